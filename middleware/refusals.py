"""The enforcement refusals: what a violating or blocked user's call is answered, and why.

A refusal says what happened in OpenAI's error shape (the SDK raises BadRequestError or
PermissionDeniedError), with the facts an application needs to tell its user in `error`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from middleware.errors import GatewayError
from middleware.protocols import Block, StrikeOutcome


def violation_answer(flagged: str, outcome: StrikeOutcome) -> tuple[str, GatewayError]:
    if outcome.block is not None:
        error = blocked_error(
            outcome.block,
            f"{flagged}; this user reached {outcome.max_strikes} strikes and is blocked",
            strikes=outcome.strikes,
            max_strikes=outcome.max_strikes,
        )
        return "violation_blocked", error
    left = max(0, outcome.max_strikes - outcome.strikes)
    plural = "" if left == 1 else "s"
    message = (
        f"{flagged}. Strike {outcome.strikes} of {outcome.max_strikes}: "
        f"{left} more violation{plural} will block this user."
    )
    return "violation", GatewayError(
        400, "content_policy_violation", message, strikes=outcome.strikes, max_strikes=outcome.max_strikes
    )


def blocked_error(block: Block, lead: str, **extra: Any) -> GatewayError:
    until = _iso(block.until) if block.until is not None else None
    retry_after = block.retry_after(datetime.now(UTC))
    message = f"{lead} permanently." if until is None else f"{lead} until {until}."
    return GatewayError(
        403,
        "user_blocked",
        message,
        headers={"Retry-After": str(retry_after)} if retry_after is not None else None,
        blocked_until=until,
        permanent=block.permanent,
        **extra,
    )


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
