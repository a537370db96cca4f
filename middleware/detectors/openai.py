"""The `openai` detector: OpenAI's moderation endpoint, with a verdict cache in front."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from middleware.detectors.cache import VerdictCache, sha256_hex
from middleware.detectors.endpoint_errors import ErrorAnswer
from middleware.detectors.remote import first_flag, post_json
from middleware.protocols import DetectorFailed, InputRefused, JsonPost, UserInput, Verdict

MODERATION_MODEL = "omni-moderation-latest"
# OpenAI's endpoint judges one image per call (more: 400 too_many_images), so each image beyond
# the first costs a call of its own; this bounds the calls one request can cost.
MAX_IMAGES = 16


@dataclass(frozen=True, slots=True)
class _Item:
    kind: str  # "text" or "image"
    value: str
    sha256: str

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.sha256}"

    def part(self) -> dict[str, Any]:
        if self.kind == "text":
            return {"type": "text", "text": self.value}
        return {"type": "image_url", "image_url": {"url": self.value}}


class OpenAIDetector:
    """OpenAI's moderation endpoint (`POST {base_url}/moderations`, model omni-moderation-latest).

    Credentials: `Bearer <api_key>` when the gateway has one, else the call's own Authorization.

    Flagging. Without thresholds, a result with `flagged: true` is a violation and its true
    `categories` are the categories. With thresholds (`{"violence": 0.5, "*": 0.9}`), `flagged` is
    not consulted: each category is flagged when its `category_scores` entry is at or above its own
    threshold, else the `*` one; a category with neither keeps its boolean from `categories`. The
    verdict's `scores` holds the scores that crossed a threshold.

    Caching. Every text and image URL is looked up by its SHA-256 in a bounded LRU first, so a
    conversation's history resent every turn is judged once; only the rest is sent. Texts alone are
    sent as an array of strings, which the endpoint answers with one result per string: each is
    cached with its own verdict. With images the input is one multimodal array, which the endpoint
    may answer with a single result for everything: then no input can be blamed alone, so the
    inputs are cached only when that result is clean, a flagged result is not cached, and its
    verdict's `text_sha256` is the SHA-256 of the JSON input array that was sent.

    Images. The endpoint takes one image per call: the texts go with the first image, each further
    image in a call of its own (an image alone is blamed and cached alone), all calls at once. A
    flag in any call decides; else a refusal of the input; else an outage. More than MAX_IMAGES
    images not in the cache are refused (InputRefused) rather than judged in as many calls.
    """

    name = "openai"
    cost = 100

    def __init__(
        self,
        post: JsonPost,
        base_url: str,
        api_key: str | None,
        thresholds: Mapping[str, float],
        timeout: float,
        *,
        cache_size: int = 10_000,
    ) -> None:
        self._post = post
        self.url = base_url.rstrip("/") + "/moderations"
        self._api_key = api_key
        self._thresholds = dict(thresholds)
        self._timeout = timeout
        self.cache = VerdictCache(self.name, cache_size)

    async def check(self, user_input: UserInput, authorization: str | None) -> Verdict | None:
        items = [_Item("text", text, sha256_hex(text)) for text in user_input.texts]
        items += [_Item("image", url, sha256_hex(url)) for url in user_input.images]
        pending: list[_Item] = []
        for item in items:
            found, verdict = self.cache.get(item.key)
            if verdict is not None:
                return verdict
            if not found:
                pending.append(item)
        if not pending:
            return None

        images = [item for item in pending if item.kind == "image"]
        if len(images) <= 1:
            return await self._judge(pending, authorization)
        if len(images) > MAX_IMAGES:
            raise InputRefused(
                f"the gateway judges at most {MAX_IMAGES} new images per request and this one has {len(images)}; "
                "send fewer at a time",
                "input",
            )
        texts = [item for item in pending if item.kind == "text"]
        calls = [[*texts, images[0]], *([image] for image in images[1:])]
        return await first_flag(self._judge(call, authorization) for call in calls)

    async def _judge(self, pending: Sequence[_Item], authorization: str | None) -> Verdict | None:
        """One call's verdict on `pending` (at most one image), caching what the answer allows."""
        if any(item.kind == "image" for item in pending):
            sent: list[Any] = [item.part() for item in pending]
        else:
            sent = [item.value for item in pending]
        results = await self._moderate(pending, sent, authorization)

        if len(results) == len(pending):
            first: Verdict | None = None
            for item, result in zip(pending, results, strict=True):
                verdict = self._verdict(result, item.sha256)
                self.cache.put(item.key, verdict)
                first = first or verdict
            return first
        whole = hashlib.sha256(orjson.dumps(sent)).hexdigest()
        for result in results:
            verdict = self._verdict(result, whole)
            if verdict is not None:
                return verdict
        for item in pending:
            self.cache.put(item.key, None)
        return None

    async def _moderate(self, items: Sequence[_Item], sent: list[Any], authorization: str | None) -> Sequence[Any]:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        elif authorization:
            headers["Authorization"] = authorization
        payload = {"model": MODERATION_MODEL, "input": sent}
        data = await post_json(
            self._post,
            self.url,
            payload,
            headers,
            self._timeout,
            "the moderation endpoint",
            lambda answer: _refusal(answer, items),
        )
        results = data.get("results") if isinstance(data, dict) else None
        if not isinstance(results, list) or not results or not all(isinstance(r, dict) for r in results):
            raise DetectorFailed(f"the moderation endpoint {self.url} answered JSON without a `results` list")
        return results

    def _verdict(self, result: Mapping[str, Any], sha256: str) -> Verdict | None:
        flags = result.get("categories")
        flags = flags if isinstance(flags, dict) else {}
        scores = result.get("category_scores")
        scores = scores if isinstance(scores, dict) else {}
        if not self._thresholds:
            if result.get("flagged") is not True:
                return None
            names = tuple(name for name, flagged in flags.items() if flagged is True) or ("unspecified",)
            return Verdict(detector=self.name, categories=names, text_sha256=sha256)

        default = self._thresholds.get("*")
        categories: list[str] = []
        crossed: dict[str, float] = {}
        for name in dict.fromkeys([*scores, *flags]):
            threshold = self._thresholds.get(name, default)
            score = scores.get(name)
            if threshold is None:
                if flags.get(name) is True:
                    categories.append(name)
            elif isinstance(score, int | float) and not isinstance(score, bool) and score >= threshold:
                categories.append(name)
                crossed[name] = float(score)
        if not categories:
            return None
        return Verdict(detector=self.name, categories=tuple(categories), text_sha256=sha256, scores=crossed)


def _refusal(answer: ErrorAnswer, items: Sequence[_Item]) -> InputRefused:
    """The refusal to give the client, naming the refused image when the answer tells which."""
    index = answer.input_index
    item = items[index] if index is not None and index < len(items) else None
    if item is None:  # the message may name the image it could not fetch
        named = [item for item in items if item.kind == "image" and item.value in answer.message]
        item = named[0] if len(named) == 1 else None
    if item is None:
        what = "the input"
    elif item.kind == "image":
        what = f"the image {_shown(item.value)}"
    else:
        what = "one of the user's texts"
    reason = answer.message.rstrip(".") or f"HTTP {answer.status}"
    return InputRefused(f"the moderation endpoint refused {what} ({reason}); change or remove it and retry", "input")


def _shown(url: str) -> str:
    """An image URL short enough for a message: a data: URL by its media type only."""
    if url.startswith("data:"):
        return url.split(",", 1)[0][:60] + ",..."
    return url if len(url) <= 100 else url[:100] + "..."
