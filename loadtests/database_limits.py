"""How far one PostgreSQL goes for the gateway: strikes, block checks, and LISTEN/NOTIFY fan-out.

    ./dev python -m loadtests.database_limits                 # about two minutes
    ./dev python -m loadtests.database_limits --seconds 4 --json loadtests/results/limits.json

It runs the gateway's own Store and BlockCache against a scratch database on the server of
TEST_DATABASE_URL (or --database-url), dropped at the end. For each phase it counts the
operations and reads the CPU time spent on them by the server's backends serving that database
(from /proc: the server must run on this machine) and by this process (the gateway's side), so
the figures are CPU per operation, which hold on a busy machine, and ratios taken in one run.
The server's own background processes (WAL writer, checkpointer) are not counted.

Phases:
- strikes, many users: every user's third strike blocks it (3 strikes a block, as by default);
  once with asyncpg's statement cache, once without it (as behind PgBouncer in transaction mode);
- strikes, one hot user: every call on the same user row, so they queue on its lock; its blocks
  end at once (GATEWAY_BLOCK_SECONDS=0.001), so its next strike records the expiry and counts
  from 1 again: the whole ladder, on one row;
- block checks: answered by a loaded per-worker cache, and asked of the database per call;
- block changes (an admin block and its unblock) with 0, 1, 3 and 10 block caches listening,
  as with that many replicas: their cost on the server; after changes at full speed, how long
  until every cache had read them all; and, one change at a time, how long from the start of
  the call that made a block until every cache knows it. The caches share this process's CPU
  and loop, where replicas would each have their own: the times are upper bounds;
- storage: bytes per audit event and per user, indexes included.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from gateway.blockcache import BlockCache
from gateway.database import Database
from gateway.logs import configure_logging
from gateway.settings import Settings, settings_from
from gateway.store import Policy, Store
from loadtests.harness import scratch_database
from middleware.protocols import Verdict, Violation

DEFAULT_DATABASE = "postgresql://postgres@127.0.0.1:5432/postgres"
VIOLATION = Violation(Verdict("rules", ("violence",), "0" * 64), path="/v1/chat/completions")
TICK = os.sysconf("SC_CLK_TCK")
LISTENERS = (0, 1, 3, 10)


@dataclass
class Phase:
    name: str
    operations: int
    seconds: float
    server_cpu: float  # seconds of the backends serving this database
    client_cpu: float  # seconds of this process

    @property
    def per_second(self) -> float:
        return self.operations / self.seconds if self.seconds else 0.0

    @property
    def per_server_core(self) -> float | None:
        """Operations one fully busy server core would do, at the CPU each one cost here (None: no
        measurable server CPU, a few clock ticks at most)."""
        return self.operations / self.server_cpu if self.server_cpu > 0.05 else None

    @property
    def server_us(self) -> float:
        return self.server_cpu / self.operations * 1e6 if self.operations else 0.0

    @property
    def client_us(self) -> float:
        return self.client_cpu / self.operations * 1e6 if self.operations else 0.0


def _cpu_of(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


class ServerClock:
    """The CPU time of the server's backends connected to one database."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._name = urlsplit(dsn).path.lstrip("/")

    async def read(self) -> dict[int, float]:
        conn = await asyncpg.connect(self._dsn, statement_cache_size=0)
        try:
            rows = await conn.fetch(
                "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", self._name
            )
        finally:
            await conn.close()
        return {row["pid"]: _cpu_of(row["pid"]) for row in rows}

    @staticmethod
    def spent(before: dict[int, float], after: dict[int, float]) -> float:
        return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


async def measure(
    name: str, clock: ServerClock, seconds: float, concurrency: int, operation: Callable[[int], Awaitable[None]]
) -> Phase:
    """Run `operation(n)` from `concurrency` tasks for `seconds`; n counts the calls across them."""
    counter = 0
    stop = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal counter
        while time.monotonic() < stop:
            n = counter
            counter += 1
            await operation(n)

    before, client = await clock.read(), time.process_time()
    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    client = time.process_time() - client
    return Phase(name, counter, elapsed, ServerClock.spent(before, await clock.read()), client)


