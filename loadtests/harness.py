"""What the load scripts (smoke, soak, bench) and the tests share to run the gateway and its peers as processes."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from gateway.settings import Settings, variable_name

ROOT = Path(__file__).resolve().parent.parent


# The variables the gateway's settings read without its GATEWAY_ prefix (OPENAI_API_KEY, ...).
_SETTING_VARIABLES = frozenset(variable_name(field) for field in Settings.model_fields)


def gateway_variable(name: str) -> bool:
    """True for an environment variable the gateway reads: a child or a test must not inherit it."""
    return name.startswith("GATEWAY_") or name in _SETTING_VARIABLES


def free_port() -> int:
    """A loopback port free right now, for a server started as a process."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child process: nothing of the caller's gateway configuration (or a
    real OpenAI key) leaks into the run, the project is importable, plus `extra`."""
    env = {key: value for key, value in os.environ.items() if not gateway_variable(key)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return {**env, **extra}


def spawn(command: list[str], log: Path, cwd: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start `command` with its output in `log`; `cwd` away from the project root, so that a
    developer's `.env` there stays out of the run."""
    with log.open("wb") as out:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=out)


def gateway_env(
    port: int, upstream_url: str, admin_token: str, data_dir: Path, database_url: str | None, **settings: str
) -> dict[str, str]:
    """The environment of a gateway on 127.0.0.1:`port` in front of `upstream_url` (with /v1).

    `settings` add to or override these (GATEWAY_MODERATION, GATEWAY_LOG_LEVEL, ...); without a
    `database_url` the gateway runs its embedded PostgreSQL in `data_dir`.
    """
    env = {
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(port),
        "GATEWAY_UPSTREAM_URL": upstream_url,
        "GATEWAY_ADMIN_TOKEN": admin_token,
        "GATEWAY_DATA_DIR": str(data_dir),
        **({"DATABASE_URL": database_url} if database_url else {}),
    }
    return child_env(**{**env, **settings})


@contextmanager
def scratch_database(admin_url: str | None, prefix: str) -> Iterator[str | None]:
    """A fresh database on the server of `admin_url`, dropped on exit; None (embedded) without one."""
    if not admin_url:
        yield None
        return
    name = f"{prefix}_{secrets.token_hex(4)}"

    async def run(statement: str) -> None:
        connection = await asyncpg.connect(admin_url)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    asyncio.run(run(f'CREATE DATABASE "{name}"'))
    try:
        yield urlunsplit(urlsplit(admin_url)._replace(path=f"/{name}"))
    finally:
        asyncio.run(run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


class LoadRunFailed(Exception):
    """A load run could not go on (a process that exited or never answered, a refused call)."""


def wait_answering(url: str, process: subprocess.Popen[bytes], name: str, timeout: float = 90) -> None:
    """Return once `url` answers (any HTTP status); LoadRunFailed if `process` exits first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LoadRunFailed(f"{name} exited with code {process.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2):  # noqa: S310 (loopback URL we built)
                return
        except OSError as exc:
            if getattr(exc, "code", None):  # an HTTP error status: it answers
                return
        time.sleep(0.2)
    raise LoadRunFailed(f"{name} did not answer {url} within {timeout:.0f} s")
