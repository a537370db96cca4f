"""Changes of a user's block state, inside the caller's transaction holding the user's row lock.

Each one writes its audit event (`block` or `unblock`), a `gateway_blocks` notification for the
block caches of every replica, the metric and, with webhooks on, the outbox row, all in the
same transaction as the change (docs/WEBHOOKS.md).
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import asyncpg
import structlog

from gateway import webhooks
from gateway.blockcache import CHANNEL, block_from
from gateway.database import Connection
from gateway.events import iso
from gateway.metrics import BLOCK_EVENTS
from gateway.policy import Policy
from gateway.users import counting
from middleware.protocols import Block

log = structlog.get_logger(__name__)

Actor = Literal["policy", "admin", "expiry"]

# A block ($9 seconds; NULL: permanent) and its audit event, which holds the points that count,
# its causes (the violations whose points count when $3, and violation $4) and their categories.
# The user's row points to the event.
_SET_BLOCK = f"""
WITH counting AS (
    SELECT e.id, e.categories, e.points FROM users u JOIN events e ON {counting("$2")} WHERE u.user_id = $1
), causes AS (
    SELECT id, categories FROM counting WHERE $3 AND points > 0
    UNION SELECT id, categories FROM events WHERE id = $4::bigint
), event AS (
    INSERT INTO events (user_id, kind, actor, reason, operator, block_number, blocked_until, categories, points, causes)
    VALUES ($1, 'block', $5, $6, $7, $8,
        CASE WHEN $9::float8 IS NULL THEN 'infinity'::timestamptz ELSE now() + make_interval(secs => $9::float8) END,
        (SELECT coalesce(array_agg(DISTINCT c ORDER BY c), '{{}}') FROM causes, unnest(causes.categories) AS c),
        (SELECT coalesce(sum(points), 0) FROM counting),
        (SELECT array_agg(id ORDER BY id) FROM causes))
    RETURNING id, at, blocked_until, categories, points
)
UPDATE users SET blocked_until = event.blocked_until, blocked_by = $5, blocks = blocks + $10,
    block_event_id = event.id, updated_at = now()
FROM event WHERE users.user_id = $1
RETURNING event.id AS event_id, event.at AS event_at, event.categories, event.points,
    CASE WHEN isfinite(event.blocked_until) THEN event.blocked_until END AS until,
    event.blocked_until = 'infinity' AS permanent, false AS appealed
"""  # noqa: S608
_EXPIRE = """
UPDATE users
SET strikes_since = blocked_until, blocked_until = NULL, blocked_by = NULL, block_event_id = NULL, updated_at = now()
WHERE user_id = $1
"""
_UNBLOCK = """
UPDATE users
SET strikes_since = now(), blocked_until = NULL, blocked_by = NULL, block_event_id = NULL, updated_at = now()
WHERE user_id = $1
"""
# An unblock event; its blocked_until is the user's after the change.
_UNBLOCK_EVENT = """
INSERT INTO events (user_id, at, kind, actor, reason, operator, block_number, blocked_until)
SELECT u.user_id, coalesce($6::timestamptz, now()), 'unblock', $2::text, $3::text, $4::text, $5::integer,
    u.blocked_until
FROM users u WHERE u.user_id = $1
RETURNING id AS event_id, at AS event_at, '{}'::text[] AS categories, points,
    CASE WHEN isfinite(blocked_until) THEN blocked_until END AS until,
    coalesce(blocked_until = 'infinity', false) AS permanent
"""
# Reversed blocks ($2 of them policy blocks) leave the ladder; $3: the block in force is one of
# them and lifts, resetting the points when $4 (a reversed block) and keeping them otherwise
# (a reversed violation: the user's other strikes still count).
_TAKE_BACK = """
UPDATE users
SET blocks = greatest(blocks - $2, 0),
    blocked_until = CASE WHEN $3 THEN NULL ELSE blocked_until END,
    blocked_by = CASE WHEN $3 THEN NULL ELSE blocked_by END,
    block_event_id = CASE WHEN $3 THEN NULL ELSE block_event_id END,
    strikes_since = CASE WHEN $3 AND $4 THEN now() ELSE strikes_since END,
    updated_at = now()
