"""Strikes, blocks and the audit trail in PostgreSQL (CONTRACT sections 5 and 6).

The database clock is the clock. A strike or a change of block state is one short transaction
holding the user's row lock, so counts are exact under concurrency and across replicas. An
expired block is no block; whichever transaction first notices one (a strike, an admin call,
the sweeper) records its `expiry` unblock. Every change of block state writes its audit event,
a `gateway_blocks` notification and, with webhooks on, an outbox row in the same transaction.
"""

from __future__ import annotations

import base64
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import asyncpg
import structlog
from asyncpg.pool import PoolConnectionProxy

from gateway.blockcache import CHANNEL, BlockCache
from gateway.database import Database, is_dropped_connection, is_unavailable
from gateway.metrics import BLOCK_CHECKS, BLOCK_EVENTS
from gateway.settings import Settings
from middleware.protocols import Block, StoreUnavailable, StrikeOutcome, Violation
from middleware.users import user_id_problem

log = structlog.get_logger(__name__)

type Connection = PoolConnectionProxy[asyncpg.Record]
Actor = Literal["policy", "admin", "expiry"]

NOTIFY_CHANNEL = CHANNEL
ACQUIRE_TIMEOUT = 5.0
MAX_PAGE = 1000  # the most users or events one call returns
# The longest timed block, 100 years: longer is what a permanent block is for (and PostgreSQL
# intervals overflow far beyond it).
MAX_BLOCK_SECONDS = 100 * 365 * 86400
_SWEEP_BATCH = 100

# The user's row, locked (created if unknown), with its block state read on the database clock.
_STATE_COLUMNS = """
    blocks, blocked_by,
    coalesce(blocked_until > now(), false) AS blocked,
    coalesce(blocked_until <= now(), false) AS expired,
    CASE WHEN isfinite(blocked_until) THEN blocked_until END AS until
"""
_LOCK_OR_CREATE = f"""
INSERT INTO users (user_id) VALUES ($1)
ON CONFLICT (user_id) DO UPDATE SET updated_at = now()
RETURNING {_STATE_COLUMNS}
"""  # noqa: S608 (constant text, no input)
_LOCK_EXISTING = f"SELECT {_STATE_COLUMNS} FROM users WHERE user_id = $1 FOR UPDATE"  # noqa: S608

# Strikes: counted violations since strikes_since, since an expired block's end, and inside the
# window ($1 seconds; 0: no window).
_STRIKES = """
(SELECT count(*) FROM events e
  WHERE e.user_id = u.user_id AND e.counted
    AND e.at >= greatest(
        u.strikes_since,
        CASE WHEN u.blocked_until <= now() THEN u.blocked_until END,
        CASE WHEN $1::float8 > 0 THEN now() - make_interval(secs => $1::float8) END))
"""
_STATUS_COLUMNS = f"""
    u.user_id, u.blocks, {_STRIKES} AS strikes,
    coalesce(u.blocked_until > now(), false) AS blocked,
    coalesce(u.blocked_until <= now(), false) AS expired,
    CASE WHEN u.blocked_until > now() AND isfinite(u.blocked_until) THEN u.blocked_until END AS until,
    coalesce(u.blocked_until = 'infinity', false) AS permanent
"""
_STATUS = f"SELECT {_STATUS_COLUMNS} FROM users u WHERE u.user_id = $2"  # noqa: S608
_STRIKE_COUNT = f"SELECT {_STRIKES} FROM users u WHERE u.user_id = $2"  # noqa: S608
_LIST_ALL = f"""
SELECT {_STATUS_COLUMNS} FROM users u
WHERE u.user_id > $2
ORDER BY u.user_id LIMIT $3
"""  # noqa: S608
_LIST_BLOCKED = f"""
SELECT {_STATUS_COLUMNS} FROM users u
WHERE u.user_id > $2 AND u.blocked_until > now()
ORDER BY u.user_id LIMIT $3
"""  # noqa: S608
_LIST_UNBLOCKED = f"""
SELECT {_STATUS_COLUMNS} FROM users u
WHERE u.user_id > $2 AND (u.blocked_until IS NULL OR u.blocked_until <= now())
ORDER BY u.user_id LIMIT $3
"""  # noqa: S608

