"""The transparent streaming proxy: every method and path under /v1 goes to the upstream.

A pure ASGI app (no Starlette request/response objects on the hot path) over one aiohttp
session per worker. Bodies stream both ways; a client that goes away cancels the upstream
call; connection failures are retried only when nothing was sent, and repeated ones open a
circuit breaker (CONTRACT.md sections 3 and 4, ARCHITECTURE.md decisions 1, 3 and 8).
"""

from __future__ import annotations

import asyncio
import functools
import math
import random
import time
import zlib
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any, cast

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.helpers import EMPTY_BODY_METHODS, TimerNoop
from multidict import CIMultiDict
from yarl import URL

from gateway import metrics
from gateway.settings import Settings
from gateway.timers import LazyDeadline
from middleware.asgi import Message, Receive, Scope, Send
from middleware.errors import GatewayError, sse_error_event
from middleware.protocols import DetectorFailed

# RFC 9110 7.6.1; the headers a Connection header names are dropped too.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"trailer",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
_REQUEST_ID = b"x-request-id"
_UPSTREAM_REQUEST_ID = b"x-upstream-request-id"
# aiohttp writes Host and the framing of the body it sends; uvicorn already answered any Expect.
_REQUEST_DROP = _HOP_BY_HOP | {b"host", b"content-length", b"expect"}
# Headers aiohttp would add on its own; the client's (or none) go upstream instead.
_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
_SKIPPED: CIMultiDict[None] = CIMultiDict((name, None) for name in _SKIP_AUTO_HEADERS)
_RETRY_BACKOFF = (0.05, 0.2)
# A response announcing at most this many bytes is read whole and sent in one message.
_BUFFER_LIMIT = 64 * 1024
# Shorter than common upstream idle timeouts (nginx 75 s), so a pooled connection is rarely stale.
_KEEPALIVE_SECONDS = 15.0
_URL_CACHE_SIZE = 1024
# A call still running after this long gets a task that watches for its client leaving. Most
# calls end sooner, and a task for every call cost about 20 µs of CPU (created, parked on
# `receive`, woken, cancelled). A client that leaves is still noticed within this delay, well
# inside the contract's second.
DISCONNECT_WATCH_AFTER = 0.1


class _Circuit:
    """Consecutive connection failures open it; after the cool-down one trial call decides."""

    def __init__(self, failures: int, cooldown: float) -> None:
        self._threshold = failures
        self._cooldown = cooldown
        self._failures = 0
        self._opened_at: float | None = None
        self._trial = False

    @property
    def open(self) -> bool:
        return self._opened_at is not None

    def admit(self) -> bool:
        """Let a call through (True if it is the half-open trial) or raise 503."""
        if self._opened_at is None:
            return False
        left = self._opened_at + self._cooldown - time.monotonic()
        if left > 0 or self._trial:
            metrics.UPSTREAM_ERRORS.labels("circuit_open").inc()
            seconds = max(1, math.ceil(left))
            raise GatewayError(
                503,
                "upstream_circuit_open",
                f"The upstream API failed repeatedly; the gateway stops calling it for {seconds} s. Retry later.",
                headers={"Retry-After": str(seconds)},
            )
        self._trial = True
        return True

    def succeeded(self) -> None:
        self._failures = 0
        if self._opened_at is not None:
            self._opened_at = None
            metrics.CIRCUIT_OPEN.set(0)

    def failed(self, trial: bool) -> None:
        self._failures += 1
        if trial or self._failures >= self._threshold:
            self._opened_at = time.monotonic()
            metrics.CIRCUIT_OPEN.set(1)

    def release(self, trial: bool) -> None:
        if trial:
            self._trial = False


class _BodyAborted(Exception):
    """The request body stream stopped: too large, or the client went away."""


