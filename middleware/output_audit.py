"""GATEWAY_OUTPUT_MODERATION=audit: a copy of the answer's text, taken as it passes, judged after it.

Nothing is held: each body chunk goes to the client first and is read here after. A JSON answer
is kept (up to `limit` bytes, within the shared byte budget) and read at its end; a stream's
events are read as they pass and only their text kept, by choice (up to `limit` characters each).
"""

from __future__ import annotations

from typing import Literal

import orjson

from middleware.budgets import ByteBudget
from middleware.errors import GatewayError
from middleware.output_body import Kind, answer_texts
from middleware.output_sse import EventTooLarge, SseReader
from middleware.output_stream import MAX_EVENT_BYTES, Key, data_of, found_in


class AnswerCopy:
    def __init__(self, kind: Kind, shape: Literal["json", "stream"], limit: int, budget: ByteBudget) -> None:
        self._kind = kind
        self._shape = shape
        self._limit = limit
        self._budget = budget  # a JSON answer's copy is held within it, like the bodies held in block mode
        self._body = bytearray()
        self._reader = SseReader(MAX_EVENT_BYTES)
        self._texts: dict[Key, list[str]] = {}
        self._sizes: dict[Key, int] = {}
        self.whole = True  # False once something was left out (too large, unreadable)

    def add(self, chunk: bytes) -> None:
        if not self.whole or not chunk:
            return
        if self._shape == "json":
            if len(self._body) + len(chunk) > self._limit:
                self._abandon()
                return
            try:
                self._budget.take(len(chunk))
            except GatewayError:  # the budget is spent by other calls: like too large, never judged whole
                self._abandon()
                return
            self._body += chunk
            return
        try:
            events = self._reader.feed(chunk)
        except EventTooLarge:
            self.whole = False
            return
        for event in events:
            for key, piece in found_in(self._kind, data_of(event)).texts:
                size = self._sizes.get(key, 0) + len(piece)
                if size > self._limit:
                    self.whole = False
                    return
                self._sizes[key] = size
                self._texts.setdefault(key, []).append(piece)

    def release(self) -> None:
        """Give back what the copy held of the byte budget."""
        self._budget.give(len(self._body))
        self._body.clear()

    def _abandon(self) -> None:
        self.whole = False
        self.release()

    def texts(self) -> list[str]:
        """The answer's texts, one per choice (a response's as one)."""
        if self._shape == "json":
            try:
                document = orjson.loads(self._body)
            except orjson.JSONDecodeError:
                return []
            return list(answer_texts(self._kind, document).values())
        if self._kind == "responses":
            joined = "".join("".join(pieces) for pieces in self._texts.values())
            return [joined] if joined else []
        return [text for pieces in self._texts.values() if (text := "".join(pieces))]
