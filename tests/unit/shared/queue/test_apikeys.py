"""API keys in Redis (fakeredis and a real redis-server): secrets never stored, lookups by
digest, updates and revocation."""

from __future__ import annotations

from typing import Any

import pytest

from llmq.shared import protocol as p
from llmq.shared.queue import names
from llmq.shared.queue.apikeys import KeyExists, KeyNotFound, KeyStore, digest


@pytest.fixture
def keystore(contract_redis: Any) -> KeyStore:
    return KeyStore(contract_redis)


async def test_create_stores_a_digest_never_the_secret(keystore: KeyStore, contract_redis) -> None:
    key, secret = await keystore.create("app", p.KeyLimits(rpm=10, priority=p.Band.HIGH))
    assert secret.startswith("sk-llmq-")
    assert len(secret) > 40
    dump = b"".join(
        [k + v for k, v in (await contract_redis.hgetall(names.api_key_record(key.digest))).items()]
    ) + b"".join((await contract_redis.hgetall(names.API_KEYS)).values())
    assert secret.encode() not in dump
    assert key.digest == digest(secret)
    found = await keystore.lookup(secret)
    assert found is not None
    assert (found.name, found.rpm, found.priority) == ("app", 10, p.Band.HIGH)
    assert await keystore.lookup(secret + "x") is None
    assert await keystore.lookup("") is None


async def test_names_are_unique_and_anonymous_is_reserved(keystore: KeyStore) -> None:
    await keystore.create("app", p.KeyLimits())
    with pytest.raises(KeyExists):
        await keystore.create("app", p.KeyLimits())
    with pytest.raises(KeyExists):
        await keystore.create(p.ANONYMOUS, p.KeyLimits())


async def test_update_keeps_what_is_not_given_and_revoke_is_final(keystore: KeyStore) -> None:
    _, secret = await keystore.create("app", p.KeyLimits(rpm=10, tpm=1000))
    updated = await keystore.update("app", p.KeyLimits(max_concurrent=2))
    assert (updated.max_concurrent, updated.rpm, updated.tpm) == (2, 10, 1000)
    assert [k.name for k in await keystore.list()] == ["app"]
    await keystore.revoke("app")
    assert await keystore.lookup(secret) is None
    with pytest.raises(KeyNotFound):
        await keystore.get("app")
    assert await keystore.list() == []
