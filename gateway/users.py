"""Users as the admin API reads them: the points that count, a user's status, the list of users.

A user's points are the SUM of their counted, unexpired, unreversed violations' points since
their strikes last reset (gateway/store.py writes them); `counting` is that rule in SQL, shared
with the store's own transactions so both count alike.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from gateway.events import iso
from gateway.policy import Policy
from middleware.users import user_id_problem

type Connection = PoolConnectionProxy[asyncpg.Record]

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
    conn: Connection, policy: Policy, *, blocked: bool | None, limit: int, after: str | None
) -> tuple[list[UserStatus], str | None]:
    """A page of users ordered by id and the cursor of the next page (None: last page).

    `limit` is capped at MAX_PAGE; a bad `after` cursor or a limit below 1 raises ValueError.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    limit = min(limit, MAX_PAGE)
    start = "" if after is None else decode_cursor(after)
    query = _LIST_ALL if blocked is None else _LIST_BLOCKED if blocked else _LIST_UNBLOCKED
    rows = await conn.fetch(query, policy.window, start, limit + 1)
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
