"""Appeals: a user contests one of their violations or blocks; a moderator accepts or rejects it.

The `appeals` table sits beside `events` (schema version 3), one appeal per event. Filing and
deciding run inside the store's transaction holding the user's row lock, like every change of
a user's state; accepting reverses the event in that same transaction (gateway/reversal.py).
Refusals are the answers' own errors (404 `event_not_found`, 409 `appeal_exists`, ...), so the
admin API, the /gateway routes and the console say the same thing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import asyncpg

from gateway import blocks
from gateway.database import Connection
from gateway.events import CONTESTED_KINDS, EVENT_COLUMNS, event_json, iso
from gateway.policy import Policy
from gateway.users import MAX_PAGE, decode_cursor, encode_cursor
from middleware.errors import GatewayError

Status = Literal["open", "accepted", "rejected"]

MAX_MESSAGE = 2000
# Event and appeal ids as the API takes them: a bigserial, in digits.
ID = re.compile(r"[0-9]{1,18}")

_COLUMNS = "id, event_id, user_id, status, message, created_at, decided_at, decided_by, decision_reason"
# The user's event, locked ($3: the appeal window in seconds; 0: none), with what decides
# whether it may be appealed, and whether it is the block in force.
_EVENT = """
SELECT e.kind, e.shadow, e.reversed_at IS NOT NULL AS reversed,
    $3::float8 > 0 AND e.at > now() - make_interval(secs => $3::float8) AS in_window,
    (SELECT a.id FROM appeals a WHERE a.event_id = e.id) AS appeal_id,
    EXISTS (SELECT 1 FROM users u WHERE u.block_event_id = e.id AND u.blocked_until > now()) AS in_force
FROM events e WHERE e.id = $1 AND e.user_id = $2
FOR UPDATE OF e
"""
_INSERT = f"""
INSERT INTO appeals (event_id, user_id, message) VALUES ($1, $2, $3)
RETURNING {_COLUMNS}
"""  # noqa: S608 (constant text, no input)
_ONE = f"SELECT {_COLUMNS} FROM appeals WHERE id = $1"  # noqa: S608
_OWNER = "SELECT user_id FROM appeals WHERE id = $1"
_LOCK = f"SELECT {_COLUMNS} FROM appeals WHERE id = $1 FOR UPDATE"  # noqa: S608
_PAGE = f"SELECT {_COLUMNS} FROM appeals WHERE status = $1 AND id > $2 ORDER BY id LIMIT $3"  # noqa: S608
_OF_USER = f"SELECT {_COLUMNS} FROM appeals WHERE user_id = $1 ORDER BY id DESC LIMIT $2"  # noqa: S608
_EVENTS = f"SELECT {EVENT_COLUMNS} FROM events e WHERE e.id = ANY($1::bigint[])"  # noqa: S608
_DECIDE = f"""
UPDATE appeals SET status = $2, decided_at = now(), decided_by = $3, decision_reason = $4
WHERE id = $1
RETURNING {_COLUMNS}
"""  # noqa: S608


@dataclass(frozen=True, slots=True)
class Appeal:
    id: int
    event_id: int
    user_id: str
    status: Status
    message: str
    created_at: datetime
    decided_at: datetime | None
    decided_by: str | None
    decision_reason: str | None
    event: dict[str, Any] | None = None  # the appealed event as the admin API shows it, when read

    def to_json(self) -> dict[str, Any]:
        """The appeal as the user's application sees it (ids are strings, like a refusal's event_id)."""
        return {
            "id": str(self.id),
            "event_id": str(self.event_id),
            "user_id": self.user_id,
            "status": self.status,
            "message": self.message,
            "created_at": iso(self.created_at),
            "decided_at": iso(self.decided_at),
            "decision_reason": self.decision_reason,
        }

    def to_admin_json(self) -> dict[str, Any]:
        """The appeal as moderators see it: also who decided it, and the event appealed."""
        return {**self.to_json(), "decided_by": self.decided_by, "event": self.event}


def appeal_from(row: asyncpg.Record, event: dict[str, Any] | None = None) -> Appeal:
    return Appeal(
        id=row["id"],
        event_id=row["event_id"],
        user_id=row["user_id"],
        status=row["status"],
        message=row["message"],
        created_at=row["created_at"],
        decided_at=row["decided_at"],
        decided_by=row["decided_by"],
        decision_reason=row["decision_reason"],
        event=event,
    )


async def file(conn: Connection, policy: Policy, user_id: str, event_id: int, message: str) -> Appeal:
    """The user's appeal of their event `event_id`; the caller holds the user's row lock.

    Raises GatewayError: 404 `event_not_found` unless it is one of the user's violations or
    blocks, 409 `appeal_exists`, 409 `event_reversed`, 400 `appeal_window_closed`.
    """
    event = await conn.fetchrow(_EVENT, event_id, user_id, policy.appeal_window_days * 86400)
    if event is None or event["kind"] not in CONTESTED_KINDS or event["shadow"]:
        raise GatewayError(
            404,
            "event_not_found",
            f"This user has no violation or block {event_id}: appeal an event_id from a refusal or from "
            "GET /gateway/standing.",
            param="event_id",
        )
    if event["appeal_id"] is not None:
        raise GatewayError(
            409,
            "appeal_exists",
            f"Event {event_id} already has an appeal ({event['appeal_id']}); one appeal per event.",
            param="event_id",
            appeal_id=str(event["appeal_id"]),
        )
    if event["reversed"]:
        raise GatewayError(
            409,
            "event_reversed",
            f"Event {event_id} was already reversed by a moderator: there is nothing left to appeal.",
            param="event_id",
        )
    if not event["in_window"]:
        days = policy.appeal_window_days
        why = "this gateway takes no appeals" if days == 0 else f"appeals are taken for {days:g} days after an event"
        raise GatewayError(400, "appeal_window_closed", f"Event {event_id} can no longer be appealed: {why}.")
    row = await conn.fetchrow(_INSERT, event_id, user_id, message)
    assert row is not None
    if event["in_force"]:
        await blocks.notify(conn, user_id)  # the block caches state it as appealed now
    return appeal_from(row)


async def one(conn: Connection, appeal_id: int) -> Appeal | None:
    row = await conn.fetchrow(_ONE, appeal_id)
    if row is None:
        return None
    return (await _with_events(conn, [row]))[0]


def decode_appeal_cursor(after: str) -> int:
    """The appeal id a page's `next` cursor stands for (0 for the empty cursor); ValueError if it is not one."""
    decoded = decode_cursor(after)
    if decoded and not ID.fullmatch(decoded):
        raise ValueError(f"not a valid cursor: {after!r}")
    return int(decoded or 0)


