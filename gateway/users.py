"""Users as the admin API and their applications read them: the points that count, a user's status,
the list of users, a user's standing.

A user's points are the SUM of their counted, unexpired, unreversed violations' points since
their strikes last reset (gateway/store.py writes them); `counting` is that rule in SQL, shared
with the store's own transactions so both count alike.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from gateway.database import Connection
from gateway.events import iso
from gateway.policy import Policy
from middleware.users import user_id_problem

MAX_PAGE = 1000


def counting(window: str) -> str:
    """SQL: whether event e of user u counts toward u's points now.

    Counted and unreversed, after strikes_since and after an expired block's end, and not
    expired. Rows from before schema version 2 have no expires_at: the policy's window (the
    parameter `window`, seconds; 0: none) is their lifetime.
    """
    return f"""
    e.user_id = u.user_id AND e.counted AND e.reversed_at IS NULL
    AND e.at >= greatest(u.strikes_since, CASE WHEN u.blocked_until <= now() THEN u.blocked_until END)
    AND (e.expires_at > now() OR (e.expires_at IS NULL
        AND ({window}::float8 = 0 OR e.at > now() - make_interval(secs => {window}::float8))))
    """


# The points that count for user u ($1: the policy's window).
POINTS = f"(SELECT coalesce(sum(e.points), 0) FROM events e WHERE {counting('$1')})"  # noqa: S608
_STATUS_COLUMNS = f"""
    u.user_id, u.blocks, {POINTS} AS strikes,
    coalesce(u.blocked_until > now(), false) AS blocked,
    coalesce(u.blocked_until <= now(), false) AS expired,
    CASE WHEN u.blocked_until > now() AND isfinite(u.blocked_until) THEN u.blocked_until END AS until,
    coalesce(u.blocked_until = 'infinity', false) AS permanent
"""
# A user's status ($1: the policy's window, $2: the user), with `expired`: the block ran out and
# no one has recorded its expiry yet (it reads as no block already).
STATUS = f"SELECT {_STATUS_COLUMNS} FROM users u WHERE u.user_id = $2"  # noqa: S608
_LIST_ALL = f"""
SELECT {_STATUS_COLUMNS} FROM users u
WHERE u.user_id > $2 AND starts_with(u.user_id, $4)
ORDER BY u.user_id LIMIT $3
"""  # noqa: S608
_LIST_BLOCKED = f"""
SELECT {_STATUS_COLUMNS} FROM users u
WHERE u.user_id > $2 AND starts_with(u.user_id, $4) AND u.blocked_until > now()
ORDER BY u.user_id LIMIT $3
"""  # noqa: S608
_LIST_UNBLOCKED = f"""
SELECT {_STATUS_COLUMNS} FROM users u
WHERE u.user_id > $2 AND starts_with(u.user_id, $4) AND (u.blocked_until IS NULL OR u.blocked_until <= now())
ORDER BY u.user_id LIMIT $3
"""  # noqa: S608

# The standing's lists hold at most this many strikes and warnings (a user far past the limit).
_MAX_LISTED = 1000
# A strike's or warning's end: its expires_at, or for a row from before schema version 2 the
# window ($1 seconds; 0: none) after it; NULL: none.
_ENDS = """CASE WHEN e.expires_at IS NULL
        THEN CASE WHEN $1::float8 > 0 THEN e.at + make_interval(secs => $1::float8) END
        WHEN isfinite(e.expires_at) THEN e.expires_at END"""


def _appealable(window: str) -> str:
    """SQL: whether event e may still be appealed; `window`: the appeal window in seconds (0: no appeals)."""
    return f"""coalesce({window}::float8 > 0 AND e.at > now() - make_interval(secs => {window}::float8)
        AND NOT EXISTS (SELECT 1 FROM appeals a WHERE a.event_id = e.id), false)"""  # noqa: S608


# The standing: $1 the policy's window, $2 the user, $3 the appeal window in seconds.
_ACTIVE_STRIKES = f"""
SELECT e.id, e.at, e.categories, e.points, {_ENDS} AS ends, {_appealable("$3")} AS appealable
FROM users u JOIN events e ON {counting("$1")}
WHERE u.user_id = $2 AND e.points > 0
ORDER BY e.at, e.id LIMIT {_MAX_LISTED}
"""  # noqa: S608
# Warnings inside the window: while they last, the user's next violations count.
_ACTIVE_WARNINGS = f"""
SELECT e.id, e.at, e.categories,
    CASE WHEN $1::float8 > 0 THEN e.at + make_interval(secs => $1::float8) END AS ends,
    {_appealable("$3")} AS appealable
