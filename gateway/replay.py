"""`python -m gateway policy check|replay`: see what a policy file says, and what it would have done.

`replay` reads the audit trail's violations of the last N days (read-only, streamed user by
user) and runs them through the current policy and through the file with the rules the store
applies: warnings, points and their lifetimes, zero tolerance, blocks that refuse the calls
made while they last and reset the points when they end, and the ladder. Each user starts the
period with no points and no blocks; admin blocks and unblocks are not replayed; reversed
violations are left out. A stricter policy cannot know what a user it blocks earlier would not
have sent: the counts show what each policy makes of the traffic that was recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from gateway.database import Database, connect
from gateway.policy import Judgement, Policy, PolicyError, load_policy
from gateway.settings import Settings, SettingsError, load_settings
from middleware.protocols import StoreUnavailable

type Connection = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]

MAX_DAYS = 3650
_BATCH = 20_000
# Violations as the store counts them: refused ones (warnings included) and shadow ones (what
# enforcement would have refused), and output violations that counted; not the reversed.
_VIOLATIONS = """
SELECT user_id, extract(epoch FROM at)::float8 AS at, categories
FROM events
WHERE at >= now() - make_interval(days => $1)
    AND reversed_at IS NULL
    AND (kind IN ('violation', 'warning') OR (kind = 'output_violation' AND counted))
ORDER BY user_id, at, id
"""


@dataclass(slots=True)
class Counts:
    """Users a policy would have warned, blocked (for good or not) and blocked for good."""

    warned: int = 0
    blocked: int = 0
    permanent: int = 0


@dataclass(frozen=True, slots=True)
class Replay:
    days: int
    violations: int
    users: int
    current: Counts
    proposed: Counts

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Simulation:
    """One policy applied to users' violations, one user at a time, as the store would."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.counts = Counts()
        self._judged: dict[tuple[str, ...], Judgement] = {}

    def user(self, violations: Sequence[tuple[float, tuple[str, ...]]]) -> None:
        """Replay one user's violations, oldest first: (epoch seconds, categories)."""
        policy = self.policy
        since = -math.inf  # strikes_since: points count from here
        blocked_until: float | None = None
        blocks = 0
        strikes: list[tuple[float, int, float]] = []  # (at, points, expires) of strikes with points
        recent: deque[float] = deque(maxlen=policy.warnings)  # the latest counted violations
        warned = blocked = False
        for at, categories in violations:
            if blocked_until is not None:
                if at < blocked_until:
                    continue  # refused while blocked: no points
                since, blocked_until = blocked_until, None
            judgement = self._judged.get(categories)
            if judgement is None:
                judgement = self._judged[categories] = policy.judge(categories)
            # A warning while fewer than `warnings` counted violations lie inside the window: the
            # oldest of the latest `warnings` is outside it, or there are not that many yet.
            warning = (
                not judgement.zero_tolerance
                and policy.warnings > 0
                and (len(recent) < policy.warnings or (policy.window > 0 and recent[0] < at - policy.window))
            )
            recent.append(at)
            if warning:
                warned = True
                continue
            if judgement.points:
                expires = at + judgement.lifetime if judgement.lifetime else math.inf
                strikes.append((at, judgement.points, expires))
            strikes = [strike for strike in strikes if strike[0] >= since and strike[2] > at]
            if not judgement.zero_tolerance and sum(strike[1] for strike in strikes) < policy.max_strikes:
                continue
            blocks += 1
            blocked = True
            seconds = policy.block_for(judgement, blocks)
            if seconds is None:
                self.counts.permanent += 1
                break
            blocked_until = at + seconds
        self.counts.warned += warned
        self.counts.blocked += blocked


