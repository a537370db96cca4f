"""Noticing a client that went away while its call waits on a silent upstream.

Starlette stops watching for disconnects on ASGI spec >= 2.4, and a silent upstream would hide
a gone client. A call still running `DISCONNECT_WATCH_AFTER` in gets a watcher task that waits
for `http.disconnect` and cancels the call; most calls end sooner and never get one, because a
task per call costs more than the rest of a short call's bookkeeping (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import asyncio
from typing import Any

from middleware.asgi import Receive

# Noticed within one to two times this, well inside the second the README promises.
DISCONNECT_WATCH_AFTER = 0.1


class Call:
    """What the body stream and the disconnect watcher share with the call they serve."""

    __slots__ = ("body_done", "disconnected", "finished", "receive", "started", "task", "too_large", "watcher")

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
            self.watcher = asyncio.get_running_loop().create_task(_watch(self, receive, task))

    def unwatch(self) -> None:
        """The call returned: stop its watcher, and let go of the request at once.

        The watch list keeps a call until its second tick; holding the request that long would
        keep every call's objects (task, uvicorn's cycle, scope, headers) alive after its answer.
        """
        self.receive = None
        self.task = None
        if self.watcher is not None:
            self.watcher.cancel()


class WatchList:
    """Starts the watcher of each call still running `after` seconds in.

    Calls go into a list, and one timer ticks every `after` seconds while there are calls: at
    each tick the calls of two ticks ago that are still running get their watcher. Starting a
    call costs an append, not a timer made and cancelled.
    """

    def __init__(self, after: float = DISCONNECT_WATCH_AFTER) -> None:
        self._after = after
        self._young: list[Call] = []  # started since the last tick
        self._old: list[Call] = []  # started in the tick before: watched at the next one
        self._timer: asyncio.TimerHandle | None = None

    def add(self, call: Call, loop: asyncio.AbstractEventLoop) -> None:
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


async def _watch(call: Call, receive: Receive, task: asyncio.Task[Any]) -> None:
    if call.body_done is not None:
        await call.body_done.wait()  # until then the body stream reads `receive`
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            # uvicorn also reports a disconnect once the response is complete: not a gone client.
            if not call.finished:
                call.disconnected = True
                task.cancel()
            return
