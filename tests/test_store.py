"""The strike store against a real PostgreSQL: strikes, blocks, expiry, audit, concurrency."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta

import asyncpg
import orjson
import pytest

from gateway.database import Database
from gateway.events import iso
from gateway.settings import Settings
from gateway.store import MAX_PAGE, NOTIFY_CHANNEL, Policy, Store
from gateway.users import UserStatus, decode_cursor, encode_cursor
from middleware.protocols import StoreUnavailable, Verdict, Violation
from tests.conftest import open_store

SettingsFactory = Callable[..., Settings]


def violation(category: str = "violence", *, path: str = "/v1/chat/completions") -> Violation:
    verdict = Verdict(
        detector="rules", categories=(category,), text_sha256="ab" * 32, rule="bomb", scores={category: 0.9}
    )
    return Violation(verdict=verdict, path=path)


async def db_now(database_url: str) -> datetime:
    conn = await asyncpg.connect(database_url)
    try:
        now: datetime = await conn.fetchval("SELECT now()")
        return now
    finally:
        await conn.close()


async def fetch(database_url: str, query: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


async def wait_past(until: datetime | None, database_url: str) -> None:
    """Sleep until the database clock has passed `until` (a short real span)."""
    assert until is not None
    left = (until - await db_now(database_url)).total_seconds()
    await asyncio.sleep(max(0.0, left) + 0.05)
    assert await db_now(database_url) > until


async def test_strikes_count_up_and_block_at_the_limit(store: Store, database_url: str) -> None:
    first = await store.record_violation("alice", violation())
    second = await store.record_violation("alice", violation())
    assert (first.strikes, first.max_strikes, first.block) == (1, 3, None)
    assert (second.strikes, second.block) == (2, None)

    before = await db_now(database_url)
    third = await store.record_violation("alice", violation())
    after = await db_now(database_url)

    assert third.strikes == 3
    assert third.block is not None
    assert third.block.until is not None
    assert before + timedelta(seconds=60) <= third.block.until <= after + timedelta(seconds=60)
    assert await store.current_block("alice") == third.block
    status = await store.status("alice")
    assert status == UserStatus("alice", 3, 3, True, third.block.until, False, 1)


async def test_a_blocked_users_violation_adds_no_strike(store: Store) -> None:
    for _ in range(3):
        outcome = await store.record_violation("bob", violation())
    again = await store.record_violation("bob", violation())

    assert again.strikes == 3
    assert again.block == outcome.block
    status = await store.status("bob")
    assert status is not None
    assert (status.strikes, status.blocks) == (3, 1)


async def test_users_are_isolated(store: Store) -> None:
    for _ in range(3):
        await store.record_violation("carol", violation())
    outcome = await store.record_violation("dave", violation())

    assert outcome.strikes == 1
    assert outcome.block is None
    assert await store.current_block("dave") is None
    assert await store.current_block("carol") is not None
    assert await store.current_block("nobody") is None


async def test_a_block_expires_by_itself_and_strikes_start_again(
    settings_factory: SettingsFactory, database_url: str
) -> None:
    async with open_store(settings_factory, max_strikes=2, block_seconds=1) as store:
        await store.record_violation("erin", violation())
        blocked = await store.record_violation("erin", violation())
        assert blocked.block is not None
        await wait_past(blocked.block.until, database_url)

        assert await store.current_block("erin") is None
        status = await store.status("erin")
        assert status is not None
        assert (status.strikes, status.blocked, status.blocked_until, status.blocks) == (0, False, None, 1)

        outcome = await store.record_violation("erin", violation())
        assert (outcome.strikes, outcome.block) == (1, None)
        events = await store.events("erin")
        assert events is not None
        expiries = [e for e in events if e["type"] == "unblock"]
        assert len(expiries) == 1
        assert expiries[0]["actor"] == "expiry"
        assert expiries[0]["block_number"] == 1
        assert expiries[0]["at"] == iso(blocked.block.until)


async def test_the_sweeper_records_each_expiry_once(settings_factory: SettingsFactory, database_url: str) -> None:
    async with open_store(settings_factory, max_strikes=1, block_seconds=1) as store:
        first = await store.record_violation("frank", violation())
        await store.record_violation("grace", violation())
        assert first.block is not None
        await wait_past(first.block.until, database_url)
        await asyncio.sleep(0.1)

        assert await store.expire_blocks() == 2
        assert await store.expire_blocks() == 0
        rows = await fetch(
            database_url,
            "SELECT user_id, at FROM events WHERE kind = 'unblock' AND actor = 'expiry' ORDER BY user_id",
        )
        assert [row["user_id"] for row in rows] == ["frank", "grace"]
        assert rows[0]["at"] == first.block.until
        status = await store.status("frank")
        assert status is not None
        assert (status.blocked, status.strikes) == (False, 0)


async def test_admin_blocks_timed_and_permanent(store: Store, database_url: str) -> None:
    before = await db_now(database_url)
    timed = await store.block("heidi", seconds=30, reason="spam")
    assert timed.blocked
    assert not timed.permanent
    assert timed.blocks == 0
    assert timed.blocked_until is not None
    assert before + timedelta(seconds=30) <= timed.blocked_until < before + timedelta(seconds=40)

    default = await store.block("ivan")
    assert default.blocked_until is not None
    assert default.blocked_until >= before + timedelta(seconds=60)

    permanent = await store.block("heidi", permanent=True)
    assert permanent.blocked
    assert permanent.permanent
    assert permanent.blocked_until is None
    assert permanent.to_json()["blocked_until"] is None
    block = await store.current_block("heidi")
    assert block is not None
    assert (block.until, block.permanent, block.categories) == (None, True, ())

    with pytest.raises(ValueError, match="positive"):
        await store.block("heidi", seconds=0)
    with pytest.raises(ValueError, match="positive"):
        await store.block("heidi", seconds=1e12)


async def test_unblock_resets_strikes_keeps_blocks_and_is_idempotent(store: Store) -> None:
    for _ in range(3):
        await store.record_violation("judy", violation())

    status = await store.unblock("judy", reason="appeal")
    assert status is not None
    assert (status.blocked, status.strikes, status.blocks, status.blocked_until) == (False, 0, 1, None)
    assert await store.current_block("judy") is None
    again = await store.unblock("judy")
    assert again == status
    assert await store.unblock("nobody") is None

    events = await store.events("judy")
    assert events is not None
    unblocks = [e for e in events if e["type"] == "unblock"]
    assert len(unblocks) == 1
    assert (unblocks[0]["actor"], unblocks[0]["reason"], unblocks[0]["block_number"]) == ("admin", "appeal", 1)
    outcome = await store.record_violation("judy", violation())
    assert outcome.strikes == 1


async def test_unblock_after_a_permanent_block(store: Store) -> None:
    await store.block("ken", permanent=True)
    status = await store.unblock("ken")
    assert status is not None
    assert not status.blocked
    assert not status.permanent
    assert await store.current_block("ken") is None


async def test_concurrent_strikes_on_one_user_are_exact(settings_factory: SettingsFactory) -> None:
    async with open_store(settings_factory, max_strikes=1000, db_pool_size=10) as store:
        outcomes = await asyncio.gather(*(store.record_violation("mallory", violation()) for _ in range(60)))
        assert sorted(outcome.strikes for outcome in outcomes) == list(range(1, 61))
        status = await store.status("mallory")
        assert status is not None
        assert status.strikes == 60


async def test_two_replicas_on_one_database_act_as_one(settings_factory: SettingsFactory) -> None:
    async with (
        open_store(settings_factory, max_strikes=1000) as one,
        open_store(settings_factory, max_strikes=1000) as two,
    ):
        outcomes = await asyncio.gather(
            *(replica.record_violation("niaj", violation()) for _ in range(20) for replica in (one, two))
        )
        assert sorted(outcome.strikes for outcome in outcomes) == list(range(1, 41))
        status = await two.status("niaj")
        assert status is not None
        assert status.strikes == 40

        blocked = await one.block("olivia", seconds=120)
        block = await two.current_block("olivia")
        assert block is not None
        assert block.until == blocked.blocked_until
        await two.unblock("olivia")
        assert await one.current_block("olivia") is None


async def test_strikes_outside_the_window_stop_counting(settings_factory: SettingsFactory, database_url: str) -> None:
    async with open_store(settings_factory, max_strikes=3, strike_window_seconds=1) as store:
        await store.record_violation("peggy", violation())
        second = await store.record_violation("peggy", violation())
        assert second.strikes == 2
        await asyncio.sleep(1.2)

        status = await store.status("peggy")
        assert status is not None
        assert status.strikes == 0
        third = await store.record_violation("peggy", violation())
        assert (third.strikes, third.block) == (1, None)


async def test_policy_blocks_escalate_then_become_permanent(
    settings_factory: SettingsFactory, database_url: str
) -> None:
    async with open_store(
        settings_factory, max_strikes=1, block_seconds=1, block_escalation=2, permanent_after_blocks=4
    ) as store:
        lengths = []
        for _ in range(3):
            before = await db_now(database_url)
            outcome = await store.record_violation("rupert", violation())
            assert outcome.block is not None
            assert outcome.block.until is not None
            lengths.append((outcome.block.until - before).total_seconds())
            # A manual unblock lifts the block but keeps the count of past blocks.
            await store.unblock("rupert")
        assert [round(length) for length in lengths] == [1, 2, 4]

        fourth = await store.record_violation("rupert", violation())
        assert fourth.block is not None
        assert fourth.block.permanent
        status = await store.status("rupert")
        assert status is not None
        assert status.permanent
        assert status.blocks == 4
        events = await store.events("rupert")
        assert events is not None
        assert [e["block_number"] for e in events if e["type"] == "block"] == [4, 3, 2, 1]


def test_block_duration_is_capped() -> None:
    policy = Policy(max_strikes=1, ladder=(10,), escalation=10, max_block=500)
    assert [policy.block_duration(n) for n in (1, 2, 3, 5000)] == [10, 100, 500, 500]
    assert Policy(max_strikes=1, ladder=(10,), permanent_after_blocks=2).block_duration(2) is None


async def test_block_changes_are_notified(store: Store, database_url: str) -> None:
    listener = await asyncpg.connect(database_url)
    received: asyncio.Queue[str] = asyncio.Queue()
    try:
        await listener.add_listener(NOTIFY_CHANNEL, lambda _conn, _pid, _channel, payload: received.put_nowait(payload))
        await store.block("sybil", seconds=10)
        assert await asyncio.wait_for(received.get(), timeout=5) == "sybil"
        await store.unblock("sybil")
        assert await asyncio.wait_for(received.get(), timeout=5) == "sybil"
        await store.record_violation("trent", violation())
        assert received.empty()
    finally:
        await listener.close()


async def test_the_outbox_gets_block_and_unblock_events_with_webhooks(
    settings_factory: SettingsFactory, database_url: str
) -> None:
    hooks = {"webhook_url": "http://127.0.0.1:9/hook", "webhook_secret": "s3cret", "max_strikes": 1}
    async with open_store(settings_factory, **hooks) as store:
        outcome = await store.record_violation("uma", violation())
        await store.unblock("uma", reason="appeal")
    assert outcome.block is not None
    assert outcome.block.until is not None

    rows = await fetch(database_url, "SELECT event_id, payload, delivered_at FROM webhook_outbox ORDER BY id")
    payloads = [orjson.loads(row["payload"]) for row in rows]
    assert [row["delivered_at"] for row in rows] == [None, None]
    blocked, unblocked = payloads
    assert blocked["id"] == f"evt_{rows[0]['event_id']}"
    assert blocked == {
        "id": blocked["id"],
        "type": "user.blocked",
        "created_at": blocked["created_at"],
        "user_id": "uma",
        "actor": "policy",
        "reason": None,
        "blocked_until": iso(outcome.block.until),
        "permanent": False,
        "block_number": 1,
        "operator": None,
        "categories": ["violence"],
    }
    assert blocked["created_at"].endswith("Z")
    assert (unblocked["type"], unblocked["actor"], unblocked["reason"]) == ("user.unblocked", "admin", "appeal")
    assert (unblocked["blocked_until"], unblocked["block_number"]) == (None, 1)
    assert (unblocked["operator"], unblocked["categories"]) == ("admin", [])


async def test_no_outbox_rows_without_webhooks(store: Store, database_url: str) -> None:
    await store.block("victor", permanent=True)
    await store.unblock("victor")
    assert await fetch(database_url, "SELECT id FROM webhook_outbox") == []


async def test_events_are_newest_first_with_their_fields(store: Store) -> None:
    await store.record_violation("wendy", violation("hate", path="/v1/responses"))
    await store.record_shadow_violation("wendy", violation("violence"))
    await store.block("wendy", seconds=10, reason="manual")

    events = await store.events("wendy")
    assert events is not None
    assert [e["type"] for e in events] == ["block", "violation", "violation"]
    block, shadow, counted = events
    assert isinstance(block["id"], int)
    assert isinstance(counted["id"], int)
    assert block["id"] > counted["id"]
    assert (block["actor"], block["reason"], block["block_number"], block["permanent"]) == (
        "admin",
        "manual",
        None,
        False,
    )
    assert isinstance(block["blocked_until"], str)
    assert block["blocked_until"].endswith("Z")
    assert counted == {
        "id": counted["id"],
        "type": "violation",
        "at": counted["at"],
        "categories": ["hate"],
        "detector": "rules",
        "rule": "bomb",
        "path": "/v1/responses",
        "text_sha256": "ab" * 32,
        "scores": {"hate": 0.9},
        "shadow": False,
        "counted": True,
        "points": 1,
        "expires_at": None,
        "app": None,
        "reversed_at": None,
        "reversed_by": None,
        "reverse_reason": None,
    }
    assert shadow["shadow"] is True
    assert await store.events("nobody") is None
    limited = await store.events("wendy", limit=1)
    assert limited is not None
    assert len(limited) == 1


async def test_shadow_violations_add_no_strike(store: Store) -> None:
    for _ in range(5):
        await store.record_shadow_violation("xavier", violation())
    status = await store.status("xavier")
    assert status is not None
    assert (status.strikes, status.blocked) == (0, False)
    outcome = await store.record_violation("xavier", violation())
    assert outcome.strikes == 1


async def test_list_users_pages_and_filters(store: Store) -> None:
    names = [f"user-{n:02d}" for n in range(7)]
    for name in names:
        await store.record_violation(name, violation())
    await store.block("user-03", seconds=30)
    await store.block("user-05", permanent=True)

    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        page, cursor = await store.list_users(limit=3, after=cursor)
        seen += [status.user_id for status in page]
        pages += 1
        if cursor is None:
            break
    assert (seen, pages) == (names, 3)

    blocked, cursor = await store.list_users(blocked=True)
    assert [status.user_id for status in blocked] == ["user-03", "user-05"]
    assert cursor is None
    unblocked, _ = await store.list_users(blocked=False, limit=100)
    assert [status.user_id for status in unblocked] == [n for n in names if n not in ("user-03", "user-05")]
    assert all(status.strikes == 1 for status in unblocked)


async def test_list_users_rejects_bad_cursors_and_limits(store: Store) -> None:
    assert decode_cursor(encode_cursor("zoë/1")) == "zoë/1"
    with pytest.raises(ValueError, match="cursor"):
        await store.list_users(after="not a cursor!")
    with pytest.raises(ValueError, match="limit"):
        await store.list_users(limit=0)
    page, cursor = await store.list_users(limit=MAX_PAGE + 1)
    assert (page, cursor) == ([], None)


async def test_stats_count_the_last_day(store: Store) -> None:
    await store.record_violation("yara", violation("hate"))
    await store.record_violation("yara", violation("violence"))
    await store.record_violation("yara", violation("violence"))
    await store.record_violation("zed", violation("violence"))
    await store.record_shadow_violation("zed", violation("hate"))
    await store.block("zed", seconds=60)

    assert await store.stats() == {
        "blocked_users": 2,
        "violations_24h": 4,
        "blocks_24h": 2,
        "violations_by_category_24h": {"hate": 1, "violence": 3},
        "warnings_24h": 0,
        "shadow_violations_24h": 1,
        "output_violations_24h": 0,
    }


async def test_status_of_an_unknown_user_is_none(store: Store) -> None:
    assert await store.status("nobody") is None
    await store.ping()


async def test_a_closed_database_raises_store_unavailable(settings_factory: SettingsFactory) -> None:
    async with open_store(settings_factory) as store:
        await store.ping()
    with pytest.raises(StoreUnavailable):
        await store.current_block("alice")
    with pytest.raises(StoreUnavailable):
        await store.record_violation("alice", violation())
    with pytest.raises(StoreUnavailable):
        await store.ping()


async def test_a_closed_pool_raises_store_unavailable(settings_factory: SettingsFactory) -> None:
    settings = settings_factory()
    database = Database(settings)
    await database.open()
    store = Store(database, Policy.from_settings(settings))
    await database.pool.close()
    try:
        with pytest.raises(StoreUnavailable):
            await store.current_block("alice")
        with pytest.raises(StoreUnavailable):
            await store.block("alice")
    finally:
        await database.close()
