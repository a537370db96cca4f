"""The enforcement ladder in the store, against a real PostgreSQL: warnings, weights, lifetimes,
zero tolerance, the ladder, exact points under concurrency and across replicas."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY

from gateway.blockcache import BlockCache
from gateway.database import Database, migrate
from gateway.policy import PERMANENT, CategoryRule, Policy
from gateway.settings import Settings
from gateway.store import Store
from middleware.protocols import Verdict, Violation
from tests.test_store import db_now, fetch, wait_past

SettingsFactory = Callable[..., Settings]
DAY = 86400.0
POLICY = Policy(
    max_strikes=3,
    window=90 * DAY,
    warnings=1,
    ladder=(DAY, 7 * DAY, 30 * DAY, PERMANENT),
    categories={
        "harassment": CategoryRule(weight=1, expires=30 * DAY),
        "weapons": CategoryRule(weight=2),
        "minors": CategoryRule(action="block", duration=PERMANENT),
        "scam": CategoryRule(action="block"),
        "spam": CategoryRule(weight=2, expires=1),
    },
)


def flagged(*categories: str, app: str | None = None) -> Violation:
    verdict = Verdict(detector="rules", categories=categories, text_sha256="cd" * 32, rule="r")
    return Violation(verdict=verdict, path="/v1/chat/completions", app=app)


@asynccontextmanager
async def policy_store(
    settings_factory: SettingsFactory, policy: Policy = POLICY, *, cache: bool = False, **overrides: Any
) -> AsyncIterator[Store]:
    settings = settings_factory(**overrides)
    database = Database(settings)
    await database.open()
    block_cache = BlockCache() if cache else None
    try:
        store = Store(database, policy, block_cache)
        if block_cache is not None:
            await block_cache.start(database.dsn)
        yield store
    finally:
        if block_cache is not None:
            await block_cache.close()
        await database.close()


def warnings_metric() -> float:
    return REGISTRY.get_sample_value("gateway_warnings_total") or 0.0


async def test_a_first_violation_is_a_warning_then_points_count(settings_factory: SettingsFactory) -> None:
    async with policy_store(settings_factory) as store:
        before = warnings_metric()
        warning = await store.record_violation("alice", flagged("harassment"))
        assert (warning.warning, warning.points, warning.strikes, warning.block) == (True, 0, 0, None)
        assert warning.categories == ("harassment",)
        assert warnings_metric() == before + 1
        first = await store.record_violation("alice", flagged("harassment"))
        assert (first.warning, first.points, first.strikes) == (False, 1, 1)
        second = await store.record_violation("alice", flagged("weapons"))
        assert (second.points, second.strikes, second.block is not None) == (2, 3, True)

        events = await store.events("alice")
        assert events is not None
        assert [event["type"] for event in events] == ["block", "violation", "violation", "warning"]
        assert [event.get("points") for event in events] == [3, 2, 1, 0]
        assert events[3]["id"] == int(warning.event_id or 0)
        stats = await store.stats()
        assert (stats["violations_24h"], stats["warnings_24h"]) == (3, 1)
        assert stats["violations_by_category_24h"] == {"harassment": 2, "weapons": 1}


async def test_strike_lifetimes_come_from_the_category(settings_factory: SettingsFactory, database_url: str) -> None:
    async with policy_store(settings_factory, dataclasses.replace(POLICY, warnings=0)) as store:
        before = await db_now(database_url)
        await store.record_violation("bob", flagged("harassment"))
        await store.record_violation("bob", flagged("unlisted"))
        after = await db_now(database_url)
        rows = await fetch(database_url, "SELECT expires_at FROM events WHERE user_id = 'bob' ORDER BY id")
        harassment, unlisted = (row["expires_at"] for row in rows)
        assert before + timedelta(days=30) <= harassment <= after + timedelta(days=30)
        assert before + timedelta(days=90) <= unlisted <= after + timedelta(days=90)


async def test_expired_strikes_stop_counting(settings_factory: SettingsFactory, database_url: str) -> None:
    async with policy_store(settings_factory, dataclasses.replace(POLICY, warnings=0)) as store:
        spam = await store.record_violation("carol", flagged("spam"))
        assert spam.strikes == 2
        rows = await fetch(database_url, "SELECT expires_at FROM events WHERE user_id = 'carol'")
        await wait_past(rows[0]["expires_at"], database_url)
        status = await store.status("carol")
        assert status is not None
        assert status.strikes == 0
        again = await store.record_violation("carol", flagged("spam"))
        assert (again.strikes, again.block) == (2, None)
        # the weapons strike (2 points, 90 days) and a fresh spam strike reach 3
        await store.record_violation("carol", flagged("weapons"))
        status = await store.status("carol")
        assert status is not None
        assert (status.strikes, status.blocked) == (4, True)


async def test_zero_tolerance_blocks_at_once_without_a_warning(settings_factory: SettingsFactory) -> None:
    async with policy_store(settings_factory) as store:
        outcome = await store.record_violation("dave", flagged("minors", "harassment"))
        assert (outcome.warning, outcome.strikes, outcome.points) == (False, 1, 1)
        block = outcome.block
        assert block is not None
        assert (block.permanent, block.categories, block.strikes, block.max_strikes) == (
            True,
            ("harassment", "minors"),
            1,
            3,
        )
        assert block.event_id is not None
        assert block.event_id != outcome.event_id
        status = await store.status("dave")
        assert status is not None
        assert (status.blocked, status.permanent, status.blocks) == (True, True, 1)


async def test_a_zero_tolerance_block_is_caused_by_its_violation_alone(
    settings_factory: SettingsFactory, database_url: str
) -> None:
    async with policy_store(settings_factory, dataclasses.replace(POLICY, warnings=0)) as store:
        await store.record_violation("dora", flagged("weapons"))
        outcome = await store.record_violation("dora", flagged("scam", "hate"))
        block = outcome.block
        assert block is not None
        # the points that count include the earlier strike; the cause and categories are its own
        assert (outcome.strikes, block.strikes, block.categories) == (3, 3, ("hate", "scam"))
        rows = await fetch(database_url, "SELECT causes FROM events WHERE id = $1", int(block.event_id or 0))
        assert rows[0]["causes"] == [int(outcome.event_id or 0)]


async def test_zero_tolerance_takes_the_ladders_next_step_and_counts_on_it(
    settings_factory: SettingsFactory, database_url: str
) -> None:
    async with policy_store(settings_factory) as store:
        lengths = []
        for _ in range(2):
            before = await db_now(database_url)
            outcome = await store.record_violation("erin", flagged("scam"))
            assert outcome.block is not None
            assert outcome.block.until is not None
            lengths.append(round((outcome.block.until - before).total_seconds() / DAY))
            await store.unblock("erin")
        assert lengths == [1, 7]
        # a points block after them is the third step
        for category in ("weapons", "weapons"):
            outcome = await store.record_violation("erin", flagged(category))
        assert outcome.block is not None
        assert outcome.block.until is not None
        assert round((outcome.block.until - await db_now(database_url)).total_seconds() / DAY) == 30


async def test_the_ladder_steps_and_its_last_step_repeats(settings_factory: SettingsFactory) -> None:
    policy = Policy(max_strikes=1, ladder=(10.0, 20.0, PERMANENT))
    async with policy_store(settings_factory, policy) as store:
        blocks = []
        for _ in range(4):
            outcome = await store.record_violation("frank", flagged("violence"))
            assert outcome.block is not None
            blocks.append(outcome.block)
            await store.unblock("frank")
        assert [block.permanent for block in blocks] == [False, False, True, True]
        status = await store.status("frank")
        assert status is not None
        assert status.blocks == 4


async def test_a_block_states_its_event_categories_and_points(
    settings_factory: SettingsFactory, database_url: str
) -> None:
    policy = dataclasses.replace(POLICY, warnings=0, appeal_window_days=10)
    async with policy_store(settings_factory, policy, cache=True) as store:
        await store.record_violation("grace", flagged("harassment"))
        outcome = await store.record_violation("grace", flagged("weapons", "hate"))
        block = outcome.block
        assert block is not None
        assert (block.categories, block.strikes, block.max_strikes) == (("harassment", "hate", "weapons"), 3, 3)
        events = await store.events("grace")
        assert events is not None
        assert str(events[0]["id"]) == block.event_id
        assert (events[0]["type"], events[0]["categories"], events[0]["points"]) == (
            "block",
            ["harassment", "hate", "weapons"],
            3,
        )
        assert block.appealable_until == datetime.fromisoformat(events[0]["at"]) + timedelta(days=10)
        # The database, the write-through cache and a freshly loaded cache state the same block.
        assert store.cache is not None
        assert store.cache.get("grace") == block
        store.cache = None
        assert await store.current_block("grace") == block
        async with policy_store(settings_factory, policy, cache=True) as other:
            assert other.cache is not None
            assert other.cache.get("grace") == block
        # The block names the violations behind it.
        rows = await fetch(database_url, "SELECT causes FROM events WHERE id = $1", int(block.event_id or 0))
        violations = sorted(int(event["id"]) for event in events if event["type"] == "violation")
        assert rows[0]["causes"] == violations


async def test_a_violation_while_blocked_adds_nothing_and_states_the_block(settings_factory: SettingsFactory) -> None:
    async with policy_store(settings_factory) as store:
        blocked = await store.record_violation("heidi", flagged("minors"))
        again = await store.record_violation("heidi", flagged("weapons"))
        assert again.points == 0
        assert again.block == blocked.block
        assert again.event_id != blocked.event_id


async def test_warnings_count_inside_the_window_and_shadow_ones_do_not(
    settings_factory: SettingsFactory, database_url: str
) -> None:
    policy = Policy(max_strikes=5, window=1, warnings=2)
    async with policy_store(settings_factory, policy) as store:
        await store.record_shadow_violation("ivan", flagged("violence"))
        outcomes = [await store.record_violation("ivan", flagged("violence")) for _ in range(3)]
        assert [outcome.warning for outcome in outcomes] == [True, True, False]
        rows = await fetch(database_url, "SELECT max(at) AS at FROM events WHERE user_id = 'ivan'")
        await wait_past(rows[0]["at"] + timedelta(seconds=1), database_url)
        # the three fell out of the one-second window: a warning again
        assert (await store.record_violation("ivan", flagged("violence"))).warning


async def test_sixty_concurrent_weighted_violations_count_exactly(settings_factory: SettingsFactory) -> None:
    policy = dataclasses.replace(POLICY, max_strikes=1000, warnings=5)
    async with policy_store(settings_factory, policy, db_pool_size=10) as store:
        outcomes = await asyncio.gather(*(store.record_violation("mallory", flagged("weapons")) for _ in range(60)))
        assert sum(outcome.warning for outcome in outcomes) == 5
        assert sorted(outcome.strikes for outcome in outcomes if not outcome.warning) == list(range(2, 111, 2))
        status = await store.status("mallory")
        assert status is not None
        assert status.strikes == 110


async def test_two_replicas_agree_on_points_and_the_block(settings_factory: SettingsFactory) -> None:
    policy = dataclasses.replace(POLICY, max_strikes=61, warnings=1)
    async with policy_store(settings_factory, policy) as one, policy_store(settings_factory, policy) as two:
        outcomes = await asyncio.gather(
            *(replica.record_violation("niaj", flagged("weapons")) for _ in range(16) for replica in (one, two))
        )
        # one warning, then 31 violations of 2 points: the one that reaches 61 blocks, once
        assert sum(outcome.warning for outcome in outcomes) == 1
        blocking = [outcome for outcome in outcomes if outcome.block is not None and outcome.points]
        assert [outcome.strikes for outcome in blocking] == [62]
        assert (await one.status("niaj")) == (await two.status("niaj"))
        status = await one.status("niaj")
        assert status is not None
        assert (status.strikes, status.blocked, status.blocks) == (62, True, 1)


async def test_rows_from_before_the_policy_keep_working(settings_factory: SettingsFactory, database_url: str) -> None:
    """A violation row of schema version 1 (no expires_at) has 1 point and the window's lifetime."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("INSERT INTO users (user_id) VALUES ('old')")
        await conn.execute(
            "INSERT INTO events (user_id, at, kind, counted, points, categories) VALUES"
            " ('old', now() - interval '2 hours', 'violation', true, 1, '{violence}'),"
            " ('old', now() - interval '10 minutes', 'violation', true, 1, '{violence}')"
        )
    finally:
        await conn.close()
    async with policy_store(settings_factory, Policy(max_strikes=3, window=3600)) as store:
        status = await store.status("old")
        assert status is not None
        assert status.strikes == 1
    async with policy_store(settings_factory, Policy(max_strikes=3)) as store:
        outcome = await store.record_violation("old", flagged("violence"))
        assert (outcome.strikes, outcome.block is not None) == (3, True)


