"""The admin API's requests as pydantic models: its path and query parameters and its bodies
(the answers are `gateway.admin_answers`).

The same models check what a client sends (`gateway.admin_requests` reads a request into them:
a bad value is a 400 `invalid_request`, or `invalid_user_id`, whose `param` names the field) and
make the OpenAPI document (`gateway.admin_openapi`), so the two cannot drift apart.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from urllib.parse import unquote_to_bytes

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)
from pydantic_core import PydanticCustomError

from gateway.appeals import ID, decode_appeal_cursor
from gateway.events import MAX_NOTE
from gateway.operators import BUILTIN, MAX_NAME, NAME_RULE, Role, name_problem
from gateway.store import MAX_BLOCK_SECONDS, MAX_PAGE, decode_cursor
from middleware.users import MAX_USER_ID_LENGTH, user_id_problem

MAX_REASON = 1000
DEFAULT_LIMIT = 100
_DIGITS = re.compile(r"[0-9]{1,7}")


# --- checks of our own -------------------------------------------------------------------------
# Their error type is the answer's error code and their message a whole sentence for the client.


def _refused(message: str, code: str = "invalid_request") -> PydanticCustomError:
    return PydanticCustomError(code, message)


def _path_user_id(raw: object) -> object:
    """The user id a percent-encoded path segment stands for."""
    if not isinstance(raw, str):
        return raw
    try:
        user_id = unquote_to_bytes(raw.encode("latin-1")).decode("utf-8")
    except UnicodeError:
        raise _refused("The user id in the path is not percent-encoded UTF-8.", "invalid_user_id") from None
    problem = user_id_problem(user_id)
    if problem is not None:
        raise _refused(
            f"The user id {problem}: expected 1 to {MAX_USER_ID_LENGTH} characters without control characters.",
            "invalid_user_id",
        )
    return user_id


def _whole_number(value: object) -> object:
    # Digits only: int() would also take "+5", " 5" and "5_0".
    if isinstance(value, str):
        if not _DIGITS.fullmatch(value):
            raise _refused(f"limit must be a whole number from 1 to {MAX_PAGE}.")
        return int(value)
    return value


def _cursor(value: str) -> str:
    try:
        decode_cursor(value)
    except ValueError:
        raise _refused("after must be the next cursor of a previous page.") from None
    return value


def _prefix(value: str) -> str:
    problem = user_id_problem(value) if value else None
    if problem is not None:
        raise _refused(f"prefix {problem}: it is the start of a user id.")
    return value


def _without_nul(value: str, info: ValidationInfo) -> str:
    if "\x00" in value:
        raise _refused(f"{info.field_name or 'The text'} must not hold NUL characters.")
    return value


def _operator_name(raw: object) -> object:
    """An operator's name, in a body or a path segment (a valid name needs no percent-encoding)."""
    if not isinstance(raw, str):
        return raw
    problem = name_problem(raw)
    if problem is not None:
        shown = raw if len(raw) <= MAX_NAME + 8 else raw[:MAX_NAME] + "..."
        raise _refused(f"The operator name {shown!r} is refused: {problem}.")
    return raw


def never_null(schema: dict[str, Any]) -> None:
    """Document a field one may leave out but not send as null by its value's schema alone."""
    schema.pop("default", None)
    values = [branch for branch in schema.pop("anyOf", ()) if branch != {"type": "null"}]
    if values:
        schema.update(values[0])


# --- parameters (path and query) ------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


PathUserId = Annotated[
    str,
    BeforeValidator(_path_user_id),
    WithJsonSchema(
        {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_USER_ID_LENGTH,
            "description": (
                "The user id, as sent in the user header; percent-encode it (`a/b` is `a%2Fb`). No control characters."
            ),
        }
    ),
]
# The bounds before the validator: after one, pydantic writes them into the schema as "ge"/"le".
Limit = Annotated[
    int, Field(ge=1, le=MAX_PAGE, description="How many items to return at most."), BeforeValidator(_whole_number)
]


class NoParams(_Strict):
    """No parameters: any query parameter is refused, so a typo shows."""


class UserParams(_Strict):
    user_id: PathUserId


class UserEventsParams(UserParams):
    limit: Limit = DEFAULT_LIMIT


class ListUsersParams(_Strict):
    blocked: bool | None = Field(default=None, description="Only blocked (`true`) or only unblocked (`false`) users.")
    limit: Limit = DEFAULT_LIMIT
    after: Annotated[str, AfterValidator(_cursor)] | None = Field(
        default=None, description="The `next` cursor of the previous page."
    )
    prefix: Annotated[str, AfterValidator(_prefix)] | None = Field(
        default=None, description="Only the users whose id starts with this (the console's search)."
    )

    @field_validator("blocked", mode="before")
    @classmethod
    def _true_or_false(cls, value: object) -> object:
        if isinstance(value, str):
            if value.lower() not in ("true", "false"):
                raise _refused("blocked must be true or false.")
            return value.lower() == "true"
        return value