class _Call:
    """What the body stream and the disconnect watcher share with the call they serve."""

    __slots__ = (
        "body_done",
        "disconnected",
        "finished",
        "receive",
        "started",
        "task",
        "too_large",
        "watcher",
    )

    def __init__(self, body_done: asyncio.Event | None, receive: Receive, task: asyncio.Task[Any]) -> None:
        self.body_done = body_done  # None: the whole body is already in hand
        # The request's `receive` (uvicorn's cycle, and through it the scope and the connection)
        # and the call's own task, cancelled when the client goes away; None once the call returned.
        self.receive: Receive | None = receive
        self.task: asyncio.Task[Any] | None = task
        self.started = False  # the body stream began reading from `receive`
        self.disconnected = False
        self.too_large = False
        self.finished = False  # the last body message is being sent
        self.watcher: asyncio.Task[None] | None = None

    def watch(self) -> None:
        """Start watching for the client leaving (the call is taking a while)."""
        receive, task = self.receive, self.task
        if self.watcher is None and not self.finished and receive is not None and task is not None:
            self.watcher = asyncio.get_running_loop().create_task(_watch_disconnect(self, receive, task))

    def unwatch(self) -> None:
        """The call returned: stop its watcher, and let go of the request at once.

        The watch list keeps a call until its second tick. Holding the request that long kept
        every call's objects (its task, uvicorn's cycle, the scope, the headers) alive 0.1 to
        0.2 s after its answer, hundreds of calls' worth at a few thousand calls a second, all
        freed together at each tick (0.6 ms a tick at 850 calls a second; 0.1 ms without them).
        """
        self.receive = None
        self.task = None
        if self.watcher is not None:
            self.watcher.cancel()


