"""Smoke load run: mock upstream + gateway + locust headless; exits non-zero on any failure.

    python -m loadtests.smoke --seconds 10

Uses a fresh database on the server of TEST_DATABASE_URL (dropped afterwards), or the embedded
PostgreSQL when it is unset. Free loopback ports, moderation by the mock (`openai` detector),
an admin token for the operator journey. CSV stats land in loadtests/results/ (git-ignored).
It also checks that the gateway stops with exit code 0 on SIGTERM.
"""

from __future__ import annotations

import argparse
import csv
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from loadtests.harness import ROOT, child_env, free_port, gateway_env, scratch_database, spawn

REQUIRED_REQUESTS = ("chat", "chat (stream)", "violation")


class SmokeFailed(Exception):
    pass


def _wait_http(url: str, process: subprocess.Popen[bytes], name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SmokeFailed(f"{name} exited with code {process.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 (loopback URL we built)
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise SmokeFailed(f"{name} did not answer {url} within {timeout:.0f} s")


def _stop(process: subprocess.Popen[bytes], timeout: float) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise SmokeFailed(f"process {process.pid} ignored SIGTERM for {timeout:.0f} s") from None


def _read_stats(path: Path) -> dict[str, tuple[int, int]]:
    with path.open(newline="") as handle:
        return {row["Name"]: (int(row["Request Count"]), int(row["Failure Count"])) for row in csv.DictReader(handle)}


def _tail(path: Path, lines: int = 30) -> str:
    text = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join(text[-lines:])


def run(args: argparse.Namespace) -> None:
    results = Path(args.results).resolve()
    results.mkdir(parents=True, exist_ok=True)
    prefix = results / "smoke"
    for old in results.glob("smoke_*.csv"):
        old.unlink()
    mock_port, gateway_port = free_port(), free_port()
    admin_token = secrets.token_urlsafe(24)
    gateway_url = f"http://127.0.0.1:{gateway_port}"

    with (
        tempfile.TemporaryDirectory(prefix="gateway-smoke-") as scratch,
        scratch_database(os.environ.get("TEST_DATABASE_URL"), "loadtest_smoke") as database_url,
    ):
        mock_log, gateway_log = results / "mock.log", results / "gateway.log"
        mock_cmd = [sys.executable, "-m", "gateway.fake_upstream", "--host", "127.0.0.1", "--port", str(mock_port)]
        mock_cmd += ["--latency-ms", str(args.mock_latency_ms), "--chunks", "5", "--chunk-delay-ms", "5"]
        environment = gateway_env(
            gateway_port,
            f"http://127.0.0.1:{mock_port}/v1",
            admin_token,
            Path(scratch) / "pgdata",
            database_url,
            GATEWAY_MODERATION="openai",
            GATEWAY_SHUTDOWN_GRACE="5",
            GATEWAY_LOG_LEVEL="warning",
        )
        mock = spawn(mock_cmd, mock_log, Path(scratch), child_env())
        gateway = spawn([sys.executable, "-m", "gateway"], gateway_log, Path(scratch), environment)
        try:
            _wait_http(f"http://127.0.0.1:{mock_port}/v1/models", mock, "mock upstream", 30)
            try:
                _wait_http(f"{gateway_url}/healthz", gateway, "gateway", 90)
            except SmokeFailed as exc:
                raise SmokeFailed(f"{exc}; log:\n{_tail(gateway_log)}") from None
            locust_cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py")]
            locust_cmd += ["--headless", "--host", gateway_url, "--users", str(args.users)]
            locust_cmd += ["--spawn-rate", str(args.spawn_rate), "--run-time", f"{args.seconds}s"]
            locust_cmd += ["--stop-timeout", "5", "--csv", str(prefix), "--only-summary"]
            locust_env = child_env(GATEWAY_ADMIN_TOKEN=admin_token)
            locust = subprocess.run(locust_cmd, env=locust_env, check=False, timeout=args.seconds + 120)
        finally:
            try:
                gateway_code = _stop(gateway, timeout=30)
            finally:
                _stop(mock, timeout=10)
        if locust.returncode != 0:
            raise SmokeFailed(f"locust exited with code {locust.returncode} (failures or errors above)")
        if gateway_code != 0:
            raise SmokeFailed(f"gateway exited with {gateway_code} after SIGTERM, not 0; log:\n{_tail(gateway_log)}")

    # Locust's exit code (checked above) counts every failure; the CSV is its last periodic
    # snapshot (up to a second old), good enough to see that every journey ran.
    stats = _read_stats(Path(f"{prefix}_stats.csv"))
    requests, failures = stats.get("Aggregated", (0, 0))
    if failures or not requests:
        raise SmokeFailed(f"{failures} failures in {requests} requests")
    missing = [name for name in REQUIRED_REQUESTS if stats.get(name, (0, 0))[0] == 0]
    if missing:
        raise SmokeFailed(f"no {', '.join(missing)} requests were made; the run was too short or too small")
    unblocks = stats.get("admin unblock", (0, 0))[0]
    print(f"smoke: ok: {requests} requests, 0 failures, {unblocks} admin unblocks; stats in {prefix}_stats.csv")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.smoke", description="Smoke load run.")
    parser.add_argument("--seconds", type=int, default=10, help="locust run time")
    parser.add_argument("--users", type=int, default=20, help="concurrent simulated users")
    parser.add_argument("--spawn-rate", type=float, default=10, help="users started per second")
    parser.add_argument("--mock-latency-ms", type=float, default=20, help="upstream latency before each answer")
    parser.add_argument("--results", default=str(ROOT / "loadtests" / "results"), help="directory for CSV and logs")
    try:
        run(parser.parse_args())
    except SmokeFailed as exc:
        print(f"smoke: FAILED: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
