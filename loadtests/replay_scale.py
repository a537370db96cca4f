"""How long `policy replay` takes on a large audit trail: seed N violations, replay, print the time.

    ./dev python -m loadtests.replay_scale --database-url postgresql://.../scratch --events 1000000

The database is migrated first and gets N violation events of `--users` users over the last 30
days (a few heavy users, many light ones; categories drawn like real traffic, zero-tolerance ones
rare). Use a scratch database: the seeded rows stay.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import asyncpg

from gateway.database import migrate
from gateway.policy import PERMANENT, CategoryRule, Policy
from gateway.replay import replay

PROPOSED = Policy(
    max_strikes=3,
    window=90 * 86400,
    warnings=1,
    ladder=(86400, 7 * 86400, 30 * 86400, PERMANENT),
    categories={
        "harassment": CategoryRule(weight=1, expires=30 * 86400),
        "illicit/violent": CategoryRule(weight=2),
        "sexual/minors": CategoryRule(action="block", duration=PERMANENT),
    },
)
CURRENT = Policy(max_strikes=3, ladder=(86400,))

_SEED = """
INSERT INTO users (user_id) SELECT 'user-' || g FROM generate_series(0, $1 - 1) AS g ON CONFLICT DO NOTHING;
"""
_EVENTS = """
INSERT INTO events (user_id, at, kind, counted, points, categories, detector, text_sha256)
SELECT 'user-' || floor(power(random(), 3) * $2)::int,
    now() - random() * interval '30 days', 'violation', true, 1,
    ARRAY[CASE WHEN r < 0.40 THEN 'harassment' WHEN r < 0.60 THEN 'hate' WHEN r < 0.80 THEN 'violence'
        WHEN r < 0.90 THEN 'illicit/violent' WHEN r < 0.999 THEN 'self-harm' ELSE 'sexual/minors' END],
    'rules', md5(g::text)
FROM (SELECT g, random() AS r FROM generate_series(1, $1) AS g) AS drawn
"""


async def main(database_url: str, events: int, users: int) -> None:
    await migrate(database_url)
    conn = await asyncpg.connect(database_url)
    try:
        started = time.perf_counter()
        await conn.execute(_SEED.replace("$1", str(users)))
        await conn.execute(_EVENTS, events, users)
        await conn.execute("ANALYZE events")
        print(f"seeded {events} violations of up to {users} users in {time.perf_counter() - started:.1f} s")
        started = time.perf_counter()
        result = await replay(conn, CURRENT, PROPOSED, 30)
        elapsed = time.perf_counter() - started
    finally:
        await conn.close()
    print(f"replayed {result.violations} violations of {result.users} users in {elapsed:.2f} s")
    print(f"current: {result.current}; proposed: {result.proposed}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=50_000)
    args = parser.parse_args()
    asyncio.run(main(args.database_url, args.events, args.users))
