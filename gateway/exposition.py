"""What `/metrics` answers: this process's metrics or, with GATEWAY_WORKERS > 1, the worker group's.

The kernel hands each scrape to one worker, and a worker knows only its own counts. So each
worker of a group writes a snapshot of its registry into a directory the group shares, once a
`interval` from a background task (the request path is untouched: the hot metrics stay plain
numbers), and the worker that answers a scrape merges its own live samples with the others'
latest snapshots:

- counters and histograms are summed over every worker that wrote a snapshot, dead ones
  included, so a worker the supervisor replaced does not make the group's totals go down;
- gauges count for live workers only, merged by their rule in GAUGE_RULES or, for a gauge
  without one, kept apart with a `worker` label (the pid);
- `gateway_workers` says how many live workers the answer covers.

The supervisor (`python -m gateway`) makes the directory before it starts the workers and
removes it when they are gone; a worker finds it by its parent's pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import orjson
import structlog
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = structlog.get_logger(__name__)

PUBLISH_INTERVAL = 1.0
Rule = Literal["sum", "max", "min"]
# How a gauge of several workers reads as one. A gauge not named here is reported per worker.
GAUGE_RULES: dict[str, Rule] = {
    "gateway_requests_in_flight": "sum",
    "gateway_upstream_circuit_open": "max",  # 1 while any worker fails fast
    "gateway_block_cache_valid": "min",  # 1 only while every worker answers from its cache
    "gateway_block_cache_users": "max",  # each worker caches the same blocked users
    "gateway_webhook_outbox_pending": "max",  # each worker's last look at the same table
    "process_resident_memory_bytes": "sum",
    "process_virtual_memory_bytes": "sum",
    "process_open_fds": "sum",
    "process_max_fds": "min",
    "process_start_time_seconds": "min",
    "python_info": "max",
}
_SUMMED_TYPES = frozenset({"counter", "histogram", "summary"})
_SNAPSHOT_FILE = re.compile(r"^(\d+)\.json$")

# A family as a snapshot holds it: name, type, help, unit and its samples (name, labels, value).
Sample = tuple[str, dict[str, str], float]
Family = tuple[str, str, str, str, list[Sample]]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One worker's families; `live`: the worker runs now (its gauges count)."""

    pid: int
    live: bool
    families: list[Family]


def families_of(registry: Collector) -> list[Family]:
    """The registry's families as plain data, the shape a snapshot file holds."""
    families: list[Family] = []
    for metric in registry.collect():
        samples = [(sample.name, sample.labels, sample.value) for sample in metric.samples]
        families.append((metric.name, metric.type, metric.documentation, metric.unit, samples))
    return families


def merge(snapshots: Sequence[Snapshot]) -> list[Metric]:
    """The group's families from its workers' snapshots (rules in the module docstring)."""
    metrics: dict[str, Metric] = {}
    series: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for snapshot in snapshots:
        for name, kind, documentation, unit, samples in snapshot.families:
            summed = kind in _SUMMED_TYPES
            if not summed and not snapshot.live:
                continue
            rule: Rule | None = "sum" if summed else GAUGE_RULES.get(name)
            if name not in metrics:
                metrics[name] = Metric(name, documentation, kind, unit)
                series[name] = {}
            values = series[name]
            for sample_name, labels, value in samples:
                if rule is None:
                    labels = {**labels, "worker": str(snapshot.pid)}
                key = (sample_name, tuple(labels.items()))
                seen = values.get(key)
                if seen is None:
                    values[key] = value
                elif sample_name.endswith("_created") or rule == "min":
                    values[key] = min(seen, value)  # a series exists since its first worker made it
                elif rule == "max":
                    values[key] = max(seen, value)
                else:
                    values[key] = seen + value
    for name, metric in metrics.items():
        for (sample_name, pairs), value in series[name].items():
            metric.add_sample(sample_name, dict(pairs), value)
    return list(metrics.values())


class _Families(Collector):
    def __init__(self, metrics: Iterable[Metric]) -> None:
        self._metrics = list(metrics)

    def collect(self) -> Iterable[Metric]:
        return self._metrics


