"""Output moderation: the model's answers on the judged routes, judged too (GATEWAY_OUTPUT_MODERATION).

A pure ASGI layer between the moderation middleware and the proxy, built only when the setting
is not `off`: it wraps `send` for POST /v1/chat/completions, /v1/completions and /v1/responses
(and the stored answers read back: /v1/responses/{id}, /v1/chat/completions/{id}) and leaves
every other call alone. A 200 answer in JSON or as server-sent events is judged:

- `audit`: passed on untouched, a copy of its text judged once it has gone (middleware/output_audit.py);
- `block`: a JSON answer held whole, judged, and its flagged text taken out (middleware/output_body.py);
  a stream released in judged windows and cut at a flag (middleware/output_stream.py).

A cut stream stops the proxy by raising `_Cut` from `send`: the proxy closes the upstream call on
its way out, and the stream's last events go to the client after. The upstream is asked for an
uncompressed answer so that its text can be read; one compressed all the same cannot be judged
and follows GATEWAY_MODERATION_FAILURE like a detector failure.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Awaitable, Sequence
from typing import Any, Literal
from urllib.parse import unquote_plus

import orjson
import structlog

from middleware.asgi import ASGIApp, Message, Receive, Scope, Send, header, route_path
from middleware.bodies import compressed
from middleware.budgets import ByteBudget, server_busy
from middleware.errors import GatewayError
from middleware.output_audit import AnswerCopy
from middleware.output_body import Kind, answer_texts, filtered
from middleware.output_judge import OutputJudge, unavailable
from middleware.output_sse import EventTooLarge
from middleware.output_stream import StreamJudge
from middleware.protocols import Verdict
from middleware.routes import match, segments

log = structlog.get_logger("middleware.output")

VIOLATION_HEADER = b"x-gateway-output-violation"
_KINDS: dict[str, Kind] = {"chat/completions": "chat", "completions": "completions", "responses": "responses"}
_FRAMING = (b"content-length", b"transfer-encoding")
_STARTING_AFTER = "starting_after"
# A JSON answer larger than this is not judged (block: GATEWAY_MODERATION_FAILURE decides).
MAX_ANSWER_BYTES = 16 * 1024 * 1024


class _Cut(Exception):
    """Raised from `send` to stop the proxy: it closes the upstream call on the way out."""


class OutputModeration:
    def __init__(
        self,
        app: ASGIApp,
        judge: OutputJudge,
        *,
        holdback: int,
        budget: ByteBudget,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
    ) -> None:
        self.app = app
        self.judge = judge
        self.holdback = holdback
        self.budget = budget  # shared with the request bodies: GATEWAY_MAX_BUFFERED_BYTES bounds both
        self.max_answer_bytes = max_answer_bytes

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] != "http":
            return self.app(scope, receive, send)
        path = route_path(scope)
        root: str = scope.get("root_path", "")
        route = match(scope["method"], path)
        kind = _KINDS.get(route.name) if route is not None else _read_back(path)
        if kind is None:
            return self.app(scope, receive, send)
        if route is None and self.judge.mode == "block" and _starts_after(scope):
            return GatewayError(
                400,
                "invalid_request",
                "A stored answer read back under output moderation (block) cannot start part way: "
                "leave out starting_after.",
                param=_STARTING_AFTER,
            ).send(send)
        return self._call(scope, receive, send, kind, root + "/" + "/".join(segments(path)))

    async def _call(self, scope: Scope, receive: Receive, send: Send, kind: Kind, path: str) -> None:
        authorization = header(scope, b"authorization")
        scope = dict(scope)
        headers = [(name, value) for name, value in scope["headers"] if name != b"accept-encoding"]
        scope["headers"] = [*headers, (b"accept-encoding", b"identity")]
        answer = (_Blocking if self.judge.mode == "block" else _Auditing)(self, kind, send, authorization)
        try:
            with contextlib.suppress(_Cut):
                await self.app(scope, receive, answer.send)
            await answer.finish()
        finally:
            answer.release()
        state = scope.get("state")
        note: dict[str, Any] = state if isinstance(state, dict) else {}
        for verdict in answer.flags:
            await self.judge.record(note.get("user_id"), verdict, path, note.get("app"))


def _read_back(path: str) -> Kind | None:
    """A stored answer read again (`GET /v1/responses/{id}`, its `?stream=true`, a stored chat
    completion): judged like the answer itself, or the text cut from a stream would be one call away."""
    found = segments(path)
    if len(found) == 2 and found[0] == "responses":
        return "responses"
    if len(found) == 3 and found[:2] == ("chat", "completions"):
        return "chat"
    return None


def _starts_after(scope: Scope) -> bool:
    """Whether a read-back names `starting_after`: its replay would start the judge mid-text with
    no overlap, so a client could split a flagged phrase between two calls."""
    query = bytes(scope.get("query_string", b"")).decode("latin-1")
    return any(unquote_plus(part.partition("=")[0]) == _STARTING_AFTER for part in re.split(r"[&;]", query))


def _shape(message: Message) -> Literal["json", "stream", "other"] | None:
    """How a response start's answer is judged: as JSON, as a stream, not at all (None: not a
    200), or it cannot be ("other": an SDK would still read its body as one of the two)."""
    if message.get("status") != 200:
        return None
    content_type = b""
    for name, value in message.get("headers", ()):
        if name.lower() == b"content-type":
            content_type = bytes(value).split(b";")[0].strip().lower()
    if content_type == b"application/json":
        return "json"
    if content_type == b"text/event-stream":
        return "stream"
    return "other"


def _compressed(message: Message) -> bool:
    return any(
        name.lower() == b"content-encoding" and compressed(bytes(value)) for name, value in message.get("headers", ())
    )


class _Answer:
    def __init__(self, layer: OutputModeration, kind: Kind, send: Send, authorization: bytes | None) -> None:
        self.layer = layer
        self.kind = kind
        self.client = send
        self.authorization = authorization
        self.flags: list[Verdict] = []

    async def judged(self, texts: Sequence[str]) -> Verdict | None:
        return await self.layer.judge.judge(texts, self.authorization)

    async def send(self, message: Message) -> None:
        raise NotImplementedError

    async def finish(self) -> None:
        """After the proxy returned (or was cut)."""

    def release(self) -> None:
        """Give back what the answer held of the byte budget."""


class _Auditing(_Answer):
    copy: AnswerCopy | None = None

    async def send(self, message: Message) -> None:
        await self.client(message)
        if message["type"] == "http.response.start":
            shape = _shape(message)
            if (shape == "json" or shape == "stream") and not _compressed(message):
                self.copy = AnswerCopy(self.kind, shape, self.layer.max_answer_bytes, self.layer.budget)
        elif self.copy is not None:
            self.copy.add(message.get("body", b""))

    async def finish(self) -> None:
        if self.copy is None:
            return
        if not self.copy.whole:
            log.warning("output_not_judged_whole", kind=self.kind, limit=self.layer.max_answer_bytes)
        for text in self.copy.texts():  # each choice on its own
            verdict = await self.judged((text,))
            if verdict is not None:
                self.flags.append(verdict)

    def release(self) -> None:
        if self.copy is not None:
            self.copy.release()


class _Blocking(_Answer):
    start: Message | None = None
    stream: StreamJudge | None = None

    def __init__(self, layer: OutputModeration, kind: Kind, send: Send, authorization: bytes | None) -> None:
        super().__init__(layer, kind, send, authorization)
        self.body = bytearray()
        self.held = 0  # of the byte budget

    def release(self) -> None:
        self.layer.budget.give(self.held)
        self.held = 0

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            shape = _shape(message)
            if shape == "other":
                await self._unjudgeable(message, "the upstream answered neither JSON nor server-sent events")
            elif shape is not None and _compressed(message):
                await self._unjudgeable(message, "the upstream answered compressed")
            elif shape == "json":
                self.start = message  # held with the body until it is judged
            else:
                if shape == "stream":
                    self.stream = StreamJudge(self.kind, self.judged, self.layer.holdback)
                await self.client(message)
            return
        if message["type"] != "http.response.body":
            await self.client(message)
            return
        body: bytes = message.get("body", b"")
        more = bool(message.get("more_body", False))
        if self.stream is not None:
            await self._stream(body, more)
        elif self.start is not None:
            await self._json(body, more)
        else:
            await self.client(message)

    async def _stream(self, body: bytes, more: bool) -> None:
        stream = self.stream
        assert stream is not None
        try:
            out = await stream.feed(body) if body else b""
            if not more and not stream.cut:
                out += await stream.end()
        except EventTooLarge:
            stream.flags.append(unavailable(()))
        if stream.cut:
            raise _Cut
        if out or not more:
            await self.client({"type": "http.response.body", "body": out, "more_body": more})

    async def _json(self, body: bytes, more: bool) -> None:
        if len(self.body) + len(body) > self.layer.max_answer_bytes:
            start, self.start = self.start, None
            assert start is not None
            await self._unjudgeable(
                start, f"the answer is larger than {self.layer.max_answer_bytes} bytes", bytes(self.body)
            )
            self.body.clear()
            await self.client({"type": "http.response.body", "body": body, "more_body": more})
            return
        try:
            self.layer.budget.take(len(body))
        except GatewayError:
            self.start = None
            await server_busy("bodies held in memory").send(self.client)
            raise _Cut from None
        self.held += len(body)
        self.body += body
        if more:
            return
        start, self.start = self.start, None
        assert start is not None
        body = bytes(self.body)
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            await self._unjudgeable(start, "its JSON does not parse", body)  # closed: raises
            await self.client({"type": "http.response.body", "body": b""})
            return
        flagged: dict[int, Verdict] = {}
        for index, text in answer_texts(self.kind, document).items():
            verdict = await self.judged((text,))
            if verdict is not None:
                flagged[index] = verdict
        headers = list(start.get("headers", ()))
        if flagged:
            assert isinstance(document, dict)
            body = orjson.dumps(filtered(self.kind, document, set(flagged)))
            categories = ",".join(dict.fromkeys(c for v in flagged.values() for c in v.categories))
            headers = [(name, value) for name, value in headers if name.lower() not in _FRAMING]
            headers += [(b"content-length", str(len(body)).encode()), (VIOLATION_HEADER, categories.encode())]
            self.flags.extend(flagged.values())
        await self.client({**start, "headers": headers})
        await self.client({"type": "http.response.body", "body": body})

    async def _unjudgeable(self, start: Message, why: str, held: bytes = b"") -> None:
        """An answer that cannot be judged: refused (failure mode closed) or passed on (open)."""
        if self.layer.judge.failure == "closed":
            self.flags.append(unavailable(()))
            await GatewayError(
                502, "output_unjudgeable", f"The answer could not be judged by output moderation: {why}."
            ).send(self.client)
            raise _Cut
        await self.client(start)
        if held:
            await self.client({"type": "http.response.body", "body": held, "more_body": True})

    async def finish(self) -> None:
        stream = self.stream
        if stream is not None and stream.cut:
            out = await stream.finale()
            await self.client({"type": "http.response.body", "body": out})
            self.flags.extend(stream.flags)
