"""The access log: one line per request on the gateway (and per job on the worker), with
the answer's status, never a prompt or a secret; plain text or JSON lines."""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

import httpx
import pytest
import redis

from tests.support.clients import assert_drained, body, new_key
from tests.support.stack import Proc, Stack, wait_for

pytestmark = pytest.mark.integration

URL = "/v1/chat/completions"


def plain_fields(line: str) -> dict[str, str]:
    """``... llmq.access: request k=v k="v w"`` -> {k: v} (a quoted value keeps its quotes)."""
    _, _, rest = line.partition("llmq.access: request ")
    return dict(re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', rest))


def access_lines(proc: Proc, fmt: str) -> list[dict[str, Any]]:
    out = []
    for line in proc.output().splitlines():
        if fmt == "json":
            if line.startswith("{") and '"llmq.access"' in line:
                out.append(json.loads(line))
        elif "llmq.access: request " in line:
            out.append(plain_fields(line))
    return out


@pytest.mark.parametrize("fmt", ["plain", "json"])
def test_a_401_a_400_a_200_and_a_429_each_get_a_line_without_the_prompt(
    stack: Stack, rdb: redis.Redis, fmt: str
) -> None:
    worker = stack.worker(log_format=fmt)
    gw = stack.gateway(auth="keys", log_format=fmt)
    name = f"team-{fmt}"
    secret = new_key(stack, name, "--rpm", "1")
    prompt = "PROMPT-" + secrets.token_hex(8)
    good = body(stream=False, tokens=2)
    good["messages"][0]["content"] = prompt
    auth = {"Authorization": f"Bearer {secret}"}

    answers = [
        httpx.post(gw.url + URL, json=good),  # no key
        httpx.post(gw.url + URL, json={**good, "n": 0}, headers=auth),  # schema violation
        httpx.post(gw.url + URL, json=good, headers=auth),
        httpx.post(gw.url + URL, json=good, headers=auth),  # over the key's rpm
    ]
    assert [a.status_code for a in answers] == [401, 400, 200, 429]
    assert_drained(rdb)

    def lines() -> list[dict[str, Any]]:
        return [x for x in access_lines(gw, fmt) if x["route"] == URL]

    wait_for(lambda: len(lines()) == 4, 10, "four access lines")
    got = lines()
    assert [int(x["status"]) for x in got] == [401, 400, 200, 429]
    assert [x["id"] for x in got] == [a.headers["x-request-id"] for a in answers]
    assert got[2]["id"] == answers[2].json()["id"], "a completion's line carries its id"
    assert [x["key"] for x in got] == (["-"] if fmt == "plain" else [""]) + [name] * 3
    assert all(x["method"] == "POST" for x in got)
    assert int(got[2]["bytes"]) == len(answers[2].content)
    assert float(got[2]["ms"]) > 0

    wait_for(lambda: "llmq.jobs" in worker.output(), 10, "the worker's job line")
    job_line = next(ln for ln in worker.output().splitlines() if "llmq.jobs" in ln)
    assert answers[2].json()["id"] in job_line
    assert "completed" in job_line
    for proc in (gw, worker):
        assert prompt not in proc.output()
        assert secret not in proc.output()


def test_an_unknown_path_is_logged_escaped(stack: Stack) -> None:
    stack.worker()
    gw = stack.gateway()
    resp = httpx.get(gw.url + "/v1/nothing%0Aforged%20line%1B[31m")
    assert resp.status_code == 404
    # (The line is written once the answer is sent: the client may read it first.)
    wait_for(lambda: "route=unmatched" in gw.output(), 10, "the request's access line")
    line = next(ln for ln in gw.output().splitlines() if "route=unmatched" in ln)
    assert plain_fields(line)["path"] == '"/v1/nothing\\nforged line\\u001b[31m"'
    assert "\nforged line" not in gw.output()
