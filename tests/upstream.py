"""A real mock OpenAI-compatible upstream for tests: an aiohttp server on a loopback port.

    with MockUpstream() as mock:
        settings = Settings(_env_file=None, upstream_url=mock.url, ...)
        ...
        assert mock.requests[-1].path == "/v1/chat/completions"

It runs in its own thread and event loop, so sync and async tests can use it alike.

Routes (any other path answers 404 with an OpenAI-shaped error):
- `POST /v1/chat/completions`: a `chat.completion` whose content is `mock.reply`; with
  `"stream": true` an SSE stream of `mock.chunks` `chat.completion.chunk` events carrying the
  content pieces, `mock.chunk_delay` seconds apart, then a finish chunk and `data: [DONE]`.
- `POST /v1/completions`: a `text_completion`, streamed the same way with `"stream": true`.
- `POST /v1/responses`: a completed `response` with one output message.
- `POST /v1/moderations`: the OpenAI moderation shape, one result per input string (one for
  a list of multimodal parts). A result is flagged when a text (or an image URL) contains a
  key of `mock.flag_words` (case-insensitive; default `{"forbidden": "violence"}`): that
  category is true with score 0.9; everything else is false with score 0.01.
- `GET /v1/models`: a model list.

Behaviours, chosen per request with the header `X-Mock: <spec>`, or per path with
`mock.behaviors["/v1/moderations"] = "<spec>"` (for calls whose headers a test cannot set).
A spec is a comma list of tokens:
- `status=429`: answer that status with an OpenAI-shaped error body (`code` `mock_<status>`).
- `hang`: never answer.
- `slow-headers=1.5`: wait that long, then answer normally.
- `delay=0.3`: the delay between stream chunks for this request.
- `stall-after=2`: a stream sends that many chunks, then goes silent forever.
- `drop-after=2`: a stream sends that many chunks, then the connection is closed abruptly;
  a JSON answer sends half its `Content-Length`, then closes.
- `close`: close the connection without answering.
- `gzip`: the JSON answer is gzip-compressed, with `Content-Encoding: gzip`.
- `echo`: answer JSON `{"method", "path", "query", "headers": [[name, value], ...], "body"}`.
- `large=N`: answer N bytes of `application/octet-stream` (a repeating pattern).
- `redirect`: answer `307` with `Location: /v1/models` and `Set-Cookie: upstream-session=s1`.
- `hop-headers`: a JSON answer also carries hop-by-hop headers (`Connection: keep-alive,
  X-Upstream-Hop`, `X-Upstream-Hop`, `Keep-Alive`) and an end-to-end `X-End-To-End: 1`.

Records: `mock.requests` (every request, in arrival order: method, path, raw path, query string,
headers, body); `mock.disconnects` counts handlers that saw their client go away while
answering (a hang, a stall, a slow stream) and `mock.disconnected` (a threading.Event) is set
at the first; `mock.disconnect_times` holds their `time.monotonic()`. `mock.reset()` clears
the records and behaviours.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

from gateway.fake_upstream import MODERATION_CATEGORIES


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str  # decoded, e.g. /v1/chat/completions
    raw_path: str  # as sent, percent-encoding kept, without the query
    query_string: str  # raw, without the "?"
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


def _parse_spec(spec: str) -> dict[str, str]:
    behaviour: dict[str, str] = {}
    for token in spec.split(","):
        name, _, value = token.strip().partition("=")
        if name:
            behaviour[name.lower()] = value.strip()
    return behaviour


def _error(status: int, message: str) -> web.Response:
    body = {"error": {"message": message, "type": "mock_error", "param": None, "code": f"mock_{status}"}}
    return web.json_response(body, status=status)


class MockUpstream:
    """An OpenAI-compatible upstream on 127.0.0.1 (see the module docstring for its knobs)."""

    def __init__(self, sock: socket.socket | None = None) -> None:
        # `sock`: a bound socket to serve on (a test may bind it early and start serving late).
        self._sock = sock
        self.requests: list[RecordedRequest] = []
        self.behaviors: dict[str, str] = {}
        self.reply = "Hello from the mock upstream."
        self.chunks = 4
        self.chunk_delay = 0.0
        self.flag_words: dict[str, str] = {"forbidden": "violence"}
        self.disconnects = 0
        self.disconnect_times: list[float] = []
        self.disconnected = threading.Event()
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The OpenAI base URL, ending in /v1."""
        return f"{self.base_url}/v1"

    def reset(self) -> None:
        self.requests.clear()
        self.behaviors.clear()
        self.disconnects = 0
        self.disconnect_times.clear()
        self.disconnected.clear()

    def __enter__(self) -> MockUpstream:
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._start())
            except BaseException as exc:
                failure.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="mock-upstream", daemon=True)
        self._thread.start()
        started.wait(10)
        if failure:
            raise RuntimeError("the mock upstream failed to start") from failure[0]
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        loop, runner = self._loop, self._runner
        if loop is None or runner is None or self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(10)

    async def _start(self) -> None:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # handler_cancellation: a handler learns that its client went away while it waits.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        site: web.BaseSite
        if self._sock is not None:
            site = web.SockSite(self._runner, self._sock)
        else:
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        address = self._runner.addresses[0]
        self.port = int(address[1])

    def _saw_disconnect(self) -> None:
        self.disconnects += 1
        self.disconnect_times.append(time.monotonic())
        self.disconnected.set()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(
            RecordedRequest(
                method=request.method,
                path=request.path,
                raw_path=request.rel_url.raw_path,
                query_string=request.rel_url.raw_query_string,
                headers=request.headers.copy(),
                body=body,
            )
        )
        spec = request.headers.get("X-Mock") or self.behaviors.get(request.path, "")
        behaviour = _parse_spec(spec)
        try:
            response = await self._answer(request, body, behaviour)
            if "drop-after" in behaviour and isinstance(response, web.Response):
                await self._truncate(request, response)
            return response
        except _Dropped:
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            self._saw_disconnect()
            raise

    async def _answer(self, request: web.Request, body: bytes, behaviour: dict[str, str]) -> web.StreamResponse:
        if "close" in behaviour:
            return await self._drop(request)
        if "hang" in behaviour:
            await asyncio.Event().wait()
        if "slow-headers" in behaviour:
            await asyncio.sleep(float(behaviour["slow-headers"]))
        if "redirect" in behaviour:
            headers = {"Location": "/v1/models", "Set-Cookie": "upstream-session=s1; Path=/"}
            return web.Response(status=307, headers=headers, text="moved")
        if "status" in behaviour:
            status = int(behaviour["status"])
            return _error(status, f"the mock upstream answers {status}")
        if "echo" in behaviour:
            return self._json(
                request,
                behaviour,
                {
                    "method": request.method,
                    "path": request.path,
                    "query": request.rel_url.raw_query_string,
                    "headers": [[name, value] for name, value in request.headers.items()],
                    "body": body.decode("utf-8", "replace"),
                },
            )
        if "large" in behaviour:
            size = int(behaviour["large"])
            pattern = b"0123456789abcdef" * 4096
            data = (pattern * (size // len(pattern) + 1))[:size]
            return web.Response(body=data, content_type="application/octet-stream")
        return await self._route(request, body, behaviour)

    async def _route(self, request: web.Request, body: bytes, behaviour: dict[str, str]) -> web.StreamResponse:
        route = (request.method, request.path)
        payload: dict[str, Any] = orjson.loads(body) if body and request.method == "POST" else {}
        model = str(payload.get("model", "gpt-mock"))
        if route == ("POST", "/v1/chat/completions"):
            if payload.get("stream"):
                return await self._stream(request, behaviour, model, chat=True)
            return self._json(request, behaviour, self._chat_completion(model))
        if route == ("POST", "/v1/completions"):
            if payload.get("stream"):
                return await self._stream(request, behaviour, model, chat=False)
            return self._json(request, behaviour, self._completion(model))
        if route == ("POST", "/v1/responses"):
            return self._json(request, behaviour, self._response(model))
        if route == ("POST", "/v1/moderations"):
            return self._json(request, behaviour, self._moderation(payload))
        if route == ("GET", "/v1/models"):
            models = [{"id": name, "object": "model", "created": 0, "owned_by": "mock"} for name in ("gpt-mock",)]
            return self._json(request, behaviour, {"object": "list", "data": models})
        return _error(404, f"the mock upstream has no route {request.method} {request.path}")

    def _json(self, request: web.Request, behaviour: dict[str, str], document: Any) -> web.StreamResponse:
        data = orjson.dumps(document)
        headers = {"Content-Type": "application/json", "X-Mock-Upstream": "1"}
        if "gzip" in behaviour:
            data = gzip.compress(data, mtime=0)  # deterministic: tests compare bytes
            headers["Content-Encoding"] = "gzip"
        if "hop-headers" in behaviour:
            headers.update(
                {
                    "Connection": "keep-alive, X-Upstream-Hop",
                    "X-Upstream-Hop": "1",
                    "Keep-Alive": "timeout=5",
                    "X-End-To-End": "1",
                }
            )
        return web.Response(body=data, headers=headers)

    async def _truncate(self, request: web.Request, full: web.Response) -> None:
        data = full.body
        assert isinstance(data, bytes)
        response = web.StreamResponse(status=full.status, headers=full.headers)
        response.content_length = len(data)
        await response.prepare(request)
        await response.write(data[: len(data) // 2])
        await asyncio.sleep(0.05)  # let the half reach the client before the drop
        await self._drop(request)

    async def _drop(self, request: web.Request) -> web.StreamResponse:
        if request.transport is not None:
            request.transport.abort()
        raise _Dropped

    def _pieces(self) -> list[str]:
        words = self.reply.split(" ")
        count = max(1, self.chunks)
        size = -(-len(words) // count)
        pieces = [" ".join(words[i : i + size]) for i in range(0, len(words), size)]
        pieces = [piece + (" " if i < len(pieces) - 1 else "") for i, piece in enumerate(pieces)]
        return pieces + [""] * (count - len(pieces))

    async def _stream(
        self, request: web.Request, behaviour: dict[str, str], model: str, *, chat: bool
    ) -> web.StreamResponse:
        delay = float(behaviour.get("delay", self.chunk_delay))
        stall_after = int(behaviour["stall-after"]) if "stall-after" in behaviour else None
        drop_after = int(behaviour["drop-after"]) if "drop-after" in behaviour else None
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        for index, piece in enumerate(self._pieces()):
            if index == stall_after:
                await asyncio.Event().wait()
            if index == drop_after:
                await asyncio.sleep(0.05)  # let the chunks reach the client before the drop
                await self._drop(request)
            if index and delay:
                await asyncio.sleep(delay)
            event = self._chat_chunk(model, piece, index) if chat else self._completion_chunk(model, piece)
            await response.write(b"data: " + orjson.dumps(event) + b"\n\n")
        if delay:
            await asyncio.sleep(delay)
        final = self._chat_chunk(model, None, -1) if chat else self._completion_chunk(model, None)
        await response.write(b"data: " + orjson.dumps(final) + b"\n\ndata: [DONE]\n\n")
        await response.write_eof()
        return response

    def _chat_completion(self, model: str) -> dict[str, Any]:
        return {
            "id": "chatcmpl-mock",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": self.reply, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
        }

    def _chat_chunk(self, model: str, piece: str | None, index: int) -> dict[str, Any]:
        delta: dict[str, Any] = {} if piece is None else {"content": piece}
        if index == 0:
            delta["role"] = "assistant"
        return {
            "id": "chatcmpl-mock",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": "stop" if piece is None else None}
            ],
        }

    def _completion(self, model: str) -> dict[str, Any]:
        return {
            "id": "cmpl-mock",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "text": self.reply, "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
        }

    def _completion_chunk(self, model: str, piece: str | None) -> dict[str, Any]:
        return {
            "id": "cmpl-mock",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": "stop" if piece is None else None}
            ],
        }

    def _response(self, model: str) -> dict[str, Any]:
        return {
            "id": "resp_mock",
            "object": "response",
            "created_at": int(time.time()),
            "status": "completed",
            "model": model,
            "output": [
                {
                    "type": "message",
                    "id": "msg_mock",
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": self.reply, "annotations": []}],
                }
            ],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": {
                "input_tokens": 5,
                "output_tokens": 7,
                "total_tokens": 12,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens_details": {"reasoning_tokens": 0},
            },
        }

    def _moderation(self, payload: dict[str, Any]) -> dict[str, Any]:
        raw = payload.get("input", "")
        groups: list[list[str]]
        if isinstance(raw, str):
            groups = [[raw]]
        elif raw and all(isinstance(item, str) for item in raw):
            groups = [[item] for item in raw]
        else:
            # multimodal parts are judged together, as OpenAI does
            texts: list[str] = []
            for part in raw or []:
                if part.get("type") == "text":
                    texts.append(str(part.get("text", "")))
                elif part.get("type") == "image_url":
                    texts.append(str(part.get("image_url", {}).get("url", "")))
            groups = [texts]
        return {
            "id": "modr-mock",
            "model": str(payload.get("model", "omni-moderation-latest")),
            "results": [self._moderation_result(texts) for texts in groups],
        }

    def _moderation_result(self, texts: list[str]) -> dict[str, Any]:
        joined = " ".join(texts).lower()
        hits = {category for word, category in self.flag_words.items() if word.lower() in joined}
        return {
            "flagged": bool(hits),
            "categories": {category: category in hits for category in MODERATION_CATEGORIES},
            "category_scores": {category: 0.9 if category in hits else 0.01 for category in MODERATION_CATEGORIES},
            "category_applied_input_types": {category: ["text"] for category in MODERATION_CATEGORIES},
        }


class _Dropped(asyncio.CancelledError):
    """Raised by a handler that closed its own connection: aiohttp treats it as a quiet disconnect."""
