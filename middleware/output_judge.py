"""Judging the model's text with the input's detectors, and recording what they flag.

Outputs go through the same detectors (and so the same verdict caches) as inputs, one window
or answer at a time: the `openai` detector sends a window's text in one `/moderations` call.
A detector that cannot judge follows GATEWAY_MODERATION_FAILURE: `open` skips it, `closed`
gives the verdict UNAVAILABLE, which the answer treats as flagged but nobody is blamed for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import structlog

from middleware.cascade import make_cascade
from middleware.detectors.cache import sha256_hex
from middleware.errors import Refused
from middleware.metrics import OUTPUT_VIOLATIONS
from middleware.protocols import Detector, StoreUnavailable, StrikeStore, UserInput, Verdict, Violation

log = structlog.get_logger("middleware.output")

UNAVAILABLE_CATEGORY = "moderation_unavailable"


def unavailable(texts: Sequence[str]) -> Verdict:
    return Verdict(detector="gateway", categories=(UNAVAILABLE_CATEGORY,), text_sha256=sha256_hex("".join(texts)))


def is_unavailable(verdict: Verdict) -> bool:
    return verdict.categories == (UNAVAILABLE_CATEGORY,)


class OutputJudge:
    """Judges answers' texts; records flagged ones as `output_violation` events of the user."""

    def __init__(
        self,
        detectors: Sequence[Detector],
        failure: Literal["closed", "open"],
        store: StrikeStore,
        *,
        mode: Literal["audit", "block"],
        strikes: bool,
    ) -> None:
        # sequential: an answer's windows are judged while the client waits on them, in turn
        self._cascade = make_cascade(detectors, failure, "sequential")
        self._store = store
        self.failure = failure  # GATEWAY_MODERATION_FAILURE, for answers that cannot be judged too
        self.mode = mode
        self._strikes = strikes

    async def judge(self, texts: Sequence[str], authorization: bytes | None) -> Verdict | None:
        """The first flag on `texts`, UNAVAILABLE when a detector failed closed, else None."""
        try:
            verdict, _ = await self._cascade.judge(UserInput(texts=tuple(texts)), authorization)
        except Refused:  # failure mode closed, or a detector refusing the text itself: unjudged
            return unavailable(texts)
        return verdict

    async def record(self, user_id: str | None, verdict: Verdict, path: str, app: str | None) -> None:
        """Count, log and store a flagged answer; an outage of the detectors or the store is only logged."""
        if is_unavailable(verdict):
            log.warning("output_unjudged", user_id=user_id, path=path, mode=self.mode)
            return
        for category in verdict.categories:
            OUTPUT_VIOLATIONS.labels(category, verdict.detector, self.mode).inc()
        log.info(
            "output_violation",
            user_id=user_id,
            path=path,
            detector=verdict.detector,
            categories=list(verdict.categories),
            rule=verdict.rule,
            mode=self.mode,
        )
        if user_id is None:
            return
        try:
            await self._store.record_output_violation(
                user_id, Violation(verdict=verdict, path=path, app=app), counts=self._strikes
            )
        except StoreUnavailable as exc:
            # the answer was already judged (and cut); the metric and the log line above still count it
            log.warning("output_violation_not_recorded", user_id=user_id, error=str(exc))
