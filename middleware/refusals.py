"""The enforcement refusals: what a violating or blocked user's call is answered, and why.

A refusal says what happened in OpenAI's error shape (the SDK raises BadRequestError or
PermissionDeniedError), with a statement of reasons in `error` that an application can show
its user: the audit event behind the answer (`event_id`, the handle for an appeal), its
`categories`, the points that count and the limit, the block's end, and whether it may still
be appealed.
"""

from __future__ import annotations

from datetime import UTC, datetime

from middleware.errors import GatewayError
from middleware.protocols import Block, StrikeOutcome


def violation_answer(flagged: str, outcome: StrikeOutcome) -> tuple[str, GatewayError]:
    """The refusal of a flagged call the store recorded: 400, or 403 when the user is blocked now."""
    now = datetime.now(UTC)
    if outcome.block is not None:
        if outcome.strikes >= outcome.max_strikes:
            lead = f"{flagged}; this user reached {outcome.max_strikes} strikes and is blocked"
        else:  # zero tolerance, or a block that came first
            lead = f"{flagged}; this user is blocked"
        return "violation_blocked", blocked_error(outcome.block, lead, now=now)
    if outcome.warning:
        message = (
            f"{flagged}. This is a warning and adds no strike; further violations count "
            f"({outcome.strikes} of {outcome.max_strikes} strikes now)."
        )
    else:
        left = max(0, outcome.max_strikes - outcome.strikes)
        if outcome.points == 1:
            more = f"Strike {outcome.strikes} of {outcome.max_strikes}: {left} more violation{_s(left)}"
        else:
            more = (
                f"Strikes: {outcome.strikes} of {outcome.max_strikes} (this violation added {outcome.points}): "
                f"{left} more point{_s(left)}"
            )
        message = f"{flagged}. {more} will block this user."
    return "violation", GatewayError(
        400,
        "content_policy_violation",
        message,
        event_id=outcome.event_id,
        categories=list(outcome.categories),
        warning=outcome.warning,
        strikes=outcome.strikes,
        max_strikes=outcome.max_strikes,
        appealable=_appealable(outcome.appealable_until, now),
    )


def unrecorded_violation(flagged: str, categories: tuple[str, ...], max_strikes: int) -> GatewayError:
    """The 400 for a flagged call whose strike could not be recorded (GATEWAY_STORE_FAILURE=open)."""
    return GatewayError(
        400,
        "content_policy_violation",
        f"{flagged}.",
        event_id=None,
        categories=list(categories),
        warning=False,
        strikes=None,
        max_strikes=max_strikes,
        appealable=False,
    )


def blocked_error(block: Block, lead: str, *, now: datetime | None = None) -> GatewayError:
    """The 403 of a blocked user: `strikes` are the points that counted when the block began."""
    now = now or datetime.now(UTC)
    until = _iso(block.until) if block.until is not None else None
    retry_after = block.retry_after(now)
    message = f"{lead} permanently." if until is None else f"{lead} until {until}."
    return GatewayError(
        403,
        "user_blocked",
        message,
        headers={"Retry-After": str(retry_after)} if retry_after is not None else None,
        event_id=block.event_id,
        categories=list(block.categories),
        strikes=block.strikes,
        max_strikes=block.max_strikes,
        blocked_until=until,
        permanent=block.permanent,
        appealable=_appealable(block.appealable_until, now),
    )


def _s(count: int) -> str:
    return "" if count == 1 else "s"


def _appealable(until: datetime | None, now: datetime) -> bool:
    return until is not None and now < until


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
