"""GATEWAY_PII: personal data and secrets in the user's input refused (`block`) or masked (`mask`).

`block` answers 400 `pii_detected` naming the kinds found, with no strike: it protects the user,
it is not misconduct. `mask` rewrites the forwarded body: inside the JSON strings that hold the
user's words, each piece found becomes its placeholder (`[EMAIL]`, `[CARD]`, ...); every other
byte stays as the client sent it, so the application's own content (system, developer,
assistant and tool messages, instructions) and the JSON's shape never change. The detectors
then judge the masked input, so the data does not reach a remote detector either.

Which strings are the user's is the extractor's call, the same one the detectors' input comes
from: each string holding personal data is swapped for a unique marker, the extractor runs on
that body, and the markers it returns are the user's strings. A system message that repeats
the user's words is therefore left as the application wrote it.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
from collections.abc import Callable
from typing import Any, Literal

import orjson
import structlog

from middleware.detectors import pii
from middleware.errors import GatewayError, Refused
from middleware.metrics import PII_FOUND
from middleware.protocols import UserInput

log = structlog.get_logger("middleware.moderation")

# A JSON string token (the body already parsed as JSON), and whether a colon makes it a key.
_STRING = re.compile(rb'"([^"\\]*(?:\\.[^"\\]*)*)"(\s*:)?', re.DOTALL)

Extract = Callable[[Any], UserInput]


class PiiScreen:
    """The GATEWAY_PII step of a judged call, run before the detectors."""

    def __init__(self, mode: Literal["mask", "block"]) -> None:
        self.mode = mode

    def apply(self, body: bytes, user_input: UserInput, extract: Extract) -> tuple[bytes, UserInput]:
        """The body to forward and the input to judge; raises Refused (400 pii_detected) in `block` mode."""
        found = {text: spans for text in user_input.texts if (spans := pii.find(text))}
        if not found:
            return body, user_input
        kinds = list(dict.fromkeys(item.kind for spans in found.values() for item in spans))
        for kind in kinds:
            PII_FOUND.labels(kind, self.mode).inc()
        log.info("pii_detected", kinds=kinds, action=self.mode)  # the kinds only, never the data
        if self.mode == "block":
            raise Refused("pii", pii_refusal(kinds))
        body = mask_body(body, found, extract)
        # two texts may mask alike: the input holds each once, as the extractor's does
        texts = tuple(
            dict.fromkeys(pii.mask(text, found[text]) if text in found else text for text in user_input.texts)
        )
        return body, dataclasses.replace(user_input, texts=texts)


def pii_refusal(kinds: list[str]) -> GatewayError:
    named = ", ".join(kinds)
    return GatewayError(
        400,
        "pii_detected",
        f"The request holds personal data or secrets ({named}) that this gateway does not forward; "
        "remove them and send it again.",
        param="input",
        kinds=kinds,
    )


def mask_body(body: bytes, found: dict[str, list[pii.Found]], extract: Extract) -> bytes:
    """`body` with the pieces `found` masked inside the user's strings, every other byte kept.

    `found` maps each user text holding personal data to its pieces; `extract` gives the user
    input of a parsed body (the route's extractor).
    """
    candidates: list[tuple[re.Match[bytes], str]] = []
    for token in _STRING.finditer(body):
        if token.group(2) is not None:  # a key: never the user's words
            continue
        raw = token.group(1)
        value = raw.decode("utf-8") if b"\\" not in raw else orjson.loads(token.group(0))
        if value in found:
            candidates.append((token, value))
    if not candidates:
        return body

    nonce = secrets.token_hex(8)
    marked: list[bytes] = []
    last = 0
    for index, (token, _) in enumerate(candidates):
        marked += [body[last : token.start()], b'"\\u0000', nonce.encode(), b":%d" % index, b'"']
        last = token.end(1) + 1
    marked.append(body[last:])
    user = extract(orjson.loads(b"".join(marked))).texts
    prefix = f"\x00{nonce}:"
    chosen = {int(text[len(prefix) :]) for text in user if text.startswith(prefix)}

    out: list[bytes] = []
    last = 0
    for index, (token, value) in enumerate(candidates):
        if index not in chosen:
            continue
        masked = pii.mask(value, found[value])
        raw = token.group(1)
        # Without escapes the token is the text's UTF-8 as is, so only the pieces change.
        replacement = b'"' + masked.encode("utf-8") + b'"' if b"\\" not in raw else orjson.dumps(masked)
        out += [body[last : token.start()], replacement]
        last = token.end(1) + 1
    out.append(body[last:])
    return b"".join(out)
