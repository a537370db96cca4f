"""The per-worker cache of blocked users, kept coherent by LISTEN/NOTIFY (docs/DESIGN.md).

The block check runs on every /v1 call; asking PostgreSQL each time costs a pool round trip.
This cache holds only the users blocked right now (a small set) and answers from memory, but
only while it can be trusted:

- it listens on a dedicated connection (never a pool connection: releasing one runs
  `UNLISTEN *`), on `GATEWAY_LISTEN_DATABASE_URL` when set (PgBouncer cannot LISTEN);
- after every (re)connect it LISTENs first, then loads the whole blocked set, and only then
  answers: a notification missed while disconnected is never replayed, the reload covers it;
- a notification carries only a user id: that user's row is read again, in arrival order;
- while the listener is down, not yet reloaded, or the set outgrew `max_entries`, `valid` is
  False and the store asks the database per call, as it would without a cache;
- a ping every `ping_interval` seconds finds a connection that died silently.

Expiry is the cache's own business: an entry whose `until` has passed (on the database clock,
estimated from the skew measured on each read) answers "not blocked". Each entry is the whole
`Block` a refusal states: the block's audit event, its categories and points, read with the
blocked set and per notification.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from datetime import datetime, timedelta

import asyncpg
import structlog

from gateway.database import is_unavailable, redact
from gateway.metrics import BLOCK_CACHE_USERS, BLOCK_CACHE_VALID
from gateway.policy import Policy
from middleware.protocols import Block

log = structlog.get_logger(__name__)

CHANNEL = "gateway_blocks"
MAX_ENTRIES = 100_000
_QUERY_TIMEOUT = 5.0
_BACKOFF = (0.1, 5.0)  # first and longest wait between reconnect attempts, seconds

# A user's block in force with its event and whether it was appealed (`block_from` reads these),
# from `users u`.
BLOCK_COLUMNS = """
    CASE WHEN isfinite(u.blocked_until) THEN u.blocked_until END AS until,
    e.id AS event_id, e.at AS event_at, coalesce(e.categories, '{}') AS categories, coalesce(e.points, 0) AS points,
    EXISTS (SELECT 1 FROM appeals a WHERE a.event_id = e.id) AS appealed
