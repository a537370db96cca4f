"""Request bodies the moderation middleware reads whole: bounded, parsed without ambiguity, replayed.

A moderated body is read with the per-request limit (413) and the process-wide budget of bytes
held in memory (503 `server_busy`), parsed as one JSON object, and handed on to the proxy as it
came. A body whose meaning a parser could guess differently than the upstream's is refused:
duplicate keys (the gateway would judge one `messages`, the upstream might read the other).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import orjson

from middleware.asgi import Message, Receive
from middleware.budgets import ByteBudget
from middleware.errors import GatewayError


class Disconnected(Exception):
    """The client went away before its body arrived."""


async def read_body(receive: Receive, declared: bytes | None, limit: int, budget: ByteBudget) -> tuple[bytes, int]:
    """The whole body and the bytes it holds of `budget` (the caller gives them back).

    `declared` is the Content-Length: a body announced over `limit` is refused before a byte is
    read, and one that would not fit the budget before it is held.
    """
    held = 0
    if declared is not None and declared.strip().isdigit():
        announced = int(declared)
        if announced > limit:
            raise too_large(limit)
        budget.take(announced)
        held = announced
    chunks: list[bytes] = []
    size = 0
    more = True
    try:
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise Disconnected
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            if size > held:  # no (or a wrong) Content-Length: held as it arrives
                budget.take(size - held)
                held = size
            chunks.append(chunk)
            more = message.get("more_body", False)
    except BaseException:
        budget.give(held)
        raise
    return (chunks[0] if len(chunks) == 1 else b"".join(chunks)), held


def too_large(limit: int) -> GatewayError:
    return GatewayError(
        413, "request_too_large", f"The request body is larger than the gateway's limit of {limit} bytes."
    )


UNCOMPRESSED = "Send this request's body uncompressed: the gateway must read it to moderate it."
# the headers that say how a body is read: one of each, or the gateway and the upstream could read it apart
_READING_HEADERS = (b"content-type", b"content-encoding")


def compressed(encoding: bytes | None) -> bool:
    """Whether a Content-Encoding says the body is not sent as is."""
    return encoding is not None and encoding.strip().lower() not in (b"", b"identity")


def read_once(raw_headers: Iterable[tuple[bytes, bytes]]) -> None:
    """Refuse (400 invalid_request) a body whose Content-Type or Content-Encoding came twice."""
    seen: set[bytes] = set()
    for name, _ in raw_headers:
        if name in _READING_HEADERS:
            if name in seen:
                header = name.decode("latin-1").title()
                message = f"Send the {header} header once; it came more than once."
                raise GatewayError(400, "invalid_request", message, param=header)
            seen.add(name)


def json_object(encoding: bytes | None, body: bytes) -> dict[str, Any]:
    """The body as one JSON object without duplicate keys; 400 `invalid_json` otherwise."""
    if encoding is not None and compressed(encoding):
        raise _invalid_json(UNCOMPRESSED)
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError:
        request = None
    if not isinstance(request, dict):
        raise _invalid_json("The request body must be a JSON object.")
    if has_duplicate_keys(body, request):
        raise _invalid_json("The request body holds a key twice in one object; send each key once.")
    return request


def has_duplicate_keys(body: bytes, value: Any) -> bool:
    """Whether the JSON text `body`, which orjson parsed as `value`, holds a key twice in one object.

    A parser that keeps the first of two equal keys reads another request than one that keeps
    the last (orjson, and so the detectors): such a text must be refused, not judged.
    """
    # Every colon of a JSON text is a member's separator or a character inside a string, so the
    # body's colons equal those of the parsed value written again exactly when no member was
    # lost to a duplicate key: C-speed counts instead of a walk in Python. A colon spelled as an
    # escape (\u003a) is one more colon in the writing than in the body; counting every "u003"
    # of the body in its stead keeps the equality exact (any other "u003" breaks it, and then
    # the body is checked member by member, as one that cannot be written again is).
    try:
        written = orjson.dumps(value)
    except orjson.JSONEncodeError:
        written = b""
    escaped = body.count(b"u003") if body.find(b"\\") >= 0 else 0  # no backslash, no escape: skip a scan
    return body.count(b":") + escaped != written.count(b":") and _has_duplicate_members(body)


def _has_duplicate_members(body: bytes) -> bool:
    try:
        json.loads(body, object_pairs_hook=_no_duplicates)
    except _DuplicateKey:
        return True
    except ValueError:  # the two parsers disagree on what is JSON: not ours to guess
        return True
    return False


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    members = dict(pairs)
    if len(members) != len(pairs):
        raise _DuplicateKey
    return members


def _invalid_json(message: str) -> GatewayError:
    return GatewayError(400, "invalid_json", message)


def add_member(body: bytes, request: dict[str, Any], key: str, value: str) -> bytes:
    """`body` with one more string member, spliced in after the opening brace.

    Splicing instead of re-serialising keeps every other byte as the client sent it: integers
    beyond 64 bits and float spellings would not survive a round trip through a parser.
    """
    start = body.index(b"{") + 1  # only whitespace can precede it in a body that parsed as an object
    member = orjson.dumps(key) + b":" + orjson.dumps(value)
    return body[:start] + member + (b"," if request else b"") + body[start:]


def replaying(body: bytes, receive: Receive) -> Receive:
    """A `receive` that yields the buffered body once, then the real one (for http.disconnect)."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
