"""Overhead benchmark: direct vs a bare Python proxy (the floor) vs the gateway, side by side.

    python -m loadtests.bench                       # latency sweep: every target at every rate
    python -m loadtests.bench --mode stream         # delay each SSE chunk gains through the gateway
    python -m loadtests.bench --mode soak           # RSS over many requests at one rate
    python -m loadtests.bench --quick               # a few seconds: the machinery works

Targets, all up for the whole run and measured in turns at each rate (so drift in the
machine's load hits them alike):
- direct: k6 straight to the mock upstream (nginx from Debian's nginx-light, a fixed chat
  completion; installed with apt-get when missing and run as root);
- floor: `loadtests/floor_proxy.py`, a pass-through proxy with no checks, same server settings;
- gateway: `python -m gateway` with full enforcement: the rules detector, PostgreSQL (a
  scratch database on TEST_DATABASE_URL's server, else the embedded one), access logs at info.

Each proxy runs alone on core 0; the mock, k6 and this script on core 1 (`taskset`). Load is
k6's constant-arrival-rate executor (open loop). Capacity: the highest rate with p99 < 50 ms
and no failed or dropped request. Overhead: target minus direct, percentile by percentile.
Results go to loadtests/results/bench-*.json as well as stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

from gateway.disconnects import DISCONNECT_WATCH_AFTER
from loadtests.harness import (
    ROOT,
    LoadRunFailed,
    child_env,
    free_port,
    gateway_env,
    scratch_database,
    wait_answering,
)
from loadtests.stamped import percentile, twin_streams

HERE = Path(__file__).resolve().parent
K6 = ROOT / ".venv" / "bin" / "k6"
PROXY_CORE, LOAD_CORE = "0", "1"
CAPACITY_P99_MS = 50.0
TARGETS = ("direct", "floor", "gateway")
COMPLETION = (
    '{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini",'
    '"choices":[{"index":0,"message":{"role":"assistant","content":"Lisbon in May is mild and sunny."},'
    '"finish_reason":"stop"}],"usage":{"prompt_tokens":30,"completion_tokens":9,"total_tokens":39}}'
)
BLOCKED_USERS = 50  # blocked before the run, so the gateway's block cache is not empty
FLOOR_HOP = ["session"]  # --floor-hop: how the floor makes its upstream call
GATEWAY_ENV: dict[str, str] = {}  # --gateway-env: settings on top of the benchmark's own


class BenchFailed(LoadRunFailed):
    pass


@dataclass
class Step:
    target: str
    rate: int
    p50: float
    p95: float
    p99: float
    requests: int
    failed: int
    dropped: int
    cpu_percent: float | None = None
    rss_mb: float | None = None

    @property
    def ok(self) -> bool:
        return self.p99 < CAPACITY_P99_MS and self.failed == 0 and self.dropped == 0


@dataclass
class Servers:
    urls: dict[str, str]
    pids: dict[str, int]
    stream_urls: dict[str, str] = field(default_factory=dict)


@contextmanager
def _process(command: list[str], log: Path, core: str, env: dict[str, str] | None = None) -> Iterator[int]:
    with log.open("wb") as out:
        process = subprocess.Popen(["taskset", "-c", core, *command], env=env or child_env(), stdout=out, stderr=out)
        try:
            yield process.pid
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def _nginx() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if found:
        return found
    print("bench: installing nginx-light (apt-get)", file=sys.stderr)
    subprocess.run(["apt-get", "install", "-y", "nginx-light"], check=True, stdout=subprocess.DEVNULL)
    return "/usr/sbin/nginx"


@contextmanager
def _mock(scratch: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    conf = scratch / "nginx.conf"
    body = COMPLETION.replace("'", "\\'")
    conf.write_text((HERE / "bench_nginx.conf").read_text().format(dir=scratch, port=port, body=body))
    with (scratch / "nginx.log").open("wb") as out:
        process = subprocess.Popen(
            ["taskset", "-c", LOAD_CORE, _nginx(), "-p", str(scratch), "-c", str(conf)], stdout=out, stderr=out
        )
        try:
            yield f"http://127.0.0.1:{port}", process
        finally:
            process.terminate()
            process.wait(10)


def _block_some_users(gateway: str, admin: str) -> None:
    for index in range(BLOCKED_USERS):
        request = urllib.request.Request(  # noqa: S310 (loopback URL we built)
            f"{gateway}/admin/block/bench-blocked-{index}",
            method="PUT",
            headers={"Authorization": f"Bearer {admin}"},
        )
        with urllib.request.urlopen(request, timeout=10):  # noqa: S310
            pass


def _servers(
    stack: ExitStack,
    scratch: Path,
    targets: tuple[str, ...],
    upstream_url: str | None = None,
    wrap: dict[str, list[str]] | None = None,
    start_timeout: float = 90,
) -> Servers:
    """Start the mock and every proxy target; yields their base URLs and pids.

    `wrap` puts a command in front of a target's (valgrind, for the instructions mode).
    """
    wrap = wrap or {}
    mock_url, mock = stack.enter_context(_mock(scratch))
    upstream = upstream_url or mock_url
    servers = Servers(urls={"direct": upstream}, pids={})
    wait_answering(f"{mock_url}/", mock, "nginx")
    if "floor" in targets:
        port = free_port()
        command = [*wrap.get("floor", []), sys.executable, "-m", "loadtests.floor_proxy", "--port", str(port)]
        command += ["--upstream", upstream, "--hop", FLOOR_HOP[0]]
        servers.pids["floor"] = stack.enter_context(_process(command, scratch / "floor.log", PROXY_CORE))
        servers.urls["floor"] = f"http://127.0.0.1:{port}"
    if "gateway" in targets:
        database_url = stack.enter_context(scratch_database(os.environ.get("TEST_DATABASE_URL"), "bench"))
        port = free_port()
        admin = secrets.token_urlsafe(16)
        env = gateway_env(
            port,
            f"{upstream}/v1",
            admin,
            scratch / "pgdata",
            database_url,
            # --gateway-env may override the benchmark's own settings
            **{
                "GATEWAY_MODERATION": "rules",
                "GATEWAY_LOG_LEVEL": "info",
                "GATEWAY_SHUTDOWN_GRACE": "3",
                **GATEWAY_ENV,
            },
        )
        command = [*wrap.get("gateway", []), sys.executable, "-m", "gateway"]
        servers.pids["gateway"] = stack.enter_context(_process(command, scratch / "gateway.log", PROXY_CORE, env))
        servers.urls["gateway"] = f"http://127.0.0.1:{port}"
    for name in ("floor", "gateway"):
        if name in servers.urls:
            _wait_pid(f"{servers.urls[name]}/healthz", servers.pids[name], name, start_timeout)
    if "gateway" in servers.urls:
        _block_some_users(servers.urls["gateway"], admin)
    return servers


def _alive(pid: int) -> bool:
    """False once `pid` has exited, reaped or not (an unreaped child is a zombie until waited for)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def _wait_pid(url: str, pid: int, name: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            raise BenchFailed(f"{name} exited before answering {url}; see its log in the scratch dir")
        try:
            with urllib.request.urlopen(url, timeout=2):  # noqa: S310 (loopback URL we built)
                return
        except OSError as exc:
            if getattr(exc, "code", None):
                return
        time.sleep(0.2)
    raise BenchFailed(f"{name} did not answer {url} within {timeout:.0f} s")


# -- process accounting ---------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` and its children so far (children: uvicorn's own)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# -- k6 --------------------------------------------------------------------------------------------


def _k6(url: str, rate: int, seconds: int, scratch: Path) -> Step:
    out = scratch / f"k6-{secrets.token_hex(4)}.json"
    env = child_env(TARGET=url, RATE=str(rate), DURATION=f"{seconds}s", OUT=str(out), K6_NO_USAGE_REPORT="true")
    command = ["taskset", "-c", LOAD_CORE, str(K6), "run", "--quiet", "--no-color", str(HERE / "bench_k6.js")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=seconds + 120, check=False)
    if not out.exists():
        raise BenchFailed(f"k6 wrote no summary (exit {result.returncode}): {result.stderr[-2000:]}")
    data = json.loads(out.read_text())
    out.unlink()
    metrics = data["metrics"]
    duration = metrics["http_req_duration"]["values"]
    requests = int(metrics["http_reqs"]["values"]["count"])
    failed = int(metrics["http_req_failed"]["values"].get("passes", 0))
    dropped = int(metrics.get("dropped_iterations", {}).get("values", {}).get("count", 0))
    return Step("", rate, duration["p(50)"], duration["p(95)"], duration["p(99)"], requests, failed, dropped)


def _measure(servers: Servers, target: str, rate: int, seconds: int, scratch: Path) -> Step:
    pid = servers.pids.get(target)
    cpu_before = _cpu_seconds(pid) if pid else 0.0
    started = time.monotonic()
    step = _k6(servers.urls[target], rate, seconds, scratch)
    elapsed = time.monotonic() - started
    step.target = target
    if pid:
        step.cpu_percent = round(100 * (_cpu_seconds(pid) - cpu_before) / elapsed, 1)
        step.rss_mb = round(_rss_mb(pid), 1)
    return step


# -- modes -----------------------------------------------------------------------------------------


def sweep(args: argparse.Namespace, scratch: Path) -> dict[str, object]:
    rates = [int(rate) for rate in args.rates.split(",")]
    targets = tuple(args.targets.split(","))
    runs: list[list[Step]] = []
    with ExitStack() as stack:
        servers = _servers(stack, scratch, targets)
        for target in targets:  # warm-up: connections, caches, JIT-free but allocator-warm
            _measure(servers, target, min(rates), max(2, args.seconds // 3), scratch)
        for repeat in range(args.repeat):
            steps: list[Step] = []
            saturated: set[str] = set()
            for rate in rates:
                for target in targets:
                    if target in saturated:
                        continue
                    step = _measure(servers, target, rate, args.seconds, scratch)
                    if not step.ok:
                        # The machine is shared: a failing step is measured once more, the better counts.
                        print(_row(step, repeat) + "  (measuring again)", flush=True)
                        again = _measure(servers, target, rate, args.seconds, scratch)
                        step = min(step, again, key=lambda s: (not s.ok, s.p99))
                    steps.append(step)
                    print(_row(step, repeat), flush=True)
                    # Far past capacity a step only measures queueing; skip the higher rates.
                    if step.p99 > 20 * CAPACITY_P99_MS or step.dropped > rate * args.seconds // 10:
                        saturated.add(target)
            runs.append(steps)
    return _report(runs, rates, targets, args)


def _row(step: Step, repeat: int) -> str:
    extra = "" if step.cpu_percent is None else f"  cpu {step.cpu_percent:5.1f}%  rss {step.rss_mb:6.1f} MB"
    return (
        f"run {repeat + 1}  {step.target:8s} {step.rate:5d} rps  p50 {step.p50:7.2f}  p95 {step.p95:7.2f}  "
        f"p99 {step.p99:7.2f} ms  reqs {step.requests:6d}  failed {step.failed}  dropped {step.dropped}{extra}"
    )


def _capacity(steps: list[Step], target: str, rates: list[int]) -> int:
    best = 0
    for rate in rates:
        step = next((s for s in steps if s.target == target and s.rate == rate), None)
        if step is None or not step.ok:
            break
        best = rate
    return best


def _report(
    runs: list[list[Step]], rates: list[int], targets: tuple[str, ...], args: argparse.Namespace
) -> dict[str, object]:
    capacities = {target: [_capacity(steps, target, rates) for steps in runs] for target in targets}
    print("\ncapacity (highest rate with p99 < 50 ms, nothing failed or dropped), per run:")
    for target in targets:
        print(f"  {target:8s} {capacities[target]}  median {statistics.median(capacities[target]):.0f} rps")
    ratio = None
    if "floor" in targets and "gateway" in targets:
        ratios = [g / f for g, f in zip(capacities["gateway"], capacities["floor"], strict=True) if f]
        ratio = statistics.median(ratios) if ratios else None
        print(f"  gateway / floor: {ratios} median {ratio}")

    cpu_ratios = _cpu_ratios(runs, rates) if "floor" in targets and "gateway" in targets else {}

    overhead: dict[str, dict[int, dict[str, float]]] = {}
    print("\noverhead = target minus direct, same rate, same run (median over runs; min..max), ms:")
    for target in targets:
        if target == "direct":
            continue
        overhead[target] = {}
        for rate in rates:
            cells: dict[str, list[float]] = {"p50": [], "p95": [], "p99": []}
            for steps in runs:
                mine = next((s for s in steps if s.target == target and s.rate == rate), None)
                base = next((s for s in steps if s.target == "direct" and s.rate == rate), None)
                if mine is None or base is None:
                    continue
                for key in cells:
                    cells[key].append(getattr(mine, key) - getattr(base, key))
            if not cells["p50"]:
                continue
            overhead[target][rate] = {key: statistics.median(values) for key, values in cells.items()}
            text = "  ".join(
                f"{key} {statistics.median(values):6.2f} ({min(values):.2f}..{max(values):.2f})"
                for key, values in cells.items()
            )
            print(f"  {target:8s} {rate:5d} rps  {text}")
    return {
        "mode": "sweep",
        "seconds": args.seconds,
        "rates": rates,
        "runs": [[asdict(step) for step in steps] for steps in runs],
        "capacity": capacities,
        "gateway_over_floor": ratio,
        "cpu_gateway_over_floor": cpu_ratios,
        "overhead": overhead,
    }


def _cpu_ratios(runs: list[list[Step]], rates: list[int]) -> dict[int, list[float]]:
    """Gateway CPU / floor CPU at the same rate in the same run: CPU per request, gateway over floor.

    Where neither target is saturated, capacity ratio ~ 1 / this; it reads finer than the capacity
    steps, whose resolution is the rate ladder.
    """
    ratios: dict[int, list[float]] = {}
    print("\nCPU per request, gateway / floor (same rate, same run; where both kept up):")
    for rate in rates:
        for steps in runs:
            gateway = next((s for s in steps if s.target == "gateway" and s.rate == rate), None)
            floor = next((s for s in steps if s.target == "floor" and s.rate == rate), None)
            if gateway is None or floor is None or not (gateway.ok and floor.ok):
                continue
            if gateway.cpu_percent and floor.cpu_percent:
                ratios.setdefault(rate, []).append(round(gateway.cpu_percent / floor.cpu_percent, 3))
        if rate in ratios:
            values = ratios[rate]
            print(
                f"  {rate:5d} rps  median {statistics.median(values):.3f}  ({min(values):.3f}..{max(values):.3f})"
                f"  => capacity ratio ~ {1 / statistics.median(values):.2f}"
            )
    return ratios


def stream(args: argparse.Namespace, scratch: Path) -> dict[str, object]:
    """Chunk delays gained through the floor and through the gateway, each against a twin sent straight.

    The two proxies share core 0, so they are measured in turns (the order alternating from one
    run to the next), each with `--concurrency` streams through it at once, each stream twinned
    with one straight to the mock.
    """
    port = free_port()
    mock_cmd = [sys.executable, "-m", "gateway.fake_upstream", "--port", str(port), "--chunks", str(args.chunks)]
    mock_cmd += ["--chunk-delay-ms", str(args.chunk_interval_ms)]
    proxies = tuple(target for target in args.targets.split(",") if target != "direct")
    runs: list[dict[str, object]] = []
    results: dict[str, object] = {"mode": "stream", "concurrency": args.concurrency, "runs": runs}
    summary: dict[str, dict[str, list[float]]] = {proxy: {"p50": [], "p95": [], "p99": []} for proxy in proxies}
    with ExitStack() as stack:
        mock_pid = stack.enter_context(_process(mock_cmd, scratch / "sse_mock.log", LOAD_CORE))
        mock_url = f"http://127.0.0.1:{port}"
        _wait_pid(f"{mock_url}/", mock_pid, "sse mock")
        servers = _servers(stack, scratch, proxies, upstream_url=mock_url)
        for proxy in proxies:  # warm-up
            asyncio.run(twin_streams(mock_url, servers.urls[proxy], streams=10, concurrency=args.concurrency))
        for repeat in range(args.repeat):
            order = proxies if repeat % 2 == 0 else tuple(reversed(proxies))
            for proxy in order:
                twins = asyncio.run(
                    twin_streams(mock_url, servers.urls[proxy], streams=args.streams, concurrency=args.concurrency)
                )
                direct_cells = {f"p{q}": percentile(twins.straight, q) for q in (50, 99)}
                through_cells = {f"p{q}": percentile(twins.through, q) for q in (50, 99)}
                gained_cells = {f"p{q}": percentile(twins.gained, q) for q in (50, 95, 99)}
                for key, value in gained_cells.items():
                    summary[proxy][key].append(value)
                print(
                    f"run {repeat + 1}  {proxy:8s} {len(twins.gained)} chunk pairs  delay ms: straight p50 "
                    f"{direct_cells['p50']:.3f} p99 {direct_cells['p99']:.3f}, through p50 {through_cells['p50']:.3f} "
                    f"p99 {through_cells['p99']:.3f}; gained per chunk p50 {gained_cells['p50']:.3f} "
                    f"p95 {gained_cells['p95']:.3f} p99 {gained_cells['p99']:.3f}",
                    flush=True,
                )
                runs.append(
                    {"target": proxy, "chunks": len(twins.gained), "direct": direct_cells, "through": through_cells}
                    | {"gained": gained_cells}
                )
    print(f"\ndelay a chunk gains against its twin sent straight, {args.concurrency} streams at once (median of runs):")
    for proxy in proxies:
        cells = summary[proxy]
        text = "  ".join(
            f"{key} {statistics.median(values):.3f} ({min(values):.3f}..{max(values):.3f})"
            for key, values in cells.items()
        )
        print(f"  {proxy:8s} {text} ms")
        results[f"{proxy}_gained"] = {key: statistics.median(values) for key, values in cells.items()}
    return results


def soak(args: argparse.Namespace, scratch: Path) -> dict[str, object]:
    """RSS of the gateway over `--soak-requests` at `--soak-rate`, sampled after a warm-up."""
    with ExitStack() as stack:
        servers = _servers(stack, scratch, ("gateway",))
        pid = servers.pids["gateway"]
        _measure(servers, "gateway", args.soak_rate, 10, scratch)  # warm-up
        start_rss = _rss_mb(pid)
        seconds = max(1, args.soak_requests // args.soak_rate)
        samples: list[tuple[float, float]] = []
        out = scratch / "k6-soak.json"
        env = child_env(
            TARGET=servers.urls["gateway"],
            RATE=str(args.soak_rate),
            DURATION=f"{seconds}s",
            OUT=str(out),
            K6_NO_USAGE_REPORT="true",
        )
        command = ["taskset", "-c", LOAD_CORE, str(K6), "run", "--quiet", "--no-color", str(HERE / "bench_k6.js")]
        k6 = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started = time.monotonic()
        while k6.poll() is None:
            time.sleep(5)
            samples.append((round(time.monotonic() - started), _rss_mb(pid)))
            print(f"soak {samples[-1][0]:4d} s  rss {samples[-1][1]:.1f} MB", flush=True)
        data = json.loads(out.read_text())["metrics"]
    end_rss = samples[-1][1] if samples else start_rss
    result = {
        "mode": "soak",
        "rate": args.soak_rate,
        "requests": int(data["http_reqs"]["values"]["count"]),
        "failed": int(data["http_req_failed"]["values"].get("passes", 0)),
        "dropped": int(data.get("dropped_iterations", {}).get("values", {}).get("count", 0)),
        "p99_ms": data["http_req_duration"]["values"]["p(99)"],
        "rss_start_mb": start_rss,
        "rss_end_mb": end_rss,
        "rss_max_mb": max([start_rss, *(rss for _, rss in samples)]),
        "growth_percent": round(100 * (end_rss - start_rss) / start_rss, 1),
        "samples": samples,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    return result


# -- instructions ----------------------------------------------------------------------------------


async def _closed_loop(url: str, requests: int, concurrency: int) -> tuple[int, float]:
    """`requests` chat calls (the k6 script's body, headers and users), `concurrency` at a time.

    Returns the failures and the 90th percentile of the calls' seconds.
    """
    body = json.dumps(
        {
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {
                    "role": "user",
                    "content": "Hello! Could you tell me what the weather is usually like in Lisbon in May?",
                },
            ],
        }
    ).encode()
    failed = 0
    seconds: list[float] = []
    left = iter(range(requests))

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal failed
        for index in left:
            headers = {
                "Content-Type": "application/json",
                "X-User-ID": f"bench-{index * 7919 % 10_000}",
                "Authorization": "Bearer sk-bench",
            }
            started = time.monotonic()
            async with session.post(f"{url}/v1/chat/completions", data=body, headers=headers) as response:
                await response.read()
                failed += response.status >= 400
            seconds.append(time.monotonic() - started)

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return failed, percentile(seconds, 90) if seconds else 0.0


def _callgrind_total(path: Path) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise BenchFailed(f"no instruction total in {path}")


def instructions(args: argparse.Namespace, scratch: Path) -> dict[str, object]:
    """User-space instructions per request, floor and gateway, counted by valgrind's callgrind.

    Instruction counts do not depend on what else the machine is doing, so they tell a change
    of a few microseconds apart where CPU time cannot. Each proxy runs under callgrind (about
    50 times slower); after a warm-up the counters are zeroed, `--requests` calls are made one
    at a time, and the counters dumped. Kernel work (system calls) is not counted.
    """
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        raise BenchFailed("instructions mode needs valgrind (apt-get install valgrind)")
    proxies = tuple(target for target in args.targets.split(",") if target != "direct")
    prefix = ["valgrind", "--tool=callgrind", "--dump-instr=no", "--dump-line=no"]
    per_request: dict[str, float] = {}
    with ExitStack() as stack:
        prefixes = {proxy: [*prefix, f"--callgrind-out-file={scratch}/callgrind.{proxy}.%p"] for proxy in proxies}
        servers = _servers(stack, scratch, proxies, wrap=prefixes, start_timeout=600)
        for proxy in proxies:
            url, pid = servers.urls[proxy], servers.pids[proxy]
            # One call at a time: under callgrind a call takes ~50x longer, and with several in flight
            # the proxy's 0.1 s disconnect watcher would start for every call, which at real speed
            # never happens; the counts would measure the slowdown, not the code.
            asyncio.run(_closed_loop(url, args.warmup_requests, 1))
            subprocess.run(["callgrind_control", "--zero", str(pid)], check=True, capture_output=True)
            failed, slow = asyncio.run(_closed_loop(url, args.requests, 1))
            if failed:
                raise BenchFailed(f"{proxy}: {failed} of {args.requests} calls failed")
            if slow > DISCONNECT_WATCH_AFTER * 0.8:
                # The count would include the watcher task, which real calls (about 1 ms) never start.
                print(
                    f"bench: WARNING: calls took {slow * 1000:.0f} ms (p90) under callgrind, near the proxy's "
                    f"{DISCONNECT_WATCH_AFTER * 1000:.0f} ms disconnect watcher: run one instructions bench at a "
                    "time on an otherwise idle core 0",
                    file=sys.stderr,
                )
            before = set(scratch.glob(f"callgrind.{proxy}.{pid}*"))
            subprocess.run(["callgrind_control", "--dump", str(pid)], check=True, capture_output=True)
            dumps = sorted(set(scratch.glob(f"callgrind.{proxy}.{pid}*")) - before)
            if not dumps:
                raise BenchFailed(f"{proxy}: callgrind wrote no dump")
            per_request[proxy] = _callgrind_total(dumps[-1]) / args.requests
            print(f"{proxy:8s} {per_request[proxy]:12,.0f} instructions per request", flush=True)
    result: dict[str, object] = {"mode": "instructions", "requests": args.requests, "per_request": per_request}
    if "floor" in per_request and "gateway" in per_request:
        ratio = per_request["gateway"] / per_request["floor"]
        result["gateway_over_floor"] = ratio
        print(f"gateway / floor: {ratio:.3f} (capacity ratio by instructions ~ {1 / ratio:.2f})")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["sweep", "stream", "soak", "instructions"], default="sweep")
    parser.add_argument("--rates", default="100,300,500,700,900,1100,1300", help="comma list, requests/s")
    parser.add_argument("--seconds", type=int, default=15, help="per rate and target")
    parser.add_argument("--repeat", type=int, default=3, help="whole sweeps; medians are reported")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--streams", type=int, default=200, help="stream mode: streams per proxy and run")
    parser.add_argument("--concurrency", type=int, default=10, help="stream mode: streams through the proxy at once")
    parser.add_argument("--chunks", type=int, default=20, help="stream mode: chunks per stream")
    parser.add_argument("--chunk-interval-ms", type=float, default=20)
    parser.add_argument("--requests", type=int, default=400, help="instructions mode: calls counted")
    parser.add_argument("--warmup-requests", type=int, default=200, help="instructions mode: calls before counting")
    parser.add_argument("--soak-rate", type=int, default=1000)
    parser.add_argument("--soak-requests", type=int, default=200_000)
    parser.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        metavar="GATEWAY_NAME=value",
        help="a setting for the gateway on top of the benchmark's (repeatable), e.g. GATEWAY_LOG_LEVEL=warning",
    )
    parser.add_argument(
        "--floor-hop",
        choices=["session", "lean"],
        default="session",
        help="the floor's upstream call: session.request (the floor) or the gateway's own lean call",
    )
    parser.add_argument("--quick", action="store_true", help="a few seconds per mode: a self-check, no figures")
    parser.add_argument("--results", default=str(HERE / "results"))
    args = parser.parse_args()
    for item in args.gateway_env:
        name, equals, value = item.partition("=")
        if not equals or not name.startswith("GATEWAY_"):
            parser.error(f"--gateway-env {item!r}: expected GATEWAY_NAME=value")
        GATEWAY_ENV[name] = value
    FLOOR_HOP[0] = args.floor_hop
    if args.quick:
        args.rates, args.seconds, args.repeat = "100", 2, 1
        args.streams, args.soak_requests, args.soak_rate = 10, 1000, 100
    if os.cpu_count() and (os.cpu_count() or 0) < 2:
        print("bench: needs 2 cores to pin the proxy apart from the load", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {int(LOAD_CORE)})
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    try:
        run = {"sweep": sweep, "stream": stream, "soak": soak, "instructions": instructions}[args.mode]
        report = run(args, scratch)
    except LoadRunFailed as exc:
        print(f"bench: FAILED: {exc} (logs in {scratch})", file=sys.stderr)
        return 1
    report["command"] = " ".join(["python -m loadtests.bench", *sys.argv[1:]])
    out = results / f"bench-{args.mode}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"\nbench: results in {out}")
    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
