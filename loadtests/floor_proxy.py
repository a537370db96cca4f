"""The floor: a bare pass-through proxy (Starlette + aiohttp, no checks), the best a Python proxy does here.

    python -m loadtests.floor_proxy --port 8001 --upstream http://127.0.0.1:9000 [--hop lean]

Same server settings as the gateway (uvicorn, uvloop, httptools, one worker, no access log).
It reads the request body, sends it upstream on one keep-alive aiohttp session, and relays
status, headers and body (a body of known length in one piece, a stream such as SSE chunk by
chunk). Nothing else: no user header, no block check, no moderation, no logs.

`--hop session` (the default, the floor of issue 6) calls `session.request`, as a bare proxy
naturally would. `--hop lean` makes the call the gateway's way (`gateway.transport.LeanTransport`,
aiohttp's request and connector steps without `ClientSession._request`), so that the gateway
can also be compared with a floor whose upstream hop is as lean as its own: that difference is
what the gateway's checks, logs and metrics cost.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import uvicorn
from multidict import CIMultiDict
from starlette.applications import Starlette
from starlette.routing import Mount
from yarl import URL

from gateway.transport import LeanTransport, Transport
from middleware.asgi import Receive, Scope, Send

_DROP = frozenset({b"host", b"content-length", b"connection", b"transfer-encoding", b"keep-alive"})


class _Opened:
    """`async with` over a response being opened, as `session.request(...)` gives one."""

    def __init__(self, opening: Awaitable[aiohttp.ClientResponse]) -> None:
        self._opening = opening

    async def __aenter__(self) -> aiohttp.ClientResponse:
        self._response = await self._opening
        return self._response

    async def __aexit__(self, *exc: object) -> None:
        self._response.release()
        await self._response.wait_for_close()


def build(upstream: str, hop: str = "session") -> Starlette:
    sessions: list[aiohttp.ClientSession] = []
    transports: list[Transport] = []
    timeouts = aiohttp.ClientTimeout(total=None, sock_connect=30)
    urls: dict[str, URL] = {}

    def lean(method: str, path: str, body: bytes, headers: dict[str, str]) -> Awaitable[aiohttp.ClientResponse]:
        url = urls.get(path)
        if url is None:
            url = URL(upstream + path)
            if len(urls) < 1024:
                urls[path] = url
        return transports[0].send(method, url, CIMultiDict(headers), body)

    async def proxy(scope: Scope, receive: Receive, send: Send) -> None:
        chunks = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"] if k not in _DROP}
        body = b"".join(chunks)
        if hop == "lean":
            call: Any = _Opened(lean(scope["method"], scope["path"], body, headers))
        else:
            call = sessions[0].request(scope["method"], upstream + scope["path"], data=body, headers=headers)
        async with call as response:
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
        if hop == "lean":
            transports.append(LeanTransport(limit=1000, timeouts=timeouts))
            sessions.append(transports[0].session)
        else:
            connector = aiohttp.TCPConnector(limit=1000, limit_per_host=0, keepalive_timeout=15)
            sessions.append(aiohttp.ClientSession(connector=connector, auto_decompress=False))
        yield
        await sessions[0].close()

    return Starlette(routes=[Mount("/", app=proxy)], lifespan=lifespan)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.floor_proxy")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL without /v1, e.g. http://127.0.0.1:9000")
    parser.add_argument("--hop", choices=["session", "lean"], default="session", help="how the upstream call is made")
    args = parser.parse_args()
    uvicorn.run(
        build(args.upstream.rstrip("/"), args.hop),
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
