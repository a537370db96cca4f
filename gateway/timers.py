"""A deadline that moves often, kept by one event-loop timer that is rarely re-armed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

# uvloop's clock ticks in milliseconds: a deadline this close counts as reached (no spin).
_EARLY = 0.005


class LazyDeadline:
    """Calls `callback` once the deadline last set has passed, unless it was cleared first.

    Moving a deadline with a timer each time (cancel the old `TimerHandle`, make a new one: a
    libuv stop and start under uvloop) costs a few thousand instructions; here `set` and
    `clear` only store a float, and the one timer, when it fires, acts if the deadline has
    passed, sleeps again until it if it moved later, or ends if it was cleared. The timer is
    re-armed at once only for a deadline earlier than the one it waits for. Used by the
    server protocol (header and body deadlines) and the proxy's upstream read timeout.
    """

    __slots__ = ("_callback", "_deadline", "_loop", "_timer", "_timer_when")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0

    @property
    def timer(self) -> asyncio.TimerHandle | None:
        """The pending timer, if any (for tests)."""
        return self._timer

    def set_in(self, seconds: float) -> None:
        """The deadline is `seconds` from now."""
        # set_at's body, not a call to it: this runs per request and per upstream chunk.
        deadline = self._loop.time() + seconds
        self._deadline = deadline
        if self._timer is None or deadline < self._timer_when:
            self._schedule(deadline)

    def set_at(self, when: float) -> None:
        """The deadline is `when`, on the loop's clock."""
        self._deadline = when
        if self._timer is None or when < self._timer_when:
            self._schedule(when)

    def reached(self, when: float) -> bool:
        """Whether `when` has passed, as the timer counts it (within its early margin)."""
        return when <= self._loop.time() + _EARLY

    def clear(self) -> None:
        """No deadline; a pending timer ends when it fires."""
        self._deadline = None

    def cancel(self) -> None:
        """No deadline and no timer (the owner is closing)."""
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _schedule(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._fired)
        self._timer_when = when

    def _fired(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None:
            return
        if deadline > self._loop.time() + _EARLY:
            self._schedule(deadline)
            return
        self._deadline = None
        self._callback()
