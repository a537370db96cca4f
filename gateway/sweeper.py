"""The sweeper: records the unblock of blocks that ran out, and applies the retention.

A block whose time has passed is already no block (the store reads it so); the sweeper only
makes its end visible promptly: the `unblock` audit event with actor `expiry` and, with
webhooks on, the `user.unblocked` event. Less often it deletes audit events past
GATEWAY_EVENT_RETENTION_DAYS and delivered webhook rows past a week (gateway/lifecycle.py).
Every replica may run one; `Store.expire_blocks` and `Store.sweep_retention` are safe to run
concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog

from gateway.store import Store
from middleware.protocols import StoreUnavailable

log = structlog.get_logger("gateway.sweeper")


class ExpirySweeper:
    """Calls `store.expire_blocks()` every `interval` seconds and `store.sweep_retention()` every
    `retention_interval` seconds (the first time at start) in a background task."""

    def __init__(self, store: Store, interval: float = 5.0, retention_interval: float = 600.0) -> None:
        self._store = store
        self._interval = interval
        self._retention_interval = retention_interval
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        self._stopping.clear()
        self._task = asyncio.create_task(self._run(), name="expiry-sweeper")

    async def close(self) -> None:
        """Let a sweep in flight finish (short transactions), then stop."""
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
        retention_due = time.monotonic()
        while not self._stopping.is_set():
            try:
                expired = await self._store.expire_blocks()
                if expired:
                    log.info("blocks_expired", count=expired)
                if time.monotonic() >= retention_due:
                    retention_due = time.monotonic() + self._retention_interval
                    deleted = await self._store.sweep_retention()
                    if deleted:
                        log.info("events_past_retention_deleted", count=deleted)
            except StoreUnavailable as exc:
                log.warning("sweep_failed", error=str(exc) or type(exc).__name__)
            except Exception:
                # Never let the task die: a dead sweeper would silently stop recording expiries.
                log.exception("sweep_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval)
