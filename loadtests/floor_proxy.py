"""The floor: a bare pass-through proxy (Starlette + aiohttp, no checks), the best a Python proxy does here.

    python -m loadtests.floor_proxy --port 8001 --upstream http://127.0.0.1:9000

Same server settings as the gateway (uvicorn, uvloop, httptools, one worker, no access log).
It reads the request body, sends it upstream on one keep-alive aiohttp session, and relays
status, headers and body (a body of known length in one piece, a stream such as SSE chunk by
chunk). Nothing else: no user header, no block check, no moderation, no logs.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount

from middleware.asgi import Receive, Scope, Send

_DROP = frozenset({b"host", b"content-length", b"connection", b"transfer-encoding", b"keep-alive"})


def build(upstream: str) -> Starlette:
    sessions: list[aiohttp.ClientSession] = []

    async def proxy(scope: Scope, receive: Receive, send: Send) -> None:
        chunks = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"] if k not in _DROP}
        url = upstream + scope["path"]
        async with sessions[0].request(scope["method"], url, data=b"".join(chunks), headers=headers) as response:
            out = [(k.lower(), v) for k, v in response.raw_headers if k.lower() not in _DROP]
            if response.content_length is not None:
                body = await response.read()
                await send({"type": "http.response.start", "status": response.status, "headers": out})
                await send({"type": "http.response.body", "body": body})
                return
            # a stream (SSE): relay each chunk as it comes
            await send({"type": "http.response.start", "status": response.status, "headers": out})
            while chunk := await response.content.readany():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=1000, limit_per_host=0, keepalive_timeout=15)
        sessions.append(aiohttp.ClientSession(connector=connector, auto_decompress=False))
        yield
        await sessions[0].close()

    return Starlette(routes=[Mount("/", app=proxy)], lifespan=lifespan)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.floor_proxy")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL without /v1, e.g. http://127.0.0.1:9000")
    args = parser.parse_args()
    uvicorn.run(
        build(args.upstream.rstrip("/")),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        server_header=False,
        date_header=False,
    )


if __name__ == "__main__":
    main()
