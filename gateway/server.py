"""The HTTP server protocol: uvicorn's httptools protocol plus the limits it lacks.

uvicorn's httptools protocol buffers request headers without a size limit and arms no timer
until a first response is sent, so one client can hold memory with endless headers, or a
connection forever by never finishing its request. This subclass caps the header size (431)
and gives every request a deadline for its headers, and for its body a longest silence and a
minimum rate (as Apache's mod_reqtimeout `body=20,MinRate=500`): a trickled body would hold an
upstream connection for as long as it lasts.
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import Callable
from typing import Any, cast

import structlog
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from gateway.context import new_request_id
from gateway.logs import access_log
from gateway.metrics import SLOW_CLIENTS
from gateway.settings import Settings
from gateway.timers import LazyDeadline
from middleware.errors import error_body

MAX_HEADER_BYTES = 64 * 1024
HEADER_TIMEOUT = 10.0
BODY_IDLE_TIMEOUT = 30.0
BODY_TIMEOUT = 20.0  # GATEWAY_BODY_TIMEOUT's default
BODY_MIN_RATE = 500.0  # GATEWAY_BODY_MIN_RATE's default, bytes a second

log = structlog.get_logger(__name__)
_CUTS = {reason: SLOW_CLIENTS.labels(reason) for reason in ("headers", "body_rate", "body_silence")}


class _TimedFlowControl(FlowControl):
    """uvicorn's flow control, also telling how long each pause of reading lasted.

    uvicorn stops reading while the app has not taken what came (its body buffer is full, or a
    pipelined request waits its turn): that time is the server's, not the client's.
    """

    def __init__(
        self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop, resumed: Callable[[float], None]
    ) -> None:
        super().__init__(transport)
        self._loop = loop
        self._resumed = resumed
        self._paused_at = 0.0

    def pause_reading(self) -> None:
        if not self.read_paused:
            super().pause_reading()
            self._paused_at = self._loop.time()

    def resume_reading(self) -> None:
        # Called on every receive(): while reading runs, one test, as uvicorn's own.
        if self.read_paused:
            super().resume_reading()
            self._resumed(self._loop.time() - self._paused_at)


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header size cap, a header deadline and body deadlines.

    The request's phase is read off uvicorn's own state after each chunk is parsed, in the one
    method this class must override anyway (`data_received`, to count header bytes): a message
    has begun whose headers are incomplete when uvicorn's current scope is not its current
    cycle's (`on_message_begin` makes a scope, `on_headers_complete` a cycle holding it); its
    body is still coming while that cycle has `more_body`. Overriding the parser callbacks
    instead, each arming a timer, cost far more (docs/PERFORMANCE.md, "The server protocol");
    here a timer is armed only when a chunk leaves a request unfinished. The same deadline keeps
    uvicorn's keep-alive timeout (an idle connection is closed `timeout_keep_alive` seconds after
    its last response), which uvicorn keeps with a timer made and cancelled per request.

    The header cap counts the bytes of the request in progress, whatever the chunking: the
    parser takes a whole header block from one chunk, however large, so a chunk that could
    complete a block over the cap is fed to it in pieces no larger than the room left.

    A body's deadline is the earlier of its silence timeout (from its last chunk) and its rate
    deadline: `body_timeout` after its headers plus a second for each `body_min_rate` bytes
    received. Time the server itself held reading paused (uvicorn's flow control, while the app
    has not taken what came) moves both later; a client that sent `Expect: 100-continue` is not
    timed until the app asks for the body. A request that arrives whole in one chunk runs none
    of this.
    """

    max_header_bytes = MAX_HEADER_BYTES
    header_timeout = HEADER_TIMEOUT
    body_idle_timeout = BODY_IDLE_TIMEOUT
    body_timeout = BODY_TIMEOUT
    body_min_rate = BODY_MIN_RATE

    def __init__(
        self, *args: Any, body_timeout: float | None = None, body_min_rate: float | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        # The gateway serves no WebSocket: an upgrade is plain HTTP here, inside these limits
        # (uvicorn's WebSocket protocol would take the connection beyond them, never to close it).
        self.ws_protocol_class = None
        if body_timeout is not None:  # given (protocol_for): the settings', else the class's
            self.body_timeout = body_timeout
        if body_min_rate is not None:
            self.body_min_rate = body_min_rate
        self._header_bytes = 0  # bytes so far of a request whose headers are incomplete (at least)
        self._header_scope: object = None  # the scope whose header deadline is armed
        # A body is due `body_timeout` after it began plus `_seconds_per_byte` for each byte
        # received (a rate of 0: a whole-body deadline); time the server held reading is added.
        self._seconds_per_byte = 1 / self.body_min_rate if self.body_min_rate else 0.0
        self._body_cycle: object = None  # the request whose body those count
        self._body_due = 0.0  # its deadline with no byte received
        self._body_bytes = 0
        # One lazy timer per connection: chunks move a deadline (a float), and the timer, when it
        # fires, either acts or sleeps again until the current deadline.
        self._deadline = LazyDeadline(self.loop, self._too_slow)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.flow = _TimedFlowControl(transport, self.loop, self._reading_resumed)
        self._deadline.set_in(self.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._deadline.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        header_bytes = self._header_bytes + len(data)
        if header_bytes > self.max_header_bytes:
            self._receive_in_pieces(data)
            return
        self._header_bytes = header_bytes
        super().data_received(data)
        cycle = self.cycle
        scope = self.scope
        if cycle is None or cycle.scope is not scope:
            # A request has begun and its headers are not all here.
            if self._header_scope is not scope:
                # It began in this chunk, maybe after the end of another request: its own bytes are
                # those after the chunk's last blank line, and its deadline runs from now.
                self._header_scope = scope
                end = data.rfind(b"\r\n\r\n")
                self._header_bytes = len(data) - end - 4 if end >= 0 else len(data)
                self._deadline.set_in(self.header_timeout)
        elif cycle.more_body:
            # The body is still coming: due at the earlier of its silence timeout and its rate
            # deadline. (Answered early, uvicorn reads it to its end and drops it, but never marks
            # that end: the connection is then kept as an idle one, see _body_deadline.)
            self._header_bytes = 0
            if self._body_cycle is cycle:
                self._body_bytes += len(data)
            else:
                self._start_body(cycle)
            self._deadline.set_at(self._body_deadline(cycle))
        else:
            # The request is complete; the next bytes start another one's headers.
            self._header_bytes = 0
            self._deadline.clear()  # the timer stays pending; with no deadline it ends when it fires

    def _start_body(self, cycle: RequestResponseCycle) -> None:
        if cycle.waiting_for_100_continue:
            # Expect: 100-continue: the client rightly waits until the app asks for the body; its
            # rate deadline starts with the first chunk after that.
            self._body_due = math.inf
            return
        self._body_cycle = cycle
        self._body_due = self.loop.time() + self.body_timeout
        self._body_bytes = len(cycle.body)  # what came with the headers

    def _body_deadline(self, cycle: RequestResponseCycle) -> float:
        # After an early answer, its silence is that of an idle connection: the body may have ended.
        quiet = self.timeout_keep_alive if cycle.response_complete else self.body_idle_timeout
        return min(self.loop.time() + quiet, self._rate_deadline())

    def _rate_deadline(self) -> float:
        # when the bytes received so far are due at `body_min_rate`
        return self._body_due + self._body_bytes * self._seconds_per_byte

    def _reading_resumed(self, paused: float) -> None:
        # The server held reading paused for `paused` seconds: the body gets them back.
        self._body_due += paused
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope and cycle.more_body:
            self._deadline.set_at(self._body_deadline(cycle))  # its silence, too, counts from now

    def _receive_in_pieces(self, data: bytes) -> None:
        # A chunk that could complete a header block over the cap (the parser takes a whole block
        # in one chunk, whatever its size): fed in pieces no larger than the room the request in
        # progress has left, so every block that completes within a piece is within the cap.
        start = 0
        while start < len(data):
            room = self.max_header_bytes - self._header_bytes
            if room <= 0:  # a request's headers have reached the cap and are still incomplete
                if self.transport.is_closing():
                    return
                self._refuse(
                    431,
                    "Request Header Fields Too Large",
                    "request_headers_too_large",
                    "Request headers exceed 64 KiB.",
                )
                return
            self.data_received(data[start : start + room])
            start += room
            if self.transport.is_closing() or self.transport.get_protocol() is not self or self.parser.should_upgrade():
                return  # refused, closed or upgraded: the parser would not have read further either

    def _unset_keepalive_if_required(self) -> None:
        # uvicorn's keep-alive timer is not used (see on_response_complete): nothing to cancel.
        pass

    def on_response_complete(self) -> None:
        # uvicorn's own, except for the keep-alive: uvicorn makes a timer when each response ends and
        # cancels it when the next request's first bytes come (a libuv start and stop per request);
        # here the connection's one deadline moves instead, and `_too_slow` closes an idle connection.
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        elif self.cycle is not None and self.cycle.scope is self.scope:
            # No next request has begun (one that has keeps its header deadline): idle from now.
            self._deadline.set_in(self.timeout_keep_alive)

    def _too_slow(self) -> None:
        if self.transport.is_closing() or self.transport.get_protocol() is not self:  # closed, or upgraded
            return
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope:
            if cycle.more_body:
                if self.flow.read_paused:
                    return  # the server holds the body, not the client; resuming sets its deadline again
                if cycle.waiting_for_100_continue:
                    self._deadline.set_in(self.body_idle_timeout)  # the app has not asked for the body yet
                    return
                if self._body_cycle is not cycle:
                    # The app asked for the body since the last look (100 Continue just went out):
                    # the client's time to send it starts now, not with the headers.
                    self._start_body(cycle)
                    self._deadline.set_at(self._body_deadline(cycle))
                    return
                self._count_cut(cycle)
            # Mid-body (closing the connection gives the app http.disconnect), or idle after a
            # response for the keep-alive timeout: closed without a word, as uvicorn does.
            self.transport.close()
        elif cycle is None or cycle.response_complete:
            _CUTS["headers"].inc()
            self._refuse(408, "Request Timeout", "request_timeout", "The request headers did not arrive in time.")
        else:
            # A pipelined request waits behind a response still streaming; that one goes first,
            # and this one's headers are looked at again once it may have ended.
            self._deadline.set_in(self.header_timeout)

    def _count_cut(self, cycle: RequestResponseCycle) -> None:
        if self._deadline.reached(self._rate_deadline()):
            reason = "body_rate"
        elif cycle.response_complete:
            return  # answered, and quiet for the keep-alive: an idle connection, not a slow client
        else:
            reason = "body_silence"
        _CUTS[reason].inc()
        log.warning(
            "slow client cut",
            reason=reason,
            client=self.client[0] if self.client else None,
            request_id=cycle.scope.get("state", {}).get("request_id"),
        )

    def send_400_response(self, msg: str) -> None:
        # uvicorn answers a request its parser refuses in plain text; clients get the OpenAI shape.
        self._refuse(400, "Bad Request", "invalid_request", "The request is not valid HTTP/1.1.")

    def _refuse(self, status: int, reason: str, code: str, message: str) -> None:
        # Below the ASGI app, so the request context does not see it: the same request id header
        # and access line (the code as its decision), and an OpenAI-shaped body still.
        self._deadline.cancel()
        request_id = new_request_id()
        body = error_body(code, message, status)
        head = (
            f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"x-should-retry: false\r\nx-request-id: {request_id}\r\ncontent-length: {len(body)}\r\n\r\n"
        )
        self.transport.write(head.encode() + body)
        self.transport.close()
        access_log.write(
            {
                "request_id": request_id,
                "user_id": None,
                "method": None,
                "path": None,
                "status": status,
                "duration_ms": None,
                "upstream_ms": None,
                "decision": code,
            }
        )


def protocol_for(settings: Settings) -> type[GatewayHttpProtocol]:
    """The server protocol with these settings' body limits, for `uvicorn.Config(http=...)`.

    A partial of the class, not a subclass: uvicorn only calls it, and with several workers it
    pickles it into each worker process, which a class made here at run time could not survive.
    """
    protocol = functools.partial(
        GatewayHttpProtocol, body_timeout=settings.body_timeout, body_min_rate=settings.body_min_rate
    )
    return cast("type[GatewayHttpProtocol]", protocol)
