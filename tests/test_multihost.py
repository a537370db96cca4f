"""The multi-host harness's own parts: the balancer it configures, its names, and the checks it judges a run by.

The run itself (`python -m loadtests.multihost --short`) needs root for its network namespaces;
CI runs it after the suite. Here each check is shown to fail on the fault it exists to catch.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx2
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.store import Store
from loadtests.harness import ROOT, child_env, free_port
from loadtests.multihost_checks import (
    Faults,
    Findings,
    check_errors,
    check_strikes,
    check_webhooks,
    read_balancer_log,
)
from loadtests.netns import Network, _owner, sweep
from loadtests.proxies import PACKAGES, Backend, find, haproxy_config
from loadtests.receiver import Delivery
from middleware.protocols import Verdict, Violation
from tests.conftest import SettingsFactory, open_store
from tests.servers import run_app

KILLED_AT = 1_000_000.0
RESTART = (1_000_020.0, 1_000_020.3)
FAULTS = Faults("gw2", KILLED_AT, "10.213.0.12", RESTART)
VIOLATION = Violation(Verdict("rules", ("violence",), "0" * 64), path="/v1/chat/completions")


def answer(
    name: str, status: int, at: float, *, code: str | None = None, user: str = "", **extra: Any
) -> dict[str, Any]:
    """A journal line as the locustfile and the probes write it."""
    entry = {"t0": at, "t1": at + 0.02, "name": name, "user": user, "request_id": uuid.uuid4().hex}
    entry |= {"status": status, "code": code, "event_id": None, "message": "", "failure": None, "transport": None}
    return entry | extra


def balancer_line(entry: dict[str, Any], server: str, status: int) -> str:
    # accept date, server, status, termination, Th, Ti, Ta, {request id}: as proxies.haproxy_config logs
    return f"{entry['t0']:.3f} {server} {status} ---- 0 0 20 {{{entry['request_id']}}}"


def test_harness_names_carry_their_owner_and_nothing_else_matches() -> None:
    assert _owner("gwmh1a2bbr") == 0x1A2B  # the bridge: its `b` is a hex digit, the owner stays right
    assert _owner("gwmh1a2bn3") == 0x1A2B
    assert _owner("gwmh1a2bh12") == 0x1A2B
    assert _owner("eth0") is None
    assert _owner("gwmhzz") is None
    assert _owner("gwmh1a2bveth") is None


def test_ci_installs_what_the_run_needs_and_runs_its_short_form() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    step = script[script.index("packages=()") : script.index("apt-get install")]
    assert all(binary in step for binary in PACKAGES)
    assert "./dev python -m loadtests.multihost --short" in script


@pytest.fixture
def root() -> None:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")


def _leftovers(tag: str) -> list[str]:
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.split()
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return [name for name in names if name.startswith(tag)] + [line for line in links.splitlines() if tag in line]


@pytest.mark.usefixtures("root")
def test_hosts_reach_the_bridge_and_leave_nothing_behind() -> None:
    network = Network(2)
    try:
        network.create()
        with socket.create_server((network.address, 0)) as server:  # a service on this machine's bridge
            port = server.getsockname()[1]
            for host in network.hosts:
                probe = f"import socket; socket.create_connection(({network.address!r}, {port}), timeout=5).close()"
                subprocess.run(host.command([sys.executable, "-c", probe]), check=True, timeout=30)
        assert len({host.address for host in network.hosts}) == 2
    finally:
        assert network.destroy() == []
    assert _leftovers(network.bridge[:-2]) == []


@pytest.mark.usefixtures("root")
def test_what_a_killed_run_left_is_swept_by_the_next() -> None:
    # A process that makes its hosts and dies without removing them, as a run killed with SIGKILL.
    made = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os; from loadtests.netns import Network; Network(1).create(); print(os.getpid())",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env=child_env(),
    )
    tag = f"gwmh{int(made.stdout):x}"
    assert _leftovers(tag)
    removed = sweep()
    assert any(tag in item for item in removed)
    assert _leftovers(tag) == []


# -- the balancer ------------------------------------------------------------------------------


@pytest.fixture
def haproxy() -> str:
    binary = find("haproxy")
    if binary is None:
        pytest.skip("haproxy is not installed (Debian: apt-get install haproxy)")
    return binary


@pytest.fixture
def replica() -> Iterator[str]:
    """A stand-in replica: healthy on /readyz, and a /v1 route that answers 200."""

    async def ok(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/readyz", ok), Route("/v1/chat/completions", ok, methods=["POST"])])
    with run_app(app) as url:
        yield url


def test_the_balancer_logs_which_replica_served_each_call(haproxy: str, replica: str, tmp_path: Path) -> None:
    port = int(replica.rsplit(":", 1)[1])
    listen = free_port()
    config = tmp_path / "haproxy.cfg"
    relay = ("127.0.0.1", free_port())
    config.write_text(haproxy_config(("127.0.0.1", listen), [Backend("gw1", "127.0.0.1", port)], relay, relay))
    checked = subprocess.run([haproxy, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    log = tmp_path / "haproxy.log"
    with log.open("wb") as out:
        process = subprocess.Popen([haproxy, "-db", "-f", str(config)], stdout=out, stderr=out)
    try:
        request_id = uuid.uuid4().hex
        before = time.time()
        status = 0
        for _ in range(100):  # until the health check has found the replica up
            try:
                response = httpx2.post(
                    f"http://127.0.0.1:{listen}/v1/chat/completions", headers={"X-Request-ID": request_id}, timeout=5
                )
                status = response.status_code
            except httpx2.TransportError:
                status = 0
            if status == 200:
                break
            time.sleep(0.05)
        after = time.time()
        assert status == 200
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(10)
    served = read_balancer_log(log)
    call = served[request_id]
    assert (call.server, call.status) == ("gw1", 200)
    assert before - 1 <= call.accepted <= call.ended <= after + 1


# -- client errors ------------------------------------------------------------------------------


def errors_of(journal: list[dict[str, Any]], lines: list[str], tmp_path: Path) -> tuple[Findings, set[str]]:
    log = tmp_path / "balancer.log"
    log.write_text("\n".join(lines) + "\n")
    findings = Findings()
    return findings, check_errors(journal, read_balancer_log(log), FAULTS, findings)


def test_only_calls_in_flight_on_the_killed_replica_may_fail(tmp_path: Path) -> None:
    cut = answer("chat", 502, KILLED_AT - 0.01)
    elsewhere = answer("chat", 502, KILLED_AT - 0.01)
    fine = answer("chat", 200, KILLED_AT)
    lines = [balancer_line(cut, "gw2", 502), balancer_line(elsewhere, "gw1", 502), balancer_line(fine, "gw2", 200)]
    findings, errors = errors_of([cut, elsewhere, fine], lines, tmp_path)
    assert errors == {cut["request_id"], elsewhere["request_id"]}
    assert findings.figures["errors: in flight on the killed replica"] == 1
    assert findings.figures["errors: other"] == 1
    assert findings.problems == ["1 client errors not explained by the killed replica: chat: 502 None"]


def test_a_call_the_balancer_closed_silently_counts_only_at_the_moment_of_the_kill(tmp_path: Path) -> None:
    closed = answer("chat", 0, KILLED_AT - 0.005, transport="HTTPConnectionClosed('connection closed.')")
    later = answer("chat", 0, KILLED_AT + 5, transport="HTTPConnectionClosed('connection closed.')")
    findings, _ = errors_of([closed, later], [], tmp_path)
    assert findings.figures["errors: in flight on the killed replica"] == 1
    assert findings.figures["in flight on the killed replica"] == 1
    assert len(findings.problems) == 1
    assert "HTTPConnectionClosed" in findings.problems[0]


def test_a_503_store_unavailable_is_excused_only_while_pgbouncer_restarts(tmp_path: Path) -> None:
    during = answer("violation", 503, RESTART[0] + 0.1, code="store_unavailable")
    after = answer("violation", 503, RESTART[1] + 5, code="store_unavailable")
    server_error = answer("violation", 500, RESTART[0] + 0.1, code="internal_error")
    findings, _ = errors_of([during, after, server_error], [], tmp_path)
    assert findings.figures["errors: 503 store_unavailable while PgBouncer restarted"] == 1
    assert findings.figures["errors: other"] == 2


def test_expected_refusals_are_not_errors(tmp_path: Path) -> None:
    journal = [
        answer("violation", 400, 1.0, code="content_policy_violation"),
        answer("violation", 403, 1.0, code="user_blocked"),
        answer("violator clean chat", 403, 1.0, code="user_blocked"),
        answer("probe watch", 403, 1.0, code="user_blocked"),
        answer("probe watch", 400, 1.0, code="invalid_json"),
    ]
    wrong_code = answer("violation", 400, 1.0, code="invalid_json")
    _, errors = errors_of([*journal, wrong_code], [], tmp_path)
    assert errors == {wrong_code["request_id"]}


# -- strikes --------------------------------------------------------------------------------------


async def strikes_of(
    database_url: str, journal: list[dict[str, Any]], errors: frozenset[str] = frozenset()
) -> Findings:
    findings = Findings()
    conn = await asyncpg.connect(database_url)
    try:
        await check_strikes(conn, journal, errors, findings)
    finally:
        await conn.close()
    return findings


async def three_strikes(store: Store, user: str) -> list[dict[str, Any]]:
    """A user's three violations as clients saw them: 400, 400, then the 403 naming the block."""
    journal = []
    for _ in range(3):
        outcome = await store.record_violation(user, VIOLATION)
        if outcome.block is None:
            journal.append(
                answer("violation", 400, 1.0, code="content_policy_violation", user=user, event_id=outcome.event_id)
            )
        else:
            journal.append(
                answer("violation", 403, 1.0, code="user_blocked", user=user, event_id=outcome.block.event_id)
            )
    return journal


