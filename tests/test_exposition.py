"""/metrics of a worker group: every worker's counts in every scrape, whichever worker answers it."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import psutil  # type: ignore[import-untyped]  # (locust's dependency; no stubs in the lock)
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.exposition import (
    Exposition,
    Snapshot,
    families_of,
    group_directory,
    merge,
    prepare_group_directory,
)
from loadtests.harness import child_env, free_port
from middleware.hotmetrics import HotHistogram
from tests.servers import stop_process
from tests.upstream import MockUpstream

Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _series(text: str) -> Series:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _worker_registry(requests: int, in_flight: float, circuit_open: float, queue: float) -> CollectorRegistry:
    """A registry shaped like a worker's: a counter, a hot histogram, gauges with and without a rule."""
    registry = CollectorRegistry()
    Counter("gateway_requests_total", "Requests.", ["route"], registry=registry).labels("/v1/chat").inc(requests)
    histogram = HotHistogram("gateway_request_duration_seconds", "Durations.", buckets=(0.1, 1), registry=registry)
    for _ in range(requests):
        histogram.observe(0.05)
    histogram.observe(0.5)
    Gauge("gateway_requests_in_flight", "In flight.", registry=registry).set(in_flight)
    Gauge("gateway_upstream_circuit_open", "Open.", registry=registry).set(circuit_open)
    Gauge("gateway_block_cache_valid", "Valid.", registry=registry).set(1 if requests else 0)
    Gauge("custom_queue_depth", "A gauge with no rule.", registry=registry).set(queue)
    return registry


def _merged(*snapshots: Snapshot) -> Series:
    class Merged:
        def collect(self) -> object:
            return merge(snapshots)

    return _series(generate_latest(Merged()).decode())  # type: ignore[arg-type]


def test_counters_and_histograms_add_up_over_workers_dead_or_alive() -> None:
    first = Snapshot(101, True, families_of(_worker_registry(3, 0, 0, 0)))
    gone = Snapshot(102, False, families_of(_worker_registry(5, 0, 0, 0)))
    series = _merged(first, gone)
    assert series[("gateway_requests_total", (("route", "/v1/chat"),))] == 8
    assert series[("gateway_request_duration_seconds_bucket", (("le", "0.1"),))] == 8
    assert series[("gateway_request_duration_seconds_bucket", (("le", "1.0"),))] == 10
    assert series[("gateway_request_duration_seconds_count", ())] == 10
    assert series[("gateway_request_duration_seconds_sum", ())] == pytest.approx(8 * 0.05 + 2 * 0.5)


def test_a_series_was_created_when_its_first_worker_made_it() -> None:
    early, late = _worker_registry(1, 0, 0, 0), _worker_registry(1, 0, 0, 0)
    early_created = _series(generate_latest(early).decode())[("gateway_requests_created", (("route", "/v1/chat"),))]
    series = _merged(Snapshot(2, True, families_of(late)), Snapshot(1, True, families_of(early)))
    assert series[("gateway_requests_created", (("route", "/v1/chat"),))] == early_created


def test_gauges_merge_by_their_rule_over_live_workers_only() -> None:
    series = _merged(
        Snapshot(201, True, families_of(_worker_registry(1, in_flight=2, circuit_open=0, queue=7))),
        Snapshot(202, True, families_of(_worker_registry(0, in_flight=3, circuit_open=1, queue=4))),
        Snapshot(203, False, families_of(_worker_registry(9, in_flight=50, circuit_open=1, queue=99))),
    )
    assert series[("gateway_requests_in_flight", ())] == 5  # sum
    assert series[("gateway_upstream_circuit_open", ())] == 1  # max
    assert series[("gateway_block_cache_valid", ())] == 0  # min: one worker checks the database
    # No rule: one series per live worker, told apart by its pid; the dead worker's is gone.
    assert series[("custom_queue_depth", (("worker", "201"),))] == 7
    assert series[("custom_queue_depth", (("worker", "202"),))] == 4
    assert ("custom_queue_depth", (("worker", "203"),)) not in series


@pytest.fixture
def live_pid() -> Iterator[int]:
    """The pid of a process that runs for the test's length (another worker, as far as a snapshot knows)."""
    process = subprocess.Popen(["sleep", "60"])
    try:
        yield process.pid
    finally:
        process.kill()
        process.wait()


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


async def test_a_scrape_merges_the_snapshots_other_workers_published(tmp_path: Path, live_pid: int) -> None:
    directory = tmp_path / "group"
    prepare_group_directory(directory)
    dead_pid = _dead_pid()
    others = [
        Exposition(directory, registry=_worker_registry(4, 1, 0, 3), pid=live_pid),
        Exposition(directory, registry=_worker_registry(6, 9, 1, 8), pid=dead_pid),
    ]
    for other in others:
        await other.start()
        await other.close()  # its last snapshot stays behind
    mine = Exposition(directory, registry=_worker_registry(2, 1, 0, 5))
    await mine.start()
    try:
        series = _series(mine.render().decode())
    finally:
        await mine.close()
    assert series[("gateway_requests_total", (("route", "/v1/chat"),))] == 12
    assert series[("gateway_requests_in_flight", ())] == 2  # the dead worker's 9 is not in flight
    assert series[("gateway_upstream_circuit_open", ())] == 0
    assert series[("custom_queue_depth", (("worker", str(live_pid)),))] == 3
    assert series[("gateway_workers", ())] == 2
    expected = {f"{pid}.json" for pid in (os.getpid(), live_pid, dead_pid)}
    assert {path.name for path in directory.iterdir()} == expected  # no temporary file left behind


