"""The rest of OpenAI's stored-completion API, as the SDK calls it:

- ``GET /v1/chat/completions`` (``client.chat.completions.list``): the key's stored
  completions, filtered by ``model`` and ``metadata[k]=v``, paged with ``after``/``limit``,
  ``order`` asc (default) or desc by creation;
- ``GET /v1/chat/completions/{id}/messages`` (``.messages.list``): the request's messages,
  kept only when the client sent ``store: true`` (an Idempotency-Key alone keeps none: the
  list is empty);
- ``POST /v1/chat/completions/{id}`` (``.update``): replace its ``metadata``.

Retrieve, resume, cancel and delete are ``gateway.durable``'s. Everything is scoped to the
API key, as there: another key's completion is a 404.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict

from llmq.gateway.auth import TenantDep
from llmq.gateway.durable import assemble, owned
from llmq.gateway.pagination import page
from llmq.gateway.state import GatewayState, StateDep
from llmq.shared.chat import Metadata
from llmq.shared.errors import InvalidRequest, NotFound
from llmq.shared.protocol import StoredJob

router = APIRouter()
Limit = Annotated[int, Query(ge=1, le=100)]
Order = Literal["asc", "desc"]


def _metadata_filter(request: Request) -> dict[str, str]:
    """``metadata[k]=v`` query parameters (as the SDK encodes a dict) -> {k: v}."""
    out = {}
    for name, value in request.query_params.multi_items():
        if name.startswith("metadata[") and name.endswith("]"):
            out[name[len("metadata[") : -1]] = value
        elif name == "metadata":
            raise InvalidRequest("filter metadata as metadata[key]=value", param="metadata")
    return out


async def _matching(
    st: GatewayState,
    tenant: str,
    *,
    model: str | None,
    metadata: dict[str, str],
    after: str | None,
    want: int,
    desc: bool,
) -> list[StoredJob]:
    """Up to ``want`` of the tenant's stored records that pass the filters, after ``after``.
    Ids whose record expired are dropped from the index on the way."""
    records = st.store.records
    ids = await records.stored_ids(tenant, desc=desc)
    if after is not None:
        ids = ids[ids.index(after) + 1 :] if after in ids else []
    out: list[StoredJob] = []
    for job_id in ids:
        rec = await records.stored(job_id)
        if rec is None:
            await records.forget_stored(tenant, job_id)
            continue
        if rec.api != "chat" or (model is not None and rec.model != model):
            continue  # stored responses are listed by the Responses API, not here
        if any(rec.metadata.get(k) != v for k, v in metadata.items()):
            continue
        out.append(rec)
        if len(out) >= want:
            break
    return out


async def _completion(st: GatewayState, rec: StoredJob) -> dict[str, Any]:
    return assemble(rec, await st.store.records.read_log(rec.id))


@router.get("/v1/chat/completions")
async def list_completions(
    request: Request,
    st: StateDep,
    tenant: TenantDep,
    model: str | None = None,
    after: str | None = None,
    limit: Limit = 20,
    order: Order = "asc",
) -> dict[str, Any]:
    recs = await _matching(
        st,
        tenant.name,
        model=model,
        metadata=_metadata_filter(request),
        after=after,
        want=limit + 1,
        desc=order == "desc",
    )
    # Only the page's completions are assembled (each reads its log); the record found
    # beyond it just says there are more.
    items = [await _completion(st, r) for r in recs[:limit]]
    return page(items, limit, more=len(recs) > limit)


def _store_message(job_id: str, index: int, message: dict[str, Any]) -> dict[str, Any]:
    """One kept message in OpenAI's shape: an id, and text content as a string (its parts,
    when it had several, in ``content_parts``)."""
    out = {"id": f"{job_id}-{index}", **message}
    content = message.get("content")
    if isinstance(content, list):
        out["content_parts"] = content
        out["content"] = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    else:
        out.setdefault("content_parts", None)
    return out


@router.get("/v1/chat/completions/{job_id}/messages")
async def list_messages(
    job_id: str,
    st: StateDep,
    tenant: TenantDep,
    after: str | None = None,
    limit: Limit = 20,
    order: Order = "asc",
) -> dict[str, Any]:
    rec = await owned(st, job_id, tenant)
    kept = await st.store.records.messages(rec.id) or []
    items = [_store_message(rec.id, i, m) for i, m in enumerate(kept)]
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [m["id"] for m in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    return page(items[: limit + 1], limit)


class CompletionUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metadata: Metadata | None


@router.post("/v1/chat/completions/{job_id}")
async def update(
    job_id: str, req: CompletionUpdate, st: StateDep, tenant: TenantDep
) -> dict[str, Any]:
    """Replace a stored completion's metadata (the only field OpenAI lets one change)."""
    rec = await owned(st, job_id, tenant)
    metadata = req.metadata or {}
    if not await st.store.records.set_metadata(rec.id, metadata):
        raise NotFound(f"no stored chat completion {job_id!r} (unknown, expired or not stored)")
    return await _completion(st, rec.model_copy(update={"metadata": metadata}))