async def test_strikes_seen_match_the_audit_trail(settings_factory: SettingsFactory, database_url: str) -> None:
    async with open_store(settings_factory, max_strikes=3) as store:
        journal = await three_strikes(store, "loadtest-violator-a")
        findings = await strikes_of(database_url, journal)
    assert findings.problems == []
    assert findings.figures["strikes seen by clients"] == findings.figures["strikes in the audit trail"] == 3


async def test_a_strike_recorded_but_never_answered_is_doubled_unless_a_call_went_unanswered(
    settings_factory: SettingsFactory, database_url: str
) -> None:
    async with open_store(settings_factory, max_strikes=3) as store:
        journal = await three_strikes(store, "loadtest-violator-b")
        silent = journal[:1] + journal[2:]  # the second 400 never reached its client...
        doubled = await strikes_of(database_url, silent)
        unanswered = answer("violation", 0, 1.0, user="loadtest-violator-b")
        excused = await strikes_of(
            database_url, [*silent, unanswered], frozenset({unanswered["request_id"]})
        )  # ...its call was cut
    assert doubled.figures["strikes doubled"] == 1
    assert "recorded but never answered" in doubled.problems[0]
    assert excused.problems == []
    assert excused.figures["strikes of unanswered calls"] == 1


async def test_a_strike_a_client_was_told_of_must_be_in_the_audit_trail(
    settings_factory: SettingsFactory, database_url: str
) -> None:
    async with open_store(settings_factory, max_strikes=3) as store:
        journal = await three_strikes(store, "loadtest-violator-c")
        invented = answer(
            "violation", 400, 1.0, code="content_policy_violation", user="loadtest-violator-c", event_id="999999"
        )
        findings = await strikes_of(database_url, [*journal, invented])
    assert findings.figures["strikes lost"] == 1
    assert "999999" in findings.problems[0]


