from __future__ import annotations

import re

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError

from llmq.shared.errors import (
    EngineUnavailable,
    InvalidRequest,
    QueueFull,
    QueueTimeout,
    QueueUnavailable,
    RequestTimeout,
    ServerBusy,
    ServiceError,
    UpstreamError,
    for_http_status,
)


@pytest.mark.parametrize(
    ("err", "status", "code", "retry"),
    [
        (InvalidRequest("x", param="messages"), 400, "invalid_request", None),
        (QueueFull("x"), 429, "queue_full", "1"),
        (ServerBusy("x", retry_after_s=3), 429, "server_busy", "3"),
        (EngineUnavailable("x"), 503, "engine_unavailable", "5"),
        (QueueTimeout("x"), 503, "queue_timeout", "1"),
        (RequestTimeout("x"), 504, "request_timeout", None),
    ],
)
def test_mapping(err: ServiceError, status: int, code: str, retry: str | None) -> None:
    assert err.status == status
    assert err.body()["error"]["code"] == code
    assert err.headers().get("Retry-After") == retry


def test_wire_round_trip_keeps_class_and_upstream_status() -> None:
    back = ServiceError.from_wire(QueueTimeout("late").to_wire())
    assert isinstance(back, QueueTimeout)
    assert back.message == "late"
    up = ServiceError.from_wire(
        UpstreamError(400, "too long", error_type="BadRequestError", code=400).to_wire()
    )
    assert isinstance(up, UpstreamError)
    assert up.status == 400
    assert up.body() == {
        "error": {"message": "too long", "type": "BadRequestError", "param": None, "code": "400"}
    }


def test_upstream_status_outside_errors_becomes_502() -> None:
    assert UpstreamError(200, "odd").status == 502


@pytest.mark.parametrize("status", [429, 503])
def test_engine_overload_passes_through_with_retry_after(status: int) -> None:
    assert UpstreamError(status, "busy").headers() == {"Retry-After": "1"}
    assert UpstreamError(400, "bad").headers() == {}


def test_upstream_status_is_the_status() -> None:
    err = UpstreamError(400, "too long", code=400)
    assert err.status == 400
    assert err.code == "400"
    assert err.type == "upstream_error"


def _all_subclasses(cls: type[ServiceError]) -> list[type[ServiceError]]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_all_subclasses(sub)]
    return out


# Leaves of the tree: the classes raised (Overloaded and Unavailable only group them).
LEAVES = [c for c in _all_subclasses(ServiceError) if not c.__subclasses__()]


@pytest.mark.parametrize("cls", [c for c in LEAVES if c is not UpstreamError])
def test_every_error_crosses_redis_and_every_429_503_has_retry_after(
    cls: type[ServiceError],
) -> None:
    err = cls("m", param="p")
    back = ServiceError.from_wire(err.to_wire())
    assert type(back) is cls
    assert (back.status, back.code, back.type, back.param) == (
        err.status,
        err.code,
        err.type,
        "p",
    )
    if err.status in (429, 503):
        assert err.headers()["Retry-After"].isdigit()


_TREE_LINE = re.compile(r"^(?P<indent>[ │├└─]*)(?P<name>[A-Z]\w+)\s+->\s*(?P<rest>.*)$")


def _docstring_tree() -> dict[str, tuple[str | None, str]]:
    """The tree drawn in ``shared.errors``' docstring: class name -> (parent, what follows
    its arrow), each name read as a whole word at its place in the drawing."""
    import llmq.shared.errors as module

    assert module.__doc__ is not None
    tree: dict[str, tuple[str | None, str]] = {}
    ancestors: list[tuple[int, str]] = []  # (column of the name, name), outermost first
    for line in module.__doc__.splitlines():
        m = _TREE_LINE.match(line)
        if m is None:
            continue
        column = len(m["indent"])
        while ancestors and ancestors[-1][0] >= column:
            ancestors.pop()
        tree[m["name"]] = (ancestors[-1][1] if ancestors else None, m["rest"])
        ancestors.append((column, m["name"]))
    return tree


def test_the_tree_in_the_docstring_names_every_class() -> None:
    """Every class is drawn under its own base, with its status and code; nothing else is."""
    tree = _docstring_tree()
    classes: list[type[ServiceError]] = [ServiceError, *_all_subclasses(ServiceError)]
    assert set(tree) == {cls.__name__ for cls in classes}
    for cls in classes:
        parent, rest = tree[cls.__name__]
        base = None if cls is ServiceError else cls.__bases__[0].__name__
        assert parent == base, (cls.__name__, parent, base)
        words = rest.split()
        if words and words[0].isdigit():  # the status, where the drawing gives one
            assert int(words[0]) == cls.status, cls.__name__
            words = words[1:]
        if words and cls.code is not None and words[0] not in ("+", "the"):
            assert words[0] == cls.code, cls.__name__


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, "invalid_request"),
        (404, "not_found"),
        (405, "method_not_allowed"),
        (413, "request_too_large"),
        (418, "invalid_request"),
        (500, "internal_error"),
    ],
)
def test_framework_statuses_map_into_the_tree(status: int, code: str) -> None:
    err = for_http_status(status, "x")
    assert err.status == status
    assert err.code == code


def test_queue_unavailable_tells_a_full_redis_from_an_unreachable_one() -> None:
    full = OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")
    assert "memory limit" in QueueUnavailable.because(full).message
    for exc in (RedisConnectionError("Connection refused"), None):
        assert "unreachable" in QueueUnavailable.because(exc).message
    assert QueueUnavailable.because(full).status == 503