async def strikes(settings: Settings, clock: ServerClock, args: argparse.Namespace) -> list[Phase]:
    phases: list[Phase] = []
    for cached in (True, False):
        tuned = settings.model_copy(update={"db_statement_cache": cached})
        database = Database(tuned)
        await database.open()
        try:
            store = Store(database, Policy.from_settings(tuned))
            tag = "" if cached else ", no statement cache (PgBouncer)"

            async def many(n: int, store: Store = store, tag: str = tag) -> None:
                await store.record_violation(f"many{tag}-{n // 3}", VIOLATION)

            phases.append(await measure(f"strikes, many users{tag}", clock, args.seconds, args.concurrency, many))
            if cached:

                async def hot(n: int, store: Store = store) -> None:
                    await store.record_violation("hot", VIOLATION)

                phases.append(await measure("strikes, one hot user", clock, args.seconds, args.concurrency, hot))
        finally:
            await database.close()
    return phases


async def block_checks(settings: Settings, dsn: str, clock: ServerClock, args: argparse.Namespace) -> list[Phase]:
    database = Database(settings)
    await database.open()
    cache = BlockCache(statement_cache=settings.db_statement_cache)
    try:
        plain = Store(database, Policy.from_settings(settings))
        for index in range(args.blocked):
            await plain.block(f"blocked-{index}", seconds=3600)
        await cache.start(dsn)
        cached = Store(database, Policy.from_settings(settings), cache)
        assert cache.valid, "the block cache did not load"
        users = [f"blocked-{index}" if index % 2 else f"clean-{index}" for index in range(2 * args.blocked)]

        async def from_database(n: int) -> None:
            await plain.current_block(users[n % len(users)])

        per_call = await measure(
            "block checks, database per call", clock, args.seconds, args.concurrency, from_database
        )
        # The cache answers synchronously (the middleware's cached_block): a plain loop, in batches.
        before, client = await clock.read(), time.process_time()
        started, done = time.monotonic(), 0
        while time.monotonic() - started < args.seconds:
            for user in users:
                known, _ = cached.cached_block(user)
                assert known
            done += len(users)
            await asyncio.sleep(0)
        elapsed = time.monotonic() - started
        client = time.process_time() - client
        server = ServerClock.spent(before, await clock.read())
        return [per_call, Phase("block checks, per-worker cache", done, elapsed, server, client)]
    finally:
        await cache.close()
        await database.close()


@dataclass
class FanOut:
    listeners: int
    changes: Phase
    backlog_ms: float | None  # after changes at full speed, until every cache had read them all
    lag_ms_median: float | None
    lag_ms_p99: float | None


async def _known_everywhere(caches: list[BlockCache], user: str) -> None:
    for _ in range(100_000):  # at most about 20 s
        if all(cache.get(user) is not None for cache in caches):
            return
        await asyncio.sleep(0.0002)


async def fan_out(settings: Settings, dsn: str, clock: ServerClock, args: argparse.Namespace) -> list[FanOut]:
    database = Database(settings)
    await database.open()
    results: list[FanOut] = []
    try:
        store = Store(database, Policy.from_settings(settings))
        for count in LISTENERS:
            caches = [BlockCache(statement_cache=settings.db_statement_cache) for _ in range(count)]
            for cache in caches:
                await cache.start(dsn)
            try:

                async def change(n: int, tag: str = f"fan{count}") -> None:
                    user = f"{tag}-{n}"
                    await store.block(user, seconds=3600)
                    await store.unblock(user)

                phase = await measure(
                    f"block changes, {count} listening", clock, args.seconds, args.concurrency, change
                )
                phase.operations *= 2  # a block and an unblock each
                backlog = None
                if caches:  # notifications are read in order: the last one known means all were
                    ended = time.perf_counter()
                    await store.block(f"fan{count}-last", seconds=3600)
                    await _known_everywhere(caches, f"fan{count}-last")
                    backlog = (time.perf_counter() - ended) * 1000
                lags: list[float] = []
                for index in range(args.lag_samples if caches else 0):
                    user = f"lag{count}-{index}"
                    asked = time.perf_counter()
                    await store.block(user, seconds=3600)
                    await _known_everywhere(caches, user)
                    lags.append((time.perf_counter() - asked) * 1000)
                ordered = sorted(lags)
                results.append(
                    FanOut(
                        count,
                        phase,
                        backlog,
                        statistics.median(ordered) if ordered else None,
                        ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else None,
                    )
                )
            finally:
                for cache in caches:
                    await cache.close()
    finally:
        await database.close()
    return results


