"""The multi-host run: three replicas on three hosts behind HAProxy, one PostgreSQL behind PgBouncer,
under locust's journeys, while a replica is killed and PgBouncer restarts.

    ./dev python -m loadtests.multihost --short     # what CI runs: about a minute
    ./dev python -m loadtests.multihost             # the long form (docs/SCALING.md's figures)

Each replica (`python -m gateway`) runs in its own network namespace with its own address,
joined to this machine by a veth pair on a bridge (loadtests/netns.py). HAProxy balances them
(health: /readyz); PgBouncer in transaction mode pools their connections to a scratch database
on the machine's PostgreSQL (`GATEWAY_DB_STATEMENT_CACHE=false`), and their block caches listen
on a direct connection (`GATEWAY_LISTEN_DATABASE_URL`). The fake upstream moderates, a webhook
receiver here gets the block and unblock events. Locust runs loadtests/locustfile.py through
HAProxy; meanwhile rounds of probes block and unblock users through one replica and watch the
others (loadtests/propagation.py). At 30 % of the run one replica is killed with SIGKILL and
started again a few seconds later; at 65 % PgBouncer is restarted.

Checks (loadtests/multihost_checks.py), printed with the figures; the exit code is 1 if any fails:
no strike lost or doubled; a block refused by every other replica, and an unblock served by
every replica, within a second; every webhook delivered, and once (by id); no client error but
the calls in flight on the killed replica; the killed replica back in service; every replica
exits 0 on SIGTERM.

It needs root (`ip netns`); run as another user it runs itself again with `sudo -n`. It installs
haproxy and pgbouncer with apt-get when they are missing. The database server is the one of
TEST_DATABASE_URL (or --database-url); the scratch database is dropped at the end. Everything
it starts (namespaces, veths, processes, the database) is removed at the end, after a failure
and on Ctrl-C or SIGTERM; what a run killed with SIGKILL left behind, the next run removes.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from loadtests import netns
from loadtests.cluster import SCRATCH_PREFIX, Cluster, ClusterError, database_prefix, sweep
from loadtests.harness import ROOT, child_env, scratch_database
from loadtests.multihost_checks import (
    Faults,
    Findings,
    check_errors,
    check_strikes,
    check_webhooks,
    read_balancer_log,
    read_journal,
)
from loadtests.propagation import Prober, Round
from loadtests.proxies import ProxyError, install_missing
from loadtests.receiver import Receiver

DEFAULT_DATABASE = "postgresql://postgres@127.0.0.1:5432/postgres"
LAG_LIMIT = 1.0  # seconds for a block or an unblock to reach every replica
KILLED = "gw2"
# (seconds of load, locust users, seconds the killed replica stays down)
FORMS = {"short": (40, 40, 2.0), "long": (300, 120, 5.0)}


class MultihostFailed(Exception):
    pass


@dataclass
class Observations:
    rounds: list[Round] = field(default_factory=list)
    journal: list[dict[str, Any]] = field(default_factory=list)
    faults: Faults | None = None
    back_at: float = 0.0  # the killed replica ready again
    started: float = 0.0
    ended: float = 0.0
    drained_after: float = 0.0


async def _pending_webhooks(dsn: str) -> tuple[int, float]:
    """Undelivered outbox rows, and seconds until the last of them is due."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        row = await conn.fetchrow(
            "SELECT count(*) AS pending, coalesce(extract(epoch FROM max(next_attempt_at) - now()), 0) AS due"
            " FROM webhook_outbox WHERE delivered_at IS NULL"
        )
    finally:
        await conn.close()
    assert row is not None
    return int(row["pending"]), float(row["due"])


async def _wait_for_balancer(session: aiohttp.ClientSession, url: str) -> None:
    for _ in range(100):  # until its health checks found a replica up
        try:
            async with session.get(f"{url}/readyz") as response:
                if response.status == 200:
                    break
        except (aiohttp.ClientError, TimeoutError):
            pass
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.5)  # and the others: `rise 2` checks each


