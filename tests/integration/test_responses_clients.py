"""The clients that speak only the Responses API, run as their users run them against the
gateway: the OpenAI Agents SDK (an agent with a function tool, to its final output), the
Vercel AI SDK (``generateText`` and ``streamText`` with ``openai(model)``) and Codex CLI
(``codex exec`` with a model provider whose ``base_url`` is the gateway). The npm packages
come from ``scripts/test.sh`` (``LLMQ_NODE_CLIENTS``); a missing one fails, never skips."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from agents import (
    Agent,
    ModelSettings,
    Runner,
    RunResult,
    function_tool,
    set_default_openai_client,
    set_tracing_disabled,
)
from openai import AsyncOpenAI

from tests.support.clients import MODEL, sim_stats
from tests.support.stack import ROOT, Stack

pytestmark = pytest.mark.integration


def _node_clients() -> Path:
    folder = os.environ.get("LLMQ_NODE_CLIENTS")
    assert folder, "LLMQ_NODE_CLIENTS is not set: run the tests with scripts/test.sh"
    path = Path(folder)
    assert (path / "node_modules/.bin/codex").exists(), f"no Codex CLI under {path}"
    return path


@function_tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


def test_the_agents_sdk_runs_an_agent_with_a_tool_to_its_final_output(stack: Stack) -> None:
    """Its defaults: the Responses API through an AsyncOpenAI client. The engine calls the
    tool, the SDK runs it and sends its output back, the engine answers."""
    stack.worker()
    gw = stack.gateway()
    call = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    agent = Agent(
        name="weather",
        instructions="Use your tools.",
        model=MODEL,
        tools=[get_weather],
        model_settings=ModelSettings(extra_body={"sim": {"tool_call": call, "record": "agent"}}),
    )

    async def run() -> RunResult:
        openai_client = AsyncOpenAI(base_url=gw.url + "/v1", api_key="unused")
        set_tracing_disabled(True)
        set_default_openai_client(openai_client)
        try:
            return await Runner.run(agent, "What is the weather in Paris?")
        finally:
            await openai_client.close()

    result = asyncio.run(run())
    assert result.final_output == " ".join(f"tok{i}" for i in range(16)) + " "
    kinds = [type(item).__name__ for item in result.new_items]
    assert kinds == ["ToolCallItem", "ToolCallOutputItem", "MessageOutputItem"]
    last = sim_stats(stack.engine_url)["recorded"]["agent"]["messages"]
    assert last[-1]["role"] == "tool"
    assert last[-1]["content"] == "sunny in Paris"


def test_the_ai_sdk_generates_and_streams_text(stack: Stack, tmp_path: Path) -> None:
    stack.worker()
    gw = stack.gateway()
    clients = _node_clients()
    script = clients / "ai_sdk_test.mjs"  # beside its node_modules: how ESM finds packages
    shutil.copy(ROOT / "tests/support/ai_sdk.mjs", script)
    done = subprocess.run(
        ["node", str(script)],
        env={**os.environ, "GATEWAY_URL": gw.url, "MODEL": MODEL},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    text = " ".join(f"tok{i}" for i in range(16)) + " "
    for call in ("generate", "stream"):
        assert out[call]["text"] == text
        assert out[call]["finishReason"] == "stop"
        assert out[call]["usage"]["outputTokens"] == 16


def test_codex_cli_answers_a_prompt_with_its_defaults(stack: Stack, tmp_path: Path) -> None:
    """``codex exec`` with only a model provider set (``wire_api = "responses"``): its
    ordinary request carries a ``web_search`` tool and namespaced function tools."""
    stack.worker()
    gw = stack.gateway()
    home, work = tmp_path / "codex-home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    (home / "config.toml").write_text(
        f'model = "{MODEL}"\n'
        'model_provider = "llmq"\n'
        "[model_providers.llmq]\n"
        'name = "llmq"\n'
        f'base_url = "{gw.url}/v1"\n'
        'wire_api = "responses"\n'
        'env_key = "LLMQ_API_KEY"\n'
    )
    done = subprocess.run(
        [str(_node_clients() / "node_modules/.bin/codex"), "exec", "--skip-git-repo-check",
         "Say hello."],
        cwd=work,
        env={**os.environ, "CODEX_HOME": str(home), "LLMQ_API_KEY": "unused"},
        capture_output=True,
        text=True,
        timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == " ".join(f"tok{i}" for i in range(16))
    log = gw.output()
    assert "route=/v1/responses status=200" in log
