"""Security: the admin token check, the open-relay guard as a process, and logs free of secrets and prompts."""

from __future__ import annotations

import hashlib
import hmac
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx2
import pytest

from gateway.admin import admin_app
from gateway.app import create_app
from gateway.settings import Settings
from gateway.store import Store
from loadtests.harness import child_env, free_port
from tests.servers import run_app
from tests.upstream import MockUpstream

SettingsFactory = Callable[..., Settings]


# --- the admin token ------------------------------------------------------------------------------


async def test_the_admin_token_is_compared_in_constant_time(
    settings_factory: SettingsFactory, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    api = admin_app(store, settings_factory(admin_token="the-admin-token"))
    transport = httpx2.ASGITransport(app=api)
    async with httpx2.AsyncClient(transport=transport, base_url="http://gw") as client:
        for token in ("", "t", "the-admin-tokeX", "the-admin-token-and-more"):
            answer = await client.get("/stats", headers={"Authorization": f"Bearer {token}"})
            assert answer.status_code == 401
        assert (await client.get("/stats", headers={"Authorization": "Bearer the-admin-token"})).status_code == 200
    # every check, right or wrong, whatever its length, compared digests of one length in full
    assert len(compared) == 5
    digest = hashlib.sha256(b"the-admin-token").digest()
    assert all(expected == digest for _, expected in compared)
    assert [given == digest for given, _ in compared] == [False] * 4 + [True]


def test_repeated_admin_auth_failures_are_slowed_down_end_to_end(settings_factory: SettingsFactory) -> None:
    with run_app(create_app(settings_factory())) as url, httpx2.Client(base_url=url, timeout=20) as client:
        wrong = {"Authorization": "Bearer guess"}
        started = time.monotonic()
        for _ in range(5):  # the first few failures are answered at once
            assert client.get("/admin/stats", headers=wrong).status_code == 401
        free = time.monotonic() - started
        started = time.monotonic()
        for _ in range(3):  # then 0.25 s, 0.5 s, 1 s
            answer = client.get("/admin/stats", headers=wrong)
            assert answer.json()["error"]["code"] == "invalid_admin_token"
        slowed = time.monotonic() - started
        # the right token still works at once, and clears the address
        started = time.monotonic()
        assert client.get("/admin/stats", headers={"Authorization": "Bearer admin-secret"}).status_code == 200
        assert client.get("/admin/stats", headers=wrong).status_code == 401
        after = time.monotonic() - started
    assert free < 1.0
    assert slowed >= 1.7
    assert after < 1.0


# --- the gateway as a process ---------------------------------------------------------------------


@contextmanager
def gateway_process(env: dict[str, str], port: int) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """`python -m gateway` with `env`, its stdout and stderr in one log file; stopped with SIGTERM."""
    scratch = Path(tempfile.mkdtemp(prefix="gateway-process-"))
    log = scratch / "gateway.log"
    with log.open("wb") as out:
        # cwd=scratch: no developer .env from the project root
        process = subprocess.Popen([sys.executable, "-m", "gateway"], cwd=scratch, env=env, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise AssertionError(f"the gateway exited with {process.returncode}:\n{log.read_text()}")
            with suppress(httpx2.HTTPError):
                if httpx2.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"the gateway did not start:\n{log.read_text()}"
            time.sleep(0.1)
        yield process, log
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.faults
def test_the_open_relay_guard_stops_the_process_without_echoing_the_key(database_url: str) -> None:
    key = "sk-proj-DoNotLeakThis0123456789"
    env = child_env(
        OPENAI_API_KEY=key, GATEWAY_HOST="0.0.0.0", GATEWAY_PORT=str(free_port()), DATABASE_URL=database_url
    )
    result = subprocess.run(
        [sys.executable, "-m", "gateway"], cwd=tempfile.gettempdir(), env=env, capture_output=True, timeout=60
    )
    output = (result.stdout + result.stderr).decode()
    assert result.returncode != 0
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    assert "GATEWAY_API_KEYS" in lines[0]
    assert "GATEWAY_ALLOW_OPEN_RELAY=true" in lines[0]
    assert key not in output
    assert "DoNotLeak" not in output


@pytest.mark.faults
def test_the_open_relay_guard_can_be_overridden(database_url: str) -> None:
    port = free_port()
    env = child_env(
        OPENAI_API_KEY="sk-test-key",
        GATEWAY_HOST="0.0.0.0",
        GATEWAY_PORT=str(port),
        GATEWAY_ALLOW_OPEN_RELAY="true",
        GATEWAY_SHUTDOWN_GRACE="2",
        DATABASE_URL=database_url,
    )
    with gateway_process(env, port) as (process, _):
        assert httpx2.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0


@pytest.mark.faults
def test_no_key_token_or_prompt_text_in_any_log_line(database_url: str) -> None:
    secrets = {
        "openai key": "sk-upstream-Secret-7c1d0e9a4b",
        "client key": "client-Secret-key-51f8e2",
        "admin token": "admin-Secret-token-9d03aa",
        "webhook secret": "webhook-Secret-0b77c4",
        "safety salt": "salt-Secret-e4a1f2",
        "database password": "dbSecretPw42",
    }
    prompts = {
        "clean": "my clean question about tulips qz81",
        "violating": "forbidden words about a vase xk27",
        "streamed": "please stream a poem about otters vb93",
        "completion": "forbidden prompt for a completion mn55",
        "reason": "appeal accepted for reasons rq64",
    }
    port = free_port()
    with MockUpstream() as upstream:
        env = child_env(
            GATEWAY_PORT=str(port),
            GATEWAY_UPSTREAM_URL=upstream.url,
            GATEWAY_MODERATION="openai,rules",
            GATEWAY_LOG_LEVEL="debug",
            GATEWAY_LOG_FORMAT="json",
            GATEWAY_MAX_STRIKES="2",
            OPENAI_API_KEY=secrets["openai key"],
            GATEWAY_API_KEYS=secrets["client key"],
            GATEWAY_ADMIN_TOKEN=secrets["admin token"],
            GATEWAY_WEBHOOK_URL=f"{upstream.base_url}/hooks",
            GATEWAY_WEBHOOK_SECRET=secrets["webhook secret"],
            GATEWAY_SAFETY_IDENTIFIER="hash",
            GATEWAY_SAFETY_SALT=secrets["safety salt"],
            GATEWAY_SHUTDOWN_GRACE="2",
            # a password the database ignores (trust auth) but the gateway must never print
            DATABASE_URL=database_url.replace("postgres@", f"postgres:{secrets['database password']}@", 1),
        )
        client_headers = {"Authorization": f"Bearer {secrets['client key']}", "X-User-ID": "alice"}
        admin = {"Authorization": f"Bearer {secrets['admin token']}"}
        with (
            gateway_process(env, port) as (process, log),
            httpx2.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client,
        ):
            chat = "/v1/chat/completions"

            def body(text: str, **extra: Any) -> dict[str, Any]:
                return {"model": "m", "messages": [{"role": "user", "content": text}], **extra}

            statuses = [
                client.post(chat, json=body(prompts["clean"]), headers=client_headers).status_code,
                client.post(chat, json=body(prompts["streamed"], stream=True), headers=client_headers).status_code,
                client.post(chat, json=body(prompts["violating"]), headers=client_headers).status_code,
                client.post(
                    "/v1/completions", json={"model": "m", "prompt": prompts["completion"]}, headers=client_headers
                ).status_code,
                client.post(chat, json=body(prompts["clean"]), headers=client_headers).status_code,
                client.put("/admin/unblock/alice", json={"reason": prompts["reason"]}, headers=admin).status_code,
                client.get("/admin/users/alice/events", headers=admin).status_code,
                client.get("/admin/stats", headers={"Authorization": "Bearer wrong-token"}).status_code,
                client.post(chat, json=body(prompts["clean"]), headers={"X-User-ID": "bob"}).status_code,
            ]
            assert statuses == [200, 200, 400, 403, 403, 200, 200, 401, 401]
            deadline = time.monotonic() + 5  # the block's webhook was tried at least once
            while not any(r.path == "/hooks" for r in upstream.requests) and time.monotonic() < deadline:
                time.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            assert process.wait(20) == 0
        output = log.read_text()
    assert any(r.path == "/hooks" for r in upstream.requests)
    leaks = [name for name, value in {**secrets, **prompts}.items() if value in output]
    assert leaks == [], output
    # and the access lines are there, one per call
    access = [line for line in output.splitlines() if '"event":"request"' in line]
    assert len(access) >= len(statuses)
    assert any('"path":"/v1/chat/completions"' in line and '"status":400' in line for line in access)
    assert any('"event":"violation"' in line for line in output.splitlines())


@pytest.mark.faults
def test_oversized_request_headers_are_refused(database_url: str) -> None:
    port = free_port()
    env = child_env(GATEWAY_PORT=str(port), GATEWAY_SHUTDOWN_GRACE="1", DATABASE_URL=database_url)
    with (
        gateway_process(env, port),
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
    ):
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        sent, refused, reply = 0, False, b""
        try:
            while sent < 8 * 1024 * 1024:  # a legitimate request's headers fit in a few kilobytes
                sock.sendall(b"a" * 65536)
                sent += 65536
            sock.sendall(b"\r\n\r\n")
            reply = sock.recv(4096)
        except OSError:
            refused = True
        assert httpx2.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    assert refused or not reply.startswith(b"HTTP/1.1 2"), f"{sent} header bytes accepted: {reply[:30]!r}"


# --- docs/SECURITY.md -----------------------------------------------------------------------------


def test_the_security_page_names_only_tests_that_exist() -> None:
    # The page answers "which test holds this attack?": a renamed or removed test must not leave
    # it pointing at nothing.
    root = Path(__file__).resolve().parent.parent
    page = (root / "docs" / "SECURITY.md").read_text()
    named = set(re.findall(r"`(tests/test_\w+\.py)::(test_\w+)`", page))
    assert len(named) > 50
    missing = [
        f"{file}::{test}"
        for file, test in sorted(named)
        if not re.search(rf"^(async )?def {test}\(", (root / file).read_text(), re.MULTILINE)
    ]
    assert missing == []