def report(phases: list[Phase], fans: list[FanOut]) -> dict[str, Any]:
    print(
        f"{'phase':54} {'ops':>8} {'ops/s':>9} {'server µs/op':>13} {'ops per server core-s':>22} {'client µs/op':>13}"
    )
    for phase in [*phases, *(fan.changes for fan in fans)]:
        print(
            f"{phase.name:54} {phase.operations:8d} {phase.per_second:9.0f} {phase.server_us:13.1f} "
            f"{'-' if phase.per_server_core is None else f'{phase.per_server_core:.0f}':>22} {phase.client_us:13.1f}"
        )
    for fan in fans:
        if fan.backlog_ms is not None:
            print(f"{fan.listeners:2d} listening: after changes at full speed every cache had read them all "
                  f"{fan.backlog_ms:.1f} ms later")  # fmt: skip
        if fan.lag_ms_median is not None:
            print(f"{fan.listeners:2d} listening: every cache knew a block {fan.lag_ms_median:.2f} ms (median), "
                  f"{fan.lag_ms_p99:.2f} ms (p99) after the call that made it began")  # fmt: skip
    by_name = {phase.name: phase for phase in phases}
    many, hot = by_name["strikes, many users"], by_name["strikes, one hot user"]
    database, cache = by_name["block checks, database per call"], by_name["block checks, per-worker cache"]
    base = fans[0].changes.server_us
    ratios = {
        "hot user / many users, strikes per second": hot.per_second / many.per_second,
        "cache / database, block checks per gateway CPU-second": database.client_us / cache.client_us,
        "database block check / strike, server CPU": database.server_us / many.server_us,
        "strike without / with the statement cache, server CPU": by_name[
            "strikes, many users, no statement cache (PgBouncer)"
        ].server_us
        / many.server_us,
        **{
            f"block change with {fan.listeners} listening / with none, server CPU": fan.changes.server_us / base
            for fan in fans[1:]
        },
    }
    for name, value in ratios.items():
        print(f"ratio: {name}: {value:.2f}")
    return {
        "phases": [asdict(phase) | {"per_server_core": phase.per_server_core} for phase in phases],
        "fan_out": [asdict(fan) for fan in fans],
        "ratios": ratios,
    }


async def storage(dsn: str) -> dict[str, float]:
    """Bytes per audit event and per user, tables and indexes together, after a VACUUM."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("VACUUM ANALYZE events, users")
        sizes = {
            table: await conn.fetchrow(
                f"SELECT pg_total_relation_size('{table}') AS bytes, (SELECT count(*) FROM {table}) AS rows"  # noqa: S608
            )
            for table in ("events", "users")
        }
    finally:
        await conn.close()
    figures = {f"bytes per {table} row": row["bytes"] / max(row["rows"], 1) for table, row in sizes.items() if row}
    for name, value in figures.items():
        print(f"storage: {name}: {value:.0f}")
    return figures


async def run(args: argparse.Namespace, dsn: str) -> dict[str, Any]:
    settings = settings_from(
        database_url=dsn,
        moderation="off",
        max_strikes=3,
        block_seconds=0.001,
        db_pool_size=args.concurrency,
        log_level="warning",
        log_format="console",
    )
    configure_logging(settings)
    clock = ServerClock(dsn)
    phases = await strikes(settings, clock, args)
    phases += await block_checks(settings, dsn, clock, args)
    fans = await fan_out(settings, dsn, clock, args)
    figures = report(phases, fans)
    figures["storage"] = await storage(dsn)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.database_limits", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each phase")
    parser.add_argument("--concurrency", type=int, default=16, help="operations in flight (and pool connections)")
    parser.add_argument("--blocked", type=int, default=1000, help="users blocked for the block-check phases")
    parser.add_argument("--lag-samples", type=int, default=100, help="blocks timed to every listening cache")
    parser.add_argument("--database-url", help="the PostgreSQL server for the scratch database (TEST_DATABASE_URL)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    admin = args.database_url or os.environ.get("TEST_DATABASE_URL") or DEFAULT_DATABASE
    with scratch_database(admin, "limits") as dsn:
        assert dsn is not None
        figures = asyncio.run(run(args, dsn))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