FROM events e
WHERE e.user_id = $2 AND e.kind = 'warning' AND e.counted AND e.reversed_at IS NULL
    AND ($1::float8 = 0 OR e.at >= now() - make_interval(secs => $1::float8))
ORDER BY e.at, e.id LIMIT {_MAX_LISTED}
"""  # noqa: S608
# $1 the user, $2 the appeal window in seconds.
_BLOCK_IN_FORCE = f"""
SELECT e.id, e.at, coalesce(e.categories, '{{}}') AS categories, e.actor,
    CASE WHEN isfinite(u.blocked_until) THEN u.blocked_until END AS until,
    u.blocked_until = 'infinity' AS permanent, {_appealable("$2")} AS appealable
FROM users u LEFT JOIN events e ON e.id = u.block_event_id
WHERE u.user_id = $1 AND u.blocked_until > now()
"""  # noqa: S608


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
        """The admin API's user status object."""
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


async def list_users(
    conn: Connection, policy: Policy, *, blocked: bool | None, limit: int, after: str | None, prefix: str = ""
) -> tuple[list[UserStatus], str | None]:
    """A page of users ordered by id and the cursor of the next page (None: last page); with
    `prefix`, only the ids that start with it (the console's search).

    `limit` is capped at MAX_PAGE; a bad `after` cursor or a limit below 1 raises ValueError.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    limit = min(limit, MAX_PAGE)
    start = "" if after is None else decode_cursor(after)
    query = _LIST_ALL if blocked is None else _LIST_BLOCKED if blocked else _LIST_UNBLOCKED
    rows = await conn.fetch(query, policy.window, start, limit + 1, prefix)
    page = [status_from(row, policy) for row in rows[:limit]]
    return page, encode_cursor(page[-1].user_id) if len(rows) > limit else None


def status_from(row: asyncpg.Record, policy: Policy) -> UserStatus:
    # An expired block reads as no block and no strikes, before anyone records its expiry.
    return UserStatus(
        user_id=row["user_id"],
        strikes=row["strikes"],
        max_strikes=policy.max_strikes,
        blocked=row["blocked"],
        blocked_until=row["until"],
        permanent=row["permanent"],
        blocks=row["blocks"],
    )


async def standing(conn: Connection, policy: Policy, user_id: str) -> dict[str, Any]:
    """What the user's application shows as their account standing, the user's appeals aside.

    A user the gateway never saw stands at zero. Every event is named by its `event_id` (a
    string, as the refusals give it), the handle of an appeal, with whether it is `appealable`.
    """
    window = policy.window
    appeal_seconds = policy.appeal_window_days * 86400
    status = await conn.fetchrow(STATUS, window, user_id)
    strikes = await conn.fetch(_ACTIVE_STRIKES, window, user_id, appeal_seconds)
    warnings = await conn.fetch(_ACTIVE_WARNINGS, window, user_id, appeal_seconds)
    block = await conn.fetchrow(_BLOCK_IN_FORCE, user_id, appeal_seconds)
    return {
        "user_id": user_id,
        "strikes": 0 if status is None else status["strikes"],
        "max_strikes": policy.max_strikes,
        "blocked": block is not None,
        "blocked_until": None if block is None else iso(block["until"]),
        "permanent": block is not None and block["permanent"],
        "warnings": len(warnings),
        "active_strikes": [
            {
                "event_id": str(row["id"]),
                "at": iso(row["at"]),
                "categories": list(row["categories"]),
                "points": row["points"],
                "expires_at": iso(row["ends"]),
                "appealable": row["appealable"],
            }
            for row in strikes
        ],
        "active_warnings": [
            {
                "event_id": str(row["id"]),
                "at": iso(row["at"]),
                "categories": list(row["categories"]),
                "expires_at": iso(row["ends"]),
                "appealable": row["appealable"],
            }
            for row in warnings
        ],
        "block": None
        if block is None
        else {
            "event_id": None if block["id"] is None else str(block["id"]),
            "at": iso(block["at"]),
            "until": iso(block["until"]),
            "permanent": block["permanent"],
            "categories": list(block["categories"]),
            "by": block["actor"] or "policy",
            "appealable": block["appealable"],
        },
    }
