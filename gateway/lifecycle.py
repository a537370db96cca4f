"""The data's lifecycle: erasing a user on request, and deleting old audit events (retention).

Erasure is one transaction under the user's row lock: the user's appeals, their events' outbox
rows, their events and their row go, and one `erased` event stays, holding only the hex SHA-256
of the id, the time and the operator (so "was this user erased?" has an answer for whoever
still knows the id, and nothing else does). A block in force goes with the user: the replicas'
block caches are told at once.

Retention deletes events older than GATEWAY_EVENT_RETENTION_DAYS in small batches, each its own
short transaction that skips rows another transaction holds. It never deletes an event that
still matters: a strike whose points count, the block in force and the violations behind it, an
event with an open appeal, or one whose webhook is not delivered yet. Decided appeals go with
their event. Delivered webhook outbox rows are deleted a week after delivery.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from gateway import blocks
from gateway.database import Connection
from gateway.users import counting

BATCH = 500
OUTBOX_KEPT_DAYS = 7
# An event's place in the order retention walks them: (at, id).
type Position = tuple[datetime, int]
START: Position = (datetime.min.replace(tzinfo=UTC), 0)

_LOCK = "SELECT 1 FROM users WHERE user_id = $1 FOR UPDATE"
_ERASE = (
    "DELETE FROM appeals WHERE user_id = $1",
    "DELETE FROM webhook_outbox o USING events e WHERE o.event_id = e.id AND e.user_id = $1",
    "UPDATE users SET block_event_id = NULL WHERE user_id = $1",
    "DELETE FROM events WHERE user_id = $1",
    "DELETE FROM users WHERE user_id = $1",
)
_ERASED = """
INSERT INTO events (user_id, kind, actor, operator, user_sha256) VALUES (NULL, 'erased', 'admin', $1, $2)
RETURNING id
"""

# Events older than $1 seconds that nothing needs any more ($2: the policy's window, $3: how many),
# after ($4, $5): a sweep walks the old events once, past those it keeps.
_EXPENDABLE = f"""
SELECT e.id, e.at FROM events e LEFT JOIN users u ON u.user_id = e.user_id
WHERE e.at < now() - make_interval(secs => $1::float8) AND (e.at, e.id) > ($4::timestamptz, $5::bigint)
    AND NOT coalesce(e.points > 0 AND {counting("$2")}, false)
    AND NOT coalesce(u.blocked_until > now() AND (u.block_event_id = e.id
        OR EXISTS (SELECT 1 FROM events b WHERE b.id = u.block_event_id AND e.id = ANY(b.causes))), false)
    AND NOT EXISTS (SELECT 1 FROM appeals a WHERE a.event_id = e.id AND a.status = 'open')
    AND NOT EXISTS (SELECT 1 FROM webhook_outbox o WHERE o.event_id = e.id AND o.delivered_at IS NULL)
ORDER BY e.at, e.id
LIMIT $3
FOR UPDATE OF e SKIP LOCKED
"""  # noqa: S608 (constant text, no input)
_DELETE_OUTBOX_OF = "DELETE FROM webhook_outbox WHERE event_id = ANY($1::bigint[])"
_DELETE_EVENTS = "DELETE FROM events WHERE id = ANY($1::bigint[])"
_DELIVERED = f"""
DELETE FROM webhook_outbox WHERE id IN (
    SELECT id FROM webhook_outbox
    WHERE delivered_at < now() - interval '{OUTBOX_KEPT_DAYS} days'
    ORDER BY id LIMIT $1
    FOR UPDATE SKIP LOCKED)
"""  # noqa: S608


def user_hash(user_id: str) -> str:
    """The hex SHA-256 of a user id (UTF-8), the one trace an erasure keeps."""
    return hashlib.sha256(user_id.encode("utf-8")).hexdigest()


async def erase(conn: Connection, user_id: str, *, operator: str) -> bool:
    """Erase the user (inside the caller's transaction); False if the gateway never recorded them."""
    if await conn.fetchval(_LOCK, user_id) is None:
        return False
    for statement in _ERASE:
        await conn.execute(statement, user_id)
    await conn.fetchval(_ERASED, operator, user_hash(user_id))
    await blocks.notify(conn, user_id)
    return True


async def delete_old_events(
    conn: Connection, *, days: float, window: float, after: Position = START
) -> tuple[int, Position]:
    """Delete one batch of expendable events older than `days`, after `after` (inside the caller's
    transaction): how many, and where the next batch starts."""
    rows = await conn.fetch(_EXPENDABLE, days * 86400, window, BATCH, *after)
    ids = [row["id"] for row in rows]
    if ids:
        # Only delivered rows remain for these events; they would otherwise hold the events back.
        await conn.execute(_DELETE_OUTBOX_OF, ids)
        await conn.execute(_DELETE_EVENTS, ids)
    return len(ids), (rows[-1]["at"], rows[-1]["id"]) if rows else after


async def delete_delivered(conn: Connection) -> int:
    """Delete one batch of outbox rows delivered over a week ago."""
    status = await conn.execute(_DELIVERED, BATCH)
    return int(status.rsplit(" ", 1)[1])
