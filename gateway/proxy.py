"""The transparent streaming proxy: every method and path under /v1 goes to the upstream.

A pure ASGI app over one aiohttp session per worker (gateway/transport.py sends each request).
Bodies stream both ways; a client that goes away cancels the upstream call
(gateway/disconnects.py); connection failures are retried only when nothing was sent, and
repeated ones open the circuit breaker (gateway/circuit.py). Calls holding an upstream
connection are a budget (middleware/budgets.py): a bounded wait for a free connection, a share
per client address.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any, Literal

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from gateway import metrics
from gateway.circuit import Circuit, tcp_probe
from gateway.disconnects import Call, WatchList
from gateway.headers import REQUEST_DROP, response_headers
from gateway.settings import Settings
from gateway.transport import Transport, open_transport
from middleware.asgi import Message, Receive, Scope, Send
from middleware.budgets import CallBudget
from middleware.errors import GatewayError, sse_error_event
from middleware.paths import invalid_path, path_problem

_RETRY_BACKOFF = (0.05, 0.2)
# A response announcing at most this many bytes is read whole and sent in one message.
_BUFFER_LIMIT = 64 * 1024
_URL_CACHE_SIZE = 1024
# A body here has no meaning (RFC 9110 9.3.1): an upstream that read it as a request of its own
# would get one the gateway never judged.
_NO_BODY_METHODS = frozenset({"GET", "HEAD"})
# What the client is told of an upstream failure, by the phase of the call it happened in.
_TIMEOUT_MESSAGES = {
    "connect": "The upstream API did not accept a connection within {seconds:g} s.",
    "answer": "The upstream API sent nothing for {seconds:g} s.",
    "body": "The upstream API went silent for {seconds:g} s mid-answer.",
}
_DROPPED_MESSAGES = {
    "connect": "The upstream API refused the connection; try again later.",
    "answer": "The upstream API dropped the connection before answering; try again later.",
    "body": "The upstream API dropped the connection mid-answer.",
}


def _body_not_allowed(method: str) -> GatewayError:
    return GatewayError(400, "invalid_request", f"A {method} request carries no body; send it without one.")


class _BodyAborted(Exception):
    """The request body stream stopped: too large, or the client went away."""


class Upstream:
    """The ASGI app for /v1 calls: forwards every one to `settings.upstream_url`.

    It expects the scope of a mount (`root_path` ends with the mount prefix, `path` is whole).
    `start()` and `close()` belong in the lifespan; the session is per worker process.
    `lean=False` makes the upstream call through aiohttp's public API only (gateway/transport.py).
    """

    def __init__(self, settings: Settings, *, lean: bool | None = None) -> None:
        self._base = settings.upstream_url
        self._max_body = settings.max_body_bytes
        self._read_timeout = settings.read_timeout
        self._connect_timeout = settings.connect_timeout
        self._max_connections = settings.upstream_max_connections
        self._lean = settings.upstream_hop == "lean" if lean is None else lean
        drop = set(REQUEST_DROP)
        drop.add(settings.user_header_key)
        self._authorization: str | None = None
        if settings.openai_api_key is not None:
            drop.add(b"authorization")
            self._authorization = f"Bearer {settings.openai_api_key.get_secret_value()}"
        self._request_drop = frozenset(drop)
        base = URL(settings.upstream_url)
        # settings accept absolute http(s) URLs only
        assert base.host is not None
        assert base.port is not None
        self._circuit = Circuit(
            settings.circuit_failures,
            settings.circuit_cooldown,
            tcp_probe(base.host, base.port, settings.connect_timeout),
        )
        self._calls = CallBudget(
            settings.upstream_max_connections,
            wait=settings.upstream_queue_seconds,
            per_client=settings.calls_per_client,
            exempt=settings.is_trusted_proxy,
        )
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self._connect_timeout, sock_read=self._read_timeout
        )
        self._transport: Transport | None = None
        self._urls: dict[tuple[str, bytes | None, bytes], URL] = {}  # by (root path, raw path, query)
        self._watchlist = WatchList()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def circuit_open(self) -> bool:
        """True from the moment the breaker trips until a probe finds the upstream again."""
        return self._circuit.open

    @property
    def session(self) -> aiohttp.ClientSession:
        """The worker's upstream session (the detectors that call out share it)."""
        if self._transport is None:
            raise RuntimeError("Upstream.start() must run (in the lifespan) before the proxy serves calls")
        return self._transport.session

    async def start(self) -> None:
        self._transport = open_transport(limit=self._max_connections, timeouts=self._timeout, lean=self._lean)
        self._loop = asyncio.get_running_loop()

    async def close(self) -> None:
        self._watchlist.close()
        if self._transport is not None:
            await self._transport.session.close()
            self._transport = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        transport = self._transport
        loop = self._loop
        if transport is None or loop is None:
            raise RuntimeError("Upstream.start() must run (in the lifespan) before the proxy serves calls")
        task = asyncio.current_task()
        assert task is not None
        call: Call | None = None
        response: aiohttp.ClientResponse | None = None
        share: str | None = None
        holding = False
        try:
            try:
                url = self._url(scope)
                headers, content_length = self._request_headers(scope["headers"])
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                first: bytes = message.get("body", b"")
                if len(first) > self._max_body:
                    raise self._too_large()
                more = message.get("more_body", False)
                if (first or more) and scope["method"] in _NO_BODY_METHODS:
                    raise _body_not_allowed(scope["method"])
                if more:
                    call = Call(asyncio.Event(), receive, task)
                    if content_length is not None:
                        headers["Content-Length"] = content_length
                else:
                    call = Call(None, receive, task)
                if self._circuit.open:
                    await self._circuit.check()
                share = self._calls.key(scope.get("client"))
                if not self._calls.try_acquire(share):
                    await self._calls.acquire(share)
                holding = True
                self._watchlist.add(call, loop)
                started = time.perf_counter()
                response = await self._open(transport, scope["method"], url, headers, first, receive, call)
                elapsed = time.perf_counter() - started
                metrics.UPSTREAM_DURATION.observe(elapsed)
                state = scope.get("state")
                if isinstance(state, dict):
                    state["upstream_seconds"] = elapsed
                await self._relay(response, scope, send, call)
            except GatewayError as exc:
                if call is not None:
                    call.unwatch()
                if call is None or not call.disconnected:
                    await exc.send(send)
        except asyncio.CancelledError:
            # The watcher cancels this task when the client goes away: a normal end of the call.
            if call is not None and call.disconnected and task.uncancel() == 0:
                return
            raise
        finally:
            if call is not None:
                call.unwatch()
            if response is not None:
                response.close()
            if holding:
                self._calls.release(share)

    def _request_headers(self, raw: Iterable[tuple[bytes, bytes]]) -> tuple[CIMultiDict[str], str | None]:
        headers: CIMultiDict[str] = CIMultiDict()
        content_length: str | None = None
        connection: list[bytes] | None = None
        drop = self._request_drop
        for name, value in raw:
            if name in drop:
                if name == b"content-length":
                    content_length = value.decode("latin-1")
                elif name == b"connection":
                    connection = (connection or []) + value.split(b",")
                continue
            headers.add(name.decode("latin-1"), value.decode("latin-1"))
        if connection is not None:
            for token in connection:
                named = token.strip().decode("latin-1")
                if named:
                    headers.popall(named, None)
        if self._authorization is not None:
            headers["Authorization"] = self._authorization
        if content_length is not None:
            try:
                announced = int(content_length)
            except ValueError:
                announced = 0
            if announced > self._max_body:
                raise self._too_large()
        return headers, content_length

    def _too_large(self) -> GatewayError:
        return GatewayError(
            413,
            "request_too_large",
            f"The request body is larger than the gateway accepts ({self._max_body} bytes).",
        )

    def _url(self, scope: Scope) -> URL:
        """The upstream URL: the base and the client's path below the mount, exactly as sent."""
        root: str = scope.get("root_path", "")
        query: bytes = scope.get("query_string", b"")
        raw: bytes | None = scope.get("raw_path")
        key = (root, raw, query)
        url = self._urls.get(key)  # most calls go to a few targets: the work below once each
        if url is not None:
            return url
        prefix = root.encode("latin-1")
        if raw is None or not raw.startswith(prefix) or not raw.isascii():
            raise invalid_path("is not the path of a call under the gateway's /v1")
        target = raw[len(prefix) :].decode("ascii")
        problem = path_problem(target)
        if problem is not None:
            raise invalid_path(problem)
        if query:
            target += "?" + query.decode("latin-1")
        # encoded=True: the client's own percent-encoding goes upstream untouched, never re-normalised.
        url = URL(self._base + target, encoded=True)
        if len(self._urls) < _URL_CACHE_SIZE:  # paths are the client's choice: keep only so many
            self._urls[key] = url
        return url

    async def _open(
        self,
        transport: Transport,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        first: bytes,
        receive: Receive,
        call: Call,
    ) -> aiohttp.ClientResponse:
        """Send the request and return the response once its headers arrived."""
        attempt = 0
        while True:
            data: Any = self._body_stream(first, receive, call) if call.body_done is not None else first or None
            try:
                response = await transport.send(method, url, headers, data)
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                # Nothing reached the upstream: safe to send again if the body can be replayed.
                if attempt < len(_RETRY_BACKOFF) and not call.started:
                    metrics.UPSTREAM_RETRIES.inc()
                    await asyncio.sleep(_RETRY_BACKOFF[attempt] * (0.5 + random.random()))
                    attempt += 1
                    continue
                self._circuit.failed()
                raise self._error(exc, "connect") from exc
            except (aiohttp.ClientError, OSError, _BodyAborted) as exc:
                if call.too_large:
                    raise self._too_large() from exc
                if call.disconnected:
                    raise asyncio.CancelledError from exc
                self._circuit.succeeded()
                raise self._error(exc, "answer") from exc
            self._circuit.succeeded()
            return response

    async def _body_stream(self, first: bytes, receive: Receive, call: Call) -> AsyncIterator[bytes]:
        call.started = True
        size = len(first)
        if first:
            yield first
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                call.disconnected = True
                raise _BodyAborted
            chunk: bytes = message.get("body", b"")
            more = message.get("more_body", False)
            size += len(chunk)
            if size > self._max_body:
                call.too_large = True
                raise _BodyAborted
            if chunk:
                yield chunk
        assert call.body_done is not None
        call.body_done.set()

    async def _relay(self, response: aiohttp.ClientResponse, scope: Scope, send: Send, call: Call) -> None:
        start: Message = {
            "type": "http.response.start",
            "status": response.status,
            "headers": response_headers(response.raw_headers),
        }
        length = response.content_length
        if length is not None and length <= _BUFFER_LIMIT:
            try:
                body = await response.read()
            except (aiohttp.ClientError, OSError) as exc:
                # Nothing reached the client yet, so it can still get a proper error.
                raise self._error(exc, "body", scope) from exc
            await send(start)
            call.finished = True
            await send({"type": "http.response.body", "body": body})
            return

        await send(start)
        content = response.content
        last = b""
        try:
            while chunk := await content.readany():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                last = chunk
        except (aiohttp.ClientError, OSError) as exc:
            error = self._error(exc, "body", scope)
            content_type = response.headers.get("Content-Type", "")
            if length is None and content_type.startswith("text/event-stream"):
                event = sse_error_event(error.code, error.message, error.status)
                if not last.endswith((b"\n\n", b"\r\n\r\n")):
                    event = b"\n\n" + event  # end the event the upstream left unfinished
                call.finished = True
                await send({"type": "http.response.body", "body": event})
            # Otherwise return without ending the body: uvicorn closes the connection, so the
            # client sees a truncated response rather than a short one that looks complete.
            return
        call.finished = True
        await send({"type": "http.response.body", "body": b""})

    def _error(
        self, exc: BaseException, phase: Literal["connect", "answer", "body"], scope: Scope | None = None
    ) -> GatewayError:
        """The gateway's answer to an upstream failure, by the phase of the call it happened in."""
        timeout = isinstance(exc, TimeoutError)
        kind = "timeout" if timeout else "connect" if phase == "connect" else "dropped"
        metrics.UPSTREAM_ERRORS.labels(kind).inc()
        if scope is not None and isinstance(state := scope.get("state"), dict):
            state["upstream_error"] = kind
        if timeout:
            seconds = self._connect_timeout if phase == "connect" else self._read_timeout
            return GatewayError(504, "upstream_timeout", _TIMEOUT_MESSAGES[phase].format(seconds=seconds))
        return GatewayError(502, "upstream_unavailable", _DROPPED_MESSAGES[phase])
