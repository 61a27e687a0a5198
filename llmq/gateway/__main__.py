"""``python -m llmq.gateway`` (console script ``llmq-gateway``): the OpenAI API on
GATEWAY_HOST:GATEWAY_PORT."""

from __future__ import annotations

import uvicorn

from llmq.gateway import event_stream, http, server
from llmq.gateway.app import build_state, create_app
from llmq.gateway.http import guarded_protocol
from llmq.gateway.server import DrainingServer
from llmq.shared import logs, sealing, seams, supervisor, tracing
from llmq.shared.settings import load_settings, require_payload_keys


def main() -> None:
    settings = load_settings()
    require_payload_keys(settings)
    logs.configure(settings.log_level, settings.log_format)
    sealing.log_keys(settings.sealer())
    # Refuse to run on a uvicorn or sse-starlette whose overridden or relied-on members
    # changed (names and signatures; the unit tests also compare their source).
    seams.refuse_on(http.seam_problems(check_source=False), "uvicorn")
    seams.refuse_on(server.seam_problems(check_source=False), "uvicorn")
    seams.refuse_on(event_stream.seam_problems(check_source=False), "sse-starlette")
    if settings.gateway_processes > 1:
        raise SystemExit(supervisor.run_gateways(settings))
    tracing.configure("llmq-gateway")  # the standard OTEL_* variables; off without one
    sock = supervisor.inherited_socket()  # set when this process is one of several
    cap = http.connection_cap(settings, http.raise_fd_limit())
    state = build_state(settings)
    app = create_app(settings, state)
    config = uvicorn.Config(
        app,
        host=settings.gateway_host,
        port=settings.gateway_port,
        log_level=settings.log_level.lower(),
        access_log=False,  # the gateway's middleware writes the access log
        log_config=None,  # uvicorn's loggers use the service's format (LOG_FORMAT)
        loop="uvloop",
        http=guarded_protocol(settings, cap),  # httptools: head limits, room for newcomers
        lifespan="on",
        timeout_graceful_shutdown=5,
        # At the cap the protocol closes the oldest idle connection for a newcomer; when
        # every connection is in a request, the newcomer's request gets 503 at once. (The
        # slack: a closed connection leaves uvicorn's count an event-loop turn later.)
        limit_concurrency=cap + http.CAP_SLACK,
        timeout_keep_alive=5,
    )
    DrainingServer(config, state).run(sockets=[sock] if sock else None)


if __name__ == "__main__":
    main()