# -- webhooks ---------------------------------------------------------------------------------------


async def test_webhooks_must_arrive_and_arrive_once_unless_a_fault_explains_it(
    settings_factory: SettingsFactory, database_url: str
) -> None:
    settings = {"webhook_url": "http://127.0.0.1:9/hooks", "webhook_secret": "s"}
    async with open_store(settings_factory, **settings) as store:
        for user in ("loadtest-violator-d", "loadtest-violator-e", "loadtest-violator-f"):
            await store.block(user, seconds=60)
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT event_id FROM webhook_outbox ORDER BY id")
        ids = [f"evt_{row['event_id']}" for row in rows]
        await conn.execute("UPDATE webhook_outbox SET delivered_at = now()")

        def sent(event_id: str, sender: str, at: float) -> Delivery:
            return Delivery(event_id, "user.blocked", sender, at, 1)

        once = [sent(event_id, "10.213.0.11", KILLED_AT + 10) for event_id in ids]
        # The killed replica sent the first just before it died, unmarked: another sent it again.
        resent = [
            sent(ids[0], FAULTS.killed_address, KILLED_AT - 0.5),
            *once[1:],
            sent(ids[0], "10.213.0.13", KILLED_AT + 40),
        ]
        twice = [*once, sent(ids[1], "10.213.0.11", KILLED_AT + 50)]  # no fault explains this one
        explained, unexplained, missing = Findings(), Findings(), Findings()
        await check_webhooks(conn, resent, FAULTS, explained)
        await check_webhooks(conn, twice, FAULTS, unexplained)
        await check_webhooks(conn, once[:2], FAULTS, missing)
    finally:
        await conn.close()
    assert explained.problems == []
    assert explained.figures["webhook duplicates explained by the faults"] == 1
    assert unexplained.figures["webhook duplicates unexplained"] == 1
    assert unexplained.problems == [f"webhook {ids[1]} received 2 times, first from 10.213.0.11"]
    assert missing.problems == [f"1 outbox events never reached the receiver (first: ['{ids[2]}'])"]
