"""The detectors in turn, cheapest first, or the remote ones at once: the first flag decides.

A detector that cannot judge (DetectorFailed) follows GATEWAY_MODERATION_FAILURE: `closed`
refuses the call with 503, `open` skips the detector. A detector that refuses the input itself
(InputRefused: an image URL the endpoint cannot fetch) refuses the call with 400 whatever the
failure mode: otherwise a client could switch moderation off by sending such a part.
GATEWAY_MODERATION_MODE=parallel runs the remote detectors at once (ParallelCascade).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from time import perf_counter
from typing import Literal

import structlog
from prometheus_client import Counter

from middleware.errors import GatewayError, Refused
from middleware.hotmetrics import HistogramChild
from middleware.metrics import DETECTOR_FAILURES, FAIL_OPEN, MODERATION_DURATION, MODERATION_TOTAL
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
                self._failed(detector.name, failures, exc)
                failed_open = True
                continue
            except InputRefused as exc:
                raise _refusal(detector.name, exc) from None
            finally:
                timer.observe(perf_counter() - started)
            if verdict is not None:
                return verdict, failed_open
        return None, failed_open

    def _failed(self, name: str, failures: Counter, exc: DetectorFailed) -> None:
        """Count and log a detector that could not judge; refuses the call in failure mode `closed`."""
        failures.inc()
        log.warning("detector_failed", detector=name, error=str(exc), failure_mode=self._failure)
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


class TimedCascade(Cascade):
    """The detectors in turn, the whole judgement timed (several detectors: their sum is the latency)."""

    async def judge(
        self, user_input: UserInput, raw_authorization: bytes | None, *, offload: bool = False
    ) -> tuple[Verdict | None, bool]:
        started = perf_counter()
        try:
            return await super().judge(user_input, raw_authorization, offload=offload)
        finally:
            MODERATION_TOTAL.observe(perf_counter() - started)


class ParallelCascade(Cascade):
    """GATEWAY_MODERATION_MODE=parallel: local detectors in turn first, then the remote ones at once.

    The first remote flag wins and the others are cancelled, so a call's moderation latency is
    the slowest remote detector's, not their sum. With no flag, a refusal of the input (400)
    comes before a failure, which follows GATEWAY_MODERATION_FAILURE as in turn.
    """

    def __init__(self, detectors: Sequence[Detector], failure: Literal["closed", "open"]) -> None:
        super().__init__(detectors, failure)
        # The parent's loop runs the local steps; the remote ones run here.
        self._remote = [step for step in self._steps if step[1] is None]
        self._steps = [step for step in self._steps if step[1] is not None]

    async def judge(
        self, user_input: UserInput, raw_authorization: bytes | None, *, offload: bool = False
    ) -> tuple[Verdict | None, bool]:
        if not user_input:
            return None, False
        started = perf_counter()
        try:
            verdict, failed_open = await super().judge(user_input, raw_authorization, offload=offload)
            if verdict is not None or not self._remote:
                return verdict, failed_open
            verdict, failed = await self._at_once(user_input, raw_authorization)
            return verdict, failed_open or failed
        finally:
            MODERATION_TOTAL.observe(perf_counter() - started)

    async def _at_once(self, user_input: UserInput, raw_authorization: bytes | None) -> tuple[Verdict | None, bool]:
        authorization = raw_authorization.decode("latin-1") if raw_authorization is not None else None
        tasks = {
            asyncio.ensure_future(_timed(detector, timer, user_input, authorization)): (detector.name, failures)
            for detector, _, timer, failures in self._remote
        }
        pending = set(tasks)
        errors: list[tuple[str, Counter, DetectorFailed | InputRefused]] = []
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    name, failures = tasks[task]
                    exc = task.exception()
                    if isinstance(exc, DetectorFailed | InputRefused):
                        errors.append((name, failures, exc))
                    elif exc is not None:
                        raise exc
                    elif (verdict := task.result()) is not None:
                        return verdict, False
        finally:
            for task in pending:
                task.cancel()
            if pending:  # let the cancelled calls close their connections before the call goes on
                await asyncio.gather(*pending, return_exceptions=True)
        for name, _, exc in errors:
            if isinstance(exc, InputRefused):
                raise _refusal(name, exc)
        for name, failures, exc in errors:
            assert isinstance(exc, DetectorFailed)
            self._failed(name, failures, exc)
        return None, bool(errors)


def make_cascade(
    detectors: Sequence[Detector], failure: Literal["closed", "open"], mode: Literal["sequential", "parallel"]
) -> Cascade:
    """The cascade for GATEWAY_MODERATION_MODE; one detector alone is judged as before, untimed."""
    if mode == "parallel" and sum(not isinstance(detector, LocalDetector) for detector in detectors) > 1:
        return ParallelCascade(detectors, failure)
    if len(detectors) > 1:
        return TimedCascade(detectors, failure)
    return Cascade(detectors, failure)


async def _timed(
    detector: Detector, timer: HistogramChild, user_input: UserInput, authorization: str | None
) -> Verdict | None:
    started = perf_counter()
    verdict = await detector.check(user_input, authorization)  # a cancelled call is not timed
    timer.observe(perf_counter() - started)
    return verdict


def _refusal(name: str, exc: InputRefused) -> Refused:
    # Not the message: it may quote the user's image URL, which can carry a signed token.
    log.info("input_refused", detector=name, part=exc.part)
    return Refused(
        "invalid",
        GatewayError(
            400,
            "invalid_request",
            f"Content moderation could not judge this request as sent: {exc.message}",
            param=exc.part,
        ),
    )