"""
BLOCK_EVENT = "LEFT JOIN events e ON e.id = u.block_event_id"
_BLOCKED = f"""
SELECT u.user_id, {BLOCK_COLUMNS}, now() AS now
FROM users u {BLOCK_EVENT} WHERE u.blocked_until > now()
LIMIT {MAX_ENTRIES + 1}
"""  # noqa: S608 (constant text, no input)
_ONE = f"""
SELECT coalesce(u.blocked_until > now(), false) AS blocked, {BLOCK_COLUMNS}, now() AS now
FROM users u {BLOCK_EVENT} WHERE u.user_id = $1
"""  # noqa: S608


def block_from(row: asyncpg.Record, policy: Policy) -> Block:
    """The Block of a row with BLOCK_COLUMNS, as `policy` (its limit, its appeal window) sees it.

    An appealed block is no longer appealable: one appeal per event.
    """
    at: datetime | None = row["event_at"]
    window = policy.appeal_window_days
    appealable = at is not None and window > 0 and not row["appealed"]
    return Block(
        until=row["until"],
        event_id=None if row["event_id"] is None else str(row["event_id"]),
        categories=tuple(row["categories"]),
        strikes=row["points"],
        max_strikes=policy.max_strikes,
        appealable_until=at + timedelta(days=window) if appealable and at is not None else None,
    )


class BlockCache:
    """Blocked users of this worker, trusted only while `valid`. Start and close it in the lifespan."""

    def __init__(
        self,
        *,
        statement_cache: bool = True,
        max_entries: int = MAX_ENTRIES,
        ping_interval: float = 1.0,
        connect_timeout: float = 5.0,
    ) -> None:
        self._statement_cache = statement_cache
        self._max_entries = min(max_entries, MAX_ENTRIES)
        self._ping_interval = ping_interval
        self._connect_timeout = connect_timeout
        self._dsn: str | None = None
        # user id -> (the block, its end in local time.time() seconds; inf when permanent)
        self._entries: dict[str, tuple[Block, float]] = {}
        self._conn: asyncpg.Connection[asyncpg.Record] | None = None
        self._valid = False
        self._skew = 0.0  # database clock minus local clock, seconds
        self._pending: asyncio.Queue[str] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.reloads = 0  # completed (re)loads of the whole set, for tests and logs
        # Whose limit and appeal window the Blocks state: the Store sets its own.
        self.policy = Policy()

    @property
    def valid(self) -> bool:
        """Whether `get` is an answer; False: ask the database."""
        conn = self._conn
        return self._valid and conn is not None and not conn.is_closed()

    @property
    def listener_pid(self) -> int | None:
        """The PostgreSQL backend pid of the listening connection, None while disconnected."""
        conn = self._conn
        return None if conn is None or conn.is_closed() else conn.get_server_pid()

    def get(self, user_id: str) -> Block | None:
        """The block in force for `user_id` per the cache; meaningful only while `valid`."""
        entry = self._entries.get(user_id)
        if entry is None:
            return None
        block, deadline = entry
        if time.time() < deadline:
            return block
        del self._entries[user_id]
        BLOCK_CACHE_USERS.set(len(self._entries))
        return None

    def learned(self, user_id: str, block: Block | None) -> None:
        """Record a change of block state this process just committed, before NOTIFY comes back.

        The user is read again from the database too (in order with the notifications), so a
        change committed elsewhere in between is not overwritten by this one.
        """
        self._set(user_id, block, self._skew)
        if self._conn is not None:
            self._pending.put_nowait(user_id)

    async def start(self, dsn: str) -> None:
        """Connect, LISTEN and load once (failures are logged, not raised), then keep it so in the background."""
        self._dsn = dsn
        with contextlib.suppress(Exception):
            await self._connect()
        self._task = asyncio.create_task(self._run(), name="block-cache")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._drop()
        self._entries.clear()

    # -- background -----------------------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        while True:
            if self._conn is None:
                try:
                    await self._connect()
                    failures = 0
                except Exception:
                    failures += 1
                    await asyncio.sleep(min(_BACKOFF[1], _BACKOFF[0] * 2 ** min(failures, 10)) * random.uniform(1, 1.5))
                    continue
            try:
                await self._serve()
            except Exception as exc:
                if not is_unavailable(exc):
                    log.exception("block cache failed; reconnecting")
                else:
                    log.warning("block cache lost its database connection; checking per call", error=repr(exc))
            await self._drop()

    async def _serve(self) -> None:
        """Refresh notified users, in order; ping when idle; return when the connection is lost."""
        conn = self._conn
        assert conn is not None
        while not conn.is_closed():
            try:
                user_id = await asyncio.wait_for(self._pending.get(), self._ping_interval)
            except TimeoutError:
                await conn.fetchval("SELECT 1", timeout=self._ping_interval * 2)
                continue
            if not user_id:
                continue
            row = await conn.fetchrow(_ONE, user_id, timeout=_QUERY_TIMEOUT)
            if row is None or not row["blocked"]:
                self._set(user_id, None, self._skew)
            else:
                self._set(user_id, block_from(row, self.policy), _skew(row["now"]))
            if len(self._entries) > self._max_entries:
                self._overflow()
                return

    async def _connect(self) -> None:
        assert self._dsn is not None
        try:
            conn: asyncpg.Connection[asyncpg.Record] = await asyncpg.connect(
                self._dsn,
                timeout=self._connect_timeout,
                command_timeout=_QUERY_TIMEOUT,
                statement_cache_size=100 if self._statement_cache else 0,
            )
        except Exception as exc:
            log.warning("block cache cannot connect; checking per call", database=redact(self._dsn), error=repr(exc))
            raise
        try:
            conn.add_termination_listener(self._terminated)
            # LISTEN before loading, so no change committed after the load goes unnoticed.
            await conn.add_listener(CHANNEL, self._notified)
            self._conn = conn
            while not self._pending.empty():
                self._pending.get_nowait()
            rows = await conn.fetch(_BLOCKED, timeout=_QUERY_TIMEOUT)
        except Exception as exc:
            log.warning("block cache cannot load the blocked users; checking per call", error=repr(exc))
            await self._drop()
            raise
        if len(rows) > self._max_entries:
            self._overflow()
            await self._drop()
            raise OverflowError("too many blocked users to cache")
        skew = _skew(rows[0]["now"]) if rows else self._skew
        self._skew = skew
        self._entries = {row["user_id"]: _entry(block_from(row, self.policy), skew) for row in rows}
        self._valid = True
        self.reloads += 1
        BLOCK_CACHE_USERS.set(len(self._entries))
        BLOCK_CACHE_VALID.set(1)
        log.info("block cache loaded", blocked_users=len(rows))

    async def _drop(self) -> None:
        self._invalidate()
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), timeout=1.0)
            except Exception:
                conn.terminate()

    def _invalidate(self) -> None:
        self._valid = False
        BLOCK_CACHE_VALID.set(0)

    def _overflow(self) -> None:
        log.warning("more blocked users than the block cache holds; checking per call", max_entries=self._max_entries)
        self._invalidate()
        self._entries.clear()

    def _set(self, user_id: str, block: Block | None, skew: float) -> None:
        if block is None:
            self._entries.pop(user_id, None)
        else:
            self._entries[user_id] = _entry(block, skew)
        BLOCK_CACHE_USERS.set(len(self._entries))

    # -- asyncpg callbacks ------------------------------------------------------------------------

    def _notified(self, conn: object, pid: int, channel: str, payload: object) -> None:
        if isinstance(payload, str):
            self._pending.put_nowait(payload)

    def _terminated(self, conn: object) -> None:
        # Checks go to the database from now on; _serve notices the closed connection and reconnects.
        self._invalidate()
        self._pending.put_nowait("")  # wake _serve


def _skew(db_now: datetime) -> float:
    return db_now.timestamp() - time.time()


def _entry(block: Block, skew: float) -> tuple[Block, float]:
    deadline = math.inf if block.until is None else block.until.timestamp() - skew
    return block, deadline
