"""The uvicorn and sse-starlette seams: a tripwire on every member the gateway overrides or
relies on (as tests/unit/worker/test_arq_worker.py is for arq)."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import uvicorn
from sse_starlette import sse as sse_module
from uvicorn.protocols.http import httptools_impl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from llmq.gateway import event_stream, http, server
from llmq.gateway.event_stream import SSE_SEAM
from llmq.gateway.http import UVICORN_SEAM, GuardedHttpProtocol
from llmq.gateway.server import UVICORN_SERVER_SEAM, DrainingServer
from llmq.shared.seams import seam_problems
from tests.support.stack import ROOT


def test_installed_uvicorn_and_sse_starlette_match_every_pin() -> None:
    assert http.seam_problems() == []
    assert server.seam_problems() == []
    assert event_stream.seam_problems() == []


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
    # handle_exit: uvicorn's own is pinned as sse-starlette keeps it (it patches the class).
    assert ours - {"handle_exit"} <= set(UVICORN_SERVER_SEAM), ours - set(UVICORN_SERVER_SEAM)
    assert "handle_exit" in ours
    assert "AppStatus.original_handler" in SSE_SEAM


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


def test_the_gateway_refuses_to_start_on_a_renamed_sse_starlette_member() -> None:
    patch = (
        "from sse_starlette import sse\n"
        "sse._watch_for_shutdown = sse._shutdown_watcher\n"
        "del sse._shutdown_watcher"
    )
    done = _gateway_start_with(patch)
    assert done.returncode == 1
    assert "the installed sse-starlette does not match" in done.stderr
    assert "'_shutdown_watcher' is gone" in done.stderr


def test_tripwire_fires_when_sse_starlette_renames_its_stream_writer() -> None:
    members = dict(vars(sse_module.EventSourceResponse))
    members["_send_stream"] = members.pop("_stream_response")
    renamed = type("EventSourceResponse", sse_module.EventSourceResponse.__bases__, members)
    changed = types.SimpleNamespace(**{**vars(sse_module), "EventSourceResponse": renamed})
    problems = seam_problems(changed, SSE_SEAM, library="sse-starlette")
    assert problems == [
        "method 'EventSourceResponse._stream_response' is gone "
        f"({SSE_SEAM['EventSourceResponse._stream_response'].why})"
    ]