async def _drain_webhooks(dsn: str, within: float) -> None:
    """Until the outbox is delivered: a row the killed replica had claimed waits for its lease (about 35 s)."""
    deadline = time.time() + within
    while time.time() < deadline:
        pending, due = await _pending_webhooks(dsn)
        if not pending:
            return
        await asyncio.sleep(min(1.0, max(0.1, due)))


async def _drive(args: argparse.Namespace, cluster: Cluster, receiver: Receiver, admin_token: str) -> Observations:
    """Start the load, run the probes and the faults on schedule until it ends, then let the webhooks drain."""
    seen = Observations()
    addresses = cluster.addresses
    assert addresses is not None
    await receiver.start(addresses.bridge, addresses.receiver)
    await cluster.wait_ready(sorted(cluster.replicas))
    live = set(cluster.replicas)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        await _wait_for_balancer(session, addresses.balancer_url)
        journal = cluster.scratch / "journal.jsonl"
        arguments = ["--host", addresses.balancer_url, "--users", str(args.users), "--spawn-rate", str(args.users)]
        arguments += ["--run-time", f"{args.seconds}s", "--stop-timeout", "5", "--only-summary"]
        arguments += ["--csv", str(cluster.scratch / "locust")]
        environment = child_env(GATEWAY_ADMIN_TOKEN=admin_token, LOADTEST_JOURNAL=str(journal))
        locust = cluster.start_locust(arguments, environment).process
        prober = Prober(session, lambda: {name: cluster.url(name) for name in sorted(live)}, admin_token)
        seen.started = start = time.time()
        kill_at, back_at = start + args.seconds * 0.3, start + args.seconds * 0.3 + args.down
        pooler_at, end = start + args.seconds * 0.65, start + args.seconds
        killed_at = 0.0
        pooler: tuple[float, float] | None = None
        returning: asyncio.Task[None] | None = None
        number = 0
        while locust.poll() is None and time.time() < end + 60:
            now = time.time()
            if not killed_at and now >= kill_at:
                live.discard(KILLED)
                killed_at = time.time()  # it dies within a millisecond of the signal
                cluster.replicas[KILLED].process.send_signal(signal.SIGKILL)
                cluster.replicas[KILLED].process.wait(10)
            elif killed_at and returning is None and now >= back_at:
                cluster.start_replica(KILLED)
                returning = asyncio.create_task(cluster.wait_ready([KILLED]))
            elif pooler is None and now >= pooler_at:
                pooler = await cluster.restart_pgbouncer()
            elif now < end - 1:
                result = await prober.round(number)
                number += 1
                if result is not None:
                    seen.rounds.append(result)
                await asyncio.sleep(args.probe_interval)
            else:
                await asyncio.sleep(0.2)
            if returning is not None and returning.done() and KILLED not in live:
                returning.result()  # a replica that did not come back fails the run here
                live.add(KILLED)
                seen.back_at = time.time()
        if locust.poll() is None:
            raise MultihostFailed(f"locust still running 60 s after its {args.seconds} s")
        seen.ended = time.time()
        if returning is not None and not returning.done():
            await asyncio.wait_for(returning, 60)
            seen.back_at = time.time()
        if not killed_at or pooler is None:
            raise MultihostFailed("the run ended before its faults: make it longer")
        seen.faults = Faults(KILLED, killed_at, cluster.hosts[KILLED].address, pooler)
        await _drain_webhooks(cluster.database, within=60)
        seen.drained_after = time.time() - seen.ended
        seen.journal = read_journal(journal) + prober.journal
    return seen


