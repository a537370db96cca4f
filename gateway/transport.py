"""The upstream hop: send one request, get the response once its head arrived.

Two implementations of one small interface, `Transport.send`. `SessionTransport` uses only
aiohttp's public `session.request`. `LeanTransport` makes the same call with aiohttp's own lower
steps (request object, pooled connection, response parameters, send, read the head) and keeps
the read timeout with one lazy timer per connection: the proxy needs none of what
`ClientSession._request` adds (cookies, redirects, auth, proxies, tracing, retries), and the
lean hop is about an eighth of the gateway's work per request less (docs/PERFORMANCE.md).

The lean hop touches aiohttp's internals, all in this module and nowhere else. `open_transport`
checks at start-up that they are as this code expects (the aiohttp minor it was tested on, and
every name it uses); otherwise it logs one warning and uses the public hop. Both raise what
`session.request` raises, so the proxy's retries and error mapping do not depend on the choice.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable, Iterable
from importlib.metadata import version
from typing import Any, Protocol, cast

import aiohttp
import structlog
from aiohttp.client_proto import ResponseHandler
from aiohttp.helpers import EMPTY_BODY_METHODS, TimerNoop
from multidict import CIMultiDict
from yarl import URL

from gateway.timers import LazyDeadline

log = structlog.get_logger(__name__)

# The aiohttp minor whose internals LeanTransport was written and tested against.
LEAN_AIOHTTP = (3, 14)
# Headers aiohttp would add on its own; the client's (or none) go upstream instead.
SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
# Shorter than common upstream idle timeouts (nginx 75 s), so a pooled connection is rarely stale.
KEEPALIVE_SECONDS = 15.0


class Transport(Protocol):
    """Sends one request upstream. `send` raises what aiohttp's `session.request` raises."""

    session: aiohttp.ClientSession

    async def send(self, method: str, url: URL, headers: CIMultiDict[str], data: Any) -> aiohttp.ClientResponse:
        """The response, its head read; the caller reads the body and closes it."""
        ...


def open_transport(*, limit: int, timeouts: aiohttp.ClientTimeout, lean: bool = True) -> Transport:
    """A session with `limit` pooled connections and the lean hop when it can be trusted."""
    if lean:
        problem = lean_problem()
        if problem is None:
            return LeanTransport(limit=limit, timeouts=timeouts)
        log.warning("lean_upstream_hop_unavailable", reason=problem, using="session.request")
    return SessionTransport(_session(_connector(limit), timeouts), timeouts)


def _connector(limit: int) -> aiohttp.TCPConnector:
    return aiohttp.TCPConnector(limit=limit, limit_per_host=0, keepalive_timeout=KEEPALIVE_SECONDS)


def _session(connector: aiohttp.TCPConnector, timeouts: aiohttp.ClientTimeout) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeouts,
        auto_decompress=False,  # compressed bodies pass through byte for byte
        cookie_jar=aiohttp.DummyCookieJar(),  # a shared jar would hand one user's cookies to the next
        trust_env=False,
    )


class SessionTransport:
    """The hop through aiohttp's public API only."""

    def __init__(self, session: aiohttp.ClientSession, timeouts: aiohttp.ClientTimeout) -> None:
        self.session = session
        self._timeouts = timeouts

    async def send(self, method: str, url: URL, headers: CIMultiDict[str], data: Any) -> aiohttp.ClientResponse:
        return await self.session.request(
            method,
            url,
            headers=headers,
            data=data,
            skip_auto_headers=SKIP_AUTO_HEADERS,
            allow_redirects=False,
            timeout=self._timeouts,
        )


# -- the lean hop: aiohttp internals from here on ------------------------------------------------


