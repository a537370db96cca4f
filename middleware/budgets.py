"""The gateway's bounds on what calls may hold at once, each a budget with one refusal.

- `ByteBudget`: bytes of request bodies held in memory across all calls (moderated bodies are
  read whole before they are judged).
- `CallBudget`: calls holding an upstream connection, in total (a bounded wait for a free one)
  and per client address.

When a budget is spent the call is answered 503 `server_busy` with `Retry-After`, rather than
left hanging or allowed to grow the process. Budgets are per worker process and used from its
event loop only.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from middleware.errors import GatewayError

_UNKNOWN = object()
_KEYS_CACHED = 4096


def server_busy(what: str, retry_after: int = 1) -> GatewayError:
    return GatewayError(
        503,
        "server_busy",
        f"The gateway is at its limit of {what}; retry in a moment.",
        headers={"Retry-After": str(retry_after)},
    )


class ByteBudget:
    """At most `limit` bytes held at once; `take` raises 503 `server_busy` beyond it."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> None:
        if self.used + size > self.limit:
            raise server_busy("request bodies held in memory")
        self.used += size

    def give(self, size: int) -> None:
        self.used -= size


class CallBudget:
    """At most `limit` calls upstream at once, and at most `per_client` of them from one address.

    A call from `client` (the ASGI scope's) counts against the share `key(client)`;
    `try_acquire(share)` takes a slot when one is free at once, the common case, without a
    coroutine; else `acquire(share)` waits up to `wait` seconds for one (first come, first
    served), then raises 503. `release(share)` gives it back. A client address past its share
    gets 503 at once, so one address cannot hold every upstream connection. Addresses `exempt`
    says yes to (trusted proxies, which speak for many clients) have no share of their own.
    `per_client` 0: no per-address cap.
    """

    def __init__(
        self, limit: int, *, wait: float, per_client: int = 0, exempt: Callable[[str], bool] = lambda address: False
    ) -> None:
        self.limit = limit
        self.used = 0
        self._wait = wait
        self._per_client = per_client
        self._exempt = exempt
        self._keys: dict[object, str | None] = {}  # client address -> its share's key (None: exempt)
        self._by_client: dict[str, int] = {}
        self._waiters: deque[asyncio.Future[None]] = deque()

    def key(self, client: tuple[str, int] | list[object] | None) -> str | None:
        """The share a call from `client` (the ASGI scope's) counts against; None: no share of its own."""
        if not self._per_client or not client:
            return None
        address = client[0]
        key = self._keys.get(address, _UNKNOWN)
        if key is _UNKNOWN:
            key = None if self._exempt(str(address)) else str(address)
            if len(self._keys) < _KEYS_CACHED:  # addresses are the clients' choice: remember so many
                self._keys[address] = key
        return key  # type: ignore[return-value]

    def try_acquire(self, key: str | None) -> bool:
        """Take a slot if one is free now; False: `acquire` must wait for one. Raises 503 past a share."""
        if key is not None:
            held = self._by_client.get(key, 0)
            if held >= self._per_client:
                raise server_busy(f"{self._per_client} upstream calls from one client address")
            self._by_client[key] = held + 1
        if self.used < self.limit and not self._waiters:
            self.used += 1
            return True
        if key is not None:
            self._release_client(key)
        return False

    async def acquire(self, key: str | None) -> None:
        """Take a slot, waiting a bounded time for one."""
        if self.try_acquire(key):
            return
        if key is not None:
            self._by_client[key] = self._by_client.get(key, 0) + 1
        try:
            await self._queue()
        except BaseException:
            self._release_client(key)
            raise

    def release(self, key: str | None) -> None:
        if key is not None:
            self._release_client(key)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to it: `used` stays
                return
        self.used -= 1

    async def _queue(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self._wait)
        except TimeoutError:
            if waiter.done():  # handed a slot at the last moment: keep it
                return
            waiter.cancel()
            raise server_busy(f"{self.limit} upstream connections") from None
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release(None)  # cancelled after a slot was handed over: pass it on
            else:
                waiter.cancel()
            raise

    def _release_client(self, key: str | None) -> None:
        if key is not None:
            held = self._by_client[key] - 1
            if held:
                self._by_client[key] = held
            else:
                del self._by_client[key]
