"""``python -m llmq.worker`` (console script ``llmq-worker``): one arq worker in front of
one engine (VLLM_URL)."""

from __future__ import annotations

import asyncio

from llmq.shared import logs, sealing, supervisor, tracing
from llmq.shared.settings import load_settings, require_payload_keys
from llmq.worker.app import build_worker, serve_metrics


def main() -> None:
    settings = load_settings()
    require_payload_keys(settings)
    logs.configure(settings.log_level, settings.log_format)
    sealing.log_keys(settings.sealer())
    if settings.worker_processes > 1:
        raise SystemExit(supervisor.run_workers(settings))
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        pass
    asyncio.set_event_loop(asyncio.new_event_loop())
    tracing.configure("llmq-worker")  # the standard OTEL_* variables; off without one
    worker = build_worker(settings)
    serve_metrics(worker, settings.worker_metrics_port, settings.worker_metrics_host)
    worker.run()


if __name__ == "__main__":
    main()
