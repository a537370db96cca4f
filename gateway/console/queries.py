"""What the console reads that the admin API has no call for: the overview's aggregates and the
CSV export's events. Everything a page changes goes through the Store, as the REST calls do.

All of it reads the audit trail (`events`) by time, through its index on `at`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from gateway.database import Connection, Database
from gateway.events import EVENT_COLUMNS, VIOLATION_KINDS, event_json

# An event without categories (a moderator's block) is counted under this name.
NO_CATEGORY = "(by a moderator)"
EXPORT_BATCH = 1000
MAX_EXPORT = timedelta(days=31)

# $1 the bucket width, $2 the window's start (a bucket boundary), $3 the kinds.
_SERIES = f"""
SELECT date_bin($1::interval, e.at, $2::timestamptz) AS bucket, category, count(*) AS n
FROM events e,
    unnest(CASE WHEN cardinality(e.categories) = 0 THEN ARRAY['{NO_CATEGORY}'] ELSE e.categories END) AS category
WHERE e.at >= $2 AND e.kind = ANY($3::text[]) AND NOT e.shadow
GROUP BY 1, 2
"""  # noqa: S608 (constant text, no input)
# $1 the window's start: which detector and rule fire most, and how often moderators undid them.
_TOP_RULES = f"""
SELECT coalesce(e.detector, '') AS detector, coalesce(e.rule, '') AS rule, count(*) AS n,
    count(*) FILTER (WHERE e.reversed_at IS NOT NULL) AS reversed
FROM events e
WHERE e.at >= $1 AND e.kind IN {VIOLATION_KINDS!r} AND NOT e.shadow
GROUP BY 1, 2 ORDER BY n DESC, 1, 2 LIMIT 10
"""  # noqa: S608
_TOP_CATEGORIES = f"""
SELECT category, count(*) AS n, count(*) FILTER (WHERE e.reversed_at IS NOT NULL) AS reversed
FROM events e, unnest(e.categories) AS category
WHERE e.at >= $1 AND e.kind IN {VIOLATION_KINDS!r} AND NOT e.shadow
GROUP BY 1 ORDER BY n DESC, 1 LIMIT 10
"""  # noqa: S608
# Shadow mode's "would have blocked": violations recorded without a strike, by category.
_SHADOW = """
SELECT category, count(*) FILTER (WHERE e.at >= now() - interval '24 hours') AS day, count(*) AS week
FROM events e, unnest(e.categories) AS category
WHERE e.at >= $1 AND e.kind = 'violation' AND e.shadow
GROUP BY 1 ORDER BY week DESC, 1 LIMIT 20
"""
_COUNTS = """
SELECT (SELECT count(*) FROM users WHERE blocked_until > now()) AS blocked_users,
    (SELECT count(*) FROM appeals WHERE status = 'open') AS open_appeals,
    now() AS now
"""
_EXPORT = f"""
SELECT e.user_id, {EVENT_COLUMNS} FROM events e
WHERE e.at >= $1 AND e.at < $2 AND (e.at, e.id) > ($3, $4)
ORDER BY e.at, e.id LIMIT $5
"""  # noqa: S608


@dataclass(frozen=True, slots=True)
class Series:
    """Counts per time bucket and category over a window: `buckets` in order, `counts[category][i]`."""

    title: str
    buckets: list[datetime]
    counts: dict[str, list[int]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(sum(values) for values in self.counts.values())


@dataclass(frozen=True, slots=True)
class Overview:
    blocked_users: int
    open_appeals: int
    charts: list[Series]
    top_rules: list[dict[str, Any]]
    top_categories: list[dict[str, Any]]
    shadow: list[dict[str, Any]]


async def overview(database: Database) -> Overview:
    """The overview page's numbers, read on one connection."""

    async def work(conn: Connection) -> Overview:
        counts = await conn.fetchrow(_COUNTS)
        assert counts is not None
        now: datetime = counts["now"]
        hour = now.replace(minute=0, second=0, microsecond=0)
        day = now.replace(hour=0, minute=0, second=0, microsecond=0)
        # 24 hourly buckets ending with the current hour; 7 daily ones ending with today.
        windows = [("last 24 hours", timedelta(hours=1), hour - timedelta(hours=23), 24)]
        windows.append(("last 7 days", timedelta(days=1), day - timedelta(days=6), 7))
        charts = []
        for kinds, what in ((list(VIOLATION_KINDS), "Violations"), (["block"], "Blocks")):
            for label, width, start, size in windows:
                charts.append(await _series(conn, f"{what}, {label}", kinds, width, start, size))
        week = now - timedelta(days=7)
        return Overview(
            blocked_users=counts["blocked_users"],
            open_appeals=counts["open_appeals"],
            charts=charts,
            top_rules=[dict(row) for row in await conn.fetch(_TOP_RULES, week)],
            top_categories=[dict(row) for row in await conn.fetch(_TOP_CATEGORIES, week)],
            shadow=[dict(row) for row in await conn.fetch(_SHADOW, week)],
        )

    return await database.read(work)


async def _series(
    conn: Connection, title: str, kinds: list[str], width: timedelta, start: datetime, size: int
) -> Series:
    buckets = [start + width * index for index in range(size)]
    places = {bucket: index for index, bucket in enumerate(buckets)}
    series = Series(title, buckets)
    for row in await conn.fetch(_SERIES, width, start, kinds):
        place = places.get(row["bucket"])
        if place is not None:
            series.counts.setdefault(row["category"], [0] * size)[place] += row["n"]
    return series


async def export_events(
    database: Database, start: datetime, end: datetime, *, batch: int = EXPORT_BATCH
) -> AsyncIterator[dict[str, Any]]:
    """The events of [start, end) oldest first, read in batches (each its own short read), so a
    large range is streamed without a long transaction or memory that grows with it."""
    # Ids start at 1: (start, 0) comes before every event at `start`, and needs no earlier moment
    # (there is none before 0001-01-01).
    after_at, after_id = start, 0
    while True:

        async def work(conn: Connection, at: datetime = after_at, last: int = after_id) -> list[Any]:
            return await conn.fetch(_EXPORT, start, end, at, last, batch)

        rows = await database.read(work)
        for row in rows:
            event = event_json(row)
            event["user_id"] = row["user_id"]
            yield event
        if len(rows) < batch:
            return
        after_at, after_id = rows[-1]["at"], rows[-1]["id"]
