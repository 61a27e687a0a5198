"""A real OTLP/HTTP trace receiver: decodes what OpenTelemetry exporters send (protobuf, as
``opentelemetry-proto`` defines it) and keeps the spans for a test or a benchmark to read.

    python -m bench.otlp_receiver --port 4318

``POST /v1/traces`` takes an ``ExportTraceServiceRequest`` (``application/x-protobuf``,
gzip or not); ``GET /spans`` answers every span received so far as JSON (``trace_id``,
``span_id``, ``parent_span_id`` in hex, ``name``, ``kind``, ``service``, ``attributes``,
``status``, ``events``, ``links``); ``POST /reset`` forgets them. What the tests of tracing
check their traces against, in place of a trace backend's UI.
"""

from __future__ import annotations

import argparse
import gzip
from typing import Any

import uvicorn
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

KINDS = {0: "unspecified", 1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}


def value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


def spans_of(request: ExportTraceServiceRequest) -> list[dict[str, Any]]:
    out = []
    for rs in request.resource_spans:
        resource = {kv.key: value(kv.value) for kv in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append({
                    "trace_id": s.trace_id.hex(),
                    "span_id": s.span_id.hex(),
                    "parent_span_id": s.parent_span_id.hex(),
                    "name": s.name,
                    "kind": KINDS.get(s.kind, str(s.kind)),
                    "service": resource.get("service.name", ""),
                    "scope": ss.scope.name,
                    "attributes": {kv.key: value(kv.value) for kv in s.attributes},
                    "status": {"code": s.status.code, "message": s.status.message},
                    "events": [{"name": e.name,
                                "attributes": {kv.key: value(kv.value) for kv in e.attributes}}
                               for e in s.events],
                    "links": [{"trace_id": link.trace_id.hex(), "span_id": link.span_id.hex()}
                              for link in s.links],
                    "start_ns": s.start_time_unix_nano,
                    "end_ns": s.end_time_unix_nano,
                })  # fmt: skip
    return out


class Receiver:
    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []

    async def traces(self, request: Request) -> Response:
        raw = await request.body()
        if request.headers.get("content-encoding") == "gzip":
            raw = gzip.decompress(raw)
        export = ExportTraceServiceRequest()
        export.ParseFromString(raw)
        self.spans.extend(spans_of(export))
        return Response(
            ExportTraceServiceResponse().SerializeToString(), media_type="application/x-protobuf"
        )

    async def get_spans(self, request: Request) -> Response:
        return JSONResponse(self.spans)

    async def reset(self, request: Request) -> Response:
        self.spans.clear()
        return JSONResponse({"ok": True})


def create_app() -> Starlette:
    r = Receiver()
    return Starlette(
        routes=[
            Route("/v1/traces", r.traces, methods=["POST"]),
            Route("/spans", r.get_spans),
            Route("/reset", r.reset, methods=["POST"]),
            Route("/health", lambda request: Response(status_code=200)),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=4318)
    a = ap.parse_args(argv)
    uvicorn.run(create_app(), host=a.host, port=a.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
