"""Where a request's time-to-first-token objective comes from (``submission.with_objective``)."""

from __future__ import annotations

import pytest
from starlette.requests import Request

from llmq.gateway.submission import with_objective
from llmq.gateway.tenant import Tenant
from llmq.shared.errors import InvalidRequest
from llmq.shared.protocol import Band
from llmq.shared.settings import Settings
from tests.support.records import job_spec


def request(**headers: str) -> Request:
    raw = [(k.lower().replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": raw})


SETTINGS = Settings(ttft_objective_ms={"high": 500, "normal": 3000})


def objective(tenant: Tenant, band: Band = Band.NORMAL, **headers: str) -> tuple[int, bool]:
    return with_headers(tenant, band, headers)


def with_headers(tenant: Tenant, band: Band, headers: dict[str, str]) -> tuple[int, bool]:
    spec = with_objective(job_spec("j", band=band), request(**headers), tenant, SETTINGS)
    return spec.ttft_objective_ms, spec.best_effort


def test_the_header_then_the_key_then_the_band() -> None:
    plain, keyed = Tenant("a"), Tenant("b", ttft_objective_ms=800)
    assert objective(plain, X_TTFT_Objective_Ms="250") == (250, False)
    assert objective(keyed, X_TTFT_Objective_Ms="250") == (250, False)
    assert objective(keyed) == (800, False)
    assert objective(plain) == (3000, False)
    assert objective(plain, Band.HIGH) == (500, False)
    assert objective(plain, Band.LOW) == (0, False), "no objective: as before"
    assert objective(plain, Band.LOW, X_Deadline_Policy="best-effort") == (0, False)
    assert objective(plain, X_Deadline_Policy="Best-Effort") == (3000, True)
    assert objective(plain, X_Deadline_Policy="drop") == (3000, False)


@pytest.mark.parametrize(
    "headers",
    [
        {"X_TTFT_Objective_Ms": "0"},
        {"X_TTFT_Objective_Ms": "-5"},
        {"X_TTFT_Objective_Ms": "1.5"},
        {"X_TTFT_Objective_Ms": "soon"},
        {"X_TTFT_Objective_Ms": "86400001"},
        {"X_Deadline_Policy": "whenever"},
    ],
)
def test_bad_headers_are_400s_naming_the_header(headers: dict[str, str]) -> None:
    with pytest.raises(InvalidRequest) as err:
        with_headers(Tenant("a"), Band.NORMAL, headers)
    assert err.value.param in ("x-ttft-objective-ms", "x-deadline-policy")
