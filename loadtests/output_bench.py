"""Output moderation's price on a stream: block mode against a direct stream, and off mode.

    python -m loadtests.output_bench [--streams 60] [--chunks 40] [--chunk-ms 10] [--chunk-chars 16]

The fake upstream writes each benchmark stream in twins (gateway/fake_stamped.py): chunk i of a
stream sent straight to it and of one sent through a gateway at the same moment, each chunk
stamped with `time.monotonic_ns()` as it is written and carrying `--chunk-chars` characters of
text. Two gateways run side by side on the same upstream, both judging input with the `rules`
detector: `off` (GATEWAY_OUTPUT_MODERATION unset, today's path) and `block` (the rules detector
judging the answer too, GATEWAY_OUTPUT_HOLDBACK_CHARS=`--holdback`). They are measured in turns.

Reported per gateway, as differences against the twin sent straight and as ratios of the
through stream's figure to the direct one's (same run, same moment):
- the delay a released chunk gains (p50, p99): in block mode mostly the wait for its window;
- the time to first token added (p50, p99): request sent to the first chunk with text.
Bounded: `--max-seconds` (default 120) stops starting streams; a run is printed and written to
loadtests/results/output-bench-*.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from loadtests.harness import ROOT, child_env, free_port, gateway_env, scratch_database, wait_answering
from loadtests.stamped import Twins, percentile, twin_streams

MODES = ("off", "block")


def _start(stack: ExitStack, command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    out = stack.enter_context(log.open("wb"))
    process = subprocess.Popen(command, env=env, stdout=out, stderr=out, cwd=log.parent)
    stack.callback(_stop, process)
    return process


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _twins(
    direct: str, through: str, args: argparse.Namespace, deadline: float, streams: int = 0
) -> Coroutine[Any, Any, Twins]:
    return twin_streams(
        direct,
        through,
        streams=streams or args.streams,
        concurrency=args.concurrency,
        text=args.chunk_chars,
        deadline=deadline,
    )


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.output_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=60, help="stream twins per gateway and run")
    parser.add_argument("--chunks", type=int, default=40, help="chunks per stream")
    parser.add_argument("--chunk-ms", type=float, default=10.0, help="milliseconds between chunks")
    parser.add_argument("--chunk-chars", type=int, default=16, help="characters of text per chunk (~4 tokens)")
    parser.add_argument("--holdback", type=int, default=200, help="GATEWAY_OUTPUT_HOLDBACK_CHARS of the block gateway")
    parser.add_argument("--concurrency", type=int, default=5, help="stream twins at once")
    parser.add_argument("--repeat", type=int, default=2, help="runs, the gateways' order alternating")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="no stream starts after this")
    args = parser.parse_args()
    deadline = time.monotonic() + args.max_seconds
    scratch = Path(tempfile.mkdtemp(prefix="output-bench-"))
    runs: list[dict[str, object]] = []
    results: dict[str, object] = {"args": vars(args), "runs": runs}
    summary: dict[str, dict[str, list[float]]] = {mode: {} for mode in MODES}
    with ExitStack() as stack:
        port = free_port()
        mock = [sys.executable, "-m", "gateway.fake_upstream", "--port", str(port), "--chunks", str(args.chunks)]
        mock += ["--chunk-delay-ms", str(args.chunk_ms)]
        upstream = f"http://127.0.0.1:{port}"
        wait_answering(f"{upstream}/v1/models", _start(stack, mock, scratch / "mock.log", child_env()), "fake upstream")
        database = stack.enter_context(scratch_database(os.environ.get("TEST_DATABASE_URL"), "output_bench"))
        gateways: dict[str, str] = {}
        for mode in MODES:
            gateway_port = free_port()
            settings = {"GATEWAY_MODERATION": "rules", "GATEWAY_LOG_LEVEL": "warning", "GATEWAY_SHUTDOWN_GRACE": "2"}
            if mode == "block":
                settings |= {"GATEWAY_OUTPUT_MODERATION": "block", "GATEWAY_OUTPUT_HOLDBACK_CHARS": str(args.holdback)}
            env = gateway_env(gateway_port, f"{upstream}/v1", "bench", scratch / mode, database, **settings)
            process = _start(stack, [sys.executable, "-m", "gateway"], scratch / f"gateway-{mode}.log", env)
            gateways[mode] = f"http://127.0.0.1:{gateway_port}"
            wait_answering(f"{gateways[mode]}/healthz", process, f"gateway ({mode})")
        for mode in MODES:  # warm-up
            asyncio.run(_twins(upstream, gateways[mode], args, deadline, streams=5))
        for repeat in range(args.repeat):
            for mode in MODES if repeat % 2 == 0 else tuple(reversed(MODES)):
                found = asyncio.run(_twins(upstream, gateways[mode], args, deadline))
                ttft_added = [b - a for a, b in zip(found.first_straight, found.first_through, strict=True)]
                cells = {
                    "gained_p50": percentile(found.gained, 50),
                    "gained_p99": percentile(found.gained, 99),
                    "delay_ratio_p50": percentile(found.through, 50) / percentile(found.straight, 50),
                    "delay_ratio_p99": percentile(found.through, 99) / percentile(found.straight, 99),
                    "ttft_added_p50": percentile(ttft_added, 50),
                    "ttft_added_p99": percentile(ttft_added, 99),
                    "ttft_ratio_p50": percentile(found.first_through, 50) / percentile(found.first_straight, 50),
                }
                for key, value in cells.items():
                    summary[mode].setdefault(key, []).append(value)
                runs.append({"mode": mode, "chunks": len(found.gained), **cells})
                print(
                    f"run {repeat + 1} {mode:5s} {len(found.gained)} chunk pairs: "
                    f"gained p50 {cells['gained_p50']:.2f} "
                    f"p99 {cells['gained_p99']:.2f} ms (through/direct delay p50 x{cells['delay_ratio_p50']:.1f}, "
                    f"p99 x{cells['delay_ratio_p99']:.1f}); first token added p50 {cells['ttft_added_p50']:.2f} "
                    f"p99 {cells['ttft_added_p99']:.2f} ms (x{cells['ttft_ratio_p50']:.2f})",
                    flush=True,
                )
    print(
        f"\nmedian of runs ({args.chunks} chunks {args.chunk_ms:g} ms apart, {args.chunk_chars} characters each, "
        f"holdback {args.holdback}):"
    )
    for mode in MODES:
        medians = {key: statistics.median(values) for key, values in summary[mode].items()}
        results[mode] = medians
        print(f"  {mode:5s} " + "  ".join(f"{key} {value:.2f}" for key, value in medians.items()))
    out = ROOT / "loadtests" / "results" / f"output-bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