def group_directory(supervisor_pid: int) -> Path:
    """Where the workers of the supervisor `supervisor_pid` publish their snapshots."""
    return Path(tempfile.gettempdir()) / f"chat-gateway-metrics-{os.geteuid()}-{supervisor_pid}"


def prepare_group_directory(directory: Path) -> None:
    """Make `directory` empty and private to this user (the supervisor, before its workers start)."""
    with contextlib.suppress(FileNotFoundError):
        _check_private(directory)
        shutil.rmtree(directory)
    directory.mkdir(mode=0o700)


def remove_group_directory(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def _check_private(directory: Path) -> None:
    # The name is predictable and /tmp is shared: a directory another user made, or could write
    # to, or a symlink, would let them feed this gateway's /metrics.
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise PermissionError(f"{directory} is not a directory private to this user; remove it")


class Exposition:
    """The body of `/metrics`. Start and close it in the lifespan; `render()` answers a scrape.

    Without a `directory` (one worker) it renders this process's registry and starts nothing.
    """

    def __init__(
        self,
        directory: Path | None,
        *,
        registry: Collector = REGISTRY,
        interval: float = PUBLISH_INTERVAL,
        pid: int | None = None,
    ) -> None:
        self._directory = directory
        self._registry = registry
        self._interval = interval
        self._pid = os.getpid() if pid is None else pid
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def for_workers(cls, workers: int) -> Exposition:
        """The exposition of a worker of `python -m gateway` with GATEWAY_WORKERS=`workers`."""
        return cls(group_directory(os.getppid()) if workers > 1 else None)

    async def start(self) -> None:
        directory = self._directory
        if directory is None:
            return
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=0o700)  # made already by `python -m gateway`; not by another supervisor
        _check_private(directory)
        self._publish(directory)
        self._task = asyncio.create_task(self._run(directory), name="metrics-publisher")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is None or self._directory is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with contextlib.suppress(OSError):
            self._publish(self._directory)  # the last counts stay in the group's totals

    def render(self) -> bytes:
        """The Prometheus text of this process, or of the whole group."""
        if self._directory is None:
            return generate_latest(self._registry)
        snapshots = [Snapshot(self._pid, True, families_of(self._registry)), *self._others(self._directory)]
        workers = GaugeMetricFamily(
            "gateway_workers", "Live worker processes whose metrics this answer merges (GATEWAY_WORKERS)."
        )
        workers.add_metric([], sum(snapshot.live for snapshot in snapshots))
        return generate_latest(_Families([*merge(snapshots), workers]))

    # -- the snapshots ---------------------------------------------------------------------------

    async def _run(self, directory: Path) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                # The write goes to a thread: a rename over the old file can wait for the disk.
                await asyncio.to_thread(_write, directory, self._pid, self._snapshot())
            except OSError as exc:
                log.warning("cannot publish this worker's metrics", directory=str(directory), error=repr(exc))

    def _publish(self, directory: Path) -> None:
        _write(directory, self._pid, self._snapshot())

    def _snapshot(self) -> bytes:
        return orjson.dumps({"written": time.time(), "families": families_of(self._registry)})

    def _others(self, directory: Path) -> list[Snapshot]:
        found: list[Snapshot] = []
        now = time.time()
        with os.scandir(directory) as entries:
            for entry in entries:
                match = _SNAPSHOT_FILE.match(entry.name)
                if match is None or int(match.group(1)) == self._pid:
                    continue
                pid = int(match.group(1))
                try:
                    with open(entry.path, "rb") as file:
                        data = orjson.loads(file.read())
                    families: list[Family] = data["families"]
                    written = float(data["written"])
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    log.warning("unreadable worker metrics snapshot skipped", file=entry.path, error=repr(exc))
                    continue
                # A worker that stopped publishing is gone even if its pid is not reaped yet.
                live = _alive(pid) and now - written < 3 * self._interval + 1
                found.append(Snapshot(pid, live, families))
        return found


def _write(directory: Path, pid: int, data: bytes) -> None:
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{pid}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temporary, directory / f"{pid}.json")  # readers see the old file or the new one
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's: a pid reused outside the group
        return True
    return True
