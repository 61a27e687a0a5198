"""What a hostile body costs everyone else: small requests' latency while 7 MB bodies arrive.

    python -m bench.hostile [--big 5] [--small 40]

Starts redis-server, the engine simulator, one worker and one gateway (defaults: 8 MiB body
limit, at most 2048 messages). Measures a small non-streamed request's latency alone, then
while a client posts ``--big`` bodies of 7 MB holding 400k messages one after another (each
answered 400 at the edge). Prints p50 / max of the small requests in both runs and the
difference (goal: a 7 MB body delays a concurrent small request by at most 100 ms).

Then the connection bounds: the gateway's RSS after ``--heads`` connections each send 1 MiB
of one never-finished header (refused 431 at 32 KiB), and ``--idle`` connections opened and
left silent: how long until the gateway has closed them all (CLIENT_HEAD_TIMEOUT_S, here 2 s)
and a small request is served again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import time
from pathlib import Path

import httpx

from bench.processes import Proc, local_stack

SMALL = {
    "model": "sim-model",
    "messages": [{"role": "user", "content": "hi"}],
    "sim": {"tokens": 1, "ttft_ms": 1},
}
BIG = json.dumps({"model": "sim-model", "messages": [{"role": "user"}] * 400_000}).encode()


async def _small(client: httpx.AsyncClient, url: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        resp = await client.post(url + "/v1/chat/completions", json=SMALL)
        assert resp.status_code == 200, resp.text
        out.append(time.perf_counter() - t0)
        await asyncio.sleep(0.01)
    return out


async def _big(client: httpx.AsyncClient, url: str, n: int) -> list[int]:
    headers = {"content-type": "application/json"}
    codes = []
    for _ in range(n):
        resp = await client.post(url + "/v1/chat/completions", content=BIG, headers=headers)
        codes.append(resp.status_code)
    return codes


async def measure(url: str, big: int, small: int) -> tuple[list[float], list[float], list[int]]:
    async with httpx.AsyncClient(timeout=60) as client:
        alone = await _small(client, url, small)
        during, codes = await asyncio.gather(_small(client, url, small), _big(client, url, big))
    return alone, during, codes


def _rss_mib(proc: Proc) -> float:
    for line in Path(f"/proc/{proc.popen.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def _half_sent_header(port: int, mib: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Big: ")
    try:
        for _ in range(mib * 16):
            writer.write(b"a" * 65536)
            await writer.drain()
    except OSError:
        pass  # refused and closed while we were still sending
    answer = await reader.read(200)
    writer.close()
    return answer.split(b"\r\n", 1)[0]


async def connections(gw: Proc, heads: int, idle: int) -> None:
    before = _rss_mib(gw)
    answers = await asyncio.gather(*(_half_sent_header(gw.port, 1) for _ in range(heads)))
    print(
        f"{heads} half-sent 1 MiB headers: answered {sorted(set(answers))}, "
        f"gateway RSS {before:.0f} -> {_rss_mib(gw):.0f} MiB"
    )
    socks = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(idle)]
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=5) as client:
        statuses = []
        while time.perf_counter() - started < 30:
            resp = await client.post(gw.url + "/v1/chat/completions", json=SMALL)
            statuses.append(resp.status_code)
            if resp.status_code == 200:
                break
            await asyncio.sleep(0.1)
    served_after = time.perf_counter() - started
    closed = sum(1 for s in socks if s.recv(4096, socket.MSG_PEEK))
    for s in socks:
        s.close()
    print(
        f"{idle} idle connections: small requests got {sorted(set(statuses))}, served "
        f"{served_after:.2f} s after they opened; {closed}/{idle} were answered and closed"
    )


def _ms(values: list[float]) -> str:
    return f"p50 {statistics.median(values) * 1000:6.1f} ms  max {max(values) * 1000:6.1f} ms"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--big", type=int, default=5)
    ap.add_argument("--small", type=int, default=40)
    ap.add_argument("--heads", type=int, default=10)
    ap.add_argument("--idle", type=int, default=1100)
    a = ap.parse_args(argv)
    with local_stack("llmq-hostile-", log_level="WARNING", client_head_timeout_s=2) as stack:
        alone, during, codes = asyncio.run(measure(stack.gateway.url, a.big, a.small))
        asyncio.run(connections(stack.gateway, a.heads, a.idle))
    print(f"body of {len(BIG) / 1e6:.1f} MB, answered {sorted(set(codes))} x{len(codes)}")
    print(f"small request alone:            {_ms(alone)}")
    print(f"small request during the bodies: {_ms(during)}")
    print(
        f"added: p50 {(statistics.median(during) - statistics.median(alone)) * 1000:+.1f} ms, "
        f"max {(max(during) - statistics.median(alone)) * 1000:+.1f} ms over the alone p50"
    )


if __name__ == "__main__":
    main()
