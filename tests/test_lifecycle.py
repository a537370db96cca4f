"""Erasure and retention against a real PostgreSQL: what goes, what stays, and the one trace an
erasure keeps."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections.abc import Callable
from datetime import timedelta

import asyncpg

from gateway import lifecycle
from gateway.settings import Settings
from gateway.sweeper import ExpirySweeper
from tests.test_appeals import STRICT, block_three_times, until
from tests.test_ladder import flagged, policy_store
from tests.test_store import fetch

SettingsFactory = Callable[..., Settings]
OLD = "now() - interval '400 days'"


async def count(database_url: str, query: str, *args: object) -> int:
    rows = await fetch(database_url, query, *args)
    return int(rows[0][0])


async def test_erasure_leaves_only_a_hash(settings_factory: SettingsFactory, database_url: str) -> None:
    policy = dataclasses.replace(STRICT, webhooks=True)
    async with policy_store(settings_factory, policy, cache=True) as store:
        block_id = await block_three_times(store, "alice")
        await store.file_appeal("alice", int(block_id), "It was my brother.")
        await store.add_note("alice", "mod-ann", "Asked for erasure by mail.")
        await store.record_violation("bob", flagged("harassment"))
        assert store.cached_block("alice")[1] is not None

        assert await store.erase_user("alice", operator="mod-root") is True

        assert await store.status("alice") is None
        assert await store.events("alice") is None
        assert store.cached_block("alice") == (True, None)
        for table in ("users", "events", "appeals"):
            assert await count(database_url, f"SELECT count(*) FROM {table} WHERE user_id = 'alice'") == 0  # noqa: S608
        assert await count(database_url, "SELECT count(*) FROM webhook_outbox WHERE payload::text LIKE '%alice%'") == 0
        rows = await fetch(database_url, "SELECT user_id, operator, user_sha256, at FROM events WHERE kind = 'erased'")
        assert len(rows) == 1
        assert (rows[0]["user_id"], rows[0]["operator"]) == (None, "mod-root")
        assert rows[0]["user_sha256"] == hashlib.sha256(b"alice").hexdigest()
        # Other users are untouched; the erased id starts afresh if it calls again.
        bob = await store.status("bob")
        assert bob is not None
        assert bob.strikes == 1
        again = await store.record_violation("alice", flagged("harassment"))
        assert (again.strikes, again.block) == (1, None)
        assert await store.erase_user("nobody") is False


async def test_erasure_reaches_every_replicas_block_cache(settings_factory: SettingsFactory) -> None:
    async with (
        policy_store(settings_factory, STRICT, cache=True) as one,
        policy_store(settings_factory, STRICT, cache=True) as two,
    ):
        await block_three_times(one, "carl")
        await until(lambda: two.cached_block("carl")[1] is not None)
        await one.erase_user("carl")
        await until(lambda: two.cached_block("carl") == (True, None), timeout=1.0)


async def _seed_old(database_url: str) -> dict[str, int]:
    """Events 400 days old, in every situation retention must tell apart; their ids by name."""
    conn = await asyncpg.connect(database_url)
    try:
        ids: dict[str, int] = {}

        async def event(name: str, user: str, values: str) -> int:
            ids[name] = await conn.fetchval(
                "INSERT INTO events (user_id, at, kind, counted, points, expires_at, categories) "  # noqa: S608
                f"VALUES ('{user}', {OLD}, {values}, '{{harassment}}') RETURNING id"
            )
            return ids[name]

        await conn.execute("INSERT INTO users (user_id) VALUES ('old'), ('kept'), ('blocked')")
        await event("expired_strike", "old", "'violation', true, 1, now() - interval '300 days'")
        await event("shadow", "old", "'violation', false, 0, NULL")
        await event("counting_strike", "kept", "'violation', true, 1, 'infinity'")
        cause = await event("block_cause", "blocked", "'violation', true, 1, 'infinity'")
        await conn.execute("UPDATE users SET strikes_since = now() WHERE user_id = 'blocked'")
        block = await conn.fetchval(
            f"INSERT INTO events (user_id, at, kind, actor, block_number, blocked_until, causes) VALUES "  # noqa: S608
            f"('blocked', {OLD}, 'block', 'policy', 1, 'infinity', ARRAY[{cause}::bigint]) RETURNING id"
        )
        ids["block_in_force"] = block
        await conn.execute(
            "UPDATE users SET blocked_until = 'infinity', blocked_by = 'policy', blocks = 1, block_event_id = $1 "
            "WHERE user_id = 'blocked'",
            block,
        )
        open_appeal = await event("open_appeal", "old", "'violation', true, 1, now() - interval '300 days'")
        decided = await event("decided_appeal", "old", "'violation', true, 1, now() - interval '300 days'")
        await conn.execute(
            "INSERT INTO appeals (event_id, user_id, message) VALUES ($1, 'old', 'open'), ($2, 'old', 'decided')",
            open_appeal,
            decided,
        )
        await conn.execute("UPDATE appeals SET status = 'rejected', decided_at = now() WHERE event_id = $1", decided)
        undelivered = await event("undelivered", "old", "'violation', false, 0, NULL")
        delivered = await event("delivered", "old", "'violation', false, 0, NULL")
        await conn.execute(
            "INSERT INTO webhook_outbox (event_id, payload, delivered_at) VALUES ($1, '{}', NULL), ($2, '{}', now())",
            undelivered,
            delivered,
        )
        await event("recent", "old", "'violation', false, 0, NULL")
        await conn.execute("UPDATE events SET at = now() - interval '10 days' WHERE id = $1", ids["recent"])
        return ids
    finally:
        await conn.close()


async def test_retention_deletes_old_events_and_keeps_what_still_counts(
    settings_factory: SettingsFactory, database_url: str
) -> None:
    ids = await _seed_old(database_url)
    async with policy_store(settings_factory, STRICT) as store:
        assert await store.sweep_retention() == 4
    rows = await fetch(database_url, "SELECT id FROM events")
    kept = {name for name, event_id in ids.items() if event_id in {row["id"] for row in rows}}
    assert kept == {"counting_strike", "block_cause", "block_in_force", "open_appeal", "undelivered", "recent"}
    assert await count(database_url, "SELECT count(*) FROM appeals") == 1
    assert await count(database_url, "SELECT count(*) FROM webhook_outbox") == 1


async def test_retention_works_in_batches_and_can_be_off(settings_factory: SettingsFactory, database_url: str) -> None:
    total = lifecycle.BATCH * 2 + 7
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("INSERT INTO users (user_id) VALUES ('many')")
        await conn.execute(
            f"INSERT INTO events (user_id, at, kind) SELECT 'many', {OLD}, 'violation' FROM generate_series(1, $1)",  # noqa: S608
            total,
        )
    finally:
        await conn.close()
    async with policy_store(settings_factory, dataclasses.replace(STRICT, retention_days=0)) as store:
        assert await store.sweep_retention() == 0
    async with policy_store(settings_factory, dataclasses.replace(STRICT, retention_days=500)) as store:
        assert await store.sweep_retention() == 0
    async with policy_store(settings_factory, STRICT) as store:
        assert await store.sweep_retention() == total
    assert await count(database_url, "SELECT count(*) FROM events") == 0


async def test_delivered_outbox_rows_go_after_a_week(settings_factory: SettingsFactory, database_url: str) -> None:
    policy = dataclasses.replace(STRICT, webhooks=True)
    async with policy_store(settings_factory, policy) as store:
        await block_three_times(store, "dina")
        await store.unblock("dina")
        await store.block("dina", seconds=60)
        delivered = "UPDATE webhook_outbox SET delivered_at = now() - $1::interval WHERE payload->>'type' = $2"
        await fetch(database_url, delivered, timedelta(days=8), "user.blocked")
        await fetch(database_url, delivered, timedelta(days=6), "user.unblocked")
        assert await store.sweep_retention() == 0
    rows = await fetch(
        database_url, "SELECT payload->>'type' AS type, delivered_at IS NULL AS pending FROM webhook_outbox"
    )
    assert sorted((row["type"], row["pending"]) for row in rows) == [("user.unblocked", False)]
    # the events themselves are recent: they stay
    assert await count(database_url, "SELECT count(*) FROM events WHERE user_id = 'dina' AND kind = 'block'") == 2


async def test_the_sweeper_applies_the_retention(settings_factory: SettingsFactory, database_url: str) -> None:
    ids = await _seed_old(database_url)
    async with policy_store(settings_factory, STRICT) as store:
        sweeper = ExpirySweeper(store, interval=0.05, retention_interval=3600)
        await sweeper.start()
        try:
            await until_gone(database_url, ids["shadow"])
        finally:
            await sweeper.close()


async def until_gone(database_url: str, event_id: int) -> None:
    for _ in range(100):
        if await count(database_url, "SELECT count(*) FROM events WHERE id = $1", event_id) == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"event {event_id} was not deleted")
