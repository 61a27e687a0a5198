"""OpenAI's Files and Batches API: ``/v1/files`` and ``/v1/batches`` (see shared.queue.batches
for how a batch runs). Files and batches belong to the API key that created them; any
other key gets 404, as for an unknown id.

An input file is validated whole at upload, line by line, with the same checks as a chat
request (gateway.body): a bad line is a 400 naming it, and nothing is stored.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel, Field

from llmq.gateway.auth import TenantDep
from llmq.gateway.body import parse_chat_body, parse_completion_body, parse_embedding_body
from llmq.gateway.pagination import page
from llmq.gateway.state import GatewayState, StateDep
from llmq.gateway.tenant import Tenant
from llmq.shared.errors import InvalidRequest, ModelNotFound, NotFound, ServiceError
from llmq.shared.protocol import Api
from llmq.shared.queue.batch_records import (
    BATCH_WINDOW_S,
    BatchRecord,
    BatchStatus,
    FileRecord,
)
from llmq.shared.queue.batches import new_id
from llmq.shared.responses.request import ECHO_KEY, batch_body
from llmq.shared.settings import Settings

router = APIRouter()
ENDPOINTS = tuple(api.path for api in Api)  # chat, Responses, completions, embeddings
_ONE_OF = ", ".join(f'"{e}"' for e in ENDPOINTS)


def validate_lines(raw: bytes, settings: Settings) -> tuple[list[bytes], list[str]]:
    """The file's JSONL lines, each a valid batch request, and the models they name;
    InvalidRequest naming the first bad line (1-based) otherwise."""
    lines = [line for line in raw.split(b"\n") if line.strip()]
    if not lines:
        raise InvalidRequest("the file holds no request", param="file")
    if len(lines) > settings.batch_max_lines:
        raise InvalidRequest(
            f"{len(lines)} requests; a batch holds at most {settings.batch_max_lines}",
            param="file",
        )
    seen: set[str] = set()
    models: dict[str, None] = {}
    for n, line in enumerate(lines, 1):
        try:
            custom_id, model = _check_line(line, settings, seen)
            seen.add(custom_id)
            models.setdefault(model, None)
        except ServiceError as exc:
            raise InvalidRequest(f"line {n}: {exc.message}", param="file") from None
        except Exception as exc:  # pydantic's errors, as 400s naming the line
            raise InvalidRequest(f"line {n}: {_short(exc)}", param="file") from None
    return lines, list(models)


def _check_line(line: bytes, settings: Settings, seen: set[str]) -> tuple[str, str]:
    try:
        item = json.loads(line)
    except ValueError as exc:
        raise InvalidRequest(f"not JSON ({exc})") from None
    if not isinstance(item, dict):
        raise InvalidRequest("not a JSON object")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not 0 < len(custom_id) <= 512:
        raise InvalidRequest("custom_id must be a string of 1..512 characters")
    if custom_id in seen:
        raise InvalidRequest(f"custom_id {custom_id!r} appears twice")
    if item.get("method") != "POST":
        raise InvalidRequest('method must be "POST"')
    url = item.get("url")
    if url not in ENDPOINTS:
        raise InvalidRequest(f"url must be one of {_ONE_OF}")
    body = item.get("body")
    if not isinstance(body, dict):
        raise InvalidRequest("body must be a JSON object")
    return custom_id, _line_model(url, body, settings)


def _line_model(url: str, body: dict[str, Any], settings: Settings) -> str:
    """The model a line's body names, once the body is checked as its endpoint's."""
    if url == Api.EMBEDDINGS.path:
        return parse_embedding_body(json.dumps(body).encode(), settings).model
    if url == Api.RESPONSES.path:  # checked as its job will run: the chat body it becomes
        body = batch_body(body, settings.passthrough_extra)
        body.pop(ECHO_KEY)
    raw = json.dumps(body).encode()
    req = (
        parse_completion_body(raw, settings)
        if url == Api.COMPLETIONS.path
        else parse_chat_body(raw, settings)
    )
    if req.stream:
        raise InvalidRequest("a batch request cannot stream")
    return req.model


def _short(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ()))
        return f"body.{where}: {first.get('msg')}" if where else str(first.get("msg"))
    return str(exc)[:200]


async def _owned_file(st: GatewayState, file_id: str, tenant: Tenant) -> FileRecord:
    rec = await st.batches.file(file_id)
    if rec is None or rec.tenant != tenant.name:
        raise NotFound(f"no file {file_id!r}")
    return rec


async def _owned_batch(st: GatewayState, batch_id: str, tenant: Tenant) -> BatchRecord:
    rec = await st.batches.batch(batch_id)
    if rec is None or rec.tenant != tenant.name:
        raise NotFound(f"no batch {batch_id!r}")
    return rec


@router.post("/v1/files")
async def create_file(
    st: StateDep,
    tenant: TenantDep,
    file: Annotated[UploadFile, File()],
    purpose: Annotated[str, Form()],
) -> dict[str, Any]:
    if purpose != "batch":
        raise InvalidRequest(
            'purpose must be "batch" (the only use of files here)', param="purpose"
        )
    raw = await file.read()
    lines, models = await anyio.to_thread.run_sync(validate_lines, raw, st.settings)
    name = file.filename or "input.jsonl"
    rec = await st.batches.create_file(tenant.name, purpose, name, lines, models)
    return rec.to_openai()


@router.get("/v1/files/{file_id}")
async def get_file(file_id: str, st: StateDep, tenant: TenantDep) -> dict[str, Any]:
    return (await _owned_file(st, file_id, tenant)).to_openai()


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, st: StateDep, tenant: TenantDep) -> Response:
    await _owned_file(st, file_id, tenant)
    lines = await st.batches.file_lines(file_id)
    body = b"".join(line + b"\n" for line in lines)
    return Response(body, media_type="application/jsonl")


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, st: StateDep, tenant: TenantDep) -> dict[str, Any]:
    await st.batches.delete_file(await _owned_file(st, file_id, tenant))
    return {"id": file_id, "object": "file", "deleted": True}


@router.get("/v1/files")
async def list_files(
    st: StateDep,
    tenant: TenantDep,
    purpose: str | None = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Literal["asc", "desc"] = "desc",
) -> dict[str, Any]:
    """The key's files, newest first by default (OpenAI's defaults: desc, up to 10 000)."""
    recs = await st.batches.list_files(
        tenant.name, purpose=purpose, after=after, limit=limit + 1, desc=order == "desc"
    )
    return page([r.to_openai() for r in recs], limit)


class BatchRequest(BaseModel):
    input_file_id: str = Field(min_length=1, max_length=128)
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = Field(None, max_length=16)


def _routes(st: GatewayState, source: FileRecord) -> dict[str, str]:
    """The served model of each aliased name the file's lines use (MODEL_ALIASES, fixed
    for the batch's life: workers feed lines by it); 404 for a model nobody serves."""
    routes = {}
    for model in json.loads(source.models or "[]"):
        served = st.registry.resolve(model)
        if not st.registry.known(served):
            raise ModelNotFound(
                f"The model `{model}` (named by the input file) does not exist.",
                param="input_file_id",
            )
        if served != model:
            routes[model] = served
    return routes


