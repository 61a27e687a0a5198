"""A real vLLM (CPU build) serving the bundled model, started once per test session.

scripts/test.sh installs the engine venv and prepares the model before pytest runs;
LLMQ_ENGINE_PYTHON and LLMQ_MODEL_DIR point elsewhere if needed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.support.stack import (
    BUNDLED_MODEL,
    E2E_ENGINE_KEY,
    E2E_MAX_MODEL_LEN,
    E2E_SECOND_NAME,
    Proc,
    Stack,
    engine_paths,
    spawn_vllm,
    stack_for,
    start_otlp_receiver,
    wait_for,
)

ENGINE_KEY = E2E_ENGINE_KEY
ENGINE_AUTH = {"Authorization": f"Bearer {ENGINE_KEY}"}


@pytest.fixture(scope="session")
def otlp(logdir: Path) -> Iterator[Proc]:
    """The OTLP receiver the session's vLLM sends its spans to (tests/e2e/test_tracing.py)."""
    proc = start_otlp_receiver(logdir)
    yield proc
    proc.kill()


@pytest.fixture(scope="session")
def vllm(logdir: Path, otlp: Proc) -> Iterator[Proc]:
    python, model = engine_paths()
    if not python.exists() or not (model / "config.json").exists():
        pytest.fail(
            f"no engine ({python}) or model ({model}): run `bash scripts/test.sh`, "
            "which installs both",
            pytrace=False,
        )
    proc = spawn_vllm(
        logdir,
        max_model_len=E2E_MAX_MODEL_LEN,
        max_num_seqs=8,
        api_key=ENGINE_KEY,
        names=f"{BUNDLED_MODEL},{E2E_SECOND_NAME}",  # a fleet of one engine, two models
        traces_to=otlp.url + "/v1/traces",  # vLLM's own spans (--otlp-traces-endpoint)
    )
    yield serving(proc, "the model")
    proc.stop(timeout=20)


def serving(proc: Proc, what: str) -> Proc:
    """``proc`` once its vLLM answers /v1/models (the test fails with its log otherwise)."""
    try:
        wait_for(
            lambda: (
                proc.alive()
                and httpx.get(proc.url + "/v1/models", headers=ENGINE_AUTH).status_code == 200
            ),
            600,
            f"vLLM to serve {what}",
        )
    except TimeoutError:
        proc.kill()
        pytest.fail(f"vLLM ({what}) did not start:\n{proc.output()[-3000:]}", pytrace=False)
    return proc


@pytest.fixture
def stack(
    redis_server: Proc, vllm: Proc, rdb: redis.Redis, logdir: Path, request: pytest.FixtureRequest
) -> Iterator[Stack]:
    with stack_for(
        request,
        f"redis://127.0.0.1:{redis_server.port}/0",
        vllm.url,
        logdir,
        worker_settings={"vllm_api_key": ENGINE_KEY},
    ) as s:
        yield s
