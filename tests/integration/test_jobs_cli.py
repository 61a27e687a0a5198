"""The operator's jobs CLI (``llmq-jobs``) against a real Redis and real processes."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from typing import Any

import httpx
import pytest
import redis

from tests.support.clients import assert_drained, body, cli, release, sim_stats, wait_held
from tests.support.stack import Proc, Stack, wait_for

pytestmark = pytest.mark.integration


def jobs_cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return cli(stack, "llmq.cli.llmq_jobs", *args)


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
    assert len(info["job"]["sealed_with"]) == 8, "the id of the key that sealed it"
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


@pytest.mark.timeout(240)
def test_a_job_running_60s_shows_in_list_and_show_throughout(
    stack: Stack, rdb: redis.Redis, sim: Proc
) -> None:
    """Twice QUEUE_TIMEOUT_S (30 s, its payload's expiry while it waited): a running job's
    keys live as long as it runs (regression: `show` lost it after ~30 s while `list` still
    listed it)."""
    stack.worker()
    gw = stack.gateway(queue_timeout_s=30)
    answer: list[httpx.Response] = []

    def go() -> None:
        payload = body(stream=False, tokens=2, hold="long")
        answer.append(httpx.post(gw.url + "/v1/chat/completions", json=payload, timeout=120))

    t = threading.Thread(target=go, daemon=True)
    t.start()
    wait_held(sim.url, "long", 1)
    listed = jobs_cli(stack, "list").stdout
    assert listed.startswith("model sim-model: 0 queued, 1 running\n"), "grouped by model"
    job_id = next(line.split()[0] for line in listed.splitlines() if " running " in line)
    started = time.monotonic()
    checks = 0
    while time.monotonic() - started < 60:
        listed = jobs_cli(stack, "list").stdout
        assert f"{job_id}  running" in listed, listed
        shown = jobs_cli(stack, "show", job_id)
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["state"] == "running"
        assert int(rdb.pttl(f"arq:job:{job_id}")) > 0  # type: ignore[arg-type]
        checks += 1
        time.sleep(2)
    release(sim.url, "long")
    t.join(30)
    assert answer[0].status_code == 200
    assert checks >= 10
    assert_drained(rdb)
    assert rdb.exists(f"arq:job:{job_id}") == 0, "deleted when the job ended"
