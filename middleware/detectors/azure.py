"""The `azure` detector: Azure AI Content Safety's text analysis.

`POST {endpoint}/contentsafety/text:analyze?api-version=2024-09-01` with the resource key in
`Ocp-Apim-Subscription-Key` and `{"text", "categories", "outputType": "EightSeverityLevels"}`;
the answer's `categoriesAnalysis` gives each of Hate, SelfHarm, Sexual and Violence a severity
from 0 to 7, and a category at or above the threshold (GATEWAY_AZURE_SEVERITY) flags. The four
categories are reported by the names OpenAI's moderation uses (`hate`, `self-harm`, `sexual`,
`violence`), so one policy file serves both detectors.

The service takes at most 10,000 characters per call: a longer text is judged in overlapping
windows, all at once, and a flag in any window flags the text. A 429 (the resource's rate
limit) is an outage like any other: GATEWAY_MODERATION_FAILURE decides. Images are not sent:
they are the `openai` detector's.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from middleware.detectors.cache import VerdictCache
from middleware.detectors.remote import first_flag, post_json
from middleware.protocols import DetectorFailed, InputRefused, JsonPost, UserInput, Verdict

API_VERSION = "2024-09-01"
CATEGORIES = {"Hate": "hate", "SelfHarm": "self-harm", "Sexual": "sexual", "Violence": "violence"}
# The service's limit is 10,000 characters (UTF-16 code units, as .NET counts them).
MAX_CHARS = 10_000
# Windows of a long text overlap so a phrase cut by one window's end is whole in the next.
OVERLAP = 500
# Calls one request may cost: past it the input is refused rather than judged in so many calls.
MAX_CALLS = 32


def windows(text: str) -> Iterator[str]:
    """`text` in windows the service accepts, each overlapping the one before by OVERLAP."""
    # An astral character is two UTF-16 units: halve the window when the text holds any.
    size = MAX_CHARS if text.isascii() or len(text.encode("utf-16-le")) == 2 * len(text) else MAX_CHARS // 2
    if len(text) <= size:
        yield text
        return
    step = size - OVERLAP
    for start in range(0, len(text) - OVERLAP, step):
        yield text[start : start + size]


class AzureDetector:
    """Azure AI Content Safety on each new user text (cached by SHA-256); `severity` flags at or above."""

    name = "azure"
    cost = 150

    def __init__(
        self,
        post: JsonPost,
        endpoint: str,
        key: str,
        severity: int,
        timeout: float,
        *,
        cache_size: int = 10_000,
    ) -> None:
        self._post = post
        self.url = f"{endpoint.rstrip('/')}/contentsafety/text:analyze?api-version={API_VERSION}"
        self._headers = {"Content-Type": "application/json", "Ocp-Apim-Subscription-Key": key}
        self._severity = severity
        self._timeout = timeout
        self.cache = VerdictCache(self.name, cache_size)

    async def check(self, user_input: UserInput, authorization: str | None) -> Verdict | None:
        verdict, pending = self.cache.texts(user_input.texts)
        if verdict is not None or not pending:
            return verdict
        # (window, SHA-256 of its whole text)
        calls = [(window, sha256) for text, sha256 in pending for window in windows(text)]
        if len(calls) > MAX_CALLS:
            raise InputRefused(
                f"the gateway judges at most {MAX_CALLS * MAX_CHARS:,} new characters of text per request with "
                "Azure AI Content Safety; send less at a time",
                "input",
            )
        verdict = await first_flag(self._analyze(window, sha) for window, sha in calls)
        if verdict is not None:
            self.cache.put(verdict.text_sha256, verdict)
            return verdict
        for _, sha256 in pending:
            self.cache.put(sha256, None)
        return None

    async def _analyze(self, text: str, sha256: str) -> Verdict | None:
        payload = {"text": text, "categories": list(CATEGORIES), "outputType": "EightSeverityLevels"}
        data = await post_json(self._post, self.url, payload, self._headers, self._timeout, "Azure AI Content Safety")
        analysis = data.get("categoriesAnalysis") if isinstance(data, dict) else None
        if not isinstance(analysis, list):
            raise DetectorFailed(f"Azure AI Content Safety {self.url} answered JSON without `categoriesAnalysis`")
        flagged: dict[str, float] = {}
        for entry in analysis:
            category, severity = _entry(entry)
            if category is not None and severity >= self._severity:
                flagged[CATEGORIES.get(category, category.lower())] = float(severity)
        if not flagged:
            return None
        return Verdict(detector=self.name, categories=tuple(flagged), text_sha256=sha256, scores=flagged)


def _entry(entry: Any) -> tuple[str | None, int]:
    if not isinstance(entry, dict):
        return None, 0
    category, severity = entry.get("category"), entry.get("severity")
    if not isinstance(category, str) or not isinstance(severity, int) or isinstance(severity, bool):
        return None, 0
    return category, severity
