"""A fast fake OpenAI upstream for load tests, demos and `docker compose --profile mock`.

    python -m loadtests.mock_upstream --host 127.0.0.1 --port 9000 --latency-ms 0 --chunks 5

Serves `/v1/chat/completions`, `/v1/completions` and `/v1/responses` (JSON, or SSE with
`"stream": true`), `/v1/moderations` (flags any text containing the trigger word, "forbidden"
by default) and `/v1/models`. It ignores credentials and answers every model name, so no key
is needed. Responses are built from small templates; the cost per request is a JSON parse.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from gateway.fake_upstream import MODERATION_CATEGORIES, moderation_inputs

TRIGGER = "forbidden"
REPLY = "Hello from the mock upstream."
FLAGGED_CATEGORY = "violence"
MODELS = ("gpt-4o-mini", "gpt-4o", "omni-moderation-latest")


@dataclass(frozen=True)
class MockConfig:
    latency: float = 0.0
    """Seconds before the response starts."""
    chunks: int = 5
    """Content chunks in a streamed answer."""
    chunk_delay: float = 0.0
    """Seconds between streamed chunks."""
    trigger: str = TRIGGER
    """Moderation flags any text that contains this (case-insensitive)."""


CONFIG_KEY = web.AppKey("config", MockConfig)


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type="application/json")


def _error(status: int, message: str, code: str) -> web.Response:
    return _json({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}, status)


async def _read_object(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _error(400, "The request body is not valid JSON.", "invalid_json")
    if not isinstance(body, dict):
        return _error(400, "The request body must be a JSON object.", "invalid_json")
    return body


async def _pause(request: web.Request) -> MockConfig:
    config = request.app[CONFIG_KEY]
    if config.latency:
        await asyncio.sleep(config.latency)
    return config


def _pieces(config: MockConfig) -> list[str]:
    """REPLY cut into `config.chunks` pieces that add up to it."""
    count = max(1, config.chunks)
    size = -(-len(REPLY) // count)
    pieces = [REPLY[start : start + size] for start in range(0, len(REPLY), size)]
    return pieces + [""] * (count - len(pieces))


async def _sse(request: web.Request, events: Sequence[bytes], config: MockConfig) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    for index, event in enumerate(events):
        if index and config.chunk_delay:
            await asyncio.sleep(config.chunk_delay)
        await response.write(event)
    await response.write_eof()
    return response


def _data(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _usage() -> dict[str, int]:
    return {"prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15}


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await _read_object(request)
    if isinstance(body, web.Response):
        return body
    config = await _pause(request)
    model = str(body.get("model", "gpt-4o-mini"))
    base = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": model}
    if not body.get("stream"):
        message = {"role": "assistant", "content": REPLY, "refusal": None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
        return _json({**base, "object": "chat.completion", "choices": [choice], "usage": _usage()})
    chunk = {**base, "object": "chat.completion.chunk"}
    events = [_data({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})]
    events += [
        _data({**chunk, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
        for piece in _pieces(config)
    ]
    events.append(_data({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        events.append(_data({**chunk, "choices": [], "usage": _usage()}))
    events.append(b"data: [DONE]\n\n")
    return await _sse(request, events, config)


async def completions(request: web.Request) -> web.StreamResponse:
    body = await _read_object(request)
    if isinstance(body, web.Response):
        return body
    config = await _pause(request)
    base = {
        "id": f"cmpl-{uuid.uuid4().hex[:24]}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": str(body.get("model", "gpt-3.5-turbo-instruct")),
    }
    if not body.get("stream"):
        choice = {"index": 0, "text": REPLY, "logprobs": None, "finish_reason": "stop"}
        return _json({**base, "choices": [choice], "usage": _usage()})
    events = [
        _data({**base, "choices": [{"index": 0, "text": piece, "logprobs": None, "finish_reason": None}]})
        for piece in _pieces(config)
    ]
    events.append(b"data: [DONE]\n\n")
    return await _sse(request, events, config)


async def responses(request: web.Request) -> web.StreamResponse:
    body = await _read_object(request)
    if isinstance(body, web.Response):
        return body
    config = await _pause(request)
    response_id = f"resp_{uuid.uuid4().hex}"
    item_id = f"msg_{uuid.uuid4().hex}"
    content = {"type": "output_text", "text": REPLY, "annotations": []}
    message = {"id": item_id, "type": "message", "status": "completed", "role": "assistant", "content": [content]}
    usage = {"input_tokens": 9, "output_tokens": 6, "total_tokens": 15}
    done = {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed",
        "model": str(body.get("model", "gpt-4o-mini")),
        "output": [message],
        "usage": usage,
    }
    if not body.get("stream"):
        return _json(done)

    def event(kind: str, payload: dict[str, Any]) -> bytes:
        return f"event: {kind}\n".encode() + _data({"type": kind, **payload})

    started = {**done, "status": "in_progress", "output": [], "usage": None}
    events = [event("response.created", {"response": started})]
    events += [
        event("response.output_text.delta", {"item_id": item_id, "output_index": 0, "content_index": 0, "delta": piece})
        for piece in _pieces(config)
    ]
    events.append(event("response.completed", {"response": done}))
    return await _sse(request, events, config)


async def moderations(request: web.Request) -> web.StreamResponse:
    body = await _read_object(request)
    if isinstance(body, web.Response):
        return body
    config = await _pause(request)
    trigger = config.trigger.lower()
    results = []
    for texts in moderation_inputs(body.get("input")):
        flagged = any(trigger in text.lower() for text in texts)
        results.append(
            {
                "flagged": flagged,
                "categories": {name: flagged and name == FLAGGED_CATEGORY for name in MODERATION_CATEGORIES},
                "category_scores": {
                    name: 0.99 if flagged and name == FLAGGED_CATEGORY else 0.0001 for name in MODERATION_CATEGORIES
                },
            }
        )
    model = str(body.get("model", "omni-moderation-latest"))
    return _json({"id": f"modr-{uuid.uuid4().hex[:24]}", "model": model, "results": results})


async def models(request: web.Request) -> web.StreamResponse:
    data = [{"id": name, "object": "model", "created": 1700000000, "owned_by": "mock"} for name in MODELS]
    return _json({"object": "list", "data": data})


def create_app(config: MockConfig | None = None) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[CONFIG_KEY] = config or MockConfig()
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/responses", responses)
    app.router.add_post("/v1/moderations", moderations)
    app.router.add_get("/v1/models", models)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.mock_upstream", description="Fake OpenAI upstream.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay before each response starts")
    parser.add_argument("--chunks", type=int, default=5, help="content chunks per streamed answer")
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0, help="delay between streamed chunks")
    parser.add_argument("--trigger", default=TRIGGER, help="word that makes /v1/moderations flag a text")
    args = parser.parse_args(argv)
    config = MockConfig(
        latency=args.latency_ms / 1000, chunks=args.chunks, chunk_delay=args.chunk_delay_ms / 1000, trigger=args.trigger
    )
    # No access log: at load-test rates it would cost more than the answers.
    web.run_app(create_app(config), host=args.host, port=args.port, access_log=None)


if __name__ == "__main__":
    main()
