"""The HTTP server protocol: uvicorn's httptools protocol plus the limits it lacks.

uvicorn's httptools protocol buffers request headers without a size limit and arms no timer
until a first response is sent, so one client can hold memory with endless headers, or a
connection forever by never finishing its request. This subclass caps the header size (431)
and gives every request a deadline for its headers and a longest silence inside its body.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from middleware.errors import error_body

MAX_HEADER_BYTES = 64 * 1024
HEADER_TIMEOUT = 10.0
BODY_IDLE_TIMEOUT = 30.0


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header size cap, a header deadline and a body idle timeout."""

    max_header_bytes = MAX_HEADER_BYTES
    header_timeout = HEADER_TIMEOUT
    body_idle_timeout = BODY_IDLE_TIMEOUT

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._awaiting_headers = True
        self._header_bytes = 0
        # One lazy timer per connection: requests move a deadline (a float), and the timer, when it
        # fires, either acts or sleeps again until the current deadline. Re-arming a TimerHandle
        # at every phase of every request cost about 3 µs per request.
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._awaiting_headers:
            self._header_bytes += len(data)
        super().data_received(data)
        # Checked after parsing: a chunk that also carries a large body is not a large header.
        if self._awaiting_headers and self._header_bytes > self.max_header_bytes and not self.transport.is_closing():
            self._refuse(
                431, "Request Header Fields Too Large", "request_headers_too_large", "Request headers exceed 64 KiB."
            )

    def on_message_begin(self) -> None:
        # Called while the bytes of this request's first chunk are already counted.
        super().on_message_begin()
        self._awaiting_headers = True
        self._arm(self.header_timeout)

    def on_headers_complete(self) -> None:
        self._awaiting_headers = False
        self._header_bytes = 0
        self._arm(self.body_idle_timeout)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._arm(self.body_idle_timeout)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        self._awaiting_headers = True  # the next request on this connection starts with headers
        super().on_message_complete()

    def _arm(self, seconds: float) -> None:
        deadline = self.loop.time() + seconds
        self._deadline = deadline
        if self._timer is None or deadline < self._timer_when:
            self._schedule(deadline)

    def _disarm(self) -> None:
        # The timer stays pending; with no deadline it simply ends when it fires.
        self._deadline = None

    def _schedule(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_at(when, self._on_timer)
        self._timer_when = when

    def _cancel_timer(self) -> None:
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None:
            return
        # uvloop's clock ticks in milliseconds: a deadline this close counts as reached (no spin).
        if deadline > self.loop.time() + 0.005:
            self._schedule(deadline)
            return
        self._deadline = None
        self._too_slow()

    def _too_slow(self) -> None:
        if self.transport.is_closing():
            return
        if not self._awaiting_headers:
            # Mid-body: the app is reading it; closing the connection gives it http.disconnect.
            self.transport.close()
        elif self.cycle is None or self.cycle.response_complete:
            self._refuse(408, "Request Timeout", "request_timeout", "The request headers did not arrive in time.")
        # else: a pipelined request waits behind a response still streaming; that one goes first.

    def _refuse(self, status: int, reason: str, code: str, message: str) -> None:
        # Below the ASGI app, so no middleware adds the usual headers: an OpenAI-shaped body still.
        self._cancel_timer()
        body = error_body(code, message, status)
        head = (
            f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"x-should-retry: false\r\ncontent-length: {len(body)}\r\n\r\n"
        )
        self.transport.write(head.encode() + body)
        self.transport.close()
