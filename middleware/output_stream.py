"""A streamed answer judged in windows before the client sees it (GATEWAY_OUTPUT_MODERATION=block).

The upstream's events are queued as they came and released in order, byte for byte, once the
text they carry is cleared. Each text (a chat or completion choice, a response's content part)
is held until `holdback` characters wait or it ends, then judged together with the last
`holdback` characters already cleared, so a phrase split across chunks or windows is still
seen whole. Events without text (a role, tool calls, usage, a response's bookkeeping) wait
behind the text before them, so the order never changes.

On a flag nothing more of the upstream is taken: the texts of other choices still held are
judged on their own and released when clean, and the stream ends with `finish_reason:
"content_filter"` for each choice that had not finished and `data: [DONE]` (a response:
`response.incomplete` with `incomplete_details.reason: "content_filter"`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from middleware.output_body import Kind, int_or
from middleware.output_sse import Event, SseReader
from middleware.protocols import Verdict

type Key = tuple[int, int]  # (choice, 0); a response's (output_index, content_index)
type Judge = Callable[[Sequence[str]], Awaitable[Verdict | None]]

MAX_EVENT_BYTES = 1024 * 1024
_RESPONSE_ENDS = frozenset({"response.completed", "response.incomplete", "response.failed"})
_DONE = b"data: [DONE]\n\n"


@dataclass(slots=True)
class _Text:
    pending: str = ""  # received, not judged yet
    total: int = 0  # characters received
    cleared: int = 0  # characters judged clean (released with their events)
    tail: str = ""  # the last characters cleared: the next window's overlap
    finished: bool = False  # its end came (a finish_reason, a response's text done)
    ended: bool = False  # the event with its end was released
    verdict: Verdict | None = None  # flagged: nothing more of it goes out


@dataclass(slots=True)
class _Held:
    raw: bytes
    needs: dict[Key, int]  # released once each text is cleared up to here
    finishes: tuple[Key, ...] = ()


@dataclass(slots=True)
class Found:
    """What one event says of the texts: new text by key, the keys it ends, whether it ends all."""

    texts: list[tuple[Key, str]] = field(default_factory=list)
    finishes: list[Key] = field(default_factory=list)
    ends_all: bool = False


def found_in(kind: Kind, data: Any) -> Found:
    """The text an event's JSON data carries (and ends), for the judged routes' streams."""
    found = Found()
    if not isinstance(data, dict):
        return found
    if kind == "responses":
        kind_of = data.get("type")
        key = (int_or(data.get("output_index")), int_or(data.get("content_index")))
        if kind_of == "response.output_text.delta" and isinstance(data.get("delta"), str):
            found.texts.append((key, data["delta"]))
        elif kind_of == "response.output_text.done":
            found.finishes.append(key)
        elif kind_of in _RESPONSE_ENDS:
            found.ends_all = True
        return found
    choices = data.get("choices")
    for position, choice in enumerate(choices if isinstance(choices, list) else []):
        if not isinstance(choice, dict):
            continue
        key = (int_or(choice.get("index"), position), 0)
        if kind == "chat":
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else None
        else:
            text = choice.get("text")
        found.texts.append((key, text if isinstance(text, str) else ""))
        if choice.get("finish_reason") is not None:
            found.finishes.append(key)
    return found


def data_of(event: Event) -> Any:
    if event.data is None or event.data == b"[DONE]":
        return None
    try:
        return orjson.loads(event.data)
    except orjson.JSONDecodeError:
        return None


class StreamJudge:
    """Takes the upstream's body chunks, gives back the bytes the client may have now."""

    def __init__(self, kind: Kind, judge: Judge, holdback: int) -> None:
        self._kind = kind
        self._judge = judge
        self._holdback = holdback
        self._reader = SseReader(MAX_EVENT_BYTES)
        self._texts: dict[Key, _Text] = {}
        self._queue: deque[_Held] = deque()
        self._last: dict[str, Any] = {}  # the last chunk (chat, completions) or response seen
        self._sequence: int | None = None
        self.flags: list[Verdict] = []  # set: the stream is cut

    @property
    def cut(self) -> bool:
        return bool(self.flags)

    async def feed(self, chunk: bytes) -> bytes:
        """The bytes cleared by this chunk (raises EventTooLarge for an event that never ends)."""
        for event in self._reader.feed(chunk):
            await self._take(event)
            if self.cut:
                return b""
        return self._release()

    async def end(self) -> bytes:
        """The upstream's body ended: the rest judged, and all of it that is clean."""
        rest = self._reader.rest()
        if rest is not None:
            await self._take(rest)
        for key, text in self._texts.items():
            if self.cut:
                return b""
            if text.pending:
                await self._window(key, text)
        return b"" if self.cut else self._release()

    async def finale(self) -> bytes:
        """After a flag: the other choices' held text judged on its own, what is clean, and the end."""
        for key, text in self._texts.items():
            if text.verdict is None and text.pending:
                await self._window(key, text)
        out = bytearray()
        dropped = False
        for held in self._queue:  # in order; the flagged window's events and all of that text after it dropped
            clean = all(self._texts[key].cleared >= upto for key, upto in held.needs.items())
            # an event tied to no text (a response's item done, quoting it whole) only before any drop
            if clean and (held.needs or not dropped):
                out += held.raw
                for key in held.finishes:
                    self._texts[key].ended = True
            else:
                dropped = True
        self._queue.clear()
        if self._kind == "responses":
            return bytes(out + self._incomplete())
        for (index, _), text in self._texts.items():
            if not text.ended:
                out += self._content_filter(index)
        return bytes(out + _DONE)

    async def _take(self, event: Event) -> None:
        data = data_of(event)
        found = found_in(self._kind, data)
        if isinstance(data, dict):
            self._remember(data)
        if found.ends_all or event.data == b"[DONE]":
            found.finishes = list(self._texts)
        touched: dict[Key, _Text] = {}
        paused: set[Key] = set()  # an event of the text without text (tool calls): judge what waits now
        for key, piece in found.texts:
            text = touched[key] = self._texts.setdefault(key, _Text())
            if piece:
                text.pending += piece
                text.total += len(piece)
            else:
                paused.add(key)
        for key in found.finishes:
            text = touched[key] = self._texts.setdefault(key, _Text())
            text.finished = True
        needs = {key: text.total for key, text in touched.items()}
        self._queue.append(_Held(event.raw, needs, tuple(found.finishes)))
        for key, text in touched.items():
            if text.pending and (text.finished or key in paused or len(text.pending) >= self._holdback):
                await self._window(key, text)
                if self.cut:
                    return

    async def _window(self, key: Key, text: _Text) -> None:
        window = text.tail + text.pending
        verdict = await self._judge((window,))
        if verdict is not None:
            text.verdict = verdict
            self.flags.append(verdict)
            return
        text.cleared = text.total
        text.tail = window[-self._holdback :]
        text.pending = ""

    def _release(self) -> bytes:
        out = bytearray()
        queue, texts = self._queue, self._texts
        while queue:
            held = queue[0]
            if any(texts[key].cleared < upto for key, upto in held.needs.items()):
                break
            queue.popleft()
            out += held.raw
            for key in held.finishes:
                texts[key].ended = True
        return bytes(out)

    def _remember(self, data: dict[str, Any]) -> None:
        if self._kind == "responses":
            if isinstance(data.get("response"), dict):
                self._last = data["response"]
            if isinstance(data.get("sequence_number"), int):
                self._sequence = data["sequence_number"]
        elif "choices" in data:
            self._last = {name: value for name, value in data.items() if name not in ("choices", "usage")}

    def _content_filter(self, index: int) -> bytes:
        if self._kind == "chat":
            choice = {"index": index, "delta": {}, "logprobs": None, "finish_reason": "content_filter"}
        else:
            choice = {"index": index, "text": "", "logprobs": None, "finish_reason": "content_filter"}
        return b"data: " + orjson.dumps({**self._last, "choices": [choice]}) + b"\n\n"

    def _incomplete(self) -> bytes:
        response = {
            **self._last,
            "status": "incomplete",
            "incomplete_details": {"reason": "content_filter"},
            "output": [],
        }
        event: dict[str, Any] = {"type": "response.incomplete", "response": response}
        if self._sequence is not None:
            event["sequence_number"] = self._sequence + 1
        return b"event: response.incomplete\ndata: " + orjson.dumps(event) + b"\n\n"
