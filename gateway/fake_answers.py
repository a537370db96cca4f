"""The fake upstream's answers: its documents and SSE events, pure functions of the payload and knobs.

gateway/fake_upstream.py routes to these and writes them out (its behaviours, streaming pace,
recording). Every model name is answered; `reply`, `replies`, `chunks` and `flag_words` are its knobs.
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
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson

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
DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}

# A stream's events: the pieces written one at a time, then the tail (the last events) in one go.
type Events = tuple[list[bytes], bytes]
type Choice = Callable[[int, int, str | None], dict[str, Any]]


def data(event: Any) -> bytes:
    return b"data: " + orjson.dumps(event) + b"\n\n"


def last_user_text(payload: dict[str, Any]) -> str:
    messages = payload.get("messages")
    for message in reversed(messages if isinstance(messages, list) else []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
            return str(content or "")
    return ""


def pieces(text: str, chunks: int) -> list[str]:
    """`text` cut at spaces into `chunks` pieces that add up to it: the words spread evenly, or
    one a piece and empty pieces after them when there are fewer words than chunks."""
    words = text.split(" ")
    count, total = max(1, chunks), len(words)
    ends = [total * i // count if total >= count else min(i, total) for i in range(1, count + 1)]
    out, start = [], 0
    for end in ends:
        out.append(" ".join(words[start:end]) + (" " if start < end < total else ""))
        start = end
    return out


def reply_text(payload: dict[str, Any], reply: str) -> str:
    if "{prompt}" in reply:
        return reply.replace("{prompt}", last_user_text(payload))
    return reply


def choice_texts(payload: dict[str, Any], reply: str, replies: Sequence[str]) -> list[str]:
    """Each choice's text (`n` of them)."""
    n = payload.get("n")
    count = n if isinstance(n, int) and 1 <= n <= 8 else 1
    return [replies[i] if i < len(replies) else reply_text(payload, reply) for i in range(count)]


def interleaved(texts: list[str], chunks: int, choice: Choice) -> list[dict[str, Any]]:
    """The choices' stream chunks: piece j of each choice in turn, a finish (piece None) after its last."""
    split = [pieces(text, chunks) for text in texts]
    out = []
    for j in range(max(map(len, split))):
        for i, parts in enumerate(split):
            if j < len(parts):
                out.append(choice(i, j, parts[j]))
            if j == len(parts) - 1:
                out.append(choice(i, j + 1, None))
    return out


def _chat_base(payload: dict[str, Any]) -> dict[str, Any]:
    return {"id": "chatcmpl-mock", "created": int(time.time()), "model": str(payload.get("model", MODEL))}


def chat_completion(payload: dict[str, Any], texts: list[str]) -> dict[str, Any]:
    choices = [
        {"index": i, "message": {"role": "assistant", "content": text, "refusal": None}}
        | {"logprobs": None, "finish_reason": "stop"}
        for i, text in enumerate(texts)
    ]
    return {**_chat_base(payload), "object": "chat.completion", "choices": choices, "usage": USAGE}


def chat_chunks(payload: dict[str, Any], texts: list[str], chunks: int) -> Events:
    chunk = {**_chat_base(payload), "object": "chat.completion.chunk"}

    def chat_choice(i: int, j: int, piece: str | None) -> dict[str, Any]:
        if piece is None:
            return {"index": i, "delta": {}, "logprobs": None, "finish_reason": "stop"}
        delta = {"role": "assistant", "content": piece} if j == 0 else {"content": piece}
        return {"index": i, "delta": delta, "logprobs": None, "finish_reason": None}

    events = [data({**chunk, "choices": [choice]}) for choice in interleaved(texts, chunks, chat_choice)]
    tail = b""
    options = payload.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        tail += data({**chunk, "choices": [], "usage": USAGE})
    return events, tail + DONE


def _completion_base(payload: dict[str, Any]) -> dict[str, Any]:
    base: dict[str, Any] = {"id": "cmpl-mock", "object": "text_completion", "created": int(time.time())}
    base["model"] = str(payload.get("model", MODEL))
    return base


def completion(payload: dict[str, Any], texts: list[str]) -> dict[str, Any]:
    choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": "stop"} for i, text in enumerate(texts)]
    return {**_completion_base(payload), "choices": choices, "usage": USAGE}


def completion_chunks(payload: dict[str, Any], texts: list[str], chunks: int) -> Events:
    base = _completion_base(payload)

    def text_choice(i: int, j: int, piece: str | None) -> dict[str, Any]:
        return {
            "index": i,
            "text": piece or "",
            "logprobs": None,
            "finish_reason": "stop" if piece is None else None,
        }

    return [data({**base, "choices": [choice]}) for choice in interleaved(texts, chunks, text_choice)], DONE


def response(payload: dict[str, Any], text: str) -> dict[str, Any]:
    """The completed `response` saying `text`."""
    content = {"type": "output_text", "text": text, "annotations": []}
    message = {
        "type": "message",
        "id": "msg_mock",
        "status": "completed",
        "role": "assistant",
        "content": [content],
    }
    return {
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


def response_events(done: dict[str, Any], text: str, chunks: int) -> Events:
    """The stream of the response `done` (saying `text`): created, the text deltas, completed."""

    def event(kind: str, fields: dict[str, Any]) -> bytes:
        return f"event: {kind}\n".encode() + data({"type": kind, **fields})

    started = event("response.created", {"response": {**done, "status": "in_progress", "output": [], "usage": None}})
    deltas = [
        event(
            "response.output_text.delta",
            {"item_id": "msg_mock", "output_index": 0, "content_index": 0} | {"delta": piece},
        )
        for piece in pieces(text, chunks)
    ]
    return [started, *deltas], event("response.completed", {"response": done})


def moderation_groups(raw: Any) -> list[list[str]]:
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


def moderation_fails(groups: list[list[str]], fail_words: set[str]) -> bool:
    """Whether a text of the input holds one of `fail_words` (the endpoint then answers 500)."""
    return any(word in " ".join(texts).lower() for texts in groups for word in fail_words)


def moderation(payload: dict[str, Any], groups: list[list[str]], flag_words: dict[str, str]) -> dict[str, Any]:
    """The moderation answer: a result for each group of texts (`moderation_groups`)."""
    results = []
    for texts in groups:
        joined = " ".join(texts).lower()
        hits = {category for word, category in flag_words.items() if word.lower() in joined}
        results.append(
            {
                "flagged": bool(hits),
                "categories": {name: name in hits for name in MODERATION_CATEGORIES},
                "category_scores": {name: 0.9 if name in hits else 0.01 for name in MODERATION_CATEGORIES},
                "category_applied_input_types": {name: ["text"] for name in MODERATION_CATEGORIES},
            }
        )
    model = str(payload.get("model", "omni-moderation-latest"))
    return {"id": "modr-mock", "model": model, "results": results}


def models() -> dict[str, Any]:
    listed = [{"id": MODEL, "object": "model", "created": 0, "owned_by": "mock"}]
    return {"object": "list", "data": listed}
