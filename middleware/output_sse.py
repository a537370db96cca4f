"""Server-sent events read incrementally: a stream's bytes cut into whole events, kept byte for byte."""

from __future__ import annotations

import re
from dataclasses import dataclass

# An event ends at a blank line; lines end in \n or \r\n (a lone \r is rare enough to leave out).
_EVENT_END = re.compile(rb"\r?\n\r?\n")


@dataclass(frozen=True, slots=True)
class Event:
    raw: bytes  # as the upstream sent it, terminator included
    name: str | None  # the `event:` field
    data: bytes | None  # the `data:` lines joined with \n; None without any


class EventTooLarge(Exception):
    """An event grew past the bound without ending: the stream cannot be judged."""


class SseReader:
    """Feeds bytes in, hands back the events they complete; `rest` is what is left at the end."""

    def __init__(self, max_event_bytes: int) -> None:
        self._buffer = b""
        self._max = max_event_bytes

    def feed(self, chunk: bytes) -> list[Event]:
        buffer = self._buffer + chunk if self._buffer else chunk
        events: list[Event] = []
        start = 0
        # only the new bytes (and the 3 before them) can hold a terminator not seen yet
        search_from = max(0, len(self._buffer) - 3)
        while (found := _EVENT_END.search(buffer, search_from)) is not None:
            events.append(parse(buffer[start : found.end()]))
            start = search_from = found.end()
        self._buffer = buffer[start:]
        if len(self._buffer) > self._max:
            raise EventTooLarge(f"an event of the answer's stream passed {self._max} bytes without ending")
        return events

    def rest(self) -> Event | None:
        """The unfinished last event, if the stream ended without its blank line."""
        rest, self._buffer = self._buffer, b""
        return parse(rest) if rest.strip() else None


def parse(raw: bytes) -> Event:
    name: str | None = None
    data: list[bytes] = []
    for line in raw.splitlines():
        field, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if field == b"data":
            data.append(value)
        elif field == b"event":
            name = value.decode("utf-8", "replace")
    return Event(raw, name, b"\n".join(data) if data else None)
