"""A tiny fake OpenAI API for `python -m gateway demo`: no key, no network, a canned answer.

It lives in the installed package (not in `loadtests/`, which is not shipped) so the demo runs
anywhere the gateway is installed. It serves:

- `POST /v1/chat/completions`: a `chat.completion` that quotes the last user message back, or
  with `"stream": true` the same text as SSE `chat.completion.chunk` events, `chunk_delay`
  seconds apart, so a reader can watch them arrive one by one;
- `POST /v1/moderations`: OpenAI's moderation shape; a text is flagged when it contains one of
  `FLAGGED_WORDS` (case-insensitive), with that word's category.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

MODEL = "gpt-4o-mini"
# word -> the moderation category it flags; the demo's violations use these words
FLAGGED_WORDS = {"bomb": "illicit/violent", "hurt": "violence"}
# The categories of OpenAI's omni-moderation-latest, as its answers list them.
MODERATION_CATEGORIES = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)


@dataclass
class Traffic:
    """What reached the fake upstream, so the demo can show that refused calls never did."""

    chat_calls: int = 0
    moderation_calls: int = 0


CHUNK_DELAY_KEY = web.AppKey("chunk_delay", float)
TRAFFIC_KEY = web.AppKey("traffic", Traffic)


def _error(status: int, message: str) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


async def _read_object(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _error(400, "The body is not JSON.")
    if not isinstance(body, dict):
        return _error(400, "The body must be a JSON object.")
    return body


def _last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def _pieces(text: str) -> list[str]:
    # Word by word, each piece keeping its trailing space, the way real streams arrive.
    words = text.split(" ")
    return [word + " " for word in words[:-1]] + [words[-1]]


async def chat_completions(request: web.Request) -> web.StreamResponse:
    request.app[TRAFFIC_KEY].chat_calls += 1
    body = await _read_object(request)
    if isinstance(body, web.Response):
        return body
    reply = f'Hello from the fake upstream! You said: "{_last_user_text(body)}"'
    completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if not body.get("stream"):
        answer = {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": MODEL,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"},
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": len(_pieces(reply)), "total_tokens": 20},
        }
        return web.Response(body=orjson.dumps(answer), content_type="application/json")

    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)

    async def event(delta: dict[str, str], finish_reason: str | None) -> None:
        chunk = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": MODEL,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }
        await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")

    delay = request.app[CHUNK_DELAY_KEY]
    await event({"role": "assistant", "content": ""}, None)
    for piece in _pieces("Streaming works: these words leave the fake upstream one at a time."):
        await asyncio.sleep(delay)
        await event({"content": piece}, None)
    await event({}, "stop")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def moderation_inputs(value: Any) -> list[list[str]]:
    """The moderation input as one list of texts per result, the way the API counts results."""
    if isinstance(value, str):
        return [[value]]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return [[item] for item in value]
    if isinstance(value, list):  # multimodal parts: one result for the whole list
        return [[str(part.get("text", "")) for part in value if isinstance(part, dict) and part.get("type") == "text"]]
    return [[]]


def moderate(text: str) -> str | None:
    """The category the fake moderation flags `text` with, or None when it is clean."""
    lowered = text.lower()
    return next((category for word, category in FLAGGED_WORDS.items() if word in lowered), None)


async def moderations(request: web.Request) -> web.StreamResponse:
    request.app[TRAFFIC_KEY].moderation_calls += 1
    body = await _read_object(request)
    if isinstance(body, web.Response):
        return body
    results = []
    for texts in moderation_inputs(body.get("input")):
        flagged = {category for text in texts if (category := moderate(text)) is not None}
        results.append(
            {
                "flagged": bool(flagged),
                "categories": {name: name in flagged for name in MODERATION_CATEGORIES},
                "category_scores": {name: 0.98 if name in flagged else 0.001 for name in MODERATION_CATEGORIES},
            }
        )
    answer = {"id": f"modr-{uuid.uuid4().hex[:24]}", "model": "omni-moderation-latest", "results": results}
    return web.Response(body=orjson.dumps(answer), content_type="application/json")


def create_app(traffic: Traffic | None = None, chunk_delay: float = 0.1) -> web.Application:
    """The fake upstream; serve it at the root and point GATEWAY_UPSTREAM_URL at `<base>/v1`."""
    app = web.Application()
    app[CHUNK_DELAY_KEY] = chunk_delay
    app[TRAFFIC_KEY] = traffic or Traffic()
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/moderations", moderations)
    return app
