"""The multi-host run's processes: three replicas on their own hosts, HAProxy, PgBouncer, the fake upstream.

`Cluster` starts them, kills and restarts a replica, restarts PgBouncer and stops everything
it started (`close`, safe after a partial start). The hosts are network namespaces
(loadtests/netns.py); the machine's PostgreSQL is reached through PgBouncer (the pool) and a
plain TCP relay (the block caches' listener). Every process starts in the run's scratch
directory, which `sweep` uses to find what a run killed with SIGKILL left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg

from loadtests.harness import ROOT, child_env, free_port, gateway_env
from loadtests.netns import PREFIX, Host, Network
from loadtests.proxies import (
    NOBODY,
    Backend,
    ProxyError,
    drop_to_nobody,
    find,
    haproxy_config,
    pgbouncer_config,
    write_private,
)

GATEWAY_PORT = 8000
SCRATCH_PREFIX = f"{PREFIX}{os.getpid():x}-"
_SCRATCH = re.compile(rf"^{PREFIX}([0-9a-f]+)-")
_DATABASE = re.compile(r"^multihost_([0-9a-f]+)_[0-9a-f]+$")


class ClusterError(Exception):
    """A process of the cluster did not start or stop as it should; the message says which."""


@dataclass
class Child:
    """A process the run started: its name, its log and how it ended."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    exit_codes: list[int] = field(default_factory=list)  # of earlier incarnations, for replicas

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, how: signal.Signals = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal it and wait; SIGKILL if it outlives `timeout`. Its exit code (negative: a signal)."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(how)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode

    def tail(self, lines: int = 20) -> str:
        text = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return "\n".join(text[-lines:])


def _start(name: str, command: list[str], scratch: Path, env: dict[str, str], **popen: object) -> Child:
    log = scratch / f"{name}.log"
    with log.open("ab") as out:
        # A session of its own: a Ctrl-C at the terminal reaches the harness alone, which stops
        # its children in order (the replicas gracefully) and then removes their hosts.
        process = subprocess.Popen(  # type: ignore[call-overload]
            command, cwd=scratch, env=env, stdout=out, stderr=out, start_new_session=True, **popen
        )
    return Child(name, process, log)


@dataclass
class Addresses:
    """Where each part listens: the bridge's services, the balancer, and each replica."""

    bridge: str
    balancer: int = field(default_factory=free_port)
    upstream: int = field(default_factory=free_port)
    pooler: int = field(default_factory=free_port)
    relay: int = field(default_factory=free_port)
    receiver: int = field(default_factory=free_port)

    @property
    def balancer_url(self) -> str:
        return f"http://127.0.0.1:{self.balancer}"


