"""The client's side of the fake upstream's stamped benchmark streams (gateway/fake_stamped.py).

Each chunk of a benchmark stream carries `sent_ns`, the fake's `time.monotonic_ns()` as it wrote
it; twins (one stream sent straight, one through a proxy) are written chunk for chunk at the same
moment, so the difference of their delays is what the proxy added. `loadtests/bench.py`'s stream
mode and `loadtests/output_bench.py` both measure with these.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import time
from dataclasses import dataclass, field

import aiohttp

from loadtests.harness import LoadRunFailed


class StreamFailed(LoadRunFailed):
    """A benchmark stream was not answered 200."""


async def stamped_stream(
    session: aiohttp.ClientSession, url: str, *, user: str, group: str, members: int = 2, text: int = 0
) -> tuple[dict[int, float], float]:
    """(milliseconds from each chunk's stamp to its arrival here, by chunk index; milliseconds from
    the request to the first stamped chunk). `text` characters of text ride on each chunk."""
    body: dict[str, object] = {
        "model": "gpt-4o-mini",
        "stream": True,
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "bench_group": group,
        "bench_members": members,
    }
    if text:
        body["bench_text"] = text
    delays: dict[int, float] = {}
    first = math.nan
    started = time.monotonic_ns()
    async with session.post(f"{url}/v1/chat/completions", json=body, headers={"X-User-ID": user}) as response:
        if response.status != 200:
            raise StreamFailed(f"stream through {url} answered {response.status}: {await response.text()}")
        buffer = b""
        async for data in response.content.iter_any():
            now = time.monotonic_ns()
            buffer += data
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                payload = event.removeprefix(b"data: ")
                if not payload.startswith(b"{"):
                    continue
                chunk = json.loads(payload)
                if "sent_ns" in chunk:
                    delays[chunk["index"]] = (now - chunk["sent_ns"]) / 1e6
                    if math.isnan(first):
                        first = (now - started) / 1e6
    return delays, first


@dataclass
class Twins:
    """Chunk delays of twin streams (ms): straight, through the proxy, and their difference per chunk;
    and each pair's time to the first chunk, straight and through."""

    straight: list[float] = field(default_factory=list)
    through: list[float] = field(default_factory=list)
    gained: list[float] = field(default_factory=list)
    first_straight: list[float] = field(default_factory=list)
    first_through: list[float] = field(default_factory=list)


async def twin_streams(
    direct: str, proxy: str, *, streams: int, concurrency: int, text: int = 0, deadline: float = math.inf
) -> Twins:
    """`streams` pairs, one straight to the fake and its twin through `proxy`, `concurrency` pairs at
    once; no pair starts after `deadline` (time.monotonic())."""
    semaphore = asyncio.Semaphore(concurrency)
    found = Twins()
    run = secrets.token_hex(3)

    async def pair(index: int) -> None:
        group = f"{run}-{index}"
        user = f"bench-stream-{index % 100}"
        async with semaphore:
            if time.monotonic() > deadline:
                return
            (one, one_first), (two, two_first) = await asyncio.gather(
                stamped_stream(session, direct, user=user, group=group, text=text),
                stamped_stream(session, proxy, user=user, group=group, text=text),
            )
        for chunk, delay in one.items():
            if chunk in two:
                found.straight.append(delay)
                found.through.append(two[chunk])
                found.gained.append(two[chunk] - delay)
        found.first_straight.append(one_first)
        found.first_through.append(two_first)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(pair(index) for index in range(streams)))
    return found


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of `values`; NaN for none."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else math.nan
