"""Open WebUI, the UI the README documents, in a real browser against the real stack.

Open WebUI (the pinned ``open-webui`` package, installed by scripts/test.sh into
``.cache/webui-venv``) talks to the gateway with an API key, as compose's ``webui`` profile
runs it, with the settings of ``compose/open-webui.env``; Playwright drives Debian's
``chromium`` (its own browser download is not reachable here). By default Open WebUI sends
its built-in tools with ``tool_choice: "auto"`` on every chat, which vLLM refuses unless it
runs with tool calling on: this test is what proves the local run's engine flags.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from playwright.sync_api import Browser, Page, sync_playwright

from tests.support.clients import assert_drained, new_key
from tests.support.stack import ROOT, Proc, Stack, free_port, spawn, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

WEBUI_SETTINGS = ROOT / "compose" / "open-webui.env"
# What only this test adds: no login (one local user), no downloads (this machine is
# offline; compose/open-webui.env already embeds documents through the API).
TEST_ONLY = {
    "WEBUI_AUTH": "False",
    "OFFLINE_MODE": "True",
    "HF_HUB_OFFLINE": "1",
}
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CHAT_ROUTE = 'api_requests_total{method="POST",route="/v1/chat/completions"'


def compose_settings() -> dict[str, str]:
    """``KEY=value`` lines of compose/open-webui.env (what compose passes as env_file)."""
    out = {}
    for line in WEBUI_SETTINGS.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def start_open_webui(stack: Stack, gateway_url: str, api_key: str) -> Proc:
    """Open WebUI on a free port, one of the stack's processes (killed at teardown, its log
    printed if the test failed)."""
    logdir = stack.logdir
    exe = Path(os.environ.get("LLMQ_OPEN_WEBUI", ROOT / ".cache/webui-venv/bin/open-webui"))
    if not exe.exists():
        pytest.fail(f"no Open WebUI at {exe}: run `bash scripts/test.sh`, which installs it")
    data = logdir / f"open-webui-{secrets.token_hex(4)}"
    data.mkdir()
    port = free_port()
    env = {
        **compose_settings(),
        **TEST_ONLY,
        "OPENAI_API_BASE_URL": gateway_url + "/v1",
        "OPENAI_API_KEY": api_key,
        "DATA_DIR": str(data),
        "WEBUI_SECRET_KEY": secrets.token_hex(16),
    }
    proc = spawn("open-webui", [str(exe), "serve", "--host", "127.0.0.1", "--port", str(port)],
                 logdir, env, port)  # fmt: skip
    stack.procs.append(proc)
    try:
        wait_for(
            lambda: proc.alive() and httpx.get(proc.url + "/health").status_code == 200,
            240,
            "Open WebUI to start",
        )
    except TimeoutError:
        pytest.fail(f"Open WebUI did not start:\n{proc.output()[-3000:]}", pytrace=False)
    return proc


@pytest.fixture
def browser() -> Iterator[Browser]:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("no chromium: run `bash scripts/test.sh`, which installs it", pytrace=False)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        yield b
        b.close()


def metric(url: str, pattern: str) -> float:
    """The sum of the samples whose line starts with ``pattern`` on a /metrics page."""
    text = httpx.get(url + "/metrics").text
    lines = [ln for ln in text.splitlines() if ln.startswith(pattern)]
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)


def ask(page: Page, text: str) -> None:
    box = page.locator("#chat-input")
    box.click()
    box.fill(text)
    page.keyboard.press("Enter")


def answers(page: Page) -> list[str]:
    """The text of each assistant message on the page, in order."""
    return [m.inner_text() for m in page.locator("#response-content-container").all()]


def test_open_webui_answers_and_its_stop_button_cancels_the_job(
    stack: Stack, vllm: Proc, rdb: redis.Redis, browser: Browser
) -> None:
    worker_metrics = free_port()
    stack.worker(worker_metrics_port=worker_metrics)
    gw = stack.gateway(auth="keys")
    webui = start_open_webui(stack, gw.url, new_key(stack, "open-webui"))
    page = browser.new_page()
    # Open WebUI shows a new admin its release notes once, in a dialog over the page,
    # whenever its layout gets to it: dismissed whenever it is in the way of an action.
    page.add_locator_handler(page.get_by_text("Okay, Let's Go!"), lambda ok: ok.click())
    page.goto(webui.url + "/", wait_until="domcontentloaded")
    page.locator("#chat-input").wait_for(timeout=120_000)

    # The README's question, with Open WebUI's defaults (its built-in tools, tool_choice
    # "auto"): the model's answer, not vLLM's refusal, is on the page.
    ask(page, "What is the capital of France?")
    page.wait_for_function("() => document.body.innerText.includes('Paris')", timeout=180_000)
    page.get_by_role("button", name="Stop").wait_for(state="hidden", timeout=180_000)
    assert "Paris" in answers(page)[-1]
    assert "tool choice" not in page.inner_text("body")

    # A long answer, stopped from the browser while it streams: the job is cancelled and
    # its engine request aborted (the slot is free at once, not at the answer's end).
    cancelled = 'worker_jobs_total{outcome="cancelled"}'
    worker_url = f"http://127.0.0.1:{worker_metrics}"
    before = metric(worker_url, cancelled)
    # (Greedy, the bundled model writes until the context is full: ~470 tokens, ~25 s.)
    ask(page, "Write a very long story about a dragon who lives in a castle.")
    wait_for(lambda: len(answers(page)[-1].split()) >= 15, 180, "the story to stream")
    page.get_by_role("button", name="Stop").click()
    wait_for(lambda: metric(worker_url, cancelled) == before + 1, 30, "the job to be cancelled")
    wait_for(lambda: metric(vllm.url, "vllm:num_requests_running") == 0, 30, "vLLM to abort it")
    assert_drained(rdb, within=10)

    # Open WebUI's background tasks (title, tags, follow-ups) are off: the gateway saw the
    # two chats and nothing else, though both answers ended seconds ago.
    gw_metrics = f"http://127.0.0.1:{gw.metrics_port}"
    assert metric(gw_metrics, CHAT_ROUTE) == 2, httpx.get(gw_metrics + "/metrics").text
    page.close()