@router.post("/v1/batches")
async def create_batch(req: BatchRequest, st: StateDep, tenant: TenantDep) -> dict[str, Any]:
    if req.endpoint not in ENDPOINTS:
        raise InvalidRequest(f"endpoint must be one of {_ONE_OF}", param="endpoint")
    window = BATCH_WINDOW_S.get(req.completion_window)
    if window is None:
        raise InvalidRequest('completion_window must be "24h"', param="completion_window")
    source = await _owned_file(st, req.input_file_id, tenant)
    if source.purpose != "batch":
        raise InvalidRequest("the input file is not a batch input", param="input_file_id")
    routes = _routes(st, source)
    now = int(time.time())
    cap = st.settings.batch_max_inflight
    rec = BatchRecord(
        id=new_id("batch"),
        tenant=tenant.name,
        input_file_id=source.id,
        endpoint=req.endpoint,
        completion_window=req.completion_window,
        status=BatchStatus.IN_PROGRESS,  # validated at upload
        created_at=now,
        in_progress_at=now,
        expires_at=now + window,
        total=source.lines,
        max_inflight=min(cap, tenant.max_concurrent) if tenant.max_concurrent else cap,
        metadata=json.dumps(req.metadata),
        routes=json.dumps(routes),
    )
    await st.batches.create_batch(rec)
    return rec.to_openai()


@router.get("/v1/batches/{batch_id}")
async def get_batch(batch_id: str, st: StateDep, tenant: TenantDep) -> dict[str, Any]:
    return (await _owned_batch(st, batch_id, tenant)).to_openai()


@router.get("/v1/batches")
async def list_batches(
    st: StateDep,
    tenant: TenantDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    recs = await st.batches.list_batches(tenant.name, after, limit + 1)
    return page([r.to_openai() for r in recs], limit)


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, st: StateDep, tenant: TenantDep) -> dict[str, Any]:
    """Stop feeding the batch; its queued requests are taken back, running ones finish,
    then it is ``cancelled`` with the results it has (workers do this within moments)."""
    await _owned_batch(st, batch_id, tenant)
    await st.batches.end(batch_id, "cancelled")
    rec = await _owned_batch(st, batch_id, tenant)
    if rec.ending == "cancelled":  # its queued requests never run (workers finish the rest)
        await st.batches.take_back(st.store, rec)
    return rec.to_openai()