_CURRENT_BLOCK = """
SELECT CASE WHEN isfinite(blocked_until) THEN blocked_until END AS until
FROM users WHERE user_id = $1 AND blocked_until > now()
"""
_INSERT_VIOLATION = """
INSERT INTO events (user_id, kind, shadow, counted, categories, detector, rule, path, text_sha256, scores)
VALUES ($1, 'violation', $2, $3, $4, $5, $6, $7, $8, $9)
"""
_SET_BLOCK = """
UPDATE users
SET blocked_until = CASE WHEN $2::float8 IS NULL THEN 'infinity' ELSE now() + make_interval(secs => $2::float8) END,
    blocked_by = $3, blocks = blocks + $4, updated_at = now()
WHERE user_id = $1
"""
_EXPIRE = """
UPDATE users
SET strikes_since = blocked_until, blocked_until = NULL, blocked_by = NULL, updated_at = now()
WHERE user_id = $1
"""
_UNBLOCK = """
UPDATE users
SET strikes_since = now(), blocked_until = NULL, blocked_by = NULL, updated_at = now()
WHERE user_id = $1
"""
# A block or unblock event; its blocked_until is the user's after the change ('infinity' kept).
_STATE_EVENT = """
INSERT INTO events (user_id, at, kind, actor, reason, block_number, blocked_until)
SELECT u.user_id, coalesce($6::timestamptz, now()), $2::text, $3::text, $4::text, $5::integer, u.blocked_until
FROM users u WHERE u.user_id = $1
RETURNING id, at,
    CASE WHEN isfinite(blocked_until) THEN blocked_until END AS until,
    coalesce(blocked_until = 'infinity', false) AS permanent
"""
_OUTBOX = "INSERT INTO webhook_outbox (event_id, payload) VALUES ($1, $2)"
_NOTIFY = f"SELECT pg_notify('{NOTIFY_CHANNEL}', $1)"
_EXPIRED = f"""
SELECT user_id, {_STATE_COLUMNS} FROM users
WHERE blocked_until <= now()
ORDER BY blocked_until LIMIT {_SWEEP_BATCH}
FOR UPDATE SKIP LOCKED
"""  # noqa: S608
_EVENTS = """
SELECT id, kind, at, shadow, categories, detector, rule, path, text_sha256, scores,
    actor, reason, block_number,
    CASE WHEN isfinite(blocked_until) THEN blocked_until END AS until,
    coalesce(blocked_until = 'infinity', false) AS permanent
FROM events WHERE user_id = $1
ORDER BY at DESC, id DESC LIMIT $2
"""
_USER_EXPIRED = "SELECT coalesce(blocked_until <= now(), false) FROM users WHERE user_id = $1"
_STATS = """
SELECT
    (SELECT count(*) FROM users WHERE blocked_until > now()) AS blocked_users,
    count(*) FILTER (WHERE kind = 'violation' AND NOT shadow) AS violations,
    count(*) FILTER (WHERE kind = 'violation' AND shadow) AS shadow_violations,
    count(*) FILTER (WHERE kind = 'block') AS blocks
FROM events WHERE at > now() - interval '24 hours'
"""
_STATS_CATEGORIES = """
SELECT category, count(*) AS n
FROM events, unnest(categories) AS category
WHERE kind = 'violation' AND NOT shadow AND at > now() - interval '24 hours'
GROUP BY category ORDER BY category
"""


def iso(moment: datetime | None) -> str | None:
    """ISO-8601 in UTC with a `Z`, as the admin API and the webhooks show times."""
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Policy:
    """The strike and block policy (CONTRACT section 5)."""

    max_strikes: int
    block_seconds: float
    strike_window_seconds: float = 0.0
    block_escalation: float = 1.0
    max_block_seconds: float = 2592000.0
    permanent_after_blocks: int = 0
    webhooks: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        return cls(
            max_strikes=settings.max_strikes,
            block_seconds=settings.block_seconds,
            strike_window_seconds=settings.strike_window_seconds,
            block_escalation=settings.block_escalation,
            max_block_seconds=settings.max_block_seconds,
            permanent_after_blocks=settings.permanent_after_blocks,
            webhooks=settings.webhook_url is not None,
        )

    def block_duration(self, number: int) -> float | None:
        """Seconds policy block `number` (1-based) lasts; None: permanent."""
        if self.permanent_after_blocks and number >= self.permanent_after_blocks:
            return None
        try:
            seconds = self.block_seconds * self.block_escalation ** (number - 1)
        except OverflowError:
            seconds = math.inf
        return min(seconds, self.max_block_seconds)


@dataclass(frozen=True, slots=True)
class UserStatus:
    user_id: str
    strikes: int
    max_strikes: int
    blocked: bool
    blocked_until: datetime | None
    permanent: bool
    blocks: int

    def to_json(self) -> dict[str, object]:
        """The status object of CONTRACT section 6."""
        return {
            "user_id": self.user_id,
            "strikes": self.strikes,
            "max_strikes": self.max_strikes,
            "blocked": self.blocked,
            "blocked_until": iso(self.blocked_until),
            "permanent": self.permanent,
            "blocks": self.blocks,
        }


