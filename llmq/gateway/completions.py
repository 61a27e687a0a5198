"""``POST /v1/completions``: legacy text completions, jobs of the same queue as chat.

``gateway.submission`` checks and admits them as chat's (the model's readiness and kind,
the key's limits, the model's bound, the same refusals); the answer is a chat
completion's (``JobRelay``): SSE ``text_completion`` chunks and ``[DONE]``, or one JSON
object.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from llmq.gateway.auth import TenantDep
from llmq.gateway.body import parse_completion_body
from llmq.gateway.relay import Timings
from llmq.gateway.state import StateDep
from llmq.gateway.submission import arrived, first_event, submit
from llmq.shared import completions
from llmq.shared.chat import band_for
from llmq.shared.errors import ClientClosedRequest

router = APIRouter()


@router.post("/v1/completions", response_model=None)
async def create_completion(request: Request, st: StateDep, tenant: TenantDep) -> Response:
    """OpenAI's legacy completions: ``prompt`` (a string, strings, token ids), streamed or
    not; ``echo``, ``logprobs``, ``suffix``, ``best_of`` go to the engine as sent."""
    timings = Timings()
    req = parse_completion_body(await request.body(), st.settings)
    arrived(st, tenant.name)
    req.model = st.registry.resolve(req.model)  # MODEL_ALIASES: the served name
    spec = completions.to_job_spec(
        req, completions.new_job_id(), tenant=tenant.name,
        band=band_for(req.service_tier, tenant.band), tpm=tenant.tpm,
    )  # fmt: skip
    relay, _ = await submit(st, request, spec, req, tenant, timings)
    try:
        first = await first_event(request, relay)
    except ClientClosedRequest:
        return Response(status_code=499)
    return await relay.respond(first)