class Cluster:
    """Everything the run starts; use as `with Cluster(...) as cluster:` or call `close()`."""

    def __init__(self, scratch: Path, admin_dsn: str, database: str, *, replicas: int, pool_size: int) -> None:
        self.scratch = scratch
        self.network = Network(replicas)
        self.admin_dsn = admin_dsn
        self.database = database  # the scratch database's DSN as this machine reaches it
        self.pool_size = pool_size
        self.addresses: Addresses | None = None
        self.replicas: dict[str, Child] = {}
        self.hosts: dict[str, Host] = {}
        self.others: dict[str, Child] = {}
        self._gateway_env: dict[str, dict[str, str]] = {}

    # -- start ------------------------------------------------------------------------------------

    def start(self, *, admin_token: str, webhook_secret: str, upstream_latency_ms: float) -> Addresses:
        """The hosts, the proxies, the fake upstream and the replicas (not yet waited for)."""
        self.network.create()
        addresses = self.addresses = Addresses(self.network.address)
        bridge = addresses.bridge
        database = urlsplit(self.database)
        self._start_pgbouncer()
        backends = [
            Backend(f"gw{index + 1}", host.address, GATEWAY_PORT) for index, host in enumerate(self.network.hosts)
        ]
        config = self.scratch / "haproxy.cfg"
        write_private(
            config,
            haproxy_config(
                ("127.0.0.1", addresses.balancer),
                backends,
                (bridge, addresses.relay),
                (database.hostname or "127.0.0.1", database.port or 5432),
            ),
        )
        self.others["haproxy"] = _start(
            "haproxy", [_binary("haproxy"), "-db", "-f", str(config)], self.scratch, child_env()
        )
        upstream = [sys.executable, "-m", "gateway.fake_upstream", "--host", bridge, "--port", str(addresses.upstream)]
        upstream += ["--latency-ms", str(upstream_latency_ms), "--chunks", "5", "--chunk-delay-ms", "5"]
        self.others["upstream"] = _start("upstream", upstream, self.scratch, child_env())
        pooled = urlunsplit(database._replace(netloc=f"gateway@{bridge}:{addresses.pooler}"))
        direct = urlunsplit(database._replace(netloc=_with_host(database.netloc, bridge, addresses.relay)))
        for backend, host in zip(backends, self.network.hosts, strict=True):
            self.hosts[backend.name] = host
            self._gateway_env[backend.name] = gateway_env(
                GATEWAY_PORT,
                f"http://{bridge}:{addresses.upstream}/v1",
                admin_token,
                self.scratch / "unused-data-dir",
                pooled,
                GATEWAY_HOST=host.address,
                GATEWAY_DB_STATEMENT_CACHE="false",
                GATEWAY_LISTEN_DATABASE_URL=direct,
                GATEWAY_DB_POOL_SIZE="5",
                GATEWAY_MODERATION="openai",
                GATEWAY_MAX_STRIKES="3",
                GATEWAY_WEBHOOK_URL=f"http://{bridge}:{addresses.receiver}/hooks",
                GATEWAY_WEBHOOK_SECRET=webhook_secret,
                FORWARDED_ALLOW_IPS=bridge,  # the balancer speaks for every client: no per-address cap on it
                GATEWAY_SHUTDOWN_GRACE="5",
                GATEWAY_LOG_LEVEL="warning",
            )
            self.start_replica(backend.name)
        return addresses

    def start_replica(self, name: str) -> None:
        """Start (or start again) the replica `name` on its host."""
        earlier = self.replicas.get(name)
        command = self.hosts[name].command([sys.executable, "-m", "gateway"])
        child = _start(name, command, self.scratch, self._gateway_env[name])
        if earlier is not None:
            child.exit_codes = [*earlier.exit_codes, earlier.process.returncode]
        self.replicas[name] = child

    def start_locust(self, arguments: list[str], environment: dict[str, str]) -> Child:
        """Locust headless on loadtests/locustfile.py with `arguments` (it stops with the cluster)."""
        command = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"), "--headless"]
        locust = self.others["locust"] = _start("locust", [*command, *arguments], self.scratch, environment)
        return locust

    def url(self, name: str) -> str:
        return f"http://{self.hosts[name].address}:{GATEWAY_PORT}"

    async def wait_ready(self, names: list[str], within: float = 90.0) -> None:
        """Until each replica's /readyz answers 200; a replica that exits or stays silent fails the run."""
        deadline = time.monotonic() + within
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:

            async def one(name: str) -> None:
                while time.monotonic() < deadline:
                    child = self.replicas[name]
                    if not child.running:
                        raise ClusterError(f"{name} exited with {child.process.returncode}:\n{child.tail()}")
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                        async with session.get(f"{self.url(name)}/readyz") as response:
                            if response.status == 200:
                                return
                    await asyncio.sleep(0.2)
                raise ClusterError(f"{name} was not ready within {within:.0f} s:\n{self.replicas[name].tail()}")

            await asyncio.gather(*(one(name) for name in names))

    # -- PgBouncer --------------------------------------------------------------------------------

    def _start_pgbouncer(self) -> None:
        assert self.addresses is not None
        home = self.scratch / "pgbouncer"
        home.mkdir(mode=0o700, exist_ok=True)
        os.chown(home, NOBODY, NOBODY)
        config = home / "pgbouncer.ini"
        pgbouncer = pgbouncer_config((self.addresses.bridge, self.addresses.pooler), self.database, self.pool_size)
        write_private(config, pgbouncer, owner=NOBODY)
        command = [_binary("pgbouncer"), str(config)]
        self.others["pgbouncer"] = _start("pgbouncer", command, self.scratch, child_env(), preexec_fn=drop_to_nobody)

    async def restart_pgbouncer(self) -> tuple[float, float]:
        """Stop PgBouncer safely (SIGINT: it lets running transactions finish) and start it again.

        Returns (when it was told to stop, when the new one accepted connections), time.time().
        """
        assert self.addresses is not None
        old = self.others["pgbouncer"]
        began = time.time()
        old.process.send_signal(signal.SIGINT)
        for _ in range(200):
            if not old.running:
                break
            await asyncio.sleep(0.01)
        code = old.stop(signal.SIGTERM, timeout=5)
        self._start_pgbouncer()
        self.others["pgbouncer"].exit_codes.append(code)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                _, writer = await asyncio.open_connection(self.addresses.bridge, self.addresses.pooler)
            except OSError:
                await asyncio.sleep(0.005)
                continue
            writer.close()
            return began, time.time()
        raise ClusterError(f"PgBouncer did not listen again within 10 s:\n{self.others['pgbouncer'].tail()}")

    # -- stop -------------------------------------------------------------------------------------

    def close(self) -> list[str]:
        """Stop every process (the load first, the replicas with SIGTERM) and remove the hosts.

        Each step runs whatever the one before met; calling it again is harmless. The problems met.
        """
        problems: list[str] = []
        steps = [("locust", self.others.get("locust"), 10.0)]
        steps += [(name, child, 20.0) for name, child in self.replicas.items()]
        steps += [(name, self.others.get(name), 10.0) for name in ("upstream", "haproxy", "pgbouncer")]
        for name, child, timeout in steps:
            if child is None or not child.running:
                continue
            try:
                child.exit_codes.append(child.stop(signal.SIGTERM, timeout=timeout))
            except Exception as exc:
                problems.append(f"stopping {name}: {exc!r}")
        try:
            problems += self.network.destroy()
        except Exception as exc:
            problems.append(f"removing the hosts: {exc!r}")
        return problems