def encode_cursor(user_id: str) -> str:
    return base64.urlsafe_b64encode(user_id.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """The user id a cursor stands for ("" for the empty cursor); ValueError if it is not one of ours."""
    try:
        user_id = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except ValueError:
        user_id = None
    # b64decode skips characters outside the alphabet; a cursor we made re-encodes to itself,
    # and holds an id the gateway could have recorded (a NUL would reach PostgreSQL otherwise).
    if user_id is None or encode_cursor(user_id) != cursor or (user_id and user_id_problem(user_id)):
        raise ValueError(f"not a valid cursor: {cursor!r}")
    return user_id


class Store:
    """The strike store on PostgreSQL; implements middleware.protocols.StrikeStore.

    With a `BlockCache`, `current_block` answers from memory while the cache is valid and asks
    the database otherwise; every change of block state made here is written through to it.
    """

    def __init__(self, database: Database, policy: Policy, cache: BlockCache | None = None) -> None:
        self._db = database
        self.policy = policy
        self.cache = cache
        self._from_cache = BLOCK_CHECKS.labels("cache")
        self._from_database = BLOCK_CHECKS.labels("database")

    # -- connections ---------------------------------------------------------------------------

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Connection]:
        try:
            async with self._db.pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
                yield conn
        except Exception as exc:
            if isinstance(exc, StoreUnavailable) or not is_unavailable(exc):
                raise
            raise StoreUnavailable(f"PostgreSQL did not answer: {exc!r}") from exc

    async def _read[T](self, work: Callable[[Connection], Awaitable[T]]) -> T:
        """Run an idempotent read; a connection found dead (a PostgreSQL restart) is retried once."""
        try:
            async with self._db.pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
                return await work(conn)
        except Exception as exc:
            if isinstance(exc, StoreUnavailable) or not is_unavailable(exc):
                raise
            if not is_dropped_connection(exc):
                raise StoreUnavailable(f"PostgreSQL did not answer: {exc!r}") from exc
            log.info("database connection lost, retrying once", error=repr(exc))
        async with self._connection() as conn:
            return await work(conn)

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
        return await self._read(self._current_block_work(user_id))

    @staticmethod
    def _current_block_work(user_id: str) -> Callable[[Connection], Awaitable[Block | None]]:
        async def work(conn: Connection) -> Block | None:
            row = await conn.fetchrow(_CURRENT_BLOCK, user_id)
            return None if row is None else Block(until=row["until"])

        return work

    def _learned(self, user_id: str, block: Block | None) -> None:
        if self.cache is not None:
            self.cache.learned(user_id, block)

    async def record_violation(self, user_id: str, violation: Violation) -> StrikeOutcome:
        outcome = await self._record_violation(user_id, violation)
        if outcome.block is not None:
            self._learned(user_id, outcome.block)
        return outcome

    async def _record_violation(self, user_id: str, violation: Violation) -> StrikeOutcome:
        max_strikes = self.policy.max_strikes
        async with self._connection() as conn, conn.transaction():
            state = await conn.fetchrow(_LOCK_OR_CREATE, user_id)
            assert state is not None
            if state["expired"]:
                await self._expire(conn, user_id, state)
            elif state["blocked"]:
                # A call that passed the block check just before the block: recorded, no strike.
                await self._insert_violation(conn, user_id, violation, shadow=False, counted=False)
                strikes = await self._strikes(conn, user_id)
                return StrikeOutcome(strikes=strikes, max_strikes=max_strikes, block=Block(until=state["until"]))
            await self._insert_violation(conn, user_id, violation, shadow=False, counted=True)
            strikes = await self._strikes(conn, user_id)
            if strikes < max_strikes:
                return StrikeOutcome(strikes=strikes, max_strikes=max_strikes, block=None)
            number = state["blocks"] + 1
            block = await self._set_block(
                conn, user_id, self.policy.block_duration(number), actor="policy", number=number, reason=None
            )
        log.info("user blocked", user_id=user_id, strikes=strikes, block_number=number, until=iso(block.until))
        return StrikeOutcome(strikes=strikes, max_strikes=max_strikes, block=block)

    async def record_shadow_violation(self, user_id: str, violation: Violation) -> None:
        async with self._connection() as conn, conn.transaction():
            await conn.execute("INSERT INTO users (user_id) VALUES ($1) ON CONFLICT (user_id) DO NOTHING", user_id)
            await self._insert_violation(conn, user_id, violation, shadow=True, counted=False)

    # -- admin ---------------------------------------------------------------------------------

    async def status(self, user_id: str) -> UserStatus | None:
        """The user's status; None if the gateway never recorded this user."""

        async def work(conn: Connection) -> asyncpg.Record | None:
            return await conn.fetchrow(_STATUS, self.policy.strike_window_seconds, user_id)

        row = await self._read(work)
        if row is not None and row["expired"]:
            await self._expire_one(user_id)
        return None if row is None else self._status(row)

    async def block(
        self, user_id: str, *, seconds: float | None = None, permanent: bool = False, reason: str | None = None
    ) -> UserStatus:
        """Block a user (created if unknown) for `seconds` (default: the policy's), or for good."""
        if permanent:
            duration = None
        else:
            duration = self.policy.block_seconds if seconds is None else seconds
            if not (0 < duration <= MAX_BLOCK_SECONDS):
                raise ValueError(f"block seconds must be positive, at most {MAX_BLOCK_SECONDS:.0f}; got {seconds!r}")
        async with self._connection() as conn, conn.transaction():
            state = await conn.fetchrow(_LOCK_OR_CREATE, user_id)
            assert state is not None
            if state["expired"]:
                await self._expire(conn, user_id, state)
            block = await self._set_block(conn, user_id, duration, actor="admin", number=None, reason=reason)
            row = await conn.fetchrow(_STATUS, self.policy.strike_window_seconds, user_id)
        self._learned(user_id, block)
        log.info("user blocked by admin", user_id=user_id, until=iso(block.until), permanent=block.permanent)
        assert row is not None
        return self._status(row)

    async def unblock(self, user_id: str, *, reason: str | None = None) -> UserStatus | None:
        """Lift the block and reset strikes (idempotent); None if the user is unknown."""
        async with self._connection() as conn, conn.transaction():
            state = await conn.fetchrow(_LOCK_EXISTING, user_id)
            if state is None:
                return None
            if state["expired"]:
                await self._expire(conn, user_id, state)
            await conn.execute(_UNBLOCK, user_id)
            if state["blocked"]:
                number = state["blocks"] if state["blocked_by"] == "policy" else None
                await self._state_event(conn, user_id, "unblock", "admin", reason, number)
            row = await conn.fetchrow(_STATUS, self.policy.strike_window_seconds, user_id)
        self._learned(user_id, None)
        if state["blocked"]:
            log.info("user unblocked by admin", user_id=user_id)
        assert row is not None
        return self._status(row)

    async def list_users(
        self, *, blocked: bool | None = None, limit: int = 100, after: str | None = None
    ) -> tuple[list[UserStatus], str | None]:
        """A page of users ordered by id and the cursor of the next page (None: last page).

        `limit` is capped at MAX_PAGE; a bad `after` cursor or a limit below 1 raises ValueError.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        limit = min(limit, MAX_PAGE)
        start = "" if after is None else decode_cursor(after)
        query = _LIST_ALL if blocked is None else _LIST_BLOCKED if blocked else _LIST_UNBLOCKED

        async def work(conn: Connection) -> list[asyncpg.Record]:
            return await conn.fetch(query, self.policy.strike_window_seconds, start, limit + 1)

        rows = await self._read(work)
        page = [self._status(row) for row in rows[:limit]]
        next_cursor = encode_cursor(page[-1].user_id) if len(rows) > limit else None
        return page, next_cursor

    async def events(self, user_id: str, *, limit: int = 100) -> list[dict[str, object]] | None:
        """The user's audit trail, newest first; None if the user is unknown."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")

        async def work(conn: Connection) -> tuple[bool, list[asyncpg.Record] | None]:
            expired = await conn.fetchval(_USER_EXPIRED, user_id)
            if expired is None:
                return False, None
            return expired, await conn.fetch(_EVENTS, user_id, min(limit, MAX_PAGE))

        expired, rows = await self._read(work)
        if expired:
            # Record the expiry first, so the trail shows it.
            await self._expire_one(user_id)
            expired, rows = await self._read(work)
        return None if rows is None else [_event_json(row) for row in rows]

    async def stats(self) -> dict[str, object]:
        """CONTRACT /admin/stats, plus shadow_violations_24h."""

        async def work(conn: Connection) -> tuple[asyncpg.Record, list[asyncpg.Record]]:
            totals = await conn.fetchrow(_STATS)
            assert totals is not None
            return totals, await conn.fetch(_STATS_CATEGORIES)

        totals, categories = await self._read(work)
        return {
            "blocked_users": totals["blocked_users"],
            "violations_24h": totals["violations"],
            "blocks_24h": totals["blocks"],
            "violations_by_category_24h": {row["category"]: row["n"] for row in categories},
            "shadow_violations_24h": totals["shadow_violations"],
        }

    async def expire_blocks(self) -> int:
        """Record the `expiry` unblock of every block that ran out; the number recorded."""
        total = 0
        while True:
            async with self._connection() as conn, conn.transaction():
                rows = await conn.fetch(_EXPIRED)
                for row in rows:
                    await self._expire(conn, row["user_id"], row)
            total += len(rows)
            if len(rows) < _SWEEP_BATCH:
                return total

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the database answers."""

        async def work(conn: Connection) -> None:
            await conn.fetchval("SELECT 1")

        await self._read(work)

    # -- inside a transaction holding the user's row lock ----------------------------------------

    async def _expire_one(self, user_id: str) -> None:
        async with self._connection() as conn, conn.transaction():
            state = await conn.fetchrow(_LOCK_EXISTING, user_id)
            if state is not None and state["expired"]:
                await self._expire(conn, user_id, state)

    async def _expire(self, conn: Connection, user_id: str, state: asyncpg.Record) -> None:
        await conn.execute(_EXPIRE, user_id)
        number = state["blocks"] if state["blocked_by"] == "policy" else None
        await self._state_event(conn, user_id, "unblock", "expiry", None, number, at=state["until"])
        log.info("block expired", user_id=user_id)

    async def _set_block(
        self,
        conn: Connection,
        user_id: str,
        seconds: float | None,
        *,
        actor: Actor,
        number: int | None,
        reason: str | None,
    ) -> Block:
        await conn.execute(_SET_BLOCK, user_id, seconds, actor, 0 if number is None else 1)
        until = await self._state_event(conn, user_id, "block", actor, reason, number)
        return Block(until=until)

    async def _state_event(
        self,
        conn: Connection,
        user_id: str,
        kind: Literal["block", "unblock"],
        actor: Actor,
        reason: str | None,
        number: int | None,
        *,
        at: datetime | None = None,
    ) -> datetime | None:
        """Write the audit event, the notification and the outbox row of a change of block state."""
        event = await conn.fetchrow(_STATE_EVENT, user_id, kind, actor, reason, number, at)
        assert event is not None
        await conn.execute(_NOTIFY, user_id)
        BLOCK_EVENTS.labels(kind, actor).inc()
        if self.policy.webhooks:
            payload = {
                "id": f"evt_{event['id']}",
                "type": "user.blocked" if kind == "block" else "user.unblocked",
                "created_at": iso(event["at"]),
                "user_id": user_id,
                "actor": actor,
                "reason": reason,
                "blocked_until": iso(event["until"]),
                "permanent": event["permanent"],
                "block_number": number,
            }
            await conn.execute(_OUTBOX, event["id"], payload)
        until: datetime | None = event["until"]
        return until

    async def _insert_violation(
        self, conn: Connection, user_id: str, violation: Violation, *, shadow: bool, counted: bool
    ) -> None:
        verdict = violation.verdict
        await conn.execute(
            _INSERT_VIOLATION,
            user_id,
            shadow,
            counted,
            list(verdict.categories),
            verdict.detector,
            verdict.rule,
            violation.path,
            verdict.text_sha256,
            dict(verdict.scores),
        )

    async def _strikes(self, conn: Connection, user_id: str) -> int:
        strikes: int = await conn.fetchval(_STRIKE_COUNT, self.policy.strike_window_seconds, user_id)
        return strikes

    def _status(self, row: asyncpg.Record) -> UserStatus:
        # An expired block reads as no block and no strikes, before anyone records its expiry.
        return UserStatus(
            user_id=row["user_id"],
            strikes=row["strikes"],
            max_strikes=self.policy.max_strikes,
            blocked=row["blocked"],
            blocked_until=row["until"],
            permanent=row["permanent"],
            blocks=row["blocks"],
        )


def _event_json(row: asyncpg.Record) -> dict[str, object]:
    event: dict[str, object] = {"id": row["id"], "type": row["kind"], "at": iso(row["at"])}
    if row["kind"] == "violation":
        event.update(
            categories=list(row["categories"]),
            detector=row["detector"],
            rule=row["rule"],
            path=row["path"],
            text_sha256=row["text_sha256"],
            scores=row["scores"] or {},
            shadow=row["shadow"],
        )
    else:
        event.update(
            actor=row["actor"],
            reason=row["reason"],
            block_number=row["block_number"],
            blocked_until=iso(row["until"]),
            permanent=row["permanent"],
        )
    return event
