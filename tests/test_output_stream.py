"""The stream judge and the SSE reader on their own: windows, overlap, order, and what a cut leaves."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import pytest

from middleware.output_sse import EventTooLarge, SseReader
from middleware.output_stream import StreamJudge
from middleware.protocols import Verdict

FLAG = Verdict(detector="test", categories=("bad",), text_sha256="0" * 64)


def chunk(index: int = 0, content: str | None = None, **extra: Any) -> bytes:
    delta: dict[str, Any] = {} if content is None else {"content": content}
    delta.update(extra.pop("delta", {}))
    choice = {"index": index, "delta": delta, "finish_reason": extra.pop("finish", None)}
    return b"data: " + orjson.dumps({"id": "c1", "object": "chat.completion.chunk", "choices": [choice]}) + b"\n\n"


class Judge:
    """Flags a window holding `word`; remembers every window it saw."""

    def __init__(self, word: str = "bomb") -> None:
        self.word = word
        self.windows: list[str] = []

    async def __call__(self, texts: Sequence[str]) -> Verdict | None:
        self.windows.extend(texts)
        return FLAG if any(self.word in text for text in texts) else None


def events(data: bytes) -> list[Any]:
    return [orjson.loads(e[6:]) if e != b"data: [DONE]" else "[DONE]" for e in data.split(b"\n\n") if e]


async def test_text_waits_for_a_window_then_goes_out_byte_for_byte() -> None:
    judge = Judge()
    stream = StreamJudge("chat", judge, holdback=10)
    first = chunk(content="Hello", delta={"role": "assistant"})
    assert await stream.feed(first) == b""  # 5 characters: held
    second = chunk(content=" there, friend")
    assert await stream.feed(second) == first + second  # 19 >= 10: judged and released together
    assert judge.windows == ["Hello there, friend"]
    finish = chunk(finish="stop")
    tail = chunk(content="!") + finish + b"data: [DONE]\n\n"
    assert await stream.feed(tail) == tail  # the finish judges the rest, with the overlap
    assert judge.windows[-1] == "re, friend!"  # the last 10 characters cleared, and the new one
    assert await stream.end() == b""


async def test_a_phrase_split_across_windows_is_seen_whole() -> None:
    judge = Judge("how to build a bomb")
    stream = StreamJudge("chat", judge, holdback=19)
    out = b""
    for word in ["Well", "then,", "here", "is", "how", "to", "build", "a", "bomb", "at", "home"]:
        out += await stream.feed(chunk(content=word + " "))
        if stream.cut:
            break
    assert stream.cut
    assert b"build" not in out  # the phrase's start went out in no window
    assert "".join(e["choices"][0]["delta"]["content"] for e in events(out)).startswith("Well then,")
    finale = events(await stream.finale())
    assert len(finale) == 2  # nothing more of the text: the end only
    assert finale[0]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "content_filter"}
    assert finale[-1] == "[DONE]"


async def test_tool_calls_and_usage_keep_their_place() -> None:
    stream = StreamJudge("chat", Judge(), holdback=1000)
    text = chunk(content="Let me look that up.")
    tool = chunk(delta={"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]})
    usage = b'data: {"choices":[],"usage":{"total_tokens":3}}\n\n'
    # a tool call after held text: the text is judged now, not at the end, and goes out first
    assert await stream.feed(text + tool) == text + tool
    assert await stream.feed(chunk(content="Done")) == b""
    assert await stream.feed(usage) == b""  # behind the held text
    assert await stream.end() == chunk(content="Done") + usage


async def test_a_flagged_choice_ends_alone_and_the_others_are_judged_on_their_own() -> None:
    stream = StreamJudge("chat", Judge(), holdback=1000)
    parts = [chunk(0, "calm words"), chunk(1, "a bomb"), chunk(0, " and more"), chunk(1, finish="stop")]
    assert await stream.feed(b"".join(parts)) == b""
    assert stream.cut
    out = events(await stream.finale())
    assert [e["choices"][0].get("delta", {}).get("content") for e in out[:2]] == ["calm words", " and more"]
    assert {e["choices"][0]["index"]: e["choices"][0]["finish_reason"] for e in out[2:4]} == {
        0: "content_filter",
        1: "content_filter",
    }
    assert out[-1] == "[DONE]"


async def test_a_response_stream_ends_incomplete() -> None:
    stream = StreamJudge("responses", Judge(), holdback=5)

    def event(kind: str, **fields: Any) -> bytes:
        return f"event: {kind}\n".encode() + b"data: " + orjson.dumps({"type": kind, **fields}) + b"\n\n"

    created = event("response.created", response={"id": "r1", "status": "in_progress"}, sequence_number=0)
    delta = event("response.output_text.delta", output_index=0, content_index=0, delta="make a bomb", sequence_number=1)
    assert await stream.feed(created) == created
    assert await stream.feed(delta) == b""
    [incomplete] = events((await stream.finale()).split(b"\n", 1)[1])
    assert incomplete["type"] == "response.incomplete"
    assert incomplete["sequence_number"] == 2
    assert incomplete["response"] == {
        "id": "r1",
        "status": "incomplete",
        "incomplete_details": {"reason": "content_filter"},
        "output": [],
    }


def test_the_reader_cuts_events_at_blank_lines_whatever_the_chunks() -> None:
    data = b"event: a\r\ndata: 1\r\n\r\ndata: 2\ndata: 3\n\n: comment\n\n"
    for size in (1, 2, 3, 7, len(data)):
        reader = SseReader(100)
        found = [e for i in range(0, len(data), size) for e in reader.feed(data[i : i + size])]
        assert [(e.name, e.data) for e in found] == [("a", b"1"), (None, b"2\n3"), (None, None)]
        assert b"".join(e.raw for e in found) == data
    with pytest.raises(EventTooLarge):
        SseReader(10).feed(b"data: " + b"x" * 20)


async def test_after_a_cut_no_event_tied_to_no_text_follows_a_dropped_one() -> None:
    # an upstream that quotes the text whole in an event of no text (a content part done) before
    # the text is judged: that event must not go out once the text is flagged
    stream = StreamJudge("responses", Judge(), holdback=100)

    def event(kind: str, **fields: Any) -> bytes:
        return f"event: {kind}\n".encode() + b"data: " + orjson.dumps({"type": kind, **fields}) + b"\n\n"

    delta = event("response.output_text.delta", output_index=0, content_index=0, delta="a bomb")
    part = event("response.content_part.done", output_index=0, content_index=0, part={"text": "a bomb"})
    done = event("response.output_text.done", output_index=0, content_index=0, text="a bomb")
    assert await stream.feed(delta + part + done) == b""
    assert stream.cut
    assert b"bomb" not in await stream.finale()