async def test_output_violations_count_only_when_asked(settings_factory: SettingsFactory) -> None:
    policy = dataclasses.replace(POLICY, warnings=0)
    async with policy_store(settings_factory, policy) as store:
        audited = await store.record_output_violation("olivia", flagged("weapons"), counts=False)
        assert (audited.strikes, audited.points, audited.block, audited.warning) == (0, 0, None, False)
        counted = await store.record_output_violation("olivia", flagged("weapons"), counts=True)
        assert (counted.strikes, counted.points, counted.block) == (2, 2, None)
        blocking = await store.record_output_violation("olivia", flagged("harassment"), counts=True)
        assert blocking.block is not None
        after = await store.record_output_violation("olivia", flagged("weapons"), counts=False)
        assert after.block == blocking.block
        events = await store.events("olivia")
        assert events is not None
        assert [(event["type"], event.get("counted")) for event in events] == [
            ("output_violation", False),
            ("block", None),
            ("output_violation", True),
            ("output_violation", True),
            ("output_violation", False),
        ]


async def test_the_app_and_the_operator_are_recorded(settings_factory: SettingsFactory) -> None:
    async with policy_store(settings_factory) as store:
        await store.record_violation("peggy", flagged("harassment", app="support-bot"))
        await store.record_shadow_violation("peggy", flagged("harassment", app="search"))
        await store.block("peggy", seconds=60, reason="spam", operator="mod-anna")
        await store.unblock("peggy", operator="mod-ben")
        events = await store.events("peggy")
        assert events is not None
        assert [(event["type"], event.get("app"), event.get("operator")) for event in events] == [
            ("unblock", None, "mod-ben"),
            ("block", None, "mod-anna"),
            ("violation", "search", None),
            ("warning", "support-bot", None),
        ]


