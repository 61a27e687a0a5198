"""Fuzzing the chat route of a real gateway (worker + simulator behind it): whatever the body,
the answer is never a 5xx, and every error is OpenAI-shaped. Bounded: 150 bodies."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.stack import Proc, Stack

pytestmark = pytest.mark.integration

FLOATS = st.floats(allow_nan=False, allow_infinity=False)  # what JSON can carry
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | FLOATS | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
FIELDS = st.sampled_from(
    ["max_tokens", "n", "temperature", "top_p", "stop", "top_k", "logprobs", "top_logprobs",
     "seed", "stream_options", "service_tier", "tools", "response_format", "kv_transfer_params",
     "chat_template", "priority", "min_tokens", "x"]
)  # fmt: skip
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "wizard"])},
    optional={"content": st.one_of(st.text(max_size=50), JSON)},
)
BODY = st.fixed_dictionaries(
    {
        "model": st.one_of(st.just("sim-model"), st.text(max_size=10), JSON),
        "messages": st.one_of(st.lists(MESSAGE, max_size=3), JSON),
    },
    optional={"stream": st.booleans()},
).flatmap(
    lambda b: st.dictionaries(FIELDS, st.one_of(JSON, st.integers(-5, 10**6)), max_size=3).map(
        lambda extra: {**b, **extra}
    )
)


@pytest.fixture(scope="module")
def fuzz_gateway(redis_server: Proc, sim: Proc, logdir: Any) -> Iterator[Proc]:
    stack = Stack(f"redis://127.0.0.1:{redis_server.port}/0", sim.url, logdir)
    stack.worker(max_active=4)
    yield stack.gateway(queue_timeout_s=5, request_timeout_s=10)
    stack.close()


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same 150 bodies on every run: a finding reproduces, CI never flakes
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=BODY)
def test_no_body_gets_a_5xx_and_every_error_is_openai_shaped(
    fuzz_gateway: Proc, body: dict[str, Any]
) -> None:
    resp = httpx.post(fuzz_gateway.url + "/v1/chat/completions", json=body, timeout=30)
    assert resp.status_code < 500, (body, resp.text)
    if resp.status_code >= 400:
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, resp.text
