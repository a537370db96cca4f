"""The fake upstream's benchmark streams: twins answered together, each chunk stamped as written.

A chat completion whose body names a `"bench_group"` is answered here (gateway/fake_upstream.py
says how). With `"bench_text": N` each chunk also carries N characters of assistant text in
`choices[0].delta.content`, so output moderation has text to hold back and judge.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from aiohttp import web

from gateway.fake_answers import DONE, SSE_HEADERS, data

GROUP_WAIT = 10.0  # seconds for every twin of a benchmark group to arrive
_WORDS = "the quick brown fox jumps over the lazy dog and keeps on running "


@dataclass
class _Group:
    members: int
    responses: list[web.StreamResponse] = field(default_factory=list)
    full: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)


class StampedGroups:
    def __init__(self) -> None:
        self._groups: dict[str, _Group] = {}

    async def answer(
        self, request: web.Request, name: str, members: int, chunks: int, delay: float, text: int = 0
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        group = self._groups.setdefault(name, _Group(members))
        group.responses.append(response)
        if len(group.responses) == group.members:
            group.full.set()
            try:
                await _write(group.responses, chunks, delay, text)
            finally:
                group.done.set()
                self._groups.pop(name, None)
        else:
            try:
                await asyncio.wait_for(group.full.wait(), GROUP_WAIT)
            except TimeoutError:
                self._groups.pop(name, None)
                raise web.HTTPGatewayTimeout(text=f"group {name}: not every member arrived") from None
            await group.done.wait()
        await response.write_eof()
        return response


async def _write(responses: list[web.StreamResponse], chunks: int, delay: float, text: int) -> None:
    words = (_WORDS * (text // len(_WORDS) + 1))[:text]
    for index in range(chunks):
        await asyncio.sleep(delay)
        turn = index % len(responses)
        for response in responses[turn:] + responses[:turn]:
            # stamped as late as can be: the time it is written
            chunk: dict[str, object] = {"object": "chat.completion.chunk", "index": index}
            if text:
                chunk["choices"] = [{"index": 0, "delta": {"content": words}, "finish_reason": None}]
            chunk["sent_ns"] = time.monotonic_ns()
            await response.write(data(chunk))
    for response in responses:
        if text:
            finish = {
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            }
            await response.write(data(finish))
        await response.write(DONE)