@pytest.mark.parametrize("permanent", [False, True])
async def test_an_admin_block_states_no_categories(settings_factory: SettingsFactory, permanent: bool) -> None:
    async with policy_store(settings_factory, dataclasses.replace(POLICY, warnings=0)) as store:
        await store.record_violation("rupert", flagged("harassment"))
        await store.block("rupert", permanent=permanent, seconds=None if permanent else 30)
        block = await store.current_block("rupert")
        assert block is not None
        assert (block.categories, block.strikes, block.permanent) == ((), 1, permanent)


async def test_migration_2_keeps_version_1_rows_working(
    empty_database_url: str, settings_factory: SettingsFactory
) -> None:
    migrations = Path(__file__).parent.parent / "gateway" / "migrations"
    conn = await asyncpg.connect(empty_database_url)
    try:
        await conn.execute((migrations / "0001_init.sql").read_text())
        await conn.execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now());"
            "INSERT INTO schema_migrations (version, name) VALUES (1, '0001_init.sql');"
            "INSERT INTO users (user_id, blocked_until, blocked_by, blocks)"
            " VALUES ('quinn', now() + interval '1 hour', 'policy', 1), ('rose', NULL, NULL, 0);"
            "INSERT INTO events (user_id, kind, counted, categories) VALUES"
            " ('quinn', 'violation', true, '{hate}'), ('rose', 'violation', true, '{hate}'),"
            " ('rose', 'violation', false, '{hate}');"
            "INSERT INTO events (user_id, kind, actor, block_number, blocked_until)"
            " VALUES ('quinn', 'block', 'policy', 1, now() + interval '1 hour');"
            "INSERT INTO events (user_id, kind, actor) VALUES ('rose', 'block', 'admin'), ('rose', 'unblock', 'admin')"
        )
        assert (await migrate(empty_database_url))[0] == 2, "version 2 first, then the later ones"
        rows = await conn.fetch("SELECT user_id, kind, counted, points, operator FROM events ORDER BY id")
        assert [tuple(row) for row in rows] == [
            ("quinn", "violation", True, 1, None),
            ("rose", "violation", True, 1, None),
            ("rose", "violation", False, 0, None),
            ("quinn", "block", False, 0, None),
            ("rose", "block", False, 0, "admin"),
            ("rose", "unblock", False, 0, "admin"),
        ]
    finally:
        await conn.close()
    async with policy_store(settings_factory, Policy(), database_url=empty_database_url) as store:
        block = await store.current_block("quinn")
        assert block is not None
        assert block.event_id == "4"
        status = await store.status("rose")
        assert status is not None
        assert status.strikes == 1
