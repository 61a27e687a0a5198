"""Operator CLI for API keys (console script ``llmq-keys``; or ``python -m llmq.cli.llmq_keys``).

    llmq-keys create NAME [--max-concurrent N] [--rpm N] [--tpm N] [--priority high|normal|low]
                          [--ttft-objective-ms MS]
    llmq-keys list
    llmq-keys show NAME
    llmq-keys update NAME [--max-concurrent N] [--rpm N] [--tpm N] [--priority ...]
    llmq-keys revoke NAME
    llmq-keys payload-key [--ids]

``create`` prints the key's settings, then its secret alone on the last line of stdout
(``SECRET=$(llmq-keys create app | tail -n1)``); the secret is shown this once and never
stored. A limit of 0 means unlimited. Reads REDIS_URL like the services.

``payload-key`` prints a new key for PAYLOAD_KEYS (nothing is stored); with ``--ids``, the
ids of the keys PAYLOAD_KEYS holds (the sealing one first), never the keys.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from llmq.shared import sealing
from llmq.shared.protocol import ApiKey, Band, KeyLimits
from llmq.shared.queue.apikeys import KeyExists, KeyNotFound, KeyStore
from llmq.shared.queue.connections import redis_client
from llmq.shared.settings import load_settings


def _limit_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-concurrent", type=int, metavar="N", help="jobs queued + running")
    p.add_argument("--rpm", type=int, metavar="N", help="requests per minute")
    p.add_argument("--tpm", type=int, metavar="N", help="tokens (prompt + completion) per minute")
    p.add_argument("--priority", choices=[b.value for b in Band])
    p.add_argument(
        "--ttft-objective-ms",
        type=int,
        metavar="MS",
        help="its requests' default time-to-first-token objective (0: none)",
    )


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llmq-keys", description="Manage llmq API keys.")
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("create", "update"):
        p = sub.add_parser(name)
        p.add_argument("name")
        _limit_flags(p)
    sub.add_parser("list")
    for name in ("show", "revoke"):
        sub.add_parser(name).add_argument("name")
    payload = sub.add_parser("payload-key", help="a new PAYLOAD_KEYS key (or --ids)")
    payload.add_argument("--ids", action="store_true", help="the ids of PAYLOAD_KEYS' keys")
    return ap


def payload_key(a: argparse.Namespace) -> int:
    if not a.ids:
        print(sealing.new_key())
        return 0
    settings = load_settings()
    if not settings.payload_key_list():
        print("llmq-keys: PAYLOAD_KEYS holds no keys", file=sys.stderr)
        return 1
    print(" ".join(settings.sealer().key_ids))
    return 0


def describe(key: ApiKey) -> str:
    def limit(v: int) -> str:
        return str(v) if v else "unlimited"

    return (
        f"{key.name}: priority={key.priority.value} max_concurrent={limit(key.max_concurrent)} "
        f"rpm={limit(key.rpm)} tpm={limit(key.tpm)} "
        f"ttft_objective_ms={key.ttft_objective_ms or 'none'}"
    )


def _limits(a: argparse.Namespace) -> KeyLimits:
    return KeyLimits(
        max_concurrent=a.max_concurrent,
        rpm=a.rpm,
        tpm=a.tpm,
        priority=Band(a.priority) if a.priority else None,
        ttft_objective_ms=a.ttft_objective_ms,
    )


async def run(a: argparse.Namespace, store: KeyStore) -> int:
    if a.command == "create":
        key, secret = await store.create(a.name, _limits(a))
        print(describe(key))
        print("secret (shown once, store it now):", file=sys.stderr)
        print(secret)
    elif a.command == "update":
        print(describe(await store.update(a.name, _limits(a))))
    elif a.command == "list":
        for key in await store.list():
            print(describe(key))
    elif a.command == "show":
        print(describe(await store.get(a.name)))
    elif a.command == "revoke":
        await store.revoke(a.name)
        print(f"{a.name}: revoked")
    return 0


async def _main(a: argparse.Namespace) -> int:
    redis = redis_client(load_settings())  # REDIS_URL or the sentinels' primary, the login
    try:
        return await run(a, KeyStore(redis))
    except KeyExists as exc:
        print(f"llmq-keys: a key named {exc} exists already", file=sys.stderr)
        return 1
    except KeyNotFound as exc:
        print(f"llmq-keys: no key named {exc}", file=sys.stderr)
        return 1
    finally:
        await redis.aclose()


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    if a.command == "payload-key":  # no Redis
        sys.exit(payload_key(a))
    sys.exit(asyncio.run(_main(a)))


if __name__ == "__main__":
    main()