def _binary(name: str) -> str:
    path = find(name)
    if path is None:
        raise ProxyError(f"{name} is not installed")
    return path


def _with_host(netloc: str, host: str, port: int) -> str:
    credentials = netloc.rsplit("@", 1)[0] + "@" if "@" in netloc else ""
    return f"{credentials}{host}:{port}"


def _owner_alive(pid_hex: str) -> bool:
    try:
        os.kill(int(pid_hex, 16), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def database_prefix(pid: int) -> str:
    """The start of a run's scratch database name (harness.scratch_database adds a random part):
    the run's process, so that `sweep` knows when it is stale."""
    return f"multihost_{pid:x}"


def sweep(admin_dsn: str, scratch_root: Path) -> list[str]:
    """Stop the processes, drop the databases and remove the scratch directories that runs no
    longer alive left behind (a harness killed with SIGKILL); what was removed."""
    removed: list[str] = []
    stale_dirs: list[Path] = []
    for entry in scratch_root.iterdir() if scratch_root.is_dir() else []:
        match = _SCRATCH.match(entry.name)
        if match and entry.is_dir() and not _owner_alive(match.group(1)):
            stale_dirs.append(entry)
    if stale_dirs:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cwd = Path(os.readlink(proc / "cwd"))
            except OSError:
                continue
            if any(cwd == stale or stale in cwd.parents for stale in stale_dirs):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(proc.name), signal.SIGKILL)
                removed.append(f"process {proc.name}")
        for stale in stale_dirs:
            shutil.rmtree(stale, ignore_errors=True)
            removed.append(f"directory {stale}")
    return removed + asyncio.run(_sweep_databases(admin_dsn))


async def _sweep_databases(admin_dsn: str) -> list[str]:
    removed: list[str] = []
    conn = await asyncpg.connect(admin_dsn, timeout=10)
    try:
        names = await conn.fetch("SELECT datname FROM pg_database WHERE datname LIKE 'multihost\\_%'")
        for row in names:
            match = _DATABASE.match(row["datname"])
            if match and not _owner_alive(match.group(1)):
                await conn.execute(f'DROP DATABASE IF EXISTS "{row["datname"]}" WITH (FORCE)')
                removed.append(f"database {row['datname']}")
    finally:
        await conn.close()
    return removed