OperatorName = Annotated[
    str,
    BeforeValidator(_operator_name),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": "^[a-z0-9][a-z0-9_-]*$",
            "minLength": 1,
            "maxLength": MAX_NAME,
            "not": {"const": BUILTIN},
            "description": f"{NAME_RULE}; not `{BUILTIN}`, the built-in operator of GATEWAY_ADMIN_TOKEN.",
        }
    ),
]


class OperatorParams(_Strict):
    name: OperatorName


def _path_id(name: str) -> Any:
    def parse(raw: object) -> object:
        if isinstance(raw, str):
            if not ID.fullmatch(raw):
                raise _refused(f"The {name} in the path must be a whole number of at most 18 digits.")
            return int(raw)
        return raw

    return BeforeValidator(parse)


AppealId = Annotated[
    int,
    _path_id("appeal id"),
    WithJsonSchema({"type": "string", "pattern": "^[0-9]{1,18}$", "description": "The appeal's id."}),
]
EventId = Annotated[
    int,
    _path_id("event id"),
    WithJsonSchema(
        {"type": "string", "pattern": "^[0-9]{1,18}$", "description": "The event's id (a refusal's `event_id`)."}
    ),
]


class AppealParams(_Strict):
    appeal_id: AppealId


class EventParams(_Strict):
    event_id: EventId


def _appeal_cursor(value: str) -> str:
    try:
        decode_appeal_cursor(value)
    except ValueError:
        raise _refused("after must be the next cursor of a previous page of appeals.") from None
    return value


class ListAppealsParams(_Strict):
    status: Literal["open", "accepted", "rejected"] = Field(
        default="open", description="Which appeals: `open` (the queue, the default), `accepted` or `rejected`."
    )
    limit: Limit = DEFAULT_LIMIT
    after: Annotated[str, AfterValidator(_appeal_cursor)] | None = Field(
        default=None, description="The `next` cursor of the previous page."
    )


# --- request bodies -------------------------------------------------------------------------

Reason = Annotated[str, Field(max_length=MAX_REASON), AfterValidator(_without_nul)]
_REASON = "Why; kept in the audit trail (no NUL characters)."


class BlockRequest(_Strict):
    """No body, or neither `seconds` nor `permanent: true`: the block lasts GATEWAY_BLOCK_SECONDS.

    A new block replaces the one in force.
    """

    model_config = ConfigDict(
        json_schema_extra={"not": {"required": ["seconds", "permanent"], "properties": {"permanent": {"const": True}}}}
    )

    seconds: Annotated[float, Field(gt=0, le=MAX_BLOCK_SECONDS)] | None = Field(
        default=None,
        description="How long the block lasts; for a block without end send `permanent: true` instead.",
        json_schema_extra=never_null,
    )
    permanent: bool = Field(default=False, description="`true`: blocked until unblocked.")
    reason: Reason | None = Field(default=None, description=_REASON)

    @field_validator("seconds", mode="before")
    @classmethod
    def _given(cls, value: object) -> object:
        if value is None:
            raise _refused("seconds must be a number; leave it out for the default block.")
        return value

    @field_validator("permanent")
    @classmethod
    def _not_both(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("seconds") is not None:
            raise _refused("Send either seconds or permanent: true, not both.")
        return value


class UnblockRequest(_Strict):
    reason: Reason | None = Field(default=None, description=_REASON)


def _words(value: str, info: ValidationInfo) -> str:
    if not value.strip():
        raise _refused("text must hold some words, not only spaces.")
    return _without_nul(value, info)


class NoteRequest(_Strict):
    """A moderator's note: the user's timeline lists it as an event of type `note`."""

    text: Annotated[str, Field(min_length=1, max_length=MAX_NOTE), AfterValidator(_words)] = Field(
        description="The moderator's words, kept in the audit trail (no NUL characters)."
    )


def _said(value: str) -> str:
    if not value.strip():
        raise _refused("reason must say why; it is empty.")
    return value


Why = Annotated[Reason, AfterValidator(_said)]


class DecisionRequest(_Strict):
    """`accept` reverses the appealed event and what it caused (a block it caused lifts at once);
    `reject` changes nothing but the appeal. The reason is kept in the audit trail and shown to
    the user's application."""

    decision: Literal["accept", "reject"]
    reason: Why = Field(description=_REASON)


class ReverseRequest(_Strict):
    """Reverse a violation, warning or block and what it caused, as an accepted appeal would."""

    reason: Why = Field(description=_REASON)


class NewOperator(_Strict):
    """The answer holds the new operator's token, shown this once: only its hash is stored."""

    name: OperatorName
    role: Role = Field(description="viewer reads; moderator also acts on users; admin also manages operators.")
