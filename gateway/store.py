"""Strikes, blocks and the enforcement ladder in PostgreSQL (the policy: gateway/policy.py).

The database clock is the clock. A violation or a change of block state is one short
transaction holding the user's row lock, so points are exact under concurrency and across
replicas. Points are rows: each counted violation stores its points and when its strike
expires; the points that count are one SUM over the user's counted, unexpired, unreversed
violations after `strikes_since`. An expired block is no block; whichever transaction first
notices one (a strike, an admin call, the sweeper) records its `expiry` unblock. Every change of
block state writes its audit event, a `gateway_blocks` notification and, with webhooks on, an
outbox row in the same transaction (gateway/blocks.py). Appeals, reversals, erasure and
retention take the same row lock (gateway/casework.py). What the admin API only reads lives in
gateway/users.py and gateway/events.py.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any, Literal

import asyncpg
import structlog

from gateway import blocks, events
from gateway.blockcache import BLOCK_COLUMNS, BLOCK_EVENT, CHANNEL, BlockCache, block_from
from gateway.casework import Casework
from gateway.database import Connection, Database
from gateway.events import iso
from gateway.metrics import BLOCK_CHECKS, WARNINGS
from gateway.policy import MAX_SECONDS
from gateway.policy import Policy as Policy  # re-exported: the app builds the Store with it
from gateway.users import MAX_PAGE as MAX_PAGE  # re-exported for the admin API
from gateway.users import POINTS, STATUS, UserStatus, list_users, status_from
from gateway.users import decode_cursor as decode_cursor  # re-exported for the admin API
from gateway.users import encode_cursor as encode_cursor  # re-exported for the admin API
from middleware.protocols import Block, StrikeOutcome, Violation

log = structlog.get_logger(__name__)

ViolationKind = Literal["violation", "output_violation"]

NOTIFY_CHANNEL = CHANNEL
MAX_BLOCK_SECONDS = MAX_SECONDS
_SWEEP_BATCH = 100

# The user's row, locked (created if unknown), with its block state read on the database clock
# and the place of a policy block on the ladder (from its event: a reversal may have taken an
# earlier block off the count since).
_STATE_COLUMNS = """
    blocks, blocked_by, block_event_id,
    coalesce(blocked_until > now(), false) AS blocked,
    coalesce(blocked_until <= now(), false) AS expired,
    CASE WHEN isfinite(blocked_until) THEN blocked_until END AS until,
    CASE WHEN blocked_by = 'policy' THEN
        coalesce((SELECT b.block_number FROM events b WHERE b.id = block_event_id), blocks) END AS block_number
"""
_LOCK_OR_CREATE = f"""
INSERT INTO users (user_id) VALUES ($1)
ON CONFLICT (user_id) DO UPDATE SET updated_at = now()
RETURNING {_STATE_COLUMNS}
"""  # noqa: S608 (constant text, no input)
_LOCK_EXISTING = f"SELECT {_STATE_COLUMNS} FROM users WHERE user_id = $1 FOR UPDATE"  # noqa: S608
_ENSURE_USER = "INSERT INTO users (user_id) VALUES ($1) ON CONFLICT (user_id) DO NOTHING"


# The points that count and the block in force, with its event.
_STANDING = f"""
SELECT {POINTS} AS strikes, coalesce(u.blocked_until > now(), false) AS blocked, {BLOCK_COLUMNS}
FROM users u {BLOCK_EVENT} WHERE u.user_id = $2
"""  # noqa: S608
_CURRENT_BLOCK = f"SELECT {BLOCK_COLUMNS} FROM users u {BLOCK_EVENT} WHERE u.user_id = $1 AND u.blocked_until > now()"  # noqa: S608
# Under the row lock: the points that count, and (up to $3) the counted violations inside the
# warnings window ($1 seconds; 0: all), to tell whether this one is a warning.
_TALLY = f"""
SELECT {POINTS} AS points,
    (SELECT count(*) FROM (
        SELECT 1 FROM events e
        WHERE e.user_id = u.user_id AND e.counted AND e.reversed_at IS NULL
            AND ($1::float8 = 0 OR e.at >= now() - make_interval(secs => $1::float8))
        LIMIT $3) AS recent) AS recent
