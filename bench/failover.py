"""Redis failovers under load: how long the service is down, and what is lost.

    python -m bench.failover [--rounds 10] [--lanes 4] [--acks 0,1]

For each REDIS_MIN_REPLICAS_ACK in ``--acks``: a Sentinel-managed Redis on loopback
(``bench.ha``: a primary, a replica, three sentinels, ``down-after-milliseconds`` 2000), the
engine simulator, one worker and one gateway that find the primary through the sentinels.
Each round: ``--lanes`` lanes stream requests; 1.5 s in, the primary is killed (-9); the
lanes go on until 1 s after the first 200 sent after the kill; the killed server is
restarted as soon as a new primary is elected (the sentinels make it a replica), and the
next round waits for every replica to be in sync. With REDIS_MIN_REPLICAS_ACK=1 the
topology has two replicas (the new primary keeps one). Nothing else is restarted: a
process that exits is a failure.

A probe lane sends a request every 100 ms (5 s client timeout). Per round: recovery (kill
-> the first probe sent after it answered 200 to its end: goal < 10 s), the answers during
the outage by outcome, and jobs lost: requests that ended in ``queue_timeout`` (their job
vanished with the primary), or whose stream ended without ``[DONE]`` or an error
(silence). Goal with REDIS_MIN_REPLICAS_ACK=1: 0 lost.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from collections import Counter
from pathlib import Path

from bench.ha import Answer, HaRedis, load_through_failover, start_ha_redis
from bench.processes import Proc, service_env, start_gateway, start_sim, start_worker, wait_for


def lost(answers: list[Answer]) -> list[Answer]:
    """Load requests whose job vanished (queue_timeout) or that were left in silence."""
    return [
        a
        for a in answers
        if not a.probe
        and (a.code == "queue_timeout" or (a.status == 200 and not a.done and not a.code))
    ]


def recovery_s(answers: list[Answer]) -> float:
    """Kill → the first probe sent after it that is answered 200 to its end."""
    ok = [a.sent + a.took for a in answers if a.probe and a.sent > 0 and a.status == 200
          and a.done and not a.code]  # fmt: skip
    return min(ok, default=float("nan"))


def run_mode(acks: int, rounds: int, lanes: int) -> list[tuple[float, int, Counter[str]]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-failover-") as tmp:
        logdir = Path(tmp)
        # Two replicas when a replica must acknowledge: after a failover the new primary
        # still has one (with one, admissions wait for the old primary to come back).
        # failover-timeout 3 s: sentinels refuse a new failover of the same name within
        # twice it, which would time the round, not the service.
        ha: HaRedis = start_ha_redis(logdir, replicas=2 if acks else 1, failover_timeout_ms=3000)
        procs: list[Proc] = []
        try:
            sim = start_sim(logdir, "--ttft-ms", "20", "--itl-ms", "5")
            procs.append(sim)
            settings = {"redis_sentinels": ha.sentinels_setting, "redis_min_replicas_ack": acks,
                        "queue_timeout_s": 15, "heartbeat_interval_s": 0.5,
                        "log_level": "WARNING"}  # fmt: skip
            env = service_env("redis://127.0.0.1:1/0", sim.url, **settings)
            worker = start_worker(logdir, env)
            gw = start_gateway(logdir, env)
            procs += [worker, gw]
            for n in range(1, rounds + 1):
                answers, _ = asyncio.run(
                    load_through_failover(
                        gw, ha, lanes=lanes, after_s=1.0, bound_s=90, probe=True, rejoin=True
                    )
                )
                ha.wait_ready(within=60)
                outcomes = Counter(
                    f"{a.status} {a.code or 'ok'}" for a in answers if a.sent > 0 and not a.probe
                )
                gone = lost(answers)
                row = (recovery_s(answers), len(gone), outcomes)
                rows.append(row)
                print(f"  round {n:2}: recovery {row[0]:5.2f} s, lost {row[1]}, after the kill: "
                      + ", ".join(f"{k} x{v}" for k, v in sorted(outcomes.items())))  # fmt: skip
                for a in gone:
                    print(f"    lost: sent {a.sent:+.2f} s after the kill, answered after "
                          f"{a.took:.2f} s: {a.status} {a.code or '(no error)'}")  # fmt: skip
                for p in (worker, gw):
                    if not p.alive():
                        raise SystemExit(f"{p.name} exited:\n{p.output()[-2000:]}")
            wait_for(lambda: worker.alive() and gw.alive(), 1, "processes alive")
        finally:
            for p in reversed(procs):
                p.kill()
            ha.close()
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--lanes", type=int, default=4)
    ap.add_argument("--acks", default="0,1", help="REDIS_MIN_REPLICAS_ACK values to run")
    a = ap.parse_args(argv)
    summary = []
    for acks in (int(x) for x in a.acks.split(",")):
        print(f"\nREDIS_MIN_REPLICAS_ACK={acks}: {a.rounds} failovers, {a.lanes} lanes")
        rows = run_mode(acks, a.rounds, a.lanes)
        rec = [r[0] for r in rows]
        summary.append((acks, rec, sum(r[1] for r in rows)))
    print("\nsummary (recovery = kill -> first 200 of a request sent after it)")
    for acks, rec, lost_total in summary:
        print(f"  acks={acks}: recovery median {statistics.median(rec):.2f} s, max {max(rec):.2f} s"
              f" (goal < 10 s); jobs lost {lost_total}"
              f"{' (goal 0)' if acks else ''}")  # fmt: skip


if __name__ == "__main__":
    main()