async def replay(conn: Connection, current: Policy, proposed: Policy, days: int) -> Replay:
    """Replay the last `days` of violations under both policies, in a read-only transaction."""
    simulations = (Simulation(current), Simulation(proposed))
    violations = users = 0
    user_id: str | None = None
    batch: list[tuple[float, tuple[str, ...]]] = []

    def flush() -> None:
        for simulation in simulations:
            simulation.user(batch)

    async with conn.transaction(readonly=True, isolation="repeatable_read"):
        # The sort of a month of events fits in memory with room to spare.
        await conn.execute("SET LOCAL work_mem = '64MB'")
        cursor = await conn.cursor(_VIOLATIONS, days)
        while rows := await cursor.fetch(_BATCH):
            for user, at, categories in rows:
                if user != user_id:
                    if batch:
                        flush()
                    user_id, batch = user, []
                    users += 1
                batch.append((at, tuple(categories)))
            violations += len(rows)
    if batch:
        flush()
    return Replay(days, violations, users, simulations[0].counts, simulations[1].counts)


@asynccontextmanager
async def _audit_trail(settings: Settings) -> AsyncIterator[Connection]:
    """A connection to the gateway's database; never migrates an external one."""
    if settings.database_url is not None:
        dsn = settings.database_url.get_secret_value()
        conn = await connect(dsn, statement_cache=settings.db_statement_cache)
        try:
            yield conn
        finally:
            await conn.close()
        return
    database = Database(settings)
    await database.open()  # the embedded PostgreSQL: the gateway's own, migrated at every start
    try:
        async with database.pool.acquire() as pooled:
            yield pooled
    finally:
        await database.close()


async def _replay_from_settings(settings: Settings, current: Policy, proposed: Policy, days: int) -> Replay:
    async with _audit_trail(settings) as conn:
        return await replay(conn, current, proposed, days)


def _print_replay(result: Replay, file: Path) -> None:
    print(
        f"Replayed {result.violations} violations of {result.users} users "
        f"recorded in the last {result.days} days (nothing was changed)."
    )
    rows = [("", "warned", "blocked", "for good"), ("current policy", *_row(result.current))]
    rows.append((str(file), *_row(result.proposed)))
    width = max(len(row[0]) for row in rows)
    for name, *numbers in rows:
        print(f"{name:<{width}}  " + "  ".join(f"{number:>8}" for number in numbers))
    print("Blocked counts every user blocked at least once; for good counts those blocked permanently.")


def _row(counts: Counts) -> tuple[str, str, str]:
    return str(counts.warned), str(counts.blocked), str(counts.permanent)


def policy_command(argv: Sequence[str]) -> int:
    """`python -m gateway policy check FILE` / `policy replay FILE [--days N] [--json]`."""
    parser = argparse.ArgumentParser(prog="chat-gateway policy", description="Check or replay a policy file.")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="validate FILE and say what it does in plain words")
    check.add_argument("file", type=Path)
    run = commands.add_parser("replay", help="what FILE and the current policy make of recent violations")
    run.add_argument("file", type=Path)
    run.add_argument("--days", type=int, default=30, help="replay the violations of the last N days (default 30)")
    run.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        proposed = load_policy(args.file)
    except PolicyError as exc:
        print(f"chat-gateway: {exc}", file=sys.stderr)
        return 2
    if args.command == "check":
        print(proposed.describe())
        return 0
    if not 1 <= args.days <= MAX_DAYS:
        print(f"chat-gateway: --days must be from 1 to {MAX_DAYS}, got {args.days}", file=sys.stderr)
        return 2
    try:
        settings = load_settings()
        current = Policy.from_settings(settings)
    except SettingsError as exc:
        print(f"chat-gateway: {exc}", file=sys.stderr)
        return 2
    try:
        result = asyncio.run(_replay_from_settings(settings, current, proposed, args.days))
    except StoreUnavailable as exc:
        print(f"chat-gateway: cannot replay: {exc}", file=sys.stderr)
        return 1
    except asyncpg.UndefinedColumnError:
        print("chat-gateway: cannot replay: the database schema is older than this gateway: migrate", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        _print_replay(result, args.file)
    return 0
