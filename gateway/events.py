"""The audit trail (`events`): a violation's row; a user's timeline and the 24-hour statistics; notes.

The store writes events inside its transactions, holding the user's row lock: a violation's row
here (`insert_violation`), block changes in gateway/blocks.py. Event kinds:
`violation` (refused, or recorded in shadow mode), `warning` (refused, no points),
`output_violation` (a flagged answer), `block` and `unblock`, `reversed` (a moderator's
correction), `appeal_accepted` and `appeal_rejected` (gateway/appeals.py), `note`, and
`erased` (the one trace an erased user leaves, holding only a hash of the id).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg

from gateway.database import Connection
from middleware.protocols import Violation

VIOLATION_KINDS = ("violation", "warning", "output_violation")
# What a user may appeal and a moderator may reverse: what was held against them (not shadow rows).
CONTESTED_KINDS = (*VIOLATION_KINDS, "block")
STATE_KINDS = ("block", "unblock")
DECISION_KINDS = ("reversed", "appeal_accepted", "appeal_rejected")
MAX_NOTE = 4000

# What `event_json` reads, from `events e`.
EVENT_COLUMNS = """
    e.id, e.kind, e.at, e.shadow, e.counted, e.categories, e.detector, e.rule, e.path, e.text_sha256, e.scores,
    e.app, e.points, CASE WHEN isfinite(e.expires_at) THEN e.expires_at END AS expires,
    e.actor, e.operator, e.reason, e.block_number,
    CASE WHEN isfinite(e.blocked_until) THEN e.blocked_until END AS until,
    coalesce(e.blocked_until = 'infinity', false) AS permanent,
    e.reversed_at, e.reversed_by, e.reverse_reason, e.event_ref, e.appeal_id, e.affected, e.note
"""
_EVENTS = f"""
SELECT {EVENT_COLUMNS} FROM events e WHERE e.user_id = $1
ORDER BY e.at DESC, e.id DESC LIMIT $2
"""  # noqa: S608 (constant text, no input)
_ADD_NOTE = f"""
INSERT INTO events AS e (user_id, kind, operator, note)
SELECT user_id, 'note', $2, $3 FROM users WHERE user_id = $1
RETURNING {EVENT_COLUMNS}
"""  # noqa: S608

# A counted row's strike lasts $13 seconds (0: until a block or unblock resets the points).
_INSERT_VIOLATION = """
INSERT INTO events (user_id, kind, shadow, counted, categories, detector, rule, path, text_sha256, scores, app,
    points, expires_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,
    CASE WHEN NOT $4 THEN NULL WHEN $13::float8 = 0 THEN 'infinity'::timestamptz
        ELSE now() + make_interval(secs => $13::float8) END)
RETURNING id, at
"""
_STATS = """
SELECT
    (SELECT count(*) FROM users WHERE blocked_until > now()) AS blocked_users,
    count(*) FILTER (WHERE kind IN ('violation', 'warning') AND NOT shadow) AS violations,
    count(*) FILTER (WHERE kind = 'warning') AS warnings,
    count(*) FILTER (WHERE kind = 'violation' AND shadow) AS shadow_violations,
    count(*) FILTER (WHERE kind = 'block') AS blocks,
    count(*) FILTER (WHERE kind = 'output_violation') AS output_violations
FROM events WHERE at > now() - interval '24 hours'
"""
_STATS_CATEGORIES = """
SELECT category, count(*) AS n
FROM events, unnest(categories) AS category
WHERE kind IN ('violation', 'warning') AND NOT shadow AND at > now() - interval '24 hours'
GROUP BY category ORDER BY category
"""


def iso(moment: datetime | None) -> str | None:
    """ISO-8601 in UTC with a `Z`, as the admin API and the webhooks show times."""
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


async def insert_violation(
    conn: Connection,
    user_id: str,
    violation: Violation,
    kind: str,
    *,
    counted: bool,
    shadow: bool = False,
    points: int = 0,
    lifetime: float = 0.0,
) -> asyncpg.Record:
    """Record a violation (`kind`: violation, warning or output_violation); its row's id and time."""
    verdict = violation.verdict
    event = await conn.fetchrow(
        _INSERT_VIOLATION,
        user_id,
        kind,
        shadow,
        counted,
        list(verdict.categories),
        verdict.detector,
        verdict.rule,
        violation.path,
        verdict.text_sha256,
        dict(verdict.scores),
        violation.app,
        points,
        lifetime,
    )
    assert event is not None
    return event


async def user_events(conn: Connection, user_id: str, limit: int) -> list[dict[str, Any]]:
    """The user's events, newest first, as the admin API shows them."""
    return [event_json(row) for row in await conn.fetch(_EVENTS, user_id, limit)]


async def add_note(conn: Connection, user_id: str, operator: str, text: str) -> dict[str, Any] | None:
    """Add a moderator's note to a known user's timeline: the event, or None if the user is unknown."""
    if not text.strip() or "\x00" in text or len(text) > MAX_NOTE:
        raise ValueError(f"a note is 1 to {MAX_NOTE} characters of text without NUL")
    row = await conn.fetchrow(_ADD_NOTE, user_id, operator, text)
    return None if row is None else event_json(row)


async def stats(conn: Connection) -> dict[str, Any]:
    """`GET /admin/stats`: violations count warnings too; `warnings_24h` says how many were."""
    totals = await conn.fetchrow(_STATS)
    assert totals is not None
    categories = await conn.fetch(_STATS_CATEGORIES)
    return {
        "blocked_users": totals["blocked_users"],
        "violations_24h": totals["violations"],
        "blocks_24h": totals["blocks"],
        "violations_by_category_24h": {row["category"]: row["n"] for row in categories},
        "warnings_24h": totals["warnings"],
        "shadow_violations_24h": totals["shadow_violations"],
        "output_violations_24h": totals["output_violations"],
    }


def event_json(row: asyncpg.Record) -> dict[str, Any]:
    event: dict[str, Any] = {"id": row["id"], "type": row["kind"], "at": iso(row["at"])}
    kind = row["kind"]
    if kind in VIOLATION_KINDS:
        event.update(
            categories=list(row["categories"]),
            detector=row["detector"],
            rule=row["rule"],
            path=row["path"],
            text_sha256=row["text_sha256"],
            scores=row["scores"] or {},
            shadow=row["shadow"],
            counted=row["counted"],
            points=row["points"],
            expires_at=iso(row["expires"]),
            app=row["app"],
        )
    elif kind == "note":
        event.update(operator=row["operator"], text=row["note"])
    else:
        event.update(actor=row["actor"], operator=row["operator"], reason=row["reason"])
    if kind in DECISION_KINDS:
        event.update(event_id=row["event_ref"])
        if kind != "reversed":
            event.update(appeal_id=str(row["appeal_id"]))
        if kind != "appeal_rejected":
            event.update(reversed_events=list(row["affected"] or ()))
    if kind in STATE_KINDS:
        event.update(
            block_number=row["block_number"],
            blocked_until=iso(row["until"]),
            permanent=row["permanent"],
        )
    if kind == "block":
        event.update(categories=list(row["categories"]), points=row["points"])
    if kind in CONTESTED_KINDS:
        event.update(
            reversed_at=iso(row["reversed_at"]), reversed_by=row["reversed_by"], reverse_reason=row["reverse_reason"]
        )
    return event
