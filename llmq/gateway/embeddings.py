"""``POST /v1/embeddings``: a job of the same queue as chat, for an embedding model.

``gateway.submission`` checks and admits it as chat's (the model's readiness and kind, the
key's limits, counting the inputs' tokens, the model's bound, the same refusals). It is
never streamed: its worker writes the client's whole answer (``shared.embeddings``),
which is sent as it is.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from llmq.gateway.auth import TenantDep
from llmq.gateway.body import parse_embedding_body
from llmq.gateway.relay import Timings
from llmq.gateway.state import StateDep
from llmq.gateway.submission import arrived, first_event, submit
from llmq.shared import embeddings
from llmq.shared.errors import ClientClosedRequest, InvalidRequest
from llmq.shared.protocol import ModelKind

router = APIRouter()


@router.post("/v1/embeddings", response_model=None)
async def create_embeddings(request: Request, st: StateDep, tenant: TenantDep) -> Response:
    """OpenAI's embeddings: ``input`` a string, strings, token ids or arrays of them;
    ``encoding_format`` float or base64; ``dimensions`` on a model that takes it."""
    timings = Timings()
    req = parse_embedding_body(await request.body(), st.settings)
    arrived(st, tenant.name)
    req.model = st.registry.resolve(req.model)
    card = st.registry.card(req.model)
    if req.dimensions is not None and card is not None and card.kind is ModelKind.EMBED:
        if not card.matryoshka:
            raise InvalidRequest(
                f"`{req.model}` makes vectors of one length ({card.dimensions or 'fixed'}): "
                "it does not take `dimensions`",
                param="dimensions",
            )
        if card.dimensions and req.dimensions > card.dimensions:
            raise InvalidRequest(
                f"dimensions is at most {card.dimensions} for `{req.model}`", param="dimensions"
            )
    spec = embeddings.to_job_spec(
        req, embeddings.new_job_id(), tenant=tenant.name, band=tenant.band, tpm=tenant.tpm
    )
    relay, _ = await submit(st, request, spec, None, tenant, timings)
    try:
        first = await first_event(request, relay)
    except ClientClosedRequest:
        return Response(status_code=499)
    await relay.close(client_gone=False)  # the answer is in: nothing left to cancel
    relay.account(embeddings.usage_of(first.data))
    return Response(first.data, media_type="application/json")
