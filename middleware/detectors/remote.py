"""One JSON call to a remote detector's endpoint, its failures sorted into outage or refusal.

Shared by the `guard` and `azure` detectors: a timeout, a connection failure, a non-2xx answer
about the gateway's own call (401, 403, 404, 429, 5xx) or a body that is not JSON is an outage
(DetectorFailed, GATEWAY_MODERATION_FAILURE applies); a 400, 413 or 422 about the input itself
is a refusal of the input (InputRefused, the client gets 400): a client must not be able to
switch a detector off by sending what it refuses.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import orjson

from middleware.detectors.endpoint_errors import ErrorAnswer
from middleware.protocols import DetectorFailed, InputRefused, JsonPost, Verdict


async def post_json(
    post: JsonPost,
    url: str,
    payload: Any,
    headers: Mapping[str, str],
    seconds: float,
    what: str,
    refused: Callable[[ErrorAnswer], InputRefused] | None = None,
) -> Any:
    """POST `payload` as JSON to `url` within `seconds` and return the answer's JSON; `what` names
    the endpoint, `refused` words a refusal of the input (else a generic one)."""
    body = orjson.dumps(payload)
    try:
        async with asyncio.timeout(seconds):
            status, answer = await post(url, body, headers, seconds)
    except TimeoutError:
        raise DetectorFailed(f"{what} {url} did not answer within {seconds}s") from None
    except OSError as exc:
        raise DetectorFailed(f"{what} {url} could not be reached: {exc}") from None
    if not 200 <= status < 300:
        error = ErrorAnswer.read(status, answer)
        if error.about_input:
            if refused is not None:
                raise refused(error)
            reason = error.message.rstrip(".") or f"HTTP {status}"
            raise InputRefused(f"{what} refused the input ({reason}); change it and retry", "input")
        raise DetectorFailed(f"{what} {url} answered HTTP {status}{error.detail()}")
    try:
        return orjson.loads(answer)
    except orjson.JSONDecodeError:
        raise DetectorFailed(f"{what} {url} answered a body that is not JSON") from None


async def first_flag(calls: Iterable[Awaitable[Verdict | None]]) -> Verdict | None:
    """Run `calls` at once: a flag in any decides; else a refusal of the input; else an outage."""
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, Verdict):
            return outcome
    for wanted in (InputRefused, DetectorFailed, BaseException):
        for outcome in outcomes:
            if isinstance(outcome, wanted):
                raise outcome
    return None
