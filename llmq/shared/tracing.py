"""OpenTelemetry traces: one trace per request, across the queue (gateway → Redis → worker →
engine).

Configured as every OpenTelemetry user expects, by the standard variables the SDK reads
itself: ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``),
``OTEL_EXPORTER_OTLP_PROTOCOL`` (``http/protobuf``, the default, or ``grpc``),
``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER`` and
``OTEL_TRACES_SAMPLER_ARG``; ``OTEL_SDK_DISABLED=true`` turns it off. Without an endpoint
nothing is configured: the API's no-op tracer makes every span below free.

Where spans come from:
  - the gateway's server span per request: the FastAPI instrumentation (which reads a
    client's ``traceparent`` / ``tracestate``), without its per-``send`` spans (a stream
    writes once per few tokens: the per-token path stays free of spans);
  - the gateway's ``<operation> <model>`` span (``gateway.submission``, GenAI semantic
    conventions): admission, the wait, the answer, its tokens;
  - the job carries that span's context in Redis (``JobSpec.trace``: W3C ``traceparent``
    and ``tracestate``), and the worker's ``process <model>`` span (messaging conventions,
    a consumer span) is its child, so one trace spans the queue;
  - the worker's engine calls: the aiohttp-client instrumentation on the engine session,
    which sends ``traceparent`` (vLLM's own span, with ``--otlp-traces-endpoint``, joins the
    trace); the worker's probes are kept out of traces (``quiet``).
Redis commands get no spans: a stream publishes per flush of a few tokens.

No prompt and no answer reaches a span unless TRACE_CONTENT is on (then the GenAI content
attributes carry them).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.utils import suppress_instrumentation

logger = logging.getLogger(__name__)

TRACER = "llmq"
_configured = False

# GenAI semantic conventions (attribute names; the operation names by API).
OPERATION = "gen_ai.operation.name"
SYSTEM = "gen_ai.provider.name"
REQUEST_MODEL = "gen_ai.request.model"
REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
REQUEST_STREAM = "gen_ai.request.stream"
RESPONSE_ID = "gen_ai.response.id"
RESPONSE_MODEL = "gen_ai.response.model"
FINISH_REASONS = "gen_ai.response.finish_reasons"
INPUT_TOKENS = "gen_ai.usage.input_tokens"
OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
TIME_TO_FIRST_CHUNK = "gen_ai.response.time_to_first_chunk"
INPUT_MESSAGES = "gen_ai.input.messages"  # content: only with TRACE_CONTENT
OUTPUT_MESSAGES = "gen_ai.output.messages"
ERROR_TYPE = "error.type"


def endpoint() -> str:
    """The OTLP endpoint the standard variables name ("" when tracing is off)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return ""
    return os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT", ""
    )


def configure(service: str) -> bool:
    """Install the SDK's tracer provider with a batching OTLP exporter, once per process,
    when an endpoint is set; True when tracing is on. ``service``: the service name unless
    OTEL_SERVICE_NAME says otherwise."""
    global _configured
    if _configured:
        return True
    if not endpoint():
        return False
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # Resource.create reads OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME (which wins);
    # TracerProvider reads OTEL_TRACES_SAMPLER(_ARG); the exporters their endpoint.
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service}
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(_exporter()))
    trace.set_tracer_provider(provider)
    _configured = True
    logger.info("tracing on: OTLP to %s", endpoint())
    return True


def _exporter() -> Any:
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )

    return HttpExporter()


def shutdown() -> None:
    """Export what is still buffered (a process that ends)."""
    provider = trace.get_tracer_provider()
    flush = getattr(provider, "shutdown", None)
    if callable(flush):
        flush()


def enabled() -> bool:
    return _configured


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER)


def carrier(span: trace.Span | None = None) -> dict[str, str]:
    """The W3C trace context (``traceparent``, ``tracestate``) of ``span`` (else of the
    current context), for a job to carry across the queue; {} when nothing records."""
    if not _configured:
        return {}
    ctx = trace.set_span_in_context(span) if span is not None else None
    out: dict[str, str] = {}
    propagate.inject(out, context=ctx)
    return out


def context_of(carried: Mapping[str, str]) -> otel_context.Context | None:
    """The context a job carried (None: it carried none)."""
    if not carried:
        return None
    return propagate.extract(dict(carried))


def exemplar() -> dict[str, str] | None:
    """A histogram exemplar naming the current trace (prometheus-client's OpenMetrics
    exemplars: a dashboard's slow bucket opens its trace); None when nothing records."""
    return exemplar_of(trace.get_current_span()) if _configured else None


def exemplar_of(span: trace.Span | None) -> dict[str, str] | None:
    """The exemplar of ``span``'s trace (None: tracing off, or the span not sampled)."""
    if span is None or not _configured:
        return None
    ctx = span.get_span_context()
    if not ctx.is_valid or not ctx.trace_flags.sampled:
        return None
    return {"trace_id": format(ctx.trace_id, "032x")}


def resume_span(model: str, job_id: str, carried: Mapping[str, str]) -> trace.Span:
    """A stored job followed again (a resumed stream, a retrieval): a span of the reader's
    trace, linked to the trace of the request that made the job."""
    links = []
    ctx = context_of(carried)
    if ctx is not None:
        origin = trace.get_current_span(ctx).get_span_context()
        if origin.is_valid:
            links.append(trace.Link(origin))
    return tracer().start_span(
        f"resume {model}", links=links, attributes={RESPONSE_ID: job_id, REQUEST_MODEL: model}
    )


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Instrumented calls made inside are not traced (a worker's probes of its engine:
    a trace each second per worker would drown the requests' traces)."""
    with suppress_instrumentation():
        yield