class _WatchList:
    """Starts the disconnect watcher of each call still running DISCONNECT_WATCH_AFTER in.

    A timer per call (made, then cancelled when the call ends first, as most do) cost about
    3,000 instructions a call. Here calls go into a list, and one timer ticks every
    DISCONNECT_WATCH_AFTER while there are calls: at each tick the calls of two ticks ago that
    are still running get their watcher, and the list of the last tick takes their place. A
    call is thus watched 1 to 2 times the delay after it started (0.1 to 0.2 s, within the
    contract's second), and starting a call costs an append.
    """

    def __init__(self, after: float = DISCONNECT_WATCH_AFTER) -> None:
        self._after = after
        self._young: list[_Call] = []  # started since the last tick
        self._old: list[_Call] = []  # started in the tick before: watched at the next one
        self._timer: asyncio.TimerHandle | None = None

    def add(self, call: _Call, loop: asyncio.AbstractEventLoop) -> None:
        self._young.append(call)
        if self._timer is None:
            self._timer = loop.call_later(self._after, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        old = self._old
        self._old = self._young
        self._young = []
        for call in old:
            call.watch()  # a call that ended meanwhile is skipped there
        self._timer = loop.call_later(self._after, self._tick, loop) if self._old else None

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._young = []
        self._old = []


class _ProxyRequest(aiohttp.ClientRequest):
    """aiohttp's request, adding none of the headers aiohttp would add on its own.

    A session's `skip_auto_headers` would do the same, but aiohttp then builds a multidict of
    the skipped names and a copy of the request's headers for every request (3 µs here); the
    skipped set is the same every time, so it is built once. aiohttp still reads it where a
    body would get a default Content-Type.
    """

    def update_auto_headers(self, skip_auto_headers: Iterable[str] | None) -> None:
        self._skip_auto_headers = _SKIPPED

    def update_headers(self, headers: Any) -> None:
        # aiohttp copies the headers one by one in a Python loop, Host first; the proxy's are
        # already a CIMultiDict without Host (it is dropped from the client's): the same
        # headers in the same order, copied in one C call.
        if not isinstance(headers, CIMultiDict) or "Host" in headers:
            super().update_headers(headers)
            return
        host = self.url.host_port_subcomponent
        assert host is not None  # an absolute URL
        self.headers = CIMultiDict(Host=host)
        self.headers.extend(headers)


class _ResponseHandler(ResponseHandler):
    """aiohttp's response protocol, its read timeout (sock_read) kept by one lazy timer.

    aiohttp cancels its read timer and makes a new one whenever the request is sent and
    whenever a chunk arrives, and cancels it again at the body's end: two timers made and two
    cancelled for a short answer, each a libuv call (about 10,000 instructions a request in
    all). Here those moments only move or clear a `LazyDeadline`. Same answer: the read fails
    when the upstream sent nothing for sock_read seconds while an answer was awaited.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self._read_deadline = LazyDeadline(loop, self._read_timed_out)

    def _reschedule_timeout(self) -> None:
        timeout = self._read_timeout
        if timeout:
            self._read_deadline.set_in(timeout)
        else:
            self._read_deadline.clear()

    def _drop_timeout(self) -> None:
        self._read_deadline.clear()

    def _read_timed_out(self) -> None:
        # Looked up when the deadline passes, not bound at creation: aiohttp's handler as it is then.
        self._on_read_timeout()

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._read_deadline.cancel()  # a closed connection holds no timer


class Upstream:
    """The ASGI app mounted at /v1: forwards every call to `settings.upstream_url`.

    `start()` and `close()` belong in the lifespan. The session is per worker process.
    """

    def __init__(self, settings: Settings) -> None:
        self._base = settings.upstream_url
        self._max_body = settings.max_body_bytes
        self._read_timeout = settings.read_timeout
        self._connect_timeout = settings.connect_timeout
        self._max_connections = settings.upstream_max_connections
        drop = set(_REQUEST_DROP)
        drop.add(settings.user_header_key)
        self._authorization: str | None = None
        if settings.openai_api_key is not None:
            drop.add(b"authorization")
            self._authorization = f"Bearer {settings.openai_api_key.get_secret_value()}"
        self._request_drop = frozenset(drop)
        self._circuit = _Circuit(settings.circuit_failures, settings.circuit_cooldown)
        self._session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self._connect_timeout, sock_read=self._read_timeout
        )
        self._urls: dict[tuple[str, bytes | None, bytes], URL] = {}  # by (root path, raw path, query)
        self._watchlist = _WatchList()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def circuit_open(self) -> bool:
        """True from the moment the breaker trips until a trial call gets an answer."""
        return self._circuit.open

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        connector = aiohttp.TCPConnector(
            limit=self._max_connections, limit_per_host=0, keepalive_timeout=_KEEPALIVE_SECONDS
        )
        # the connector makes its connections' protocols with this (aiohttp internals, pinned)
        connector._factory = cast("functools.partial[ResponseHandler]", functools.partial(_ResponseHandler, loop=loop))
        session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,
            # A shared jar would hand one user's upstream cookies to the next.
            cookie_jar=aiohttp.DummyCookieJar(),
            request_class=_ProxyRequest,  # adds none of aiohttp's automatic headers
            trust_env=False,
        )
        # aiohttp resends idempotent requests once when a connection drops after sending; the
        # contract retries only failures that happen before any byte was sent.
        if hasattr(session, "_retry_connection"):
            session._retry_connection = False
        self._session = session
        self._loop = loop

    async def close(self) -> None:
        self._watchlist.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # `timeout` is part of the JsonPost protocol the moderation middleware calls.
    async def post_json(
        self,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        timeout: float,  # noqa: ASYNC109
    ) -> tuple[int, bytes]:
        """POST a JSON body on the upstream session (a `JsonPost`); raises DetectorFailed."""
        session = self._require_session()
        request_headers = CIMultiDict(headers)
        request_headers.setdefault("Content-Type", "application/json")
        # The session does not decompress (the proxy passes bytes through), so ask for none.
        request_headers.setdefault("Accept-Encoding", "identity")
        try:
            async with session.post(
                url,
                data=body,
                headers=request_headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
                allow_redirects=False,
            ) as response:
                data = await response.read()
                encoding = response.headers.get("Content-Encoding", "").lower()
                if encoding in ("gzip", "deflate"):
                    data = zlib.decompress(data, zlib.MAX_WBITS | 32)
                return response.status, data
        except (aiohttp.ClientError, TimeoutError, zlib.error) as exc:
            raise DetectorFailed(f"POST {url} failed: {exc!r}") from exc

    def _require_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("Upstream.start() must run (in the lifespan) before the proxy serves calls")
        return self._session

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        session = self._require_session()
        loop = self._loop
        assert loop is not None  # set with the session
        task = asyncio.current_task()
        assert task is not None
        call: _Call | None = None
        response: aiohttp.ClientResponse | None = None
        trial = False
        try:
            try:
                headers, content_length = self._request_headers(scope["headers"])
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                first: bytes = message.get("body", b"")
                if len(first) > self._max_body:
                    raise self._too_large()
                if message.get("more_body", False):
                    call = _Call(asyncio.Event(), receive, task)
                    if content_length is not None:
                        headers["Content-Length"] = content_length
                else:
                    call = _Call(None, receive, task)
                trial = self._circuit.admit()
                self._watchlist.add(call, loop)
                started = time.perf_counter()
                response = await self._open(session, scope, headers, first, receive, call, trial)
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
            self._circuit.release(trial)

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
        # Starlette's Mount leaves `path` whole and appends the mount prefix to `root_path`.
        root: str = scope.get("root_path", "")
        query: bytes = scope.get("query_string", b"")
        raw: bytes | None = scope.get("raw_path")
        key = (root, raw, query)
        url = self._urls.get(key)  # most calls go to a few targets: the work below once each
        if url is not None:
            return url
        prefix = root.encode("latin-1")
        if raw is not None and raw.startswith(prefix) and raw.isascii():
            # The client's own percent-encoding, untouched.
            target = raw[len(prefix) :].decode("ascii")
            if query:
                target += "?" + query.decode("latin-1")
            url = URL(self._base + target, encoded=True)
            if len(self._urls) < _URL_CACHE_SIZE:  # paths are the client's choice: keep only so many
                self._urls[key] = url
            return url
        path: str = scope["path"]
        rest = path[len(root) :] if path.startswith(root) else path
        url = URL(self._base + rest)
        return url.with_query(query.decode("latin-1")) if query else url

    async def _open(
        self,
        session: aiohttp.ClientSession,
        scope: Scope,
        headers: CIMultiDict[str],
        first: bytes,
        receive: Receive,
        call: _Call,
        trial: bool,
    ) -> aiohttp.ClientResponse:
        """Send the request and return the response once its headers arrived."""
        method: str = scope["method"]
        url = self._url(scope)
        attempt = 0
        while True:
            data: Any = self._body_stream(first, receive, call) if call.body_done is not None else first or None
            try:
                response = await send_upstream(session, method, url, headers, data, self._timeout)
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                # Nothing reached the upstream: safe to send again if the body can be replayed.
                if attempt < len(_RETRY_BACKOFF) and not call.started:
                    metrics.UPSTREAM_RETRIES.inc()
                    await asyncio.sleep(_RETRY_BACKOFF[attempt] * (0.5 + random.random()))
                    attempt += 1
                    continue
                self._circuit.failed(trial)
                if isinstance(exc, aiohttp.ConnectionTimeoutError):
                    metrics.UPSTREAM_ERRORS.labels("timeout").inc()
                    raise GatewayError(
                        504,
                        "upstream_timeout",
                        f"The upstream API did not accept a connection within {self._connect_timeout:g} s.",
                    ) from exc
                metrics.UPSTREAM_ERRORS.labels("connect").inc()
                raise GatewayError(
                    502, "upstream_unavailable", "The upstream API refused the connection; try again later."
                ) from exc
            except (aiohttp.ClientError, OSError, _BodyAborted) as exc:
                if call.too_large:
                    raise self._too_large() from exc
                if call.disconnected:
                    raise asyncio.CancelledError from exc
                self._circuit.succeeded()
                if isinstance(exc, TimeoutError):
                    metrics.UPSTREAM_ERRORS.labels("timeout").inc()
                    raise GatewayError(
                        504,
                        "upstream_timeout",
                        f"The upstream API sent nothing for {self._read_timeout:g} s.",
                    ) from exc
                metrics.UPSTREAM_ERRORS.labels("dropped").inc()
                raise GatewayError(
                    502,
                    "upstream_unavailable",
                    "The upstream API dropped the connection before answering; try again later.",
                ) from exc
            self._circuit.succeeded()
            return response

    async def _body_stream(self, first: bytes, receive: Receive, call: _Call) -> AsyncIterator[bytes]:
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

    async def _relay(self, response: aiohttp.ClientResponse, scope: Scope, send: Send, call: _Call) -> None:
        start: Message = {
            "type": "http.response.start",
            "status": response.status,
            "headers": _response_headers(response.raw_headers),
        }
        length = response.content_length
        if length is not None and length <= _BUFFER_LIMIT:
            try:
                body = await response.read()
            except (aiohttp.ClientError, OSError) as exc:
                # Nothing reached the client yet, so it can still get a proper error.
                raise self._dropped(exc, scope) from exc
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
            error = self._dropped(exc, scope)
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

    def _dropped(self, exc: BaseException, scope: Scope) -> GatewayError:
        kind = "timeout" if isinstance(exc, TimeoutError) else "dropped"
        metrics.UPSTREAM_ERRORS.labels(kind).inc()
        state = scope.get("state")
        if isinstance(state, dict):
            state["upstream_error"] = kind
        if kind == "timeout":
            return GatewayError(
                504, "upstream_timeout", f"The upstream API went silent for {self._read_timeout:g} s mid-answer."
            )
        return GatewayError(502, "upstream_unavailable", "The upstream API dropped the connection mid-answer.")


_NO_TIMER = TimerNoop()  # the session has no total timeout: sock_connect and sock_read do the work


async def send_upstream(
    session: aiohttp.ClientSession,
    method: str,
    url: URL,
    headers: CIMultiDict[str],
    data: Any,
    timeouts: aiohttp.ClientTimeout,
) -> aiohttp.ClientResponse:
    """What `session.request(method, url, ..., allow_redirects=False)` does for the proxy, and no more.

    `ClientSession._request` is general: default headers merged into a copy, cookies filtered
    (a dummy jar here), a total-timeout handle, auth from the URL or netrc, proxies from the
    environment, tracing hooks, client middlewares, redirects, a retry of idempotent calls.
    The proxy uses none of it, and walking through it cost about 80,000 instructions a call
    (measured against the same request and connection calls made here): a tenth of the
    gateway's whole work per request. The steps kept are aiohttp's own, in its order: the
    request object, a pooled connection within sock_connect, the response parameters, send,
    read the head. Errors are those `session.request` raises, so `_open` handles them as
    before. These are aiohttp's internal interfaces, hence the pinned minor version in
    pyproject.toml; every proxy test runs through here.
    """
    connector = session.connector
    assert connector is not None
    request = _ProxyRequest(method, url, headers=headers, data=data, session=session, timer=_NO_TIMER)
    try:
        connection = await connector.connect(request, traces=[], timeout=timeouts)
    except TimeoutError as exc:
        raise aiohttp.ConnectionTimeoutError(f"Connection timeout to host {url}") from exc
    protocol = connection.protocol
    assert protocol is not None
    protocol.set_response_params(
        timer=_NO_TIMER,
        skip_payload=method in EMPTY_BODY_METHODS,  # HEAD: no body, whatever is announced
        read_until_eof=True,
        auto_decompress=False,
        read_timeout=timeouts.sock_read,
        timeout_ceil_threshold=timeouts.ceil_threshold,
    )
    try:
        response = await request.send(connection)
        try:
            await response.start(connection)
        except BaseException:
            response.close()
            raise
    except BaseException:
        connection.close()
        raise
    # The payloads used here (bytes, an async generator) hold nothing for `close()` to release.
    return response


def _response_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    headers: list[tuple[bytes, bytes]] = []
    connection: bytes | None = None
    for name, value in raw:
        lower = name.lower()
        if lower in _HOP_BY_HOP:
            if lower == b"connection":
                connection = value if connection is None else connection + b"," + value
            continue
        if lower == _REQUEST_ID:
            # X-Request-ID is the gateway's (CONTRACT section 3); the upstream's own is kept under another name.
            lower = _UPSTREAM_REQUEST_ID
        headers.append((lower, value))
    if connection is not None:
        named = {token.strip().lower() for token in connection.split(b",")}
        headers = [(name, value) for name, value in headers if name not in named]
    return headers


async def _watch_disconnect(call: _Call, receive: Receive, task: asyncio.Task[Any]) -> None:
    # Starlette stops watching for disconnects on ASGI spec >= 2.4, and a silent upstream would
    # hide a gone client: wait for it here and cancel the call (ARCHITECTURE.md decision 3).
    if call.body_done is not None:
        await call.body_done.wait()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            # uvicorn also reports a disconnect once the response is complete: not a gone client.
            if not call.finished:
                call.disconnected = True
                task.cancel()
            return
