"""OpenAI's stored-completion surface and the Files list, called through the official SDK:
``chat.completions.list / retrieve / update / delete``, ``.messages.list`` and
``files.list``, each scoped to its API key."""

from __future__ import annotations

import io
import json
from typing import Any

import openai
import pytest
import redis

from tests.support.clients import MODEL, assert_drained, new_key
from tests.support.stack import Stack

pytestmark = pytest.mark.integration


def ask(c: openai.OpenAI, text: str, **kw: Any) -> str:
    done = c.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}],
        extra_body={"sim": {"tokens": 3}},
        **kw,
    )
    return done.id


def test_list_messages_update_and_delete_through_the_sdk(
    stack: Stack, rdb: redis.Redis, sdk: Any
) -> None:
    stack.worker()
    gw = stack.gateway(auth="keys")
    mine = sdk(gw.url, new_key(stack, "owner"))
    theirs = sdk(gw.url, new_key(stack, "other"))

    a1 = ask(mine, "first", store=True, metadata={"team": "a", "env": "dev"})
    b = ask(mine, "second", store=True, metadata={"team": "b"})
    a2 = ask(mine, "third", store=True, metadata={"team": "a"})
    ask(mine, "not stored")
    idem = mine.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "retry-safe"}],
        extra_headers={"Idempotency-Key": "k-1"},
    ).id
    ask(theirs, "another key's", store=True)
    assert_drained(rdb)

    # list: every completion GET can return (stored or Idempotency-Key), oldest first;
    # the SDK pages through them with after=<last id>.
    assert [c.id for c in mine.chat.completions.list()] == [a1, b, a2, idem]
    assert [c.id for c in mine.chat.completions.list(limit=1)] == [a1, b, a2, idem]
    desc = mine.chat.completions.list(order="desc", limit=2)
    assert [c.id for c in desc.data] == [idem, a2]
    assert desc.has_more
    assert [c.id for c in mine.chat.completions.list(metadata={"team": "a"})] == [a1, a2]
    assert [c.id for c in mine.chat.completions.list(metadata={"team": "a", "env": "dev"})] == [a1]
    assert [c.id for c in mine.chat.completions.list(model="nope")] == []
    first = mine.chat.completions.list().data[0]
    assert first.choices[0].message.content
    assert first.metadata == {"team": "a", "env": "dev"}
    assert first.usage is not None

    # messages: kept for store: true only, in order, each with an id.
    msgs = list(mine.chat.completions.messages.list(a1))
    assert [(m.role, m.content) for m in msgs] == [("system", "Be brief."), ("user", "first")]
    assert len({m.id for m in msgs}) == 2
    assert [m.content for m in mine.chat.completions.messages.list(a1, order="desc")] == [
        "first",
        "Be brief.",
    ]
    paged = mine.chat.completions.messages.list(a1, limit=1)
    assert [m.content for m in paged] == ["Be brief.", "first"]
    assert list(mine.chat.completions.messages.list(idem)) == [], "no prompt kept without store"

    # update: the metadata is replaced, and listing filters by the new one.
    updated = mine.chat.completions.update(b, metadata={"team": "a", "reviewed": "yes"})
    assert updated.metadata == {"team": "a", "reviewed": "yes"}
    assert mine.chat.completions.retrieve(b).metadata == {"team": "a", "reviewed": "yes"}
    assert [c.id for c in mine.chat.completions.list(metadata={"team": "a"})] == [a1, b, a2]

    # delete: gone from retrieve and from the list.
    assert mine.chat.completions.delete(a2).deleted
    with pytest.raises(openai.NotFoundError):
        mine.chat.completions.retrieve(a2)
    assert a2 not in [c.id for c in mine.chat.completions.list()]

    # Scoped to the key: the other key sees only its own, and none of these.
    assert len(list(theirs.chat.completions.list())) == 1
    for call in (
        lambda: theirs.chat.completions.messages.list(a1),
        lambda: theirs.chat.completions.update(a1, metadata={"x": "y"}),
    ):
        with pytest.raises(openai.NotFoundError):
            call()


def test_metadata_is_checked_at_the_edge(stack: Stack, rdb: redis.Redis, sdk: Any) -> None:
    stack.worker()
    gw = stack.gateway()
    c = sdk(gw.url, "unused")
    for bad in ({f"k{i}": "v" for i in range(17)}, {"k" * 65: "v"}, {"k": "v" * 513}):
        with pytest.raises(openai.BadRequestError):
            ask(c, "x", store=True, metadata=bad)
    assert rdb.zcard("llmq:queue") == 0


def test_files_list_by_purpose_and_page_through_the_sdk(stack: Stack, sdk: Any) -> None:
    stack.worker()
    gw = stack.gateway(auth="keys")
    mine = sdk(gw.url, new_key(stack, "files-owner"))
    theirs = sdk(gw.url, new_key(stack, "files-other"))
    line = {
        "custom_id": "q1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]},
    }
    raw = (json.dumps(line) + "\n").encode()
    ids = [mine.files.create(file=io.BytesIO(raw), purpose="batch").id for _ in range(3)]
    theirs.files.create(file=io.BytesIO(raw), purpose="batch")

    assert [f.id for f in mine.files.list()] == ids[::-1], "newest first (OpenAI's default)"
    assert [f.id for f in mine.files.list(order="asc", limit=1)] == ids
    assert [f.id for f in mine.files.list(purpose="batch")] == ids[::-1]
    assert list(mine.files.list(purpose="batch_output")) == []
    mine.files.delete(ids[1])
    assert [f.id for f in mine.files.list()] == [ids[2], ids[0]]
    assert len(list(theirs.files.list())) == 1
