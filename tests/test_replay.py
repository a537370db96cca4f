"""`policy replay` on a seeded audit trail, and against what the store itself did."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import asyncpg

from gateway.policy import PERMANENT, CategoryRule, Policy
from gateway.replay import Counts, _audit_trail, replay
from gateway.settings import Settings
from loadtests.harness import free_port
from tests.test_ladder import POLICY, flagged, policy_store
from tests.test_policy import run_cli

SettingsFactory = Callable[..., Settings]
DAY = 86400.0

# (user, days ago, kind, categories); extra columns per row below
SEED = [
    # three violations two days apart: three strikes under no window, one at a time under a 1-day window
    ("spread", 6, "violation", ("harassment",)),
    ("spread", 4, "violation", ("harassment",)),
    ("spread", 2, "violation", ("harassment",)),
    # four in one hour: blocked under both (a warning and three points under the proposal)
    ("burst", 3.03, "violation", ("harassment",)),
    ("burst", 3.02, "violation", ("harassment",)),
    ("burst", 3.01, "violation", ("harassment",)),
    ("burst", 3.00, "warning", ("harassment",)),
    # a zero-tolerance violation: three points under the current policy, a permanent block proposed
    ("minor", 5, "violation", ("sexual/minors",)),
    ("minor", 4.9, "violation", ("harassment",)),
    ("minor", 4.8, "violation", ("harassment",)),
    # a shadow violation counts as what enforcement would have refused
    ("shadowed", 1, "shadow", ("harassment",)),
    # left out: a reversed violation, an audited output violation, one older than the period
    ("reversed", 1, "reversed", ("sexual/minors",)),
    ("output", 1, "output_violation", ("sexual/minors",)),
    ("old", 40, "violation", ("sexual/minors",)),
]


async def seed(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.executemany(
            "INSERT INTO users (user_id) VALUES ($1) ON CONFLICT DO NOTHING", [(row[0],) for row in SEED]
        )
        for user, days, kind, categories in SEED:
            await conn.execute(
                "INSERT INTO events (user_id, at, kind, shadow, counted, points, categories, reversed_at)"
                " VALUES ($1, now() - make_interval(secs => $2), $3, $4, $5, $6, $7, $8)",
                user,
                days * DAY,
                "violation" if kind in ("shadow", "reversed") else kind,
                kind == "shadow",
                kind in ("violation", "warning", "reversed"),
                1 if kind in ("violation", "reversed") else 0,
                list(categories),
                None if kind != "reversed" else await conn.fetchval("SELECT now()"),
            )
    finally:
        await conn.close()


CURRENT = Policy(max_strikes=3, ladder=(DAY,))
PROPOSED = Policy(
    max_strikes=3,
    window=DAY,
    warnings=1,
    ladder=(DAY, PERMANENT),
    categories={"sexual/minors": CategoryRule(action="block", duration=PERMANENT)},
)


async def test_replay_counts_users_under_each_policy(database_url: str) -> None:
    await seed(database_url)
    conn = await asyncpg.connect(database_url)
    try:
        result = await replay(conn, CURRENT, PROPOSED, 30)
        before = await conn.fetchval("SELECT count(*) FROM events")
    finally:
        await conn.close()
    assert (result.violations, result.users) == (11, 4)
    # current: spread, burst and minor reach 3 points (burst's fourth is refused while blocked)
    assert result.current == Counts(warned=0, blocked=3, permanent=0)
    # proposed: a first violation in a day is a warning, so spread's never add up; minor is blocked
    # for good at once; shadowed's one violation is a warning
    assert result.proposed == Counts(warned=3, blocked=2, permanent=1)
    assert before == len(SEED)


async def test_replay_runs_the_stores_rules(settings_factory: SettingsFactory, database_url: str) -> None:
    """What the store did, the replay of its audit trail under the same policy does too."""
    stories: dict[str, list[tuple[str, ...]]] = {
        "warned": [("harassment",)],
        "blocked": [("harassment",), ("weapons",), ("harassment",), ("weapons",)],
        "zero": [("minors", "harassment"), ("weapons",)],
        "pointed": [("harassment",), ("harassment",), ("harassment",)],
    }
    async with policy_store(settings_factory, POLICY) as store:
        for user, story in stories.items():
            for categories in story:
                await store.record_violation(user, flagged(*categories))
    conn = await asyncpg.connect(database_url)
    try:
        result = await replay(conn, POLICY, POLICY, 1)
        done = await conn.fetchrow(
            "SELECT count(DISTINCT user_id) FILTER (WHERE kind = 'warning') AS warned,"
            " count(DISTINCT user_id) FILTER (WHERE kind = 'block') AS blocked,"
            " count(DISTINCT user_id) FILTER (WHERE kind = 'block' AND blocked_until = 'infinity') AS permanent"
            " FROM events"
        )
    finally:
        await conn.close()
    assert done is not None
    assert result.current == result.proposed == Counts(done["warned"], done["blocked"], done["permanent"])
    assert result.current == Counts(warned=3, blocked=2, permanent=1)


async def test_replay_connects_with_the_statement_cache_setting(settings_factory: SettingsFactory) -> None:
    """Behind PgBouncer in transaction mode (statement cache off) a named prepared statement left
    on the server connection is there for another client to collide with: replay leaves none."""
    prepared: dict[bool, int] = {}
    for cache in (True, False):
        async with _audit_trail(settings_factory(db_statement_cache=cache)) as conn:
            await replay(conn, CURRENT, PROPOSED, 30)
            prepared[cache] = await conn.fetchval("SELECT count(*) FROM pg_prepared_statements")
    assert prepared[True] > 0  # what the statement cache does: this test can tell
    assert prepared[False] == 0


def test_the_replay_command(tmp_path: Path, database_url: str) -> None:
    import asyncio

    asyncio.run(seed(database_url))
    path = tmp_path / "proposed.toml"
    path.write_text(
        'max_strikes = 3\nwindow = "1d"\nwarnings = 1\nladder = ["1d", "permanent"]\n'
        '[categories."sexual/minors"]\naction = "block"\nduration = "permanent"\n'
    )
    answer = run_cli(tmp_path, "policy", "replay", str(path), "--json", DATABASE_URL=database_url)
    assert answer.returncode == 0, answer.stderr
    assert json.loads(answer.stdout) == {
        "days": 30,
        "violations": 11,
        "users": 4,
        "current": {"warned": 0, "blocked": 3, "permanent": 0},
        "proposed": {"warned": 3, "blocked": 2, "permanent": 1},
    }
    longer = run_cli(tmp_path, "policy", "replay", str(path), "--days", "60", DATABASE_URL=database_url)
    assert longer.returncode == 0, longer.stderr
    assert longer.stdout.startswith("Replayed 12 violations of 5 users recorded in the last 60 days")
    assert "current policy" in longer.stdout
    # the current policy is the environment's (or its own file)
    strict = run_cli(
        tmp_path, "policy", "replay", str(path), "--json", DATABASE_URL=database_url, GATEWAY_MAX_STRIKES="1"
    )
    assert json.loads(strict.stdout)["current"] == {"warned": 0, "blocked": 4, "permanent": 0}


def test_the_replay_command_fails_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "proposed.toml"
    path.write_text("warnings = -1")
    bad = run_cli(tmp_path, "policy", "replay", str(path))
    assert (bad.returncode, bad.stderr.count("\n")) == (2, 1)
    assert "warnings: must not be negative" in bad.stderr
    path.write_text("")
    days = run_cli(tmp_path, "policy", "replay", str(path), "--days", "0")
    assert (days.returncode, days.stderr.strip()) == (2, "chat-gateway: --days must be from 1 to 3650, got 0")
    url = f"postgresql://nobody:hunter2@127.0.0.1:{free_port()}/x"
    down = run_cli(tmp_path, "policy", "replay", str(path), DATABASE_URL=url)
    assert (down.returncode, down.stderr.count("\n")) == (1, 1)
    assert "cannot replay" in down.stderr
    assert "hunter2" not in down.stderr
