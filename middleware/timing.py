"""GATEWAY_MODERATION_TIMING=during_call: the upstream call starts while the input is judged.

The inner app (the proxy) runs in a task of its own from the moment the body is read; every
message it sends is held at a gate until the verdict is in. Cleared, the gate opens and the
answer flows as if the call had started then; flagged (or refused for any reason), the task is
cancelled, which closes the upstream call, and the client gets the gateway's answer as in
`before_call`: no byte of the upstream's answer was sent. A call's latency becomes the larger
of moderation and the upstream's time to first byte instead of their sum; the price is that a
flagged prompt does reach the provider (and may be billed) before it is cancelled.
"""

from __future__ import annotations

import asyncio

import structlog

from middleware.asgi import ASGIApp, Message, Receive, Scope, Send

log = structlog.get_logger("middleware.moderation")


class EarlyCall:
    """The inner app's call, started now, its answer held until `release` or dropped by `cancel`."""

    __slots__ = ("_opened", "_send", "task")

    def __init__(self, app: ASGIApp, scope: Scope, receive: Receive) -> None:
        self._opened = asyncio.Event()
        self._send: Send | None = None
        self.task = asyncio.ensure_future(app(scope, receive, self._held))

    async def _held(self, message: Message) -> None:
        await self._opened.wait()
        assert self._send is not None
        await self._send(message)

    async def release(self, send: Send) -> None:
        """Let the answer through to `send` and wait for the call to end."""
        self._send = send
        self._opened.set()
        try:
            await self.task
        except BaseException:
            self.task.cancel()  # this call was cancelled (the server's own shutdown): so is the inner one
            raise

    async def cancel(self) -> None:
        """Cancel the call (closing the upstream request) and wait until it has ended."""
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass
        except Exception:  # the caller answers the client itself; the inner failure is only logged
            log.exception("early_call_failed")
