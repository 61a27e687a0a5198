"""The uvicorn seams: a tripwire on every member the gateway overrides or relies on (as
tests/unit/worker/test_arq_worker.py is for arq)."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import uvicorn
from uvicorn.protocols.http import httptools_impl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from llmq.gateway import http, server
from llmq.gateway.http import UVICORN_SEAM, GuardedHttpProtocol
from llmq.gateway.server import UVICORN_SERVER_SEAM, DrainingServer
from llmq.shared.seams import seam_problems
from tests.support.stack import ROOT


def test_installed_uvicorn_matches_every_pin() -> None:
    assert http.seam_problems() == []
    assert server.seam_problems() == []


def test_every_override_is_pinned() -> None:
    protocol = {
        f"HttpToolsProtocol.{name}"
        for name, member in vars(GuardedHttpProtocol).items()
        if callable(member) and hasattr(HttpToolsProtocol, name)
    }
    assert protocol <= set(UVICORN_SEAM), protocol - set(UVICORN_SEAM)
    ours = {
        name
        for name, member in vars(DrainingServer).items()
        if callable(member) and hasattr(uvicorn.Server, name)
    }
    assert ours <= set(UVICORN_SERVER_SEAM), ours - set(UVICORN_SERVER_SEAM)


def test_tripwire_fires_when_uvicorn_renames_a_callback() -> None:
    members = dict(vars(HttpToolsProtocol))
    members["on_header_field"] = members.pop("on_header")
    renamed = type("HttpToolsProtocol", HttpToolsProtocol.__bases__, members)
    changed = types.SimpleNamespace(
        HttpToolsProtocol=renamed, RequestResponseCycle=httptools_impl.RequestResponseCycle
    )
    problems = seam_problems(changed, UVICORN_SEAM, library="uvicorn")
    assert problems == [
        "method 'HttpToolsProtocol.on_header' is gone "
        f"({UVICORN_SEAM['HttpToolsProtocol.on_header'].why})"
    ]


def test_tripwire_fires_when_a_pinned_body_changes() -> None:
    def on_url(self, url: bytes) -> None:  # same signature, other body
        pass

    members = dict(vars(HttpToolsProtocol))
    members["on_url"] = on_url
    changed = types.SimpleNamespace(
        HttpToolsProtocol=type("HttpToolsProtocol", HttpToolsProtocol.__bases__, members),
        RequestResponseCycle=httptools_impl.RequestResponseCycle,
    )
    problems = seam_problems(changed, UVICORN_SEAM, library="uvicorn")
    assert len(problems) == 1
    assert problems[0].startswith("uvicorn's HttpToolsProtocol.on_url changed (overridden")
    assert problems[0].endswith("review, then re-pin its hash")


def _gateway_start_with(patch: str) -> subprocess.CompletedProcess[str]:
    """``python -m llmq.gateway`` as a process, after ``patch`` changed a library."""
    code = f"{patch}\nfrom llmq.gateway.__main__ import main\nmain()"
    env = {**os.environ, "PAYLOAD_KEYS": "none"}  # past the key check, to the seams'
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env
    )


def test_the_gateway_refuses_to_start_on_a_renamed_uvicorn_member() -> None:
    patch = (
        "from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as P\n"
        "P.on_header_field = P.on_header\n"
        "del P.on_header"
    )
    done = _gateway_start_with(patch)
    assert done.returncode == 1
    assert "the installed uvicorn does not match" in done.stderr
    assert "'HttpToolsProtocol.on_header' is gone" in done.stderr
