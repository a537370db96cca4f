"""HAProxy and PgBouncer for the multi-host run: installing them, their configuration, their processes.

HAProxy (Debian's package) is the load balancer in front of the replicas, and also a plain TCP
relay from the bridge to the machine's PostgreSQL, which listens on loopback only: a relay is
not a pooler (one client connection, one server connection), so the block caches' LISTEN works
through it as on a direct connection. PgBouncer (Debian's package) pools the replicas' other
connections in transaction mode, as a production deployment in front of a managed database would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

# binary -> the Debian package that ships it
PACKAGES = {"haproxy": "haproxy", "pgbouncer": "pgbouncer"}
# How a replica's health is checked, and how soon a dead one leaves (and a live one rejoins) the rotation.
CHECK = "inter 500ms fastinter 200ms downinter 500ms fall 3 rise 2"
NOBODY = 65534  # pgbouncer refuses to run as root


class ProxyError(Exception):
    """A proxy could not be installed, configured or started; the message says which and why."""


def find(binary: str) -> str | None:
    """The binary's path; /usr/sbin and /sbin are looked in too (not on a user's PATH)."""
    return shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/sbin:/usr/local/sbin")


def install_missing(packages: dict[str, str] = PACKAGES) -> list[str]:
    """apt-get the packages whose binaries are missing; the packages installed."""
    missing = sorted({package for binary, package in packages.items() if find(binary) is None})
    if not missing:
        return []
    if shutil.which("apt-get") is None:
        raise ProxyError(f"{', '.join(missing)} missing and no apt-get to install them: install them first")
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
    ):
        result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600, check=False)
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise ProxyError(f"{' '.join(command)} failed: {' / '.join(tail)}")
    still = [binary for binary in packages if find(binary) is None]
    if still:
        raise ProxyError(f"installed {', '.join(missing)} but {', '.join(still)} is still not found")
    return missing


@dataclass(frozen=True)
class Backend:
    name: str
    address: str
    port: int


def haproxy_config(
    listen: tuple[str, int], backends: list[Backend], relay: tuple[str, int], database: tuple[str, int]
) -> str:
    """The balancer on `listen` over `backends` (health: /readyz), and the TCP relay `relay` -> `database`.

    Its log, one line a call on stdout: `<accept date> <server> <status> <termination state>
    <Th> <Ti> <Ta> {<X-Request-ID>}` (the date a keep-alive connection's request counts from, the
    milliseconds of handshake and idleness after it, then of the call), so each answer a client
    got is tied to the replica that served it, and when.
    A call is moved to another replica only when its connection failed (nothing was sent):
    replaying a POST that reached a replica could record its strike twice.
    """
    servers = "\n".join(f"    server {b.name} {b.address}:{b.port} check" for b in backends)
    return f"""\
global
    log stdout format raw local0 info
    maxconn 4096

defaults
    log global
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    timeout check 2s

frontend gateway
    mode http
    bind {listen[0]}:{listen[1]}
    capture request header X-Request-ID len 64
    log-format "%Ts.%ms %s %ST %tsc %Th %Ti %Ta %hr"
    option forwardfor
    default_backend replicas

backend replicas
    mode http
    balance roundrobin
    retries 3
    option redispatch 1
    retry-on conn-failure
    option httpchk GET /readyz
    http-check expect status 200
    default-server {CHECK}
{servers}

listen postgres_direct
    mode tcp
    no log
    bind {relay[0]}:{relay[1]}
    timeout client 1h
    timeout server 1h
    server postgres {database[0]}:{database[1]}
"""


def pgbouncer_config(listen: tuple[str, int], dsn: str, pool_size: int) -> str:
    """PgBouncer in transaction mode on `listen`, serving the database of `dsn` under its name.

    Clients are not authenticated (`auth_type = any`: it listens on the harness's bridge only);
    PgBouncer logs in to PostgreSQL as `dsn` says.
    """
    parts = urlsplit(dsn)
    name = parts.path.lstrip("/")
    target = f"host={parts.hostname or '127.0.0.1'} port={parts.port or 5432} dbname={name}"
    if parts.username:
        target += f" user={unquote(parts.username)}"
    if parts.password:
        target += f" password={unquote(parts.password)}"
    return f"""\
[databases]
{name} = {target}

[pgbouncer]
listen_addr = {listen[0]}
listen_port = {listen[1]}
unix_socket_dir =
auth_type = any
pool_mode = transaction
default_pool_size = {pool_size}
max_client_conn = 1000
server_login_retry = 1
"""


def drop_to_nobody() -> None:
    """preexec_fn for pgbouncer: run as nobody."""
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def write_private(path: Path, text: str, owner: int | None = None) -> None:
    """Write a file only its owner (root, or `owner`) reads: it may hold the database's password."""
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    if owner is not None:
        os.chown(path, owner, NOBODY)
