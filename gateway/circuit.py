"""The upstream circuit breaker: stop calling an upstream that keeps refusing connections.

Consecutive connection failures open the circuit; calls then fail fast with 503
`upstream_circuit_open` for the cool-down. After it, a probe decides, not a client's call: one
TCP connection to the upstream's host and port. A trial made of a real call would hang on
whatever that client sends (a body trickled for half a minute kept the circuit open for
everyone while the upstream was healthy). Calls arriving while the probe runs wait for it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable

from gateway import metrics
from middleware.errors import GatewayError

Probe = Callable[[], Awaitable[None]]  # raises OSError or TimeoutError when the upstream is down


def tcp_probe(host: str, port: int, timeout: float) -> Probe:
    """A probe that opens (and closes) one TCP connection to `host:port` within `timeout` seconds."""

    async def probe() -> None:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        writer.close()

    return probe


class Circuit:
    """`check()` before a call; `succeeded()` / `failed()` after its connection attempt."""

    def __init__(self, failures: int, cooldown: float, probe: Probe) -> None:
        self._threshold = failures
        self._cooldown = cooldown
        self._probe = probe
        self._failures = 0
        self._opened_at: float | None = None
        self._trial: asyncio.Future[None] | None = None
        self.open = False  # read before every call: a plain attribute, not a property

    async def check(self) -> None:
        """Return when a call may go upstream; raise 503 while the circuit is open.

        Only called while `open` (the caller checks the property first: the closed circuit
        costs an attribute read per call).
        """
        opened_at = self._opened_at
        if opened_at is None:
            return
        left = opened_at + self._cooldown - time.monotonic()
        if left > 0:
            raise self._refusal(left)
        if self._trial is None:
            self._trial = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().create_task(self._run_probe(self._trial))
        await asyncio.shield(self._trial)
        if self._opened_at is not None:
            raise self._refusal(self._cooldown)

    async def _run_probe(self, trial: asyncio.Future[None]) -> None:
        try:
            await self._probe()
        except Exception:
            self._opened_at = time.monotonic()  # still down: another cool-down (still open)
        else:
            self.succeeded()
        finally:
            self._trial = None
            trial.set_result(None)

    def succeeded(self) -> None:
        self._failures = 0
        if self._opened_at is not None:
            self._opened_at = None
            self.open = False
            metrics.CIRCUIT_OPEN.set(0)

    def failed(self) -> None:
        self._failures += 1
        if self._failures >= self._threshold:
            self._opened_at = time.monotonic()
            self.open = True
            metrics.CIRCUIT_OPEN.set(1)

    def _refusal(self, left: float) -> GatewayError:
        metrics.UPSTREAM_ERRORS.labels("circuit_open").inc()
        seconds = max(1, math.ceil(left))
        return GatewayError(
            503,
            "upstream_circuit_open",
            f"The upstream API failed repeatedly; the gateway stops calling it for {seconds} s. Retry later.",
            headers={"Retry-After": str(seconds)},
        )
