"""The expiry sweeper: records the unblock of blocks that ran out, even for users who never return.

A block whose time has passed is already no block (the store reads it so); the sweeper only
makes its end visible promptly: the `unblock` audit event with actor `expiry` and, with
webhooks on, the `user.unblocked` event. Every replica may run one; `Store.expire_blocks`
is safe to run concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from gateway.store import Store
from middleware.protocols import StoreUnavailable

log = structlog.get_logger("gateway.sweeper")


class ExpirySweeper:
    """Calls `store.expire_blocks()` every `interval` seconds in a background task."""

    def __init__(self, store: Store, interval: float = 5.0) -> None:
        self._store = store
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        self._stopping.clear()
        self._task = asyncio.create_task(self._run(), name="expiry-sweeper")

    async def close(self) -> None:
        """Let a sweep in flight finish (it is one short transaction), then stop."""
        self._stopping.set()
        if self._task is None:
            return
        task, self._task = self._task, None
        try:
            await asyncio.wait_for(asyncio.shield(task), 10)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                expired = await self._store.expire_blocks()
            except StoreUnavailable as exc:
                log.warning("expiry_sweep_failed", error=str(exc) or type(exc).__name__)
            except Exception:
                # Never let the task die: a dead sweeper would silently stop recording expiries.
                log.exception("expiry_sweep_failed")
            else:
                if expired:
                    log.info("blocks_expired", count=expired)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval)