async def page(conn: Connection, status: Status, *, limit: int, after: str | None) -> tuple[list[Appeal], str | None]:
    """A page of the appeals in `status`, oldest first, and the cursor of the next (None: last page).

    A bad `after` cursor or a limit below 1 raises ValueError; `limit` is capped at MAX_PAGE.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    limit = min(limit, MAX_PAGE)
    start = 0 if after is None else decode_appeal_cursor(after)
    rows = await conn.fetch(_PAGE, status, start, limit + 1)
    found = await _with_events(conn, rows[:limit])
    return found, encode_cursor(str(found[-1].id)) if len(rows) > limit else None


async def of_user(conn: Connection, user_id: str, limit: int = 100) -> list[Appeal]:
    """The user's appeals, newest first."""
    return [appeal_from(row) for row in await conn.fetch(_OF_USER, user_id, limit)]


async def owner(conn: Connection, appeal_id: int) -> str | None:
    """The user who filed the appeal, None if there is no such appeal."""
    user_id: str | None = await conn.fetchval(_OWNER, appeal_id)
    return user_id


async def lock(conn: Connection, appeal_id: int) -> Appeal | None:
    """The appeal, locked until the caller's transaction ends."""
    row = await conn.fetchrow(_LOCK, appeal_id)
    return None if row is None else appeal_from(row)


async def decide(conn: Connection, appeal: Appeal, status: Status, operator: str, reason: str) -> Appeal:
    """Record the decision of an open appeal the caller locked."""
    row = await conn.fetchrow(_DECIDE, appeal.id, status, operator, reason)
    assert row is not None
    return appeal_from(row)


def not_found(appeal_id: int | str) -> GatewayError:
    return GatewayError(404, "appeal_not_found", f"There is no appeal {appeal_id}.", param="appeal_id")


def decided(appeal: Appeal) -> GatewayError:
    return GatewayError(
        409,
        "appeal_decided",
        f"Appeal {appeal.id} was already decided ({appeal.status}, {iso(appeal.decided_at)}).",
        appeal_status=appeal.status,
    )


async def _with_events(conn: Connection, rows: list[asyncpg.Record]) -> list[Appeal]:
    events = {row["id"]: event_json(row) for row in await conn.fetch(_EVENTS, [row["event_id"] for row in rows])}
    return [appeal_from(row, events.get(row["event_id"])) for row in rows]
