"""A fake engine for the worker's unit tests: a real aiohttp server on loopback whose
answers come from a handler that returns httpx Responses (simple to write: ``content=``
bytes or an async generator for a slow stream, ``json=``...). The worker's engine client
then runs its real HTTP code."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
from aiohttp import web
from aiohttp.test_utils import TestServer

Handler = Callable[[httpx.Request], httpx.Response]


@asynccontextmanager
async def fake_engine(handler: Handler) -> AsyncIterator[str]:
    """Serve ``handler`` on a free loopback port; yields the base URL."""

    async def serve(request: web.Request) -> web.StreamResponse:
        req = httpx.Request(
            request.method, str(request.url), content=await request.read(), headers=request.headers
        )
        resp = handler(req)
        out = web.StreamResponse(
            status=resp.status_code,
            headers={"content-type": resp.headers.get("content-type", "application/json")},
        )
        await out.prepare(request)
        try:
            await out.write(resp.content)  # content= bytes, json=, text=
        except httpx.ResponseNotRead:  # content= an async generator: stream it
            async for chunk in resp.aiter_raw():
                await out.write(chunk)
        await out.write_eof()
        return out

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", serve)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()
