"""Slowing down guessed admin tokens: per socket peer, and all peers together.

One throttle guards the admin API and the console's sign-in alike (create_app shares it): they
check the same tokens, so a guess at either counts toward the other.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable

from middleware.asgi import Scope

# Enough doublings of any sane `delay` to reach `max_delay`: counting further changes nothing.
_DOUBLINGS = 64


class AuthThrottle:
    """Delays the answer to each failed token past a free allowance.

    Per peer: after `free_failures` failures each further one waits longer (doubling from
    `delay` up to `max_delay`) before its 401; `forget_after` seconds without failures clear
    the peer. It remembers at most `max_peers` peers, dropping the least recently failed, so a
    flood of addresses costs bounded memory.

    Overall: past `global_free_failures` failures from all peers together in the last `window`
    seconds, each further failure waits the same way, so guesses spread over many addresses
    are slowed like one guesser's.

    A success clears its peer, in both counts: a peer that shows the token was not guessing.
    It slows a guesser who waits for answers; the token's length is the real defence.
    """

    def __init__(
        self,
        *,
        free_failures: int = 5,
        global_free_failures: int = 20,
        window: float = 60.0,
        delay: float = 0.25,
        max_delay: float = 4.0,
        forget_after: float = 300.0,
        max_peers: int = 4096,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._free = free_failures
        self._global_free = global_free_failures
        self._window = window
        self._delay = delay
        self._max_delay = max_delay
        self._forget_after = forget_after
        self._max_peers = max_peers
        self._sleep = sleep
        self._clock = clock
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()
        # The latest failures (time, peer), all peers together; only the newest ones matter.
        self._recent: deque[tuple[float, str]] = deque(maxlen=global_free_failures + _DOUBLINGS)

    def __len__(self) -> int:
        return len(self._failures)

    async def failed(self, peer: str) -> None:
        """Record a failure from `peer` and wait out its delay, if any."""
        now = self._clock()
        count, last = self._failures.pop(peer, (0, now))
        count = 1 if now - last > self._forget_after else min(count + 1, self._free + _DOUBLINGS)
        self._failures[peer] = (count, now)
        while len(self._failures) > self._max_peers:
            self._failures.popitem(last=False)
        recent = self._recent
        recent.append((now, peer))
        while now - recent[0][0] > self._window:
            recent.popleft()
        excess = max(count - self._free, len(recent) - self._global_free)
        if excess > 0:
            await self._sleep(min(self._max_delay, self._delay * 2 ** (excess - 1)))

    def succeeded(self, peer: str) -> None:
        if self._failures.pop(peer, None) is not None:
            kept = [failure for failure in self._recent if failure[1] != peer]
            self._recent.clear()
            self._recent.extend(kept)


def peer(scope: Scope) -> str:
    """The throttle's key: the socket peer, which the gateway puts in state["peer"] before any
    X-Forwarded-For is applied; the client address where it did not."""
    found = scope.get("state", {}).get("peer")
    return found if isinstance(found, str) and found else client_address(scope)


def client_address(scope: Scope) -> str:
    # The client address as the server reports it: a trusted proxy's X-Forwarded-For rewrites it.
    address = scope.get("client")
    return str(address[0]) if address else "unknown"