FROM users u WHERE u.user_id = $2
"""  # noqa: S608
_EXPIRED = f"""
SELECT user_id, {_STATE_COLUMNS} FROM users
WHERE blocked_until <= now()
ORDER BY blocked_until LIMIT {_SWEEP_BATCH}
FOR UPDATE SKIP LOCKED
"""  # noqa: S608
_USER_EXPIRED = "SELECT coalesce(blocked_until <= now(), false) FROM users WHERE user_id = $1"


class Store(Casework):
    """The strike store on PostgreSQL; implements middleware.protocols.StrikeStore.

    Standing, appeals, reversal, notes, erasure and retention are its `Casework` (gateway/casework.py).

    With a `BlockCache`, `current_block` answers from memory while the cache is valid and asks
    the database otherwise; every change of block state made here is written through to it.
    """

    def __init__(self, database: Database, policy: Policy, cache: BlockCache | None = None) -> None:
        self._db = database
        self.policy = policy
        self.cache = cache
        if cache is not None:
            cache.policy = policy
        self._from_cache = BLOCK_CHECKS.labels("cache")
        self._from_database = BLOCK_CHECKS.labels("database")

    # -- connections ---------------------------------------------------------------------------

    @property
    def database(self) -> Database:
        """The database the store is kept in (the admin API's operators live there too)."""
        return self._db

    # -- the StrikeStore protocol --------------------------------------------------------------

    def cached_block(self, user_id: str) -> tuple[bool, Block | None]:
        # A valid cache is an answer even when the pool is exhausted or closed: it is loaded,
        # and its live listener connection proves the database reachable and the set current.
        cache = self.cache
        if cache is not None and cache.valid:
            self._from_cache.inc()
            return True, cache.get(user_id)
        return False, None

    async def current_block(self, user_id: str) -> Block | None:
        known, block = self.cached_block(user_id)
        if known:
            return block
        self._from_database.inc()

        async def work(conn: Connection) -> Block | None:
            row = await conn.fetchrow(_CURRENT_BLOCK, user_id)
            return None if row is None else block_from(row, self.policy)

        return await self._db.read(work)

    def _learned(self, user_id: str, block: Block | None) -> None:
        if self.cache is not None:
            self.cache.learned(user_id, block)

    async def record_violation(self, user_id: str, violation: Violation) -> StrikeOutcome:
        return await self._record(user_id, violation, "violation")

    async def record_output_violation(self, user_id: str, violation: Violation, *, counts: bool) -> StrikeOutcome:
        if counts:
            return await self._record(user_id, violation, "output_violation")
        async with self._db.connection() as conn, conn.transaction():
            await conn.execute(_ENSURE_USER, user_id)
            return await self._uncounted(conn, user_id, violation, "output_violation")

    async def record_shadow_violation(self, user_id: str, violation: Violation) -> None:
        async with self._db.connection() as conn, conn.transaction():
            await conn.execute(_ENSURE_USER, user_id)
            await events.insert_violation(conn, user_id, violation, "violation", counted=False, shadow=True)

    async def _record(self, user_id: str, violation: Violation, kind: ViolationKind) -> StrikeOutcome:
        policy = self.policy
        async with self._db.connection() as conn, conn.transaction():
            state = await conn.fetchrow(_LOCK_OR_CREATE, user_id)
            assert state is not None
            if state["expired"]:
                await blocks.expire(conn, self.policy, user_id, state)
            elif state["blocked"]:
                # A call that passed the block check just before the block: recorded, no points.
                return await self._uncounted(conn, user_id, violation, kind)
            judgement = policy.judge(violation.verdict.categories)
            limit = 0 if judgement.zero_tolerance else policy.warnings
            tally = await conn.fetchrow(_TALLY, policy.window, user_id, limit)
            assert tally is not None
            warning = tally["recent"] < limit
            points = 0 if warning else judgement.points
            lifetime = policy.window if warning else judgement.lifetime
            recorded = "warning" if warning and kind == "violation" else kind
            event = await events.insert_violation(
                conn, user_id, violation, recorded, counted=True, points=points, lifetime=lifetime
            )
            strikes = tally["points"] + points
            outcome = self._outcome(violation, event, strikes=strikes, points=points, warning=warning)
            if warning or (strikes < policy.max_strikes and not judgement.zero_tolerance):
                if warning:
                    WARNINGS.inc()
                return outcome
            number = state["blocks"] + 1
            block = await blocks.set_block(
                conn,
                self.policy,
                user_id,
                policy.block_for(judgement, number),
                actor="policy",
                number=number,
                causes=(not judgement.zero_tolerance, event["id"]),
            )
        self._learned(user_id, block)
        log.info(
            "user blocked",
            user_id=user_id,
            strikes=strikes,
            block_number=number,
            until=iso(block.until),
            zero_tolerance=judgement.zero_tolerance,
        )
        return dataclasses.replace(outcome, block=block)

    async def _uncounted(
        self, conn: Connection, user_id: str, violation: Violation, kind: ViolationKind
    ) -> StrikeOutcome:
        """Record a violation that earns no points; the outcome shows the user's standing as it is."""
        event = await events.insert_violation(conn, user_id, violation, kind, counted=False)
        row = await conn.fetchrow(_STANDING, self.policy.window, user_id)
        assert row is not None
        return self._outcome(violation, event, strikes=row["strikes"], block=self._block_of(row))

    def _outcome(
        self,
        violation: Violation,
        event: asyncpg.Record,
        *,
        strikes: int,
        block: Block | None = None,
        points: int = 0,
        warning: bool = False,
    ) -> StrikeOutcome:
        window = self.policy.appeal_window_days
        return StrikeOutcome(
            strikes=strikes,
            max_strikes=self.policy.max_strikes,
            block=block,
            event_id=str(event["id"]),
            categories=violation.verdict.categories,
            points=points,
            warning=warning,
            appealable_until=event["at"] + timedelta(days=window) if window > 0 else None,
        )

    def _block_of(self, row: asyncpg.Record) -> Block | None:
        return block_from(row, self.policy) if row["blocked"] else None

    # -- admin ---------------------------------------------------------------------------------

    async def status(self, user_id: str) -> UserStatus | None:
        """The user's status; None if the gateway never recorded this user."""

        async def work(conn: Connection) -> asyncpg.Record | None:
            return await conn.fetchrow(STATUS, self.policy.window, user_id)

        row = await self._db.read(work)
        if row is not None and row["expired"]:
            await self._expire_one(user_id)
        return None if row is None else status_from(row, self.policy)

    async def block(
        self,
        user_id: str,
        *,
        seconds: float | None = None,
        permanent: bool = False,
        reason: str | None = None,
        operator: str = "admin",
    ) -> UserStatus:
        """Block a user (created if unknown) for `seconds` (default: the ladder's first step), or for good."""
        if permanent:
            duration = None
        else:
            duration = self.policy.block_duration(1) if seconds is None else seconds
            if duration is not None and not (0 < duration <= MAX_BLOCK_SECONDS):
                raise ValueError(f"block seconds must be positive, at most {MAX_BLOCK_SECONDS:.0f}; got {seconds!r}")
        async with self._db.connection() as conn, conn.transaction():
            state = await conn.fetchrow(_LOCK_OR_CREATE, user_id)
            assert state is not None
            if state["expired"]:
                await blocks.expire(conn, self.policy, user_id, state)
            block = await blocks.set_block(
                conn, self.policy, user_id, duration, actor="admin", number=None, reason=reason, operator=operator
            )
            row = await conn.fetchrow(STATUS, self.policy.window, user_id)
        self._learned(user_id, block)
        log.info("user blocked by admin", user_id=user_id, operator=operator, until=iso(block.until))
        assert row is not None
        return status_from(row, self.policy)

    async def unblock(self, user_id: str, *, reason: str | None = None, operator: str = "admin") -> UserStatus | None:
        """Lift the block and reset strikes (idempotent); None if the user is unknown."""
        async with self._db.connection() as conn, conn.transaction():
            state = await self._lock(conn, user_id)
            if state is None:
                return None
            await blocks.unblock(conn, self.policy, user_id, state, reason=reason, operator=operator)
            row = await conn.fetchrow(STATUS, self.policy.window, user_id)
        self._learned(user_id, None)
        if state["blocked"]:
            log.info("user unblocked by admin", user_id=user_id, operator=operator)
        assert row is not None
        return status_from(row, self.policy)

    async def list_users(
        self, *, blocked: bool | None = None, limit: int = 100, after: str | None = None, prefix: str = ""
    ) -> tuple[list[UserStatus], str | None]:
        """A page of users ordered by id and the cursor of the next page (gateway/users.py)."""

        async def work(conn: Connection) -> tuple[list[UserStatus], str | None]:
            return await list_users(conn, self.policy, blocked=blocked, limit=limit, after=after, prefix=prefix)

        return await self._db.read(work)

    async def events(self, user_id: str, *, limit: int = 100) -> list[dict[str, Any]] | None:
        """The user's audit trail, newest first; None if the user is unknown."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")

        async def work(conn: Connection) -> tuple[bool, list[dict[str, Any]] | None]:
            expired = await conn.fetchval(_USER_EXPIRED, user_id)
            if expired is None:
                return False, None
            return expired, await events.user_events(conn, user_id, min(limit, MAX_PAGE))

        expired, found = await self._db.read(work)
        if expired:
            # Record the expiry first, so the trail shows it.
            await self._expire_one(user_id)
            expired, found = await self._db.read(work)
        return found

    async def stats(self) -> dict[str, Any]:
        """The admin API's 24-hour statistics (gateway/events.py)."""
        return await self._db.read(events.stats)

    async def expire_blocks(self) -> int:
        """Record the `expiry` unblock of every block that ran out; the number recorded."""
        total = 0
        while True:
            async with self._db.connection() as conn, conn.transaction():
                rows = await conn.fetch(_EXPIRED)
                for row in rows:
                    await blocks.expire(conn, self.policy, row["user_id"], row)
            total += len(rows)
            if len(rows) < _SWEEP_BATCH:
                return total

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the database answers."""

        async def work(conn: Connection) -> None:
            await conn.fetchval("SELECT 1")

        await self._db.read(work)

    # -- inside a transaction holding the user's row lock ----------------------------------------

    async def _lock(self, conn: Connection, user_id: str) -> asyncpg.Record | None:
        """Lock a known user's row, recording a block that ran out first; their state, or None."""
        state = await conn.fetchrow(_LOCK_EXISTING, user_id)
        if state is not None and state["expired"]:
            await blocks.expire(conn, self.policy, user_id, state)
            state = await conn.fetchrow(_LOCK_EXISTING, user_id)
        return state

    async def _expire_one(self, user_id: str) -> None:
        async with self._db.connection() as conn, conn.transaction():
            await self._lock(conn, user_id)
