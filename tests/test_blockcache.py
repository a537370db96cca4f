"""The block cache: coherent across replicas through LISTEN/NOTIFY, safe when the listener is lost."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import asyncpg

from gateway.blockcache import BlockCache
from gateway.database import Database
from gateway.metrics import BLOCK_CHECKS
from gateway.store import Policy, Store
from middleware.protocols import Verdict, Violation
from tests.conftest import SettingsFactory
from tests.test_moderation import Inner, call, middleware


@asynccontextmanager
async def replica(settings_factory: SettingsFactory, **cache_options: float) -> AsyncIterator[Store]:
    """A Store with its own pool and its own block cache: one gateway replica."""
    settings = settings_factory(max_strikes=2, block_seconds=600)
    database = Database(settings)
    await database.open()
    cache = BlockCache(ping_interval=0.2, **cache_options)  # type: ignore[arg-type]
    try:
        await cache.start(database.dsn)
        yield Store(database, Policy.from_settings(settings), cache)
    finally:
        await cache.close()
        await database.close()


def checks(source: str) -> float:
    return BLOCK_CHECKS.labels(source).value


async def within(seconds: float, condition: Callable[[], Awaitable[bool]]) -> float:
    """Poll `condition` until it holds; fail after `seconds`. Returns the time it took."""
    started = time.monotonic()
    while not await condition():
        assert time.monotonic() - started < seconds, f"not within {seconds} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def violation() -> Violation:
    return Violation(verdict=Verdict(detector="rules", categories=("violence",), text_sha256="0" * 64), path="/v1/x")


async def test_a_block_on_another_replica_is_seen_within_a_second_and_so_is_the_unblock(
    settings_factory: SettingsFactory,
) -> None:
    async with replica(settings_factory) as one, replica(settings_factory) as two:
        assert one.cache is not None
        assert one.cache.valid
        assert await one.current_block("alice") is None
        await two.block("alice", seconds=300)

        async def blocked() -> bool:
            return await one.current_block("alice") is not None

        async def free() -> bool:
            return await one.current_block("alice") is None

        from_database = checks("database")
        await within(1.0, blocked)
        await two.unblock("alice")
        await within(1.0, free)
        # Both answers came from memory: no query per call while the cache is valid.
        assert checks("database") == from_database


async def test_a_valid_cache_answers_without_the_pool(settings_factory: SettingsFactory) -> None:
    async with replica(settings_factory) as store:
        await store.block("bob", permanent=True)
        # Closing the pool makes any query raise StoreUnavailable: the answers below are the cache's.
        await store._db.pool.close()
        block = await store.current_block("bob")
        assert block is not None
        assert block.permanent
        assert await store.current_block("carol") is None
        # The middleware's first question, answered from memory without a coroutine.
        from_cache = checks("cache")
        assert store.cached_block("bob") == (True, block)
        assert store.cached_block("carol") == (True, None)
        assert checks("cache") == from_cache + 2


async def test_the_middleware_refuses_a_cached_block_without_asking_the_database(
    settings_factory: SettingsFactory,
) -> None:
    async with replica(settings_factory) as store:
        await store.block("ivy", seconds=300)
        inner = Inner()
        app = middleware(inner, store, [])
        before = checks("cache"), checks("database")
        refused = await call(app, method="GET", path="/v1/models", user=b"ivy")
        allowed = await call(app, method="GET", path="/v1/models", user=b"jay")
        assert refused.status == 403
        assert refused.error["code"] == "user_blocked"
        assert refused.state["decision"] == "blocked"
        assert allowed.status == 200
        assert len(inner.scopes) == 1
        assert (checks("cache"), checks("database")) == (before[0] + 2, before[1])


async def test_without_a_valid_cache_only_the_database_can_tell(settings_factory: SettingsFactory) -> None:
    async with replica(settings_factory, max_entries=1) as store:
        cache = store.cache
        assert cache is not None
        await store.block("gus", seconds=300)
        await store.block("hal", seconds=300)  # more than the cache holds: it gives up

        async def invalid() -> bool:
            return not cache.valid

        await within(1.0, invalid)
        before = checks("cache"), checks("database")
        assert store.cached_block("gus") == (False, None)
        assert await store.current_block("gus") is not None
        assert (checks("cache"), checks("database")) == (before[0], before[1] + 1)


async def test_this_replicas_own_changes_reach_its_cache_at_once(settings_factory: SettingsFactory) -> None:
    async with replica(settings_factory) as store:
        cache = store.cache
        assert cache is not None
        await store.record_violation("dave", violation())
        outcome = await store.record_violation("dave", violation())
        assert outcome.block is not None
        # No await in between: not waiting for NOTIFY to come back.
        assert cache.get("dave") == outcome.block
        await store.unblock("dave")
        assert cache.get("dave") is None
        status = await store.block("dave", seconds=60)
        cached = cache.get("dave")
        assert cached is not None
        assert cached.until == status.blocked_until


async def test_expiry_is_honoured_by_the_cache(settings_factory: SettingsFactory) -> None:
    async with replica(settings_factory) as one, replica(settings_factory) as two:
        await two.block("erin", seconds=1)

        async def blocked() -> bool:
            return await one.current_block("erin") is not None

        async def free() -> bool:
            return await one.current_block("erin") is None

        await within(1.0, blocked)
        from_database = checks("database")
        # Nobody records the expiry (no sweeper runs here): the cache lets erin go by itself.
        await within(3.0, free)
        assert checks("database") == from_database


async def test_a_lost_listener_falls_back_to_the_database_then_reloads(
    settings_factory: SettingsFactory, database_url: str, pg_server_dsn: str
) -> None:
    name = urlsplit(database_url).path.lstrip("/")  # the embedded server's DSN ends with ?host=/a/path
    async with replica(settings_factory) as one, replica(settings_factory) as two:
        cache = one.cache
        assert cache is not None
        pid = cache.listener_pid
        assert pid is not None
        reloads = cache.reloads
        admin = await asyncpg.connect(pg_server_dsn)
        try:
            # Kill the listener and keep it from reconnecting; the pools keep their open connections.
            await admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)

            async def invalid() -> bool:
                return not cache.valid

            await within(2.0, invalid)
            # A block made while this replica is not listening: its notification is lost for good.
            await two.block("frank", seconds=300)
            from_database = checks("database")
            assert await one.current_block("frank") is not None
            assert checks("database") == from_database + 1
            assert not cache.valid
        finally:
            await admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
            await admin.close()

        async def reloaded() -> bool:
            return cache.valid and cache.reloads > reloads

        await within(10.0, reloaded)
        assert cache.listener_pid not in (None, pid)
        # The reload picked up the block whose notification was missed.
        assert cache.get("frank") is not None
        from_cache = checks("cache")
        assert await one.current_block("frank") is not None
        assert checks("cache") == from_cache + 1


async def test_more_blocked_users_than_the_cap_means_per_call_checks(settings_factory: SettingsFactory) -> None:
    async with replica(settings_factory, max_entries=1) as store:
        cache = store.cache
        assert cache is not None
        assert cache.valid
        await store.block("gina", seconds=300)
        await store.block("hank", seconds=300)

        async def invalid() -> bool:
            return not cache.valid

        await within(1.0, invalid)
        from_database = checks("database")
        assert await store.current_block("gina") is not None
        assert await store.current_block("hank") is not None
        assert await store.current_block("ivan") is None
        assert checks("database") == from_database + 3
