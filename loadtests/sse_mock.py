"""An SSE upstream that stamps every chunk with the time it was sent, for `loadtests/bench.py --mode stream`.

    python -m loadtests.sse_mock --port 9100 --chunks 20 --interval-ms 20

Each chunk of a streamed chat completion carries `"sent_ns"`: `time.monotonic_ns()` when it
was written (CLOCK_MONOTONIC is one clock for every process on the machine), so a client
can tell how long the chunk took to reach it, straight or through the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import orjson
from aiohttp import web


def build(chunks: int, interval: float) -> web.Application:
    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        for index in range(chunks):
            await asyncio.sleep(interval)
            chunk = {"object": "chat.completion.chunk", "index": index, "sent_ns": time.monotonic_ns()}
            await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
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
