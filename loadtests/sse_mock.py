"""An SSE upstream that stamps every chunk with the time it was sent, for `loadtests/bench.py --mode stream`.

    python -m loadtests.sse_mock --port 9100 --chunks 20 --interval-ms 20

Each chunk of a streamed chat completion carries `"sent_ns"`: `time.monotonic_ns()` when it
was written (CLOCK_MONOTONIC is one clock for every process on the machine), so a client
can tell how long the chunk took to reach it, straight or through a proxy.

Twins: requests whose bodies carry the same `"bench_group"` (and `"bench_members"`: how many
to wait for) are answered together: once all have arrived, chunk i of every member is written
in one go, back to back, each stamped as it is written, the members' order rotating from one
chunk to the next. A client that sends one member straight and one through a proxy can then
subtract, chunk by chunk, two delays measured at the same moment under the same conditions.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field

import orjson
from aiohttp import web

GROUP_WAIT = 10.0  # seconds for every member of a group to arrive


@dataclass
class _Group:
    members: int
    responses: list[web.StreamResponse] = field(default_factory=list)
    full: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)


def _chunk(index: int) -> bytes:
    chunk = {"object": "chat.completion.chunk", "index": index, "sent_ns": time.monotonic_ns()}
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def build(chunks: int, interval: float) -> web.Application:
    groups: dict[str, _Group] = {}

    async def write_all(responses: list[web.StreamResponse]) -> None:
        for index in range(chunks):
            await asyncio.sleep(interval)
            turn = index % len(responses)
            for response in responses[turn:] + responses[:turn]:
                await response.write(_chunk(index))
        for response in responses:
            await response.write(b"data: [DONE]\n\n")

    async def chat(request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        name = body.get("bench_group")
        if name is None:
            await write_all([response])
        else:
            group = groups.setdefault(str(name), _Group(int(body.get("bench_members", 2))))
            group.responses.append(response)
            if len(group.responses) == group.members:
                group.full.set()
                try:
                    await write_all(group.responses)
                finally:
                    group.done.set()
                    groups.pop(str(name), None)
            else:
                try:
                    await asyncio.wait_for(group.full.wait(), GROUP_WAIT)
                except TimeoutError:
                    groups.pop(str(name), None)
                    raise web.HTTPGatewayTimeout(text=f"group {name}: not every member arrived") from None
                await group.done.wait()
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.sse_mock")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--interval-ms", type=float, default=20)
    args = parser.parse_args()
    web.run_app(build(args.chunks, args.interval_ms / 1000), host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
