"""Pins on the private members of the libraries the service extends at their seams.

Three libraries are extended past their public API: arq's worker loop
(``worker/arq_worker.py``), uvicorn's httptools protocol (``gateway/http.py``) and server
(``gateway/server.py``), and sse-starlette's response and shutdown hook
(``gateway/event_stream.py``). Each of those
modules lists, in a ``*_SEAM`` dict, every member it overrides or relies on: its signature
and, where behaviour matters, a SHA-256 of the library's source. ``seam_problems`` compares
a pin set with the installed library. At start-up the services refuse to run on a missing
member or a changed signature (``refuse_on``); the unit tests (the tripwires) also compare
the hashes, so an upgrade fails loudly and names what to review. ``pyproject.toml`` bounds
each of these libraries from above.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Pin:
    """One library member relied on."""

    signature: str | None = None  # str(inspect.signature(member)); None for plain attributes
    source_sha256: str | None = None  # of inspect.getsource(member): behaviour we depend on
    why: str = ""


def source_sha256(member: Any) -> str:
    return hashlib.sha256(inspect.getsource(member).encode()).hexdigest()


def seam_problems(
    owner: Any,
    pins: dict[str, Pin],
    *,
    library: str,
    instance: object | None = None,
    check_source: bool = True,
) -> list[str]:
    """What no longer matches between ``pins`` and ``owner`` (a class or a module).

    Plain attributes (no signature) are looked up on ``instance`` when one is given (they
    are set in ``__init__``); a pin whose name is dotted (``Class.member``) is looked up on
    that class of ``owner``."""
    problems = []
    for name, pin in pins.items():
        if pin.signature is None and pin.source_sha256 is None:
            if instance is not None and not hasattr(instance, name):
                problems.append(f"attribute {name!r} is gone")
            continue
        member = _member(owner, name)
        if member is None:
            problems.append(f"method {name!r} is gone ({pin.why})")
            continue
        # (A class, pinned by its source alone, has no signature to compare.)
        signature = None if pin.signature is None else str(inspect.signature(member))
        if pin.signature is not None and signature != pin.signature:
            problems.append(f"{name}{signature} != pinned {pin.signature}")
        elif check_source and pin.source_sha256 and source_sha256(member) != pin.source_sha256:
            problems.append(f"{library}'s {name} changed ({pin.why}): review, then re-pin its hash")
    return problems


def _member(owner: Any, name: str) -> Any:
    for part in name.split("."):
        owner = inspect.getattr_static(owner, part, None)
        if owner is None:
            return None
    if isinstance(owner, staticmethod | classmethod):
        return owner.__func__
    return owner


def refuse_on(problems: list[str], library: str) -> None:
    """Start-up: exit naming what changed, rather than run on a library this was not built
    against."""
    if problems:
        raise SystemExit(
            f"the installed {library} does not match what llmq was built against:\n  "
            + "\n  ".join(problems)
        )
