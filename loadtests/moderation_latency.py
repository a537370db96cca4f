"""Moderation latency by GATEWAY_MODERATION_MODE and GATEWAY_MODERATION_TIMING (docs/PERFORMANCE.md).

- `cascade`: the `openai` detector (a fake /moderations answering in 50 ms) and the `guard`
  detector (a fake guard model answering in 80 ms), judged in turn and in parallel; each call
  a new text, so no verdict comes from the cache. Reports the whole judgement's latency.
- `ttft`: the gateway with the `guard` detector at 80 ms in front of an upstream whose first
  token comes 200 ms after the call, `before_call` against `during_call`: time from sending a
  streamed chat call to its first `data:` line, one call at a time.

    TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test ./dev python -m loadtests.moderation_latency

Everything listens on 127.0.0.1; each part makes `--calls` calls per variant (default 40).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Mapping

import aiohttp
import httpx2

from gateway.app import create_app
from gateway.fake_upstream import FakeUpstream
from gateway.settings import settings_from
from loadtests.harness import scratch_database
from middleware.cascade import make_cascade
from middleware.detectors import GuardDetector, OpenAIDetector
from middleware.protocols import DetectorFailed, UserInput
from tests.detector_mocks import MockGuard, serving
from tests.servers import run_app


def _summary(name: str, seconds: list[float]) -> str:
    ms = sorted(value * 1000 for value in seconds)
    p90 = ms[min(len(ms) - 1, round(0.9 * (len(ms) - 1)))]
    return f"{name:<28} n={len(ms):<4} p50={statistics.median(ms):7.1f} ms  p90={p90:7.1f} ms  max={ms[-1]:7.1f} ms"


async def cascade(calls: int) -> None:
    guard = MockGuard(delay=0.08)
    with FakeUpstream(latency=0.05, record=False) as upstream:
        async with serving(guard), aiohttp.ClientSession() as session:

            async def post(url: str, body: bytes, headers: Mapping[str, str], seconds: float) -> tuple[int, bytes]:
                try:
                    async with session.post(url, data=body, headers=dict(headers)) as response:
                        return response.status, await response.read()
                except aiohttp.ClientError as exc:
                    raise DetectorFailed(str(exc)) from exc

            for mode in ("sequential", "parallel"):
                detectors = [
                    OpenAIDetector(post, upstream.url, None, {}, 5.0),
                    GuardDetector(post, guard.base_url, "llama-guard3:1b", None, 5.0),
                ]
                judge = make_cascade(detectors, "closed", mode).judge  # type: ignore[arg-type]
                await judge(UserInput(texts=("warm-up",)), None)
                times = []
                for index in range(calls):
                    started = time.perf_counter()
                    await judge(UserInput(texts=(f"{mode} text {index}",)), None)
                    times.append(time.perf_counter() - started)
                print(_summary(f"openai 50 ms + guard 80 ms, {mode}", times))


async def ttft(calls: int, database_url: str | None) -> None:
    guard = MockGuard(delay=0.08)
    with FakeUpstream(latency=0.2, record=False) as upstream:
        async with serving(guard):
            for timing in ("before_call", "during_call"):
                settings = settings_from(
                    upstream_url=upstream.url,
                    database_url=database_url,
                    moderation="guard",
                    guard_url=guard.base_url,
                    guard_model="llama-guard3:1b",
                    moderation_timing=timing,
                    log_level="warning",
                )
                times = []
                with run_app(create_app(settings)) as url:
                    async with httpx2.AsyncClient(base_url=url, headers={"X-User-ID": "bench"}) as client:
                        for index in range(calls + 1):
                            body = {
                                "model": "gpt-4o-mini",
                                "stream": True,
                                "messages": [{"role": "user", "content": f"{timing} question {index}"}],
                            }
                            started = time.perf_counter()
                            async with client.stream("POST", "/v1/chat/completions", json=body) as answer:
                                async for line in answer.aiter_lines():
                                    if line.startswith("data:"):
                                        if index:  # the first call warms the connections up
                                            times.append(time.perf_counter() - started)
                                        break
                print(_summary(f"TTFT, guard 80 ms, {timing}", times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["cascade", "ttft", "both"], nargs="?", default="both")
    parser.add_argument("--calls", type=int, default=40)
    args = parser.parse_args()
    calls = max(1, min(args.calls, 1000))
    if args.part in ("cascade", "both"):
        asyncio.run(cascade(calls))
    if args.part in ("ttft", "both"):
        with scratch_database(os.environ.get("TEST_DATABASE_URL"), "moderation_latency") as database_url:
            asyncio.run(ttft(calls, database_url))


if __name__ == "__main__":
    main()
