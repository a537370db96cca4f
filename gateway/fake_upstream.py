"""A fake OpenAI API: the demo's upstream, the tests' recording mock and the load runs' fast one.

    python -m gateway.fake_upstream --port 9000 [--host 0.0.0.0] [--latency-ms 20] [--chunks 5]

It lives in the installed package (`tests/` and `loadtests/` are not shipped) so that
`python -m gateway demo` and compose's `mock` profile run it anywhere the gateway is installed.
No key is needed and every model name is answered. In a test, `with FakeUpstream() as mock:`
serves it from a thread of its own on a loopback port (`mock.url` ends in /v1).

Routes (any other path answers 404 in OpenAI's error shape; a body that is not a JSON object, 400):
- `POST /v1/chat/completions`: a `chat.completion` whose content is `reply` (a `{prompt}` in it
  becomes the last user message); with `"stream": true`, `chunks` `chat.completion.chunk` events
  (the first also carries the role) `chunk_delay` seconds apart, a finish chunk, a usage chunk
  when `stream_options.include_usage`, then `data: [DONE]`. With `"n": N`, N choices: choice i
  says `replies[i]` (default: `reply`); streamed, their chunks alternate, each choice's finish
  chunk right after its last piece.
- `POST /v1/completions`: a `text_completion`, likewise.
- `POST /v1/responses`: a completed `response`; streamed as `response.created`, the text deltas,
  `response.completed`. `GET /v1/responses/resp_mock` (`?stream=true`) reads it back.
- `POST /v1/moderations`: one result per input string (one for a list of multimodal parts). A
  result is flagged when a text or image URL contains a key of `flag_words` (case-insensitive):
  that category is true with score 0.9, every other false with 0.01. A text holding one of
  `fail_words` gets a 500 instead (a detector failing on one window of an answer).
- `GET /v1/models`: the model list.

Benchmark streams: a chat completion whose body names a `"bench_group"` is a stream of `chunks`
chunks, each stamped with `"sent_ns"` (`time.monotonic_ns()` as it is written: one clock for every
process on the machine), one every `chunk_delay` seconds. Its `"bench_members"` twins (2 unless
said) are answered together: chunk i of each, back to back, the order rotating from chunk to
chunk, so a client that sends one twin straight and one through a proxy subtracts two delays
measured at the same moment (gateway/fake_stamped.py; `"bench_text": N` adds N characters of
text to each chunk).

Behaviours, per request with the header `X-Mock: <spec>`, or per path with
`behaviors["/v1/moderations"] = "<spec>"`; a spec is a comma list of:
- `status=429`: answer that status with an OpenAI-shaped error (`code` `mock_<status>`).
- `hang`: never answer. `close`: close the connection without answering.
- `slow-headers=1.5`: wait that long (instead of `latency`), then answer normally.
- `delay=0.3`: the delay between stream chunks. `stall-after=2`: a stream sends that many chunks,
  then goes silent. `drop-after=2`: a stream sends that many chunks, then the connection is cut;
  a JSON answer sends half its `Content-Length`, then is cut.
- `gzip`: a JSON answer gzip-compressed, with `Content-Encoding: gzip`.
- `echo`: answer JSON `{"method", "path", "query", "headers": [[name, value], ...], "body"}`.
- `large=N`: answer N bytes of `application/octet-stream`.
- `redirect`: answer 307 to `/v1/models` with `Set-Cookie: upstream-session=s1`.
- `hop-headers`: a JSON answer also carries hop-by-hop headers (`Connection: keep-alive,
  X-Upstream-Hop`, `X-Upstream-Hop`, `Keep-Alive`) and an end-to-end `X-End-To-End: 1`.

Records: `requests` (with `record`, the default: method, path, raw path, query, headers, body);
`disconnects` counts answers whose client went away, `disconnected` (a threading.Event) is set at
the first, `disconnect_times` holds their `time.monotonic()`; `reset()` clears them and `behaviors`
and restores the knobs given to the constructor.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

from gateway.fake_stamped import StampedGroups

MODEL = "gpt-mock"
REPLY = "Hello from the mock upstream."
FLAG_WORDS = {"forbidden": "violence"}
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
USAGE = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
_SSE = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


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


class _Dropped(asyncio.CancelledError):
    """Raised by a handler that closed its own connection: aiohttp treats it as a quiet disconnect."""


def _parse_spec(spec: str) -> dict[str, str]:
    behaviour: dict[str, str] = {}
    for token in spec.split(","):
        name, _, value = token.strip().partition("=")
        if name:
            behaviour[name.lower()] = value.strip()
    return behaviour


def _error(status: int, message: str, code: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": "mock_error", "param": None, "code": code or f"mock_{status}"}}
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _data(event: Any) -> bytes:
    return b"data: " + orjson.dumps(event) + b"\n\n"


def _last_user_text(payload: dict[str, Any]) -> str:
    messages = payload.get("messages")
    for message in reversed(messages if isinstance(messages, list) else []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
            return str(content or "")
    return ""


def _moderation_groups(raw: Any) -> list[list[str]]:
    """The texts of each result: one per input string, one for a list of multimodal parts."""
    if isinstance(raw, str):
        return [[raw]]
    if isinstance(raw, list) and raw and all(isinstance(item, str) for item in raw):
        return [[item] for item in raw]
    texts: list[str] = []
    for part in raw if isinstance(raw, list) else []:  # multimodal parts are judged together, as OpenAI does
        if isinstance(part, dict) and part.get("type") == "text":
            texts.append(str(part.get("text", "")))
        elif isinstance(part, dict) and isinstance(image := part.get("image_url"), dict):
            texts.append(str(image.get("url", "")))
    return [texts]


class FakeUpstream:
    """An OpenAI-compatible upstream (see the module docstring); `with` serves it from a thread."""

    def __init__(
        self,
        *,
        reply: str = REPLY,
        replies: Sequence[str] = (),
        chunks: int = 4,
        chunk_delay: float = 0.0,
        latency: float = 0.0,
        flag_words: dict[str, str] | None = None,
        record: bool = True,
        sock: socket.socket | None = None,
    ) -> None:
        # `sock`: a bound socket to serve on (a test may bind it early and start serving late).
        self.reply = reply
        self.replies = list(replies)
        self.chunks = chunks
        self.chunk_delay = chunk_delay
        self.latency = latency
        self.flag_words = dict(FLAG_WORDS if flag_words is None else flag_words)
        self.fail_words: set[str] = set()
        self._knobs = (reply, list(replies), chunks, chunk_delay, latency, dict(self.flag_words))
        self.record = record
        self.requests: list[RecordedRequest] = []
        self.behaviors: dict[str, str] = {}
        self.disconnects = 0
        self.disconnect_times: list[float] = []
        self.disconnected = threading.Event()
        self.port = 0
        self._sock = sock
        self._groups = StampedGroups()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._routes = {
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/v1/completions"): self._completion,
            ("POST", "/v1/responses"): self._response,
            ("GET", "/v1/responses/resp_mock"): self._stored,
            ("POST", "/v1/moderations"): self._moderation,
            ("GET", "/v1/models"): self._models,
        }

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The OpenAI base URL, ending in /v1."""
        return f"{self.base_url}/v1"

    def reset(self) -> None:
        """Forget the records and behaviours, and take the constructor's reply, chunks, ... again."""
        self.reply, replies, self.chunks, self.chunk_delay, self.latency, flag_words = self._knobs
        self.replies, self.flag_words = list(replies), dict(flag_words)
        self.fail_words = set()
        self.requests.clear()
        self.behaviors.clear()
        self.disconnects = 0
        self.disconnect_times.clear()
        self.disconnected.clear()

    def app(self) -> web.Application:
        """The aiohttp application; serve it with `handler_cancellation=True` to see disconnects."""
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    # -- serving from a thread ---------------------------------------------------------------------

    def __enter__(self) -> FakeUpstream:
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
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

        self._thread = threading.Thread(target=run, name="fake-upstream", daemon=True)
        self._thread.start()
        started.wait(10)
        if failure:
            raise RuntimeError("the fake upstream failed to start") from failure[0]
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
        self._runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        site: web.BaseSite
        if self._sock is not None:
            site = web.SockSite(self._runner, self._sock)
        else:
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    # -- answering ---------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if self.record:
            url = request.rel_url
            headers = request.headers.copy()
            self.requests.append(
                RecordedRequest(request.method, request.path, url.raw_path, url.raw_query_string, headers, body)
            )
        spec = request.headers.get("X-Mock") or self.behaviors.get(request.path)
        behaviour = _parse_spec(spec) if spec else {}
        try:
            response = await self._answer(request, body, behaviour)
            if "drop-after" in behaviour and isinstance(response, web.Response):
                await self._truncate(request, response)
            return response
        except _Dropped:
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnects += 1
            self.disconnect_times.append(time.monotonic())
            self.disconnected.set()
            raise

    async def _answer(self, request: web.Request, body: bytes, behaviour: dict[str, str]) -> web.StreamResponse:
        if "close" in behaviour:
            return await self._drop(request)
        if "hang" in behaviour:
            await asyncio.Event().wait()
        wait = float(behaviour.get("slow-headers", self.latency))
        if wait:
            await asyncio.sleep(wait)
        if behaviour:
            if "redirect" in behaviour:
                headers = {"Location": "/v1/models", "Set-Cookie": "upstream-session=s1; Path=/"}
                return web.Response(status=307, headers=headers, text="moved")
            if "status" in behaviour:
                status = int(behaviour["status"])
                return _error(status, f"the mock upstream answers {status}")
            if "echo" in behaviour:
                echo: dict[str, Any] = {"method": request.method, "path": request.path}
                echo["query"] = request.rel_url.raw_query_string
                echo["headers"] = [[name, value] for name, value in request.headers.items()]
                echo["body"] = body.decode("utf-8", "replace")
                return self._json(behaviour, echo)
            if "large" in behaviour:
                size = int(behaviour["large"])
                pattern = b"0123456789abcdef" * 4096
                data = (pattern * (size // len(pattern) + 1))[:size]
                return web.Response(body=data, content_type="application/octet-stream")
        route = self._routes.get((request.method, request.path))
        if route is None:
            return _error(404, f"the mock upstream has no route {request.method} {request.path}")
        try:
            payload = orjson.loads(body) if body else {}
        except orjson.JSONDecodeError:
            return _error(400, "The request body is not valid JSON.", "invalid_json")
        if not isinstance(payload, dict):
            return _error(400, "The request body must be a JSON object.", "invalid_json")
        return await route(request, behaviour, payload)

    def _json(self, behaviour: dict[str, str], document: Any) -> web.Response:
        data = orjson.dumps(document)
        headers = {"Content-Type": "application/json", "X-Mock-Upstream": "1"}
        if "gzip" in behaviour:
            data = gzip.compress(data, mtime=0)  # deterministic: tests compare bytes
            headers["Content-Encoding"] = "gzip"
        if "hop-headers" in behaviour:
            headers["Connection"] = "keep-alive, X-Upstream-Hop"
            headers.update({"X-Upstream-Hop": "1", "Keep-Alive": "timeout=5", "X-End-To-End": "1"})
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

    async def _sse(
        self, request: web.Request, behaviour: dict[str, str], pieces: list[bytes], tail: bytes
    ) -> web.StreamResponse:
        """Write `pieces` one event at a time, `delay` apart, then `tail` (the last events) in one go."""
        delay = float(behaviour.get("delay", self.chunk_delay))
        stall_after = int(behaviour["stall-after"]) if "stall-after" in behaviour else None
        drop_after = int(behaviour["drop-after"]) if "drop-after" in behaviour else None
        response = web.StreamResponse(headers=_SSE)
        await response.prepare(request)
        for index, event in enumerate([*pieces, tail]):
            if index == stall_after:
                await asyncio.Event().wait()
            if index == drop_after:
                await asyncio.sleep(0.05)  # let the chunks reach the client before the drop
                await self._drop(request)
            if index and delay:
                await asyncio.sleep(delay)
            await response.write(event)
        await response.write_eof()
        return response

    def _pieces(self, text: str) -> list[str]:
        """`text` cut at spaces into `chunks` pieces that add up to it: the words spread evenly, or
        one a piece and empty pieces after them when there are fewer words than chunks."""
        words = text.split(" ")
        count, total = max(1, self.chunks), len(words)
        ends = [total * i // count if total >= count else min(i, total) for i in range(1, count + 1)]
        pieces, start = [], 0
        for end in ends:
            pieces.append(" ".join(words[start:end]) + (" " if start < end < total else ""))
            start = end
        return pieces

    def _text(self, payload: dict[str, Any]) -> str:
        if "{prompt}" in self.reply:
            return self.reply.replace("{prompt}", _last_user_text(payload))
        return self.reply

    async def _chat(
        self, request: web.Request, behaviour: dict[str, str], payload: dict[str, Any]
    ) -> web.StreamResponse:
        if "bench_group" in payload:
            members = int(payload.get("bench_members", 2))
            text = int(payload.get("bench_text", 0))
            group = str(payload["bench_group"])
            return await self._groups.answer(request, group, members, self.chunks, self.chunk_delay, text)
        base = {"id": "chatcmpl-mock", "created": int(time.time()), "model": str(payload.get("model", MODEL))}
        texts = self._texts(payload)
        if not payload.get("stream"):
            choices = [
                {"index": i, "message": {"role": "assistant", "content": text, "refusal": None}}
                | {"logprobs": None, "finish_reason": "stop"}
                for i, text in enumerate(texts)
            ]
            return self._json(behaviour, {**base, "object": "chat.completion", "choices": choices, "usage": USAGE})
        chunk = {**base, "object": "chat.completion.chunk"}

        def chat_choice(i: int, j: int, piece: str | None) -> dict[str, Any]:
            if piece is None:
                return {"index": i, "delta": {}, "logprobs": None, "finish_reason": "stop"}
            delta = {"role": "assistant", "content": piece} if j == 0 else {"content": piece}
            return {"index": i, "delta": delta, "logprobs": None, "finish_reason": None}

        pieces = [_data({**chunk, "choices": [choice]}) for choice in self._interleaved(texts, chat_choice)]
        tail = b""
        options = payload.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            tail += _data({**chunk, "choices": [], "usage": USAGE})
        return await self._sse(request, behaviour, pieces, tail + b"data: [DONE]\n\n")

    async def _completion(
        self, request: web.Request, behaviour: dict[str, str], payload: dict[str, Any]
    ) -> web.StreamResponse:
        base = {"id": "cmpl-mock", "object": "text_completion", "created": int(time.time())}
        base["model"] = str(payload.get("model", MODEL))
        texts = self._texts(payload)
        if not payload.get("stream"):
            choices = [
                {"index": i, "text": text, "logprobs": None, "finish_reason": "stop"} for i, text in enumerate(texts)
            ]
            return self._json(behaviour, {**base, "choices": choices, "usage": USAGE})

        def text_choice(i: int, j: int, piece: str | None) -> dict[str, Any]:
            return {
                "index": i,
                "text": piece or "",
                "logprobs": None,
                "finish_reason": "stop" if piece is None else None,
            }

        pieces = [_data({**base, "choices": [choice]}) for choice in self._interleaved(texts, text_choice)]
        return await self._sse(request, behaviour, pieces, b"data: [DONE]\n\n")

    def _texts(self, payload: dict[str, Any]) -> list[str]:
        """Each choice's text (`n` of them)."""
        n = payload.get("n")
        count = n if isinstance(n, int) and 1 <= n <= 8 else 1
        return [self.replies[i] if i < len(self.replies) else self._text(payload) for i in range(count)]

    def _interleaved(self, texts: list[str], choice: Any) -> list[dict[str, Any]]:
        """The choices' stream chunks: piece j of each choice in turn, a finish (piece None) after its last."""
        split = [self._pieces(text) for text in texts]
        out = []
        for j in range(max(map(len, split))):
            for i, pieces in enumerate(split):
                if j < len(pieces):
                    out.append(choice(i, j, pieces[j]))
                if j == len(pieces) - 1:
                    out.append(choice(i, j + 1, None))
        return out

    async def _response(
        self, request: web.Request, behaviour: dict[str, str], payload: dict[str, Any]
    ) -> web.StreamResponse:
        text = self._text(payload)
        content = {"type": "output_text", "text": text, "annotations": []}
        message = {
            "type": "message",
            "id": "msg_mock",
            "status": "completed",
            "role": "assistant",
            "content": [content],
        }
        done = {
            "id": "resp_mock",
            "object": "response",
            "created_at": int(time.time()),
            "status": "completed",
            "model": str(payload.get("model", MODEL)),
            "output": [message],
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
        if not payload.get("stream"):
            return self._json(behaviour, done)

        def event(kind: str, fields: dict[str, Any]) -> bytes:
            return f"event: {kind}\n".encode() + _data({"type": kind, **fields})

        started = event(
            "response.created", {"response": {**done, "status": "in_progress", "output": [], "usage": None}}
        )
        deltas = [
            event(
                "response.output_text.delta",
                {"item_id": "msg_mock", "output_index": 0, "content_index": 0} | {"delta": piece},
            )
            for piece in self._pieces(text)
        ]
        return await self._sse(request, behaviour, [started, *deltas], event("response.completed", {"response": done}))

    async def _stored(self, request: web.Request, behaviour: dict[str, str], _: dict[str, Any]) -> web.StreamResponse:
        return await self._response(request, behaviour, {"stream": request.query.get("stream") == "true"})

    async def _moderation(
        self, request: web.Request, behaviour: dict[str, str], payload: dict[str, Any]
    ) -> web.StreamResponse:
        results = []
        groups = _moderation_groups(payload.get("input"))
        if any(word in " ".join(texts).lower() for texts in groups for word in self.fail_words):
            return _error(500, "the mock moderation endpoint fails on this text")
        for texts in groups:
            joined = " ".join(texts).lower()
            hits = {category for word, category in self.flag_words.items() if word.lower() in joined}
            results.append(
                {
                    "flagged": bool(hits),
                    "categories": {name: name in hits for name in MODERATION_CATEGORIES},
                    "category_scores": {name: 0.9 if name in hits else 0.01 for name in MODERATION_CATEGORIES},
                    "category_applied_input_types": {name: ["text"] for name in MODERATION_CATEGORIES},
                }
            )
        model = str(payload.get("model", "omni-moderation-latest"))
        return self._json(behaviour, {"id": "modr-mock", "model": model, "results": results})

    async def _models(
        self, request: web.Request, behaviour: dict[str, str], payload: dict[str, Any]
    ) -> web.StreamResponse:
        data = [{"id": MODEL, "object": "model", "created": 0, "owned_by": "mock"}]
        return self._json(behaviour, {"object": "list", "data": data})


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gateway.fake_upstream", description="A fake OpenAI API.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay before each answer starts")
    parser.add_argument("--chunks", type=int, default=4, help="content chunks per streamed answer")
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0, help="delay between streamed chunks")
    parser.add_argument("--trigger", default="forbidden", help="a word that makes /v1/moderations flag a text")
    args = parser.parse_args(argv)
    upstream = FakeUpstream(
        chunks=args.chunks,
        chunk_delay=args.chunk_delay_ms / 1000,
        latency=args.latency_ms / 1000,
        flag_words={args.trigger: "violence"},
        record=False,  # a load run would keep every request
    )
    # No access log: at load-test rates it would cost more than the answers.
    web.run_app(upstream.app(), host=args.host, port=args.port, access_log=None, handler_cancellation=True)


if __name__ == "__main__":
    main()
