"""OpenAI's cursor pages: ``{"object": "list", "data", "first_id", "last_id", "has_more"}``
(what the SDK's ``SyncCursorPage`` reads: it asks for the next page with ``after=last_id``)."""

from __future__ import annotations

from typing import Any


def page(items: list[dict[str, Any]], limit: int, *, more: bool = False) -> dict[str, Any]:
    """OpenAI's cursor page of ``items`` (read one beyond ``limit`` to know has_more, or
    say ``more`` when the caller knows there are more without building them)."""
    data = items[:limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": more or len(items) > limit,
    }
