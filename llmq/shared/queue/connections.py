"""Connections to Redis: the one place a process builds them (gateway, worker, CLIs).

Without REDIS_SENTINELS a pool connects to REDIS_URL. With it, a redis-py
``SentinelConnectionPool`` asks the sentinels for the primary of REDIS_SENTINEL_MASTER on
every new connection, and a connection that finds the server demoted (a READONLY reply)
is dropped: after a failover, the next command (after the error that the outage costs)
reaches the new primary, with no restart. REDIS_URL's database number and the ACL login
(REDIS_USERNAME/REDIS_PASSWORD) apply either way. What else a failover asks of each
process: ``queue.failover``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

from llmq.shared.settings import Settings


def _db(url: str) -> int:
    path = urlparse(url).path.strip("/")
    return int(path) if path.isdigit() else 0


def redis_pool(settings: Settings, *, timeout: float | None = None) -> ConnectionPool:
    """A pool of connections to the primary. ``timeout``: each command's bound (None: no
    bound, for a pub/sub connection whose reads wait on purpose); connecting is always
    bounded by REDIS_TIMEOUT_S."""
    kwargs: dict[str, Any] = {
        "socket_connect_timeout": settings.redis_timeout_s,
        "socket_keepalive": True,
        **settings.redis_auth(),
    }
    if timeout is not None:
        kwargs["socket_timeout"] = timeout
    addresses = settings.sentinel_addresses()
    if not addresses:
        return ConnectionPool.from_url(settings.redis_url, **kwargs)
    secret = settings.redis_sentinel_password
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        addresses,
        sentinel_kwargs={
            "socket_timeout": settings.redis_timeout_s,
            "socket_connect_timeout": settings.redis_timeout_s,
            **({"password": secret.get_secret_value()} if secret and len(secret) else {}),
        },
    )
    return SentinelConnectionPool(  # type: ignore[no-untyped-call]
        settings.redis_sentinel_master,
        sentinel,
        is_master=True,
        db=_db(settings.redis_url),
        **kwargs,
    )


def redis_client(settings: Settings, *, timeout: float | None = None) -> Redis:
    """A client of the primary, owning its pool (``redis_pool``)."""
    client: Redis = Redis.from_pool(redis_pool(settings, timeout=timeout))
    return client