def _locust_figures(path: Path, findings: Findings) -> None:
    if not path.exists():
        findings.problems.append("locust wrote no statistics")
        return
    with path.open(newline="") as handle:
        rows = {row["Name"]: row for row in csv.DictReader(handle)}
    total = rows.get("Aggregated")
    if total is None or not int(total["Request Count"]):
        findings.problems.append("locust made no requests")
        return
    findings.figures["locust requests"] = int(total["Request Count"])
    findings.figures["locust requests per second"] = round(float(total["Requests/s"]), 1)
    findings.figures["locust p50 / p99 ms"] = f"{total['50%']} / {total['99%']}"
    for name in ("chat", "chat (stream)", "violation", "admin unblock"):
        if not int(rows.get(name, {}).get("Request Count", 0) or 0):
            findings.problems.append(f"locust made no {name!r} requests: the run was too short or too small")


def _round_figures(rounds: list[Round], findings: Findings) -> None:
    observed = {
        "block": [lag for probe in rounds for lag in probe.block_lags.values()],
        "unblock": [lag for probe in rounds for lag in probe.unblock_lags.values()],
    }
    for probe in rounds:
        findings.problems += [f"probe {probe.number}: {problem}" for problem in probe.problems]
        for what, lags in (("block", probe.block_lags), ("unblock", probe.unblock_lags)):
            for replica, lag in lags.items():
                if lag is None or lag > LAG_LIMIT:
                    shown = "never" if lag is None else f"after {lag:.3f} s"
                    findings.problems.append(
                        f"probe {probe.number}: the {probe.kind} {what} through "
                        f"{probe.origin if what == 'block' else probe.unblock_via} reached {replica} {shown}"
                    )
    if len(rounds) < 3:
        findings.problems.append(f"only {len(rounds)} probe rounds ran")
    for what, all_lags in observed.items():
        known = sorted(lag for lag in all_lags if lag is not None)
        if known:
            findings.figures[f"{what} reached a replica, median / max ms"] = (
                f"{statistics.median(known) * 1000:.0f} / {known[-1] * 1000:.0f} ({len(known)} observations)"
            )
    findings.figures["probe rounds"] = len(rounds)


async def _check(
    cluster: Cluster, seen: Observations, receiver: Receiver, exit_codes: dict[str, list[int]]
) -> Findings:
    findings = Findings()
    faults = seen.faults
    assert faults is not None
    served = read_balancer_log(cluster.scratch / "haproxy.log")
    _locust_figures(cluster.scratch / "locust_stats.csv", findings)
    findings.figures[f"{faults.killed} killed at, s into the load"] = round(faults.killed_at - seen.started, 2)
    findings.figures[f"{faults.killed} ready again after, s"] = round(seen.back_at - faults.killed_at, 2)
    returned = [call for call in served.values() if call.server == faults.killed and call.accepted > seen.back_at]
    findings.figures[f"calls {faults.killed} served after it came back"] = len(returned)
    if not returned:
        findings.problems.append(f"{faults.killed} served no call through the balancer after it came back")
    began, listening = faults.pgbouncer
    findings.figures["PgBouncer restarted at, s into the load"] = round(began - seen.started, 2)
    findings.figures["PgBouncer not listening for, ms"] = round((listening - began) * 1000)
    errors = check_errors(seen.journal, served, faults, findings)
    conn = await asyncpg.connect(cluster.database, timeout=10)
    try:
        await check_strikes(conn, seen.journal, errors, findings)
        _round_figures(seen.rounds, findings)
        await check_webhooks(conn, receiver.deliveries, faults, findings)
    finally:
        await conn.close()
    if receiver.bad_signatures:
        findings.problems.append(f"{receiver.bad_signatures} webhooks with a bad signature")
    findings.figures["webhooks drained after the load, s"] = round(seen.drained_after, 1)
    for name, codes in sorted(exit_codes.items()):
        if not codes or codes[-1] != 0:
            findings.problems.append(f"{name} did not exit 0 on SIGTERM (exit codes of its runs: {codes})")
    return findings