WHERE user_id = $1
"""
_NOTIFY = f"SELECT pg_notify('{CHANNEL}', $1)"


async def set_block(
    conn: Connection,
    policy: Policy,
    user_id: str,
    seconds: float | None,
    *,
    actor: Actor,
    number: int | None,
    reason: str | None = None,
    operator: str | None = None,
    causes: tuple[bool, int | None] = (False, None),
) -> Block:
    """Block the user for `seconds` (None: for good); `number`: the policy block's place on the ladder.

    `causes`: whether the violations whose points count caused it, and which violation did.
    """
    cause_all, cause_id = causes
    event = await conn.fetchrow(
        _SET_BLOCK,
        user_id,
        policy.window,
        cause_all,
        cause_id,
        actor,
        reason,
        operator,
        number,
        seconds,
        0 if number is None else 1,
    )
    assert event is not None
    await _announce(conn, policy, user_id, "block", actor, reason, number, operator, event)
    return block_from(event, policy)


async def expire(conn: Connection, policy: Policy, user_id: str, state: asyncpg.Record) -> None:
    """Record the end of a block that ran out (`state`: the user's row, locked)."""
    await conn.execute(_EXPIRE, user_id)
    await _unblock_event(conn, policy, user_id, "expiry", None, state["block_number"], operator=None, at=state["until"])
    log.info("block expired", user_id=user_id)


async def unblock(
    conn: Connection, policy: Policy, user_id: str, state: asyncpg.Record, *, reason: str | None, operator: str
) -> None:
    """An operator's unblock: lift the block in force, if any, and reset the points."""
    await conn.execute(_UNBLOCK, user_id)
    if state["blocked"]:
        await _unblock_event(conn, policy, user_id, "admin", reason, state["block_number"], operator=operator)


async def take_back(
    conn: Connection,
    policy: Policy,
    user_id: str,
    state: asyncpg.Record,
    *,
    policy_blocks: int,
    lift: bool,
    reset_points: bool,
    reason: str | None,
    operator: str,
) -> None:
    """Undo reversed blocks: `policy_blocks` of them leave the ladder count; `lift`: the block in
    force is one of them and ends now (an `unblock` by the operator), resetting the points when
    `reset_points`."""
    await conn.execute(_TAKE_BACK, user_id, policy_blocks, lift, reset_points)
    if lift:
        await _unblock_event(conn, policy, user_id, "admin", reason, state["block_number"], operator=operator)


async def notify(conn: Connection, user_id: str) -> None:
    """Have every replica's block cache read the user again (its block changed, or was appealed)."""
    await conn.execute(_NOTIFY, user_id)


async def _unblock_event(
    conn: Connection,
    policy: Policy,
    user_id: str,
    actor: Actor,
    reason: str | None,
    number: int | None,
    *,
    operator: str | None,
    at: datetime | None = None,
) -> None:
    event = await conn.fetchrow(_UNBLOCK_EVENT, user_id, actor, reason, operator, number, at)
    assert event is not None
    await _announce(conn, policy, user_id, "unblock", actor, reason, number, operator, event)


async def _announce(
    conn: Connection,
    policy: Policy,
    user_id: str,
    kind: Literal["block", "unblock"],
    actor: Actor,
    reason: str | None,
    number: int | None,
    operator: str | None,
    event: asyncpg.Record,
) -> None:
    """The notification, the metric and the outbox row of a change of block state."""
    await notify(conn, user_id)
    BLOCK_EVENTS.labels(kind, actor).inc()
    if policy.webhooks:
        payload = {
            "id": f"evt_{event['event_id']}",
            "type": "user.blocked" if kind == "block" else "user.unblocked",
            "created_at": iso(event["event_at"]),
            "user_id": user_id,
            "actor": actor,
            "operator": operator,
            "reason": reason,
            "blocked_until": iso(event["until"]),
            "permanent": event["permanent"],
            "block_number": number,
            "categories": list(event["categories"]),
        }
        await webhooks.enqueue(conn, event["event_id"], payload)
