"""The admin API's answers as pydantic models: what each operation returns, and the error shape.

They make the OpenAPI document's responses (`gateway.admin_openapi`); the handlers in
`gateway.admin` build them from what the store returns.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from gateway.operators import Role

Time = Annotated[str, WithJsonSchema({"type": "string", "format": "date-time", "description": "UTC, ISO-8601."})]


class _Answer(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class _StoreAnswer(_Answer):
    # The store decides what its objects hold: fields it adds pass through, undocumented here.
    model_config = ConfigDict(extra="allow")


class UserStatus(_StoreAnswer):
    """The user's status."""

    user_id: str
    strikes: int = Field(ge=0, description="0 once a block expired.")
    max_strikes: int = Field(ge=1)
    blocked: bool
    blocked_until: Time | None = Field(description="UTC; null when not blocked or blocked for good.")
    permanent: bool
    blocks: int = Field(ge=0, description="Policy blocks so far.")


class UserList(_Answer):
    """One page of users."""

    data: list[UserStatus]
    next: str | None = Field(description="Pass as `after` for the next page; null on the last page.")


EventType = Literal[
    "violation",
    "warning",
    "output_violation",
    "block",
    "unblock",
    "reversed",
    "appeal_accepted",
    "appeal_rejected",
    "note",
    "erased",
]


class Event(_StoreAnswer):
    """One event of a user's audit trail.

    Violations carry categories, detector, rule, path, text_sha256, scores, shadow; blocks and
    unblocks carry actor, operator, reason, block_number, blocked_until, permanent; notes carry
    operator and text.
    """

    id: int
    type: EventType
    at: Time
    categories: list[str] = []
    detector: str | None = None
    rule: str | None = None
    path: str | None = None
    text_sha256: str | None = None
    scores: dict[str, float] | None = None
    shadow: bool = False
    actor: Literal["admin", "policy", "expiry"] | None = None
    operator: str | None = Field(default=None, description="The operator who acted; null for the policy and expiry.")
    reason: str | None = None
    text: str | None = Field(default=None, description="A note's words: a moderator's, never the user's.")
    block_number: int | None = None
    blocked_until: Time | None = None
    permanent: bool = False


class EventList(_Answer):
    """The user's events, newest first."""

    data: list[Event]


class Stats(_StoreAnswer):
    """Blocked users now; violations and blocks over the last 24 hours."""

    blocked_users: int = Field(ge=0)
    violations_24h: int = Field(ge=0)
    blocks_24h: int = Field(ge=0)
    violations_by_category_24h: dict[str, Annotated[int, Field(ge=0)]]
    shadow_violations_24h: int = Field(ge=0, description="Violations recorded in shadow mode (no strike).")
    output_violations_24h: int = Field(ge=0, description="Flagged answers (GATEWAY_OUTPUT_MODERATION).")


class OperatorInfo(_Answer):
    """An operator."""

    name: str
    role: Role
    builtin: bool = Field(description="The built-in operator `admin` of GATEWAY_ADMIN_TOKEN (not stored).")
    created_at: Time | None = Field(description="Null for the built-in operator.")
    created_by: str | None = Field(
        description="The operator who added it, or `cli:` and the account that ran the command."
    )
    last_seen_at: Time | None = Field(description="Its latest call, to the minute; null if none yet (or built in).")


class OperatorList(_Answer):
    """The built-in operator (when GATEWAY_ADMIN_TOKEN is set), then the stored ones by name."""

    data: list[OperatorInfo]


class AddedOperator(OperatorInfo):
    """The operator added, with its token: shown this once, never again."""

    token: str = Field(description="Its bearer token; store it now, only a hash of it is kept.")


class RemovedOperator(OperatorInfo):
    """The operator removed: its token and console sessions no longer work."""

    removed_at: Time
    removed_by: str


class Appeal(_StoreAnswer):
    """An appeal, with the event appealed."""

    id: str
    event_id: str
    user_id: str
    status: Literal["open", "accepted", "rejected"]
    message: str = Field(description="The user's words.")
    created_at: Time
    decided_at: Time | None
    decided_by: str | None = Field(description="The operator who decided it.")
    decision_reason: str | None
    event: Event | None = Field(description="The event appealed, as the user's audit trail lists it.")


class AppealList(_Answer):
    """One page of appeals, oldest first."""

    data: list[Appeal]
    next: str | None = Field(description="Pass as `after` for the next page; null on the last page.")


class LadderRule(_Answer):
    weight: int
    expires: float = Field(description="Seconds a strike of this category counts; 0: until a block or unblock.")
    action: Literal["strike", "block"]
    duration: float | Literal["permanent"] | None = Field(description="A zero-tolerance block's length.")


class PolicyDocument(_StoreAnswer):
    """The enforcement policy in force; durations in seconds, or "permanent"."""

    source: Literal["environment", "file"]
    file: str | None
    max_strikes: int
    window: float = Field(description="Seconds a strike counts unless its category says otherwise; 0: no expiry.")
    warnings: int
    ladder: list[float | Literal["permanent"]]
    escalation: float
    max_block: float
    permanent_after_blocks: int
    categories: dict[str, LadderRule]
    appeal_window_days: float


class NoContent(_Answer):
    """Done; no body."""


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")

    message: str
    type: str
    param: str | None
    code: str


class Error(BaseModel):
    """An OpenAI-shaped error."""

    error: ErrorDetail
