"""The gateway's database layer behind a real PgBouncer in transaction mode (Debian's `pgbouncer`).

PgBouncer hands each transaction whatever server connection is free, so a named prepared
statement one client left on a server connection is there for the next client to collide with.
With one server connection (`default_pool_size = 1`) every client shares it: a collision is
certain rather than likely.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from gateway.blockcache import BlockCache
from gateway.database import Database
from gateway.settings import Settings
from gateway.store import Policy, Store
from loadtests.harness import child_env, free_port
from loadtests.proxies import NOBODY, drop_to_nobody, find, pgbouncer_config, write_private
from middleware.protocols import Verdict, Violation
from tests.conftest import outside_pytest_tmp

SettingsFactory = Callable[..., Settings]


class PgBouncer:
    """PgBouncer on a loopback port in front of one database; `url` reaches that database through it."""

    def __init__(self, database_url: str, directory: Path, pool_size: int = 1) -> None:
        self.port = free_port()
        self.directory = directory
        name = urlsplit(database_url).path.lstrip("/")
        self.url = urlunsplit(
            urlsplit(database_url)._replace(netloc=f"gateway@127.0.0.1:{self.port}", path=f"/{name}", query="")
        )
        self._config = directory / "pgbouncer.ini"
        root = os.geteuid() == 0  # pgbouncer refuses to run as root
        write_private(
            self._config, pgbouncer_config(("127.0.0.1", self.port), database_url, pool_size), NOBODY if root else None
        )
        if root:
            directory.chmod(0o711)
        self._preexec = drop_to_nobody if root else None
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = find("pgbouncer")
        assert binary is not None
        with (self.directory / "pgbouncer.log").open("ab") as log:
            self.process = subprocess.Popen(
                [binary, str(self._config)], stdout=log, stderr=log, preexec_fn=self._preexec
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.02)
        raise AssertionError(f"pgbouncer did not listen: {(self.directory / 'pgbouncer.log').read_text()}")

    def stop(self, how: signal.Signals = signal.SIGINT) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(how)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def bouncer_directory() -> Iterator[Path]:
    if find("pgbouncer") is None:
        pytest.skip("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
    with outside_pytest_tmp() as path:  # as root, pgbouncer runs as nobody, locked out of pytest's tmp
        yield path


@pytest.fixture
def pgbouncer(empty_database_url: str, bouncer_directory: Path) -> Iterator[PgBouncer]:
    """PgBouncer in transaction mode, one server connection, in front of this test's empty database."""
    if "host=" in urlsplit(empty_database_url).query:
        pytest.skip("PgBouncer reaches PostgreSQL over TCP here: set TEST_DATABASE_URL")
    bouncer = PgBouncer(empty_database_url, bouncer_directory)
    bouncer.start()
    try:
        yield bouncer
    finally:
        bouncer.stop()


def test_replicas_apply_the_schema_one_after_another_through_pgbouncer(pgbouncer: PgBouncer) -> None:
    # Each replica is a process of its own, and asyncpg numbers its prepared statements per
    # process: with named statements the second found the first's __asyncpg_stmt_1__ still on
    # the shared server connection ("already exists") and could not start.
    environment = child_env(DATABASE_URL=pgbouncer.url, GATEWAY_DB_STATEMENT_CACHE="false", GATEWAY_LOG_LEVEL="error")
    for attempt in range(2):
        result = subprocess.run(
            [sys.executable, "-m", "gateway", "migrate"], env=environment, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, f"start {attempt + 1}: {result.stderr[-2000:]}"
        assert "schema is up to date" in result.stdout


async def test_strikes_count_through_pgbouncer_and_a_block_reaches_a_cache_listening_directly(
    settings_factory: SettingsFactory, pgbouncer: PgBouncer, empty_database_url: str
) -> None:
    settings = settings_factory(database_url=pgbouncer.url, db_statement_cache=False, max_strikes=2)
    first, second = Database(settings), Database(settings)  # two replicas on one PgBouncer
    await first.open()
    await second.open()
    cache = BlockCache(statement_cache=False)
    try:
        await cache.start(empty_database_url)  # LISTEN cannot go through PgBouncer's transaction mode
        assert cache.valid
        watching = Store(first, Policy.from_settings(settings), cache)
        striking = Store(second, Policy.from_settings(settings))
        violation = Violation(Verdict("rules", ("violence",), "0" * 64), path="/v1/chat/completions")
        outcomes = [await striking.record_violation("alice", violation) for _ in range(2)]
        assert [outcome.strikes for outcome in outcomes] == [1, 2]
        assert outcomes[1].block is not None
        # The NOTIFY committed through PgBouncer reaches the direct listener of the other replica.
        for _ in range(100):
            if cache.get("alice") is not None:
                break
            await asyncio.sleep(0.01)
        known, block = watching.cached_block("alice")
        assert known
        assert block is not None
        assert block.event_id == outcomes[1].block.event_id
    finally:
        await cache.close()
        await second.close()
        await first.close()