def test_one_worker_renders_its_own_registry_and_writes_nothing(tmp_path: Path) -> None:
    registry = _worker_registry(3, 0, 0, 0)
    assert Exposition(None, registry=registry).render() == generate_latest(registry)


@pytest.mark.parametrize("make", ["open to others", "symlink", "file"])
def test_a_group_directory_others_could_feed_is_refused(tmp_path: Path, make: str) -> None:
    directory = tmp_path / "group"
    if make == "open to others":
        directory.mkdir(mode=0o777)
        directory.chmod(0o777)
    elif make == "symlink":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        directory.symlink_to(tmp_path / "elsewhere")
    else:
        directory.write_text("{}")
    with pytest.raises(PermissionError, match="not a directory private to this user"):
        prepare_group_directory(directory)


def test_a_stale_group_directory_of_this_user_is_emptied(tmp_path: Path) -> None:
    directory = tmp_path / "group"
    directory.mkdir(mode=0o700)
    (directory / "12345.json").write_text("{}")
    prepare_group_directory(directory)
    assert list(directory.iterdir()) == []
    assert directory.stat().st_mode & 0o777 == 0o700


# --- a real gateway of two workers ----------------------------------------------------------------


def _get(connection: http.client.HTTPConnection, path: str, **headers: str) -> tuple[int, bytes]:
    connection.request("GET", path, headers=headers)
    response = connection.getresponse()
    return response.status, response.read()


def _workers(supervisor: psutil.Process, port: int) -> list[psutil.Process]:
    listening = []
    for child in supervisor.children():
        try:
            connections = child.net_connections("tcp")
        except psutil.NoSuchProcess:
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in connections):
            listening.append(child)
    return listening


def _served_by(supervisor: psutil.Process, port: int, connection: http.client.HTTPConnection) -> int | None:
    """The pid of the worker holding the server side of `connection`, if a live one does."""
    assert connection.sock is not None
    client_port = connection.sock.getsockname()[1]
    for worker in _workers(supervisor, port):
        try:
            if any(c.raddr and c.raddr.port == client_port for c in worker.net_connections("tcp")):
                return int(worker.pid)
        except psutil.NoSuchProcess:
            continue
    return None


def _counts(
    scrape: Callable[[http.client.HTTPConnection], Series],
    connection: http.client.HTTPConnection,
    key: tuple[str, tuple[tuple[str, str], ...]],
    expected: float,
) -> bool:
    return scrape(connection).get(key) == expected


def _until(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.mark.faults
def test_every_scrape_of_a_two_worker_gateway_counts_both_workers(tmp_path: Path, database_url: str) -> None:
    port = free_port()
    with MockUpstream() as upstream:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway"],
            env=child_env(
                DATABASE_URL=database_url,
                GATEWAY_PORT=str(port),
                GATEWAY_WORKERS="2",
                GATEWAY_UPSTREAM_URL=upstream.url,
                GATEWAY_MODERATION="off",
                GATEWAY_SHUTDOWN_GRACE="5",
                GATEWAY_LOG_LEVEL="warning",
            ),
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        supervisor = psutil.Process(process.pid)
        connections: dict[int, http.client.HTTPConnection] = {}
        try:
            _until(lambda: process.poll() is None and len(_workers(supervisor, port)) == 2, "two workers listening")
            # One open connection to each worker (the kernel picks the worker that accepts). A worker
            # slow to start may be replaced meanwhile (uvicorn kills one that misses its health
            # check): only live workers count.
            deadline = time.monotonic() + 60
            while len(connections) < 2:
                assert time.monotonic() < deadline, "no connection reached the second worker"
                live = {worker.pid for worker in _workers(supervisor, port)}
                for gone in [pid for pid in connections if pid not in live]:
                    connections.pop(gone).close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                try:
                    served = _get(connection, "/healthz")[0] == 200
                except OSError:  # not accepting yet, or a worker replaced mid-call
                    served = False
                pid = _served_by(supervisor, port, connection) if served else None
                if pid is None or pid in connections:
                    connection.close()
                    time.sleep(0.05)
                else:
                    connections[pid] = connection
            (first_pid, first), (second_pid, second) = connections.items()
            for connection, calls in ((first, 3), (second, 5)):
                for _ in range(calls):
                    assert _get(connection, "/v1/models", **{"X-User-ID": "alice"})[0] == 200
            models = ("gateway_requests_total", (("method", "GET"), ("route", "/v1/models"), ("status", "200")))

            def scraped(connection: http.client.HTTPConnection) -> Series:
                status, body = _get(connection, "/metrics")
                assert status == 200
                return _series(body.decode())

            # Each worker answers with the other's calls too (published within a second).
            for connection in (first, second):
                _until(partial(_counts, scraped, connection, models, 8), "a scrape missed the other worker's calls")
                assert scraped(connection)[("gateway_workers", ())] == 2

            # A worker killed outright: its calls stay counted, its replacement joins the group.
            os.kill(second_pid, signal.SIGKILL)
            second.close()

            def newcomers() -> set[int]:
                return {int(worker.pid) for worker in _workers(supervisor, port)} - {first_pid, second_pid}

            _until(lambda: len(newcomers()) == 1, "the supervisor did not replace the killed worker")
            (new_pid,) = newcomers()
            directory = group_directory(process.pid)
            _until(lambda: f"{new_pid}.json" in os.listdir(directory), "the new worker never published")
            series = scraped(first)
            assert series[("gateway_workers", ())] == 2  # the killed one's gauges are gone
            assert series[models] == 8  # its calls are not
            assert f"{second_pid}.json" in os.listdir(directory)
        finally:
            for connection in connections.values():
                connection.close()
            stderr = stop_process(process)
    assert process.returncode == 0, stderr
    assert not group_directory(process.pid).exists(), "the supervisor left the group's metrics behind"