def lean_problem() -> str | None:
    """Why the lean hop cannot be trusted with the installed aiohttp, or None when it can."""
    installed = version("aiohttp")
    if tuple(int(part) for part in installed.split(".")[:2]) != LEAN_AIOHTTP:
        return f"aiohttp {installed} is not the {LEAN_AIOHTTP[0]}.{LEAN_AIOHTTP[1]}.x the lean hop was tested on"
    expected: Iterable[tuple[object, str]] = (
        (ResponseHandler, "_reschedule_timeout"),
        (ResponseHandler, "_drop_timeout"),
        (ResponseHandler, "_on_read_timeout"),
        (ResponseHandler, "set_response_params"),
        (aiohttp.ClientRequest, "update_auto_headers"),
        (aiohttp.ClientRequest, "update_headers"),
        (aiohttp.ClientRequest, "send"),
        (aiohttp.ClientResponse, "start"),
        (aiohttp.TCPConnector, "connect"),
    )
    for owner, name in expected:
        if not callable(getattr(owner, name, None)):
            return f"aiohttp's {getattr(owner, '__name__', owner)}.{name} is missing"
    wanted: dict[Callable[..., Any], set[str]] = {
        ResponseHandler.set_response_params: {"timer", "skip_payload", "read_until_eof", "auto_decompress",
                                              "read_timeout", "timeout_ceil_threshold"},
        aiohttp.ClientRequest.__init__: {"method", "url", "headers", "data", "session", "timer"},
        aiohttp.TCPConnector.connect: {"req", "traces", "timeout"},
    }  # fmt: skip
    for function, names in wanted.items():
        missing = names - set(inspect.signature(function).parameters)
        if missing:
            return f"aiohttp's {function.__qualname__} lacks {', '.join(sorted(missing))}"
    if not hasattr(_connector(1), "_factory"):
        return "aiohttp's TCPConnector makes its protocols without `_factory`"
    return None


_NO_TIMER = TimerNoop()  # no total timeout: sock_connect and sock_read do the work
_SKIPPED: CIMultiDict[None] = CIMultiDict((name, None) for name in SKIP_AUTO_HEADERS)


class LeanTransport:
    """What `session.request(method, url, ..., allow_redirects=False)` does for the proxy, and no more."""

    def __init__(self, *, limit: int, timeouts: aiohttp.ClientTimeout) -> None:
        connector = _connector(limit)
        # The connector makes its connections' protocols with this (checked by lean_problem).
        connector._factory = cast(
            "functools.partial[ResponseHandler]",
            functools.partial(_ResponseHandler, loop=asyncio.get_running_loop()),
        )
        self.session = _session(connector, timeouts)
        self._connector = connector
        self._timeouts = timeouts

    async def send(self, method: str, url: URL, headers: CIMultiDict[str], data: Any) -> aiohttp.ClientResponse:
        timeouts = self._timeouts
        request = _ProxyRequest(method, url, headers=headers, data=data, session=self.session, timer=_NO_TIMER)
        try:
            connection = await self._connector.connect(request, traces=[], timeout=timeouts)
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


class _ProxyRequest(aiohttp.ClientRequest):
    """aiohttp's request, adding none of the headers aiohttp would add on its own."""

    def update_auto_headers(self, skip_auto_headers: Iterable[str] | None) -> None:
        # The skipped set is the same every time: built once, not per request as the session would.
        self._skip_auto_headers = _SKIPPED

    def update_headers(self, headers: Any) -> None:
        # The proxy's headers are already a CIMultiDict without Host: copied in one C call, Host
        # first, instead of aiohttp's loop over them.
        if not isinstance(headers, CIMultiDict) or "Host" in headers:
            super().update_headers(headers)
            return
        host = self.url.host_port_subcomponent
        assert host is not None  # an absolute URL
        self.headers = CIMultiDict(Host=host)
        self.headers.extend(headers)


class _ResponseHandler(ResponseHandler):
    """aiohttp's response protocol, its read timeout (sock_read) kept by one lazy timer.

    aiohttp cancels its read timer and makes a new one whenever the request is sent and whenever
    a chunk arrives; here those moments only move or clear a `LazyDeadline`. Same answer: the
    read fails when the upstream sent nothing for sock_read seconds while an answer was awaited.
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
