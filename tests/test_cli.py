"""`python -m gateway` as an operator runs it: start-up errors, migrate, a graceful SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx2
import pytest

from loadtests.harness import child_env, free_port
from tests.conftest import run_sync
from tests.upstream import MockUpstream


def _run(tmp_path: Path, **variables: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *variables.pop("ARGS", "").split()],
        env=child_env(**variables),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({"GATEWAY_MAX_STRIKES": "none"}, "chat-gateway: GATEWAY_MAX_STRIKES: Input should be a valid integer"),
        ({"GATEWAY_MODERATION": "everything"}, "chat-gateway: GATEWAY_MODERATION: expected a comma list"),
        (
            {"GATEWAY_RULES_FILE": "/nonexistent/rules.toml", "GATEWAY_MODERATION": "rules"},
            "chat-gateway: GATEWAY_RULES_FILE: /nonexistent/rules.toml: cannot read",
        ),
    ],
)
def test_a_bad_setting_stops_start_up_with_one_line(tmp_path: Path, variables: dict[str, str], expected: str) -> None:
    result = _run(tmp_path, **variables)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(expected)


def test_migrate_applies_the_schema_and_exits(tmp_path: Path, empty_database_url: str) -> None:
    result = _run(tmp_path, ARGS="migrate", DATABASE_URL=empty_database_url)
    assert result.returncode == 0, result.stderr
    assert "schema is up to date" in result.stdout

    async def tables() -> set[str]:
        conn = await asyncpg.connect(empty_database_url)
        try:
            rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        finally:
            await conn.close()
        return {row["tablename"] for row in rows}

    assert {"users", "events", "webhook_outbox"} <= run_sync(tables())


def test_migrate_says_so_when_the_database_is_unreachable(tmp_path: Path) -> None:
    result = _run(tmp_path, ARGS="migrate", DATABASE_URL=f"postgresql://nobody:hunter2@127.0.0.1:{free_port()}/x")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "hunter2" not in result.stderr


@pytest.fixture
def slow_upstream() -> Iterator[MockUpstream]:
    with MockUpstream() as mock:
        mock.chunks = 6
        mock.chunk_delay = 0.25
        yield mock


@pytest.mark.faults
def test_sigterm_lets_a_stream_in_flight_finish_then_exits_0(
    tmp_path: Path, database_url: str, slow_upstream: MockUpstream
) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway"],
        env=child_env(
            DATABASE_URL=database_url,
            GATEWAY_PORT=str(port),
            GATEWAY_UPSTREAM_URL=slow_upstream.url,
            GATEWAY_MODERATION="off",
            GATEWAY_SHUTDOWN_GRACE="10",
        ),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx2.get(f"{base}/healthz").status_code == 200:
                    break
            except httpx2.TransportError:
                pass
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.1)

        events: list[bytes] = []
        first_chunk = threading.Event()

        def stream() -> None:
            body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
            with httpx2.stream(
                "POST", f"{base}/v1/chat/completions", json=body, headers={"X-User-ID": "alice"}, timeout=30
            ) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:].encode())
                        first_chunk.set()

        client = threading.Thread(target=stream)
        client.start()
        assert first_chunk.wait(10)
        process.send_signal(signal.SIGTERM)
        client.join(15)
        assert not client.is_alive()
        _, stderr = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert process.returncode == 0, stderr
    assert events[-1] == b"[DONE]"
    assert len(events) == slow_upstream.chunks + 2  # the pieces, the finish chunk, [DONE]
    # The access log line of the stream was written after it ended, with the fields operators need.
    access = [json.loads(line) for line in stderr.splitlines() if '"gateway.access"' in line or '"request"' in line]
    streamed = [line for line in access if line.get("path") == "/v1/chat/completions"]
    assert streamed, stderr
    assert {"request_id", "user_id", "method", "status", "duration_ms", "upstream_ms", "decision"} <= set(streamed[0])
    assert streamed[0]["user_id"] == "alice"
    assert streamed[0]["status"] == 200
