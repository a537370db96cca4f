"""A fake OpenAI API: the demo's upstream, the tests' recording mock and the load runs' fast one.

    python -m gateway.fake_upstream --port 9000 [--host 0.0.0.0] [--latency-ms 20] [--chunks 5]

It lives in the installed package (`tests/` and `loadtests/` are not shipped) so that
`python -m gateway demo` and compose's `mock` profile run it anywhere the gateway is installed.
No key is needed and every model name is answered. In a test, `with FakeUpstream() as mock:`
serves it from a thread of its own on a loopback port (`mock.url` ends in /v1).

Routes: `POST /v1/chat/completions`, `/v1/completions`, `/v1/responses`, `/v1/moderations`;
`GET /v1/responses/resp_mock`, `/v1/chat/completions/chatcmpl-mock`, `/v1/models`; what each
answers is gateway/fake_answers.py. Any other path answers 404 in OpenAI's error shape; a body
that is not a JSON object, 400.

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

from gateway import fake_answers as answers
from gateway.fake_answers import FLAG_WORDS, REPLY
from gateway.fake_stamped import StampedGroups


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
            ("GET", "/v1/chat/completions/chatcmpl-mock"): self._stored_chat,
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
        response = web.StreamResponse(headers=answers.SSE_HEADERS)
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

    async def _chat(
        self, request: web.Request, behaviour: dict[str, str], payload: dict[str, Any]
    ) -> web.StreamResponse:
        if "bench_group" in payload:
            members = int(payload.get("bench_members", 2))
            text = int(payload.get("bench_text", 0))
            group = str(payload["bench_group"])
            return await self._groups.answer(request, group, members, self.chunks, self.chunk_delay, text)
        texts = answers.choice_texts(payload, self.reply, self.replies)
        if not payload.get("stream"):
            return self._json(behaviour, answers.chat_completion(payload, texts))
        return await self._sse(request, behaviour, *answers.chat_chunks(payload, texts, self.chunks))

    async def _completion(
        self, request: web.Request, behaviour: dict[str, str], payload: dict[str, Any]
    ) -> web.StreamResponse:
        texts = answers.choice_texts(payload, self.reply, self.replies)
        if not payload.get("stream"):
            return self._json(behaviour, answers.completion(payload, texts))
        return await self._sse(request, behaviour, *answers.completion_chunks(payload, texts, self.chunks))

    async def _response(
        self, request: web.Request, behaviour: dict[str, str], payload: dict[str, Any]
    ) -> web.StreamResponse:
        text = answers.reply_text(payload, self.reply)
        done = answers.response(payload, text)
        if not payload.get("stream"):
            return self._json(behaviour, done)
        return await self._sse(request, behaviour, *answers.response_events(done, text, self.chunks))

    async def _stored(self, request: web.Request, behaviour: dict[str, str], _: dict[str, Any]) -> web.StreamResponse:
        return await self._response(request, behaviour, {"stream": request.query.get("stream") == "true"})

    async def _stored_chat(
        self, request: web.Request, behaviour: dict[str, str], _: dict[str, Any]
    ) -> web.StreamResponse:
        return self._json(behaviour, answers.chat_completion({}, [self.reply]))

    async def _moderation(
        self, request: web.Request, behaviour: dict[str, str], payload: dict[str, Any]
    ) -> web.StreamResponse:
        groups = answers.moderation_groups(payload.get("input"))
        if answers.moderation_fails(groups, self.fail_words):
            return _error(500, "the mock moderation endpoint fails on this text")
        return self._json(behaviour, answers.moderation(payload, groups, self.flag_words))

    async def _models(
        self, request: web.Request, behaviour: dict[str, str], payload: dict[str, Any]
    ) -> web.StreamResponse:
        return self._json(behaviour, answers.models())


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