@contextmanager
def _uninterrupted() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait while the run cleans up (every step of it is bounded in time)."""
    previous = {number: signal.signal(number, signal.SIG_IGN) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def run(args: argparse.Namespace) -> Findings:
    admin = args.database_url or os.environ.get("TEST_DATABASE_URL") or DEFAULT_DATABASE
    removed = netns.sweep() + sweep(admin, Path(tempfile.gettempdir()))
    if removed:
        print(f"multihost: removed what an earlier run left: {', '.join(removed)}")
    installed = install_missing()
    if installed:
        print(f"multihost: installed {', '.join(installed)}")
    scratch = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX))
    scratch.chmod(0o711)  # pgbouncer runs as nobody and reads its own directory inside
    admin_token, webhook_secret = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    receiver = Receiver(webhook_secret.encode())
    failed = True
    with scratch_database(admin, database_prefix(os.getpid())) as database:
        assert database is not None
        cluster = Cluster(scratch, admin, database, replicas=3, pool_size=args.pool_size)
        try:
            cluster.start(admin_token=admin_token, webhook_secret=webhook_secret, upstream_latency_ms=20)

            async def drive() -> Observations:
                try:
                    return await _drive(args, cluster, receiver, admin_token)
                finally:
                    await receiver.close()

            seen = asyncio.run(drive())
            with _uninterrupted():
                problems = cluster.close()
            exit_codes = {replica: child.exit_codes for replica, child in cluster.replicas.items()}
            findings = asyncio.run(_check(cluster, seen, receiver, exit_codes))
            findings.problems += problems
            failed = bool(findings.problems)
            return findings
        finally:
            with _uninterrupted():
                for problem in cluster.close():
                    print(f"multihost: cleaning up: {problem}", file=sys.stderr)
                if failed or args.keep:
                    print(f"multihost: logs kept in {scratch}")
                else:
                    shutil.rmtree(scratch, ignore_errors=True)


def _as_root(argv: list[str]) -> int:
    if shutil.which("sudo") is None:
        print("multihost: needs root (ip netns): run it as root", file=sys.stderr)
        return 2
    command = ["sudo", "-n", "--preserve-env", sys.executable, "-m", "loadtests.multihost", *argv]
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        return subprocess.call(command, cwd=ROOT, env=environment)
    except KeyboardInterrupt:
        return 130


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m loadtests.multihost", description=__doc__.split("\n")[0])
    parser.add_argument("--short", action="store_true", help="the short form CI runs")
    parser.add_argument("--seconds", type=int, help="seconds of load (short: 40, long: 300)")
    parser.add_argument("--users", type=int, help="locust users (short: 40, long: 120)")
    parser.add_argument("--down", type=float, help="seconds the killed replica stays down (short: 2, long: 5)")
    parser.add_argument("--probe-interval", type=float, default=0.5, help="seconds between propagation rounds")
    parser.add_argument("--pool-size", type=int, default=10, help="PgBouncer's server connections")
    parser.add_argument("--database-url", help="the PostgreSQL server for the scratch database (TEST_DATABASE_URL)")
    parser.add_argument("--keep", action="store_true", help="keep the logs (kept anyway when a check fails)")
    args = parser.parse_args(argv)
    seconds, users, down = FORMS["short" if args.short else "long"]
    args.seconds = args.seconds or seconds
    args.users = args.users or users
    args.down = args.down or down
    if os.geteuid() != 0:
        return _as_root(argv)
    # SIGTERM stops the run like Ctrl-C: through every `finally` that stops and removes what it started.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        findings = run(args)
    except (MultihostFailed, ClusterError, ProxyError, netns.NetworkError, OSError) as exc:
        print(f"multihost: FAILED: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("multihost: interrupted; everything it started was stopped and removed", file=sys.stderr)
        return 130
    for figure, value in findings.figures.items():
        print(f"multihost: {figure}: {value}")
    for problem in findings.problems:
        print(f"multihost: FAILED: {problem}", file=sys.stderr)
    if not findings.problems:
        print("multihost: ok: every check held")
    return 1 if findings.problems else 0


if __name__ == "__main__":
    sys.exit(main())
