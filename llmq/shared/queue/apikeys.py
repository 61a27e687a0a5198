"""API keys in Redis: create, look up, update, revoke. Secrets are never stored.

A key's secret is ``sk-llmq-`` + 32 random bytes (URL-safe base64). Redis holds, under
``llmq:apikey:<sha256 of the secret>``, the key's name, limits and priority band, so a
lookup is one HGETALL; ``llmq:apikeys`` maps names to those digests for the operator CLI.
The secret has 256 bits of entropy, so an unsalted SHA-256 is as strong as a slow hash
here (nothing to brute-force), and the digest found by lookup is compared again with
``hmac.compare_digest``. Revoking deletes the record: the next request with that key, on
any gateway, gets 401 (gateways do not cache keys).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from redis.asyncio import Redis

from llmq.shared import protocol as p
from llmq.shared.queue import names

SECRET_PREFIX = "sk-llmq-"


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


class KeyExists(Exception):
    """A key of that name exists already."""


class KeyNotFound(Exception):
    """No key of that name."""


class KeyStore:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    async def create(self, name: str, limits: p.KeyLimits) -> tuple[p.ApiKey, str]:
        """Create a key; returns it and its secret (shown once, never stored)."""
        secret = new_secret()
        key = p.ApiKey(name=name, digest=digest(secret), created_at=time.time(), **limits.fields())
        if name == p.ANONYMOUS:
            raise KeyExists(name)  # the tenant of AUTH=none
        if not await self.redis.hsetnx(names.API_KEYS, name, key.digest):  # type: ignore[misc]
            raise KeyExists(name)
        await self.redis.hset(names.api_key_record(key.digest), mapping=key.to_hash())  # type: ignore[misc]
        return key, secret

    async def lookup(self, secret: str) -> p.ApiKey | None:
        """The key whose secret this is, or None (unknown or revoked)."""
        wanted = digest(secret)
        raw = await self.redis.hgetall(names.api_key_record(wanted))  # type: ignore[misc]
        if not raw:
            return None
        key = p.ApiKey.from_hash(raw)
        return key if hmac.compare_digest(key.digest, wanted) else None

    async def get(self, name: str) -> p.ApiKey:
        found = await self.redis.hget(names.API_KEYS, name)  # type: ignore[misc]
        if found is None:
            raise KeyNotFound(name)
        raw = await self.redis.hgetall(names.api_key_record(found.decode()))  # type: ignore[misc]
        if not raw:
            raise KeyNotFound(name)
        return p.ApiKey.from_hash(raw)

    async def list(self) -> list[p.ApiKey]:
        held = await self.redis.hkeys(names.API_KEYS)  # type: ignore[misc]
        return [await self.get(n.decode()) for n in sorted(held)]

    async def update(self, name: str, limits: p.KeyLimits) -> p.ApiKey:
        key = await self.get(name)
        updated = key.model_copy(update=limits.fields())
        await self.redis.hset(  # type: ignore[misc]
            names.api_key_record(key.digest), mapping=updated.to_hash()
        )
        return updated

    async def revoke(self, name: str) -> None:
        key = await self.get(name)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(names.api_key_record(key.digest))
            pipe.hdel(names.API_KEYS, name)
            await pipe.execute()
