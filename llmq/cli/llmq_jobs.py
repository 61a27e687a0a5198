"""Operator CLI for jobs (console script ``llmq-jobs``; or ``python -m llmq.cli.llmq_jobs``).

    llmq-jobs list             by model: its queued jobs (by band, oldest first), then its
                               running ones
    llmq-jobs show ID          one job: where it stands, its settings, its stored record
    llmq-jobs cancel ID        a queued job never runs; a running one is aborted
    llmq-jobs purge --queued   cancel every job still waiting (running ones are left alone)
    llmq-jobs sealed           payloads in Redis by the key that sealed them (PAYLOAD_KEYS
                               rotation: a key may go once it seals none)

It reads the same keys as the README's ``redis-cli`` recipes, and never prints a prompt or
a completion (``show`` gives the request's size, not its text). Reads REDIS_URL like the
services.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from llmq.shared.errors import JobCancelled
from llmq.shared.queue.connections import redis_client
from llmq.shared.queue.store import Store
from llmq.shared.sealing import key_id_of
from llmq.shared.settings import load_settings

_CANCELLED_BY_OPERATOR = "cancelled by the operator"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llmq-jobs", description="Inspect and cancel llmq jobs.")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("list")
    sub.add_parser("show").add_argument("id")
    sub.add_parser("cancel").add_argument("id")
    purge = sub.add_parser("purge")
    purge.add_argument("--queued", action="store_true", required=True, help="waiting jobs")
    sub.add_parser("sealed", help="payloads in Redis by the id of the key that sealed them")
    return ap


async def sealed(store: Store, held: list[str]) -> int:
    """One line per key id: what it sealed, and whether PAYLOAD_KEYS here holds it."""
    found = await store.records.sealed_by()
    if not found:
        print("no payloads in Redis")
    for kid, kinds in sorted(found.items()):
        where = "" if kid == "plain" else ("  (held)" if kid in held else "  (NOT held here)")
        counts = " ".join(f"{kind}={kinds.get(kind, 0)}" for kind in ("jobs", "stored", "files"))
        print(f"{kid:<8}  {counts}{where}")
    return 0


def _age(ms: int) -> str:
    return f"{max(0.0, time.time() - ms / 1000):.1f}s"


def _until(ms: int) -> str:
    return f"{ms / 1000 - time.time():.1f}s"


async def list_jobs(store: Store) -> None:
    queued = await store.records.queued_jobs()
    running = await store.records.running_jobs()
    moving = await store.records.migrating_jobs()
    models = sorted({j.model for j in queued} | {r[3] for r in running} | {m[1] for m in moving})
    for model in models:
        mq = [j for j in queued if j.model == model]
        mr = [r for r in running if r[3] == model]
        mm = [m for m in moving if m[1] == model]
        more = f", {len(mm)} migrating" if mm else ""
        print(f"model {model or '?'}: {len(mq)} queued, {len(mr)} running{more}")
        for j in mq:
            print(
                f"  {j.id}  queued   band={j.band.value} key={j.tenant} "
                f"waiting={_age(j.enqueued_at_ms)} due_in={_until(j.due_ms)}"
            )
        for job_id, worker, tenant, _ in mr:
            print(f"  {job_id}  running  worker={worker} key={tenant}")
        for job_id, _, tenant, since in mm:  # handed over, waiting for a worker to resume it
            print(f"  {job_id}  migrating  key={tenant} waiting={_age(since)}")
    print(f"{len(queued)} queued, {len(running)} running", file=sys.stderr)


async def describe(store: Store, job_id: str) -> dict[str, Any] | None:
    """What an operator may see of a job: never its messages or its answer."""
    records = store.records
    spec = await records.job_spec(job_id)
    stored = await records.stored(job_id)
    outcome = await records.outcome(job_id)
    if spec is None and stored is None and outcome is None:
        return None
    out: dict[str, Any] = {"id": job_id}
    if spec is not None:
        out["state"] = "running" if await records.running(job_id) else "queued"
        out["job"] = spec.model_dump(mode="json", exclude={"body", "sealed", "body_bytes"})
        out["job"]["request_bytes"] = spec.body_bytes or len(json.dumps(spec.body))
        # Which key sealed its request (an old key may go once no job names it).
        out["job"]["sealed_with"] = key_id_of(spec.sealed) or None
    else:
        out["state"] = "ended"
    if outcome is not None:
        out["outcome"] = outcome
    if stored is not None:
        out["stored"] = stored.model_dump(mode="json", exclude={"body_digest"})
        logged, expires_in_s = await records.log_facts(job_id)
        out["stored"]["logged_events"] = logged
        out["stored"]["expires_in_s"] = round(expires_in_s)
    return out


async def cancel(store: Store, job_id: str) -> int:
    spec = await store.records.job_spec(job_id)
    if spec is None:
        print(f"llmq-jobs: {job_id} is not queued or running", file=sys.stderr)
        return 1
    never_ran = await store.jobs.cancel(spec, JobCancelled(_CANCELLED_BY_OPERATOR))
    print(f"{job_id}: " + ("cancelled (it never ran)" if never_ran else "abort requested"))
    return 0


async def purge_queued(store: Store) -> int:
    removed = running = 0
    for job in await store.records.queued_jobs():
        if await store.jobs.cancel(
            job.spec(), JobCancelled(_CANCELLED_BY_OPERATOR), queued_only=True
        ):
            removed += 1
        else:
            running += 1
    print(f"{removed} queued job(s) cancelled; {running} had started and run on")
    return 0


async def run(a: argparse.Namespace, store: Store) -> int:
    if a.command == "list":
        await list_jobs(store)
    elif a.command == "show":
        shown = await describe(store, a.id)
        if shown is None:
            print(
                f"llmq-jobs: no job {a.id} (unknown, or ended over 5 minutes ago)", file=sys.stderr
            )
            return 1
        print(json.dumps(shown, indent=2))
    elif a.command == "cancel":
        return await cancel(store, a.id)
    elif a.command == "purge":
        return await purge_queued(store)
    elif a.command == "sealed":
        return await sealed(store, store.sealer.key_ids)
    return 0


async def _main(a: argparse.Namespace) -> int:
    settings = load_settings()
    redis = redis_client(settings)
    try:
        # The key ids only (``sealed`` says which are held); nothing here opens a payload.
        return await run(a, Store(redis, settings.store_ttl_s, sealer=settings.sealer()))
    finally:
        await redis.aclose()


def main(argv: list[str] | None = None) -> None:
    sys.exit(asyncio.run(_main(parser().parse_args(argv))))


if __name__ == "__main__":
    main()
