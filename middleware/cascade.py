"""The detectors in turn: the first flag decides, cheapest detector first.

A detector that cannot judge (DetectorFailed) follows GATEWAY_MODERATION_FAILURE: `closed`
refuses the call with 503, `open` skips the detector. A detector that refuses the input itself
(InputRefused: an image URL the endpoint cannot fetch) refuses the call with 400 whatever the
failure mode: otherwise a client could switch moderation off by sending such a part.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from time import perf_counter
from typing import Literal

import structlog

from middleware.errors import GatewayError, Refused
from middleware.metrics import DETECTOR_FAILURES, FAIL_OPEN, MODERATION_DURATION
from middleware.protocols import Detector, DetectorFailed, InputRefused, LocalDetector, UserInput, Verdict

log = structlog.get_logger("middleware.moderation")


class Cascade:
    """Runs `detectors` over a call's input; `judge` gives the verdict and whether one failed open."""

    def __init__(self, detectors: Sequence[Detector], failure: Literal["closed", "open"]) -> None:
        self.detectors = sorted(detectors, key=lambda detector: detector.cost)
        self._failure = failure
        # Each detector with its check_now when it judges in-process (called without a
        # coroutine), its timer and its failure counter.
        self._steps = [
            (
                detector,
                detector.check_now if isinstance(detector, LocalDetector) else None,
                MODERATION_DURATION.labels(detector.name),
                DETECTOR_FAILURES.labels(detector.name),
            )
            for detector in self.detectors
        ]

    async def judge(
        self, user_input: UserInput, raw_authorization: bytes | None, *, offload: bool = False
    ) -> tuple[Verdict | None, bool]:
        """The first detector's verdict, cheapest first; and whether a failed detector was skipped.

        `offload`: the input is large, so local detectors judge it off the event loop's thread.
        """
        if not user_input:
            return None, False
        failed_open = False
        for detector, check_now, timer, failures in self._steps:
            started = perf_counter()
            try:
                if check_now is None:
                    authorization = raw_authorization.decode("latin-1") if raw_authorization is not None else None
                    verdict = await detector.check(user_input, authorization)
                elif offload:
                    verdict = await asyncio.to_thread(check_now, user_input)
                else:
                    verdict = check_now(user_input)
            except DetectorFailed as exc:
                failures.inc()
                log.warning("detector_failed", detector=detector.name, error=str(exc), failure_mode=self._failure)
                if self._failure == "closed":
                    raise Refused(
                        "moderation_unavailable",
                        GatewayError(
                            503,
                            "moderation_unavailable",
                            "Content moderation is unavailable, so the request was not forwarded; retry in a moment.",
                        ),
                    ) from None
                FAIL_OPEN.labels("moderation").inc()
                failed_open = True
                continue
            except InputRefused as exc:
                # Not the message: it may quote the user's image URL, which can carry a signed token.
                log.info("input_refused", detector=detector.name, part=exc.part)
                raise Refused(
                    "invalid",
                    GatewayError(
                        400,
                        "invalid_request",
                        f"Content moderation could not judge this request as sent: {exc.message}",
                        param=exc.part,
                    ),
                ) from None
            finally:
                timer.observe(perf_counter() - started)
            if verdict is not None:
                return verdict, failed_open
        return None, failed_open
