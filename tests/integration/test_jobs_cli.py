"""The operator's jobs CLI (``llmq-jobs``) against a real Redis and real processes."""

from __future__ import annotations

import json
import subprocess
import threading
from typing import Any

import httpx
import pytest
import redis

from tests.support.clients import assert_drained, body, cli, release, sim_stats, wait_held
from tests.support.stack import Proc, Stack, wait_for

pytestmark = pytest.mark.integration


def jobs_cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return cli(stack, "llmq.gateway.jobs", *args)


def test_list_show_cancel_purge(stack: Stack, rdb: redis.Redis, sim: Proc) -> None:
    stack.worker(max_active=1)
    gw = stack.gateway()
    prompt = "SECRET-PROMPT-do-not-print"
    answers: dict[str, Any] = {}

    def ask(name: str, **sim_knobs: Any) -> threading.Thread:
        payload = body(stream=False, tokens=2, **sim_knobs)
        payload["messages"][0]["content"] = prompt

        def go() -> None:
            r = httpx.post(gw.url + "/v1/chat/completions", json=payload, timeout=60)
            answers[name] = r

        t = threading.Thread(target=go, daemon=True)
        t.start()
        return t

    threads = [ask("running", hold="cli")]
    wait_held(sim.url, "cli", 1)
    threads += [ask(f"waiting{i}") for i in range(3)]
    wait_for(lambda: rdb.zcard("llmq:queue") == 4, 10, "three jobs queued behind one")

    listed = jobs_cli(stack, "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert sum(" queued " in line for line in lines) == 3
    assert sum(" running " in line for line in lines) == 1
    queued_id = next(line.split()[0] for line in lines if " queued " in line)
    running_id = next(line.split()[0] for line in lines if " running " in line)

    shown = jobs_cli(stack, "show", queued_id)
    assert shown.returncode == 0, shown.stderr
    assert prompt not in shown.stdout
    info = json.loads(shown.stdout)
    assert info["state"] == "queued"
    assert info["job"]["request_bytes"] > len(prompt)
    assert json.loads(jobs_cli(stack, "show", running_id).stdout)["state"] == "running"

    cancelled = jobs_cli(stack, "cancel", queued_id)
    assert cancelled.returncode == 0, cancelled.stderr
    assert "never ran" in cancelled.stdout
    purged = jobs_cli(stack, "purge", "--queued")
    assert purged.returncode == 0, purged.stderr
    assert purged.stdout.startswith("2 queued job(s) cancelled; 0 had started")
    release(sim.url, "cli")
    for t in threads:
        t.join(30)
    codes = sorted(r.status_code for r in answers.values())
    assert codes == [200, 409, 409, 409], codes
    assert sim_stats(sim.url)["requests"] == 1
    assert jobs_cli(stack, "show", "chatcmpl-nosuchjob").returncode == 1
    assert_drained(rdb)
