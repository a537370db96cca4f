"""What the moderation middleware needs from the outside world, as small protocols.

The middleware knows nothing of asyncpg or aiohttp: `gateway` implements these (the strike
store on PostgreSQL, the HTTP call of the `openai` detector on its aiohttp session).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class Block:
    """A user's block in force, with what a refusal says about it. `until` is None for a permanent block.

    `event_id` is the block's audit event (the handle for an appeal), `categories` the flagged
    categories behind it (none for a moderator's block), `strikes` the points that counted when
    it began and `max_strikes` the policy's limit. It may be appealed until `appealable_until`
    (None: not appealable, e.g. already appealed).
    """

    until: datetime | None
    event_id: str | None = None
    categories: tuple[str, ...] = ()
    strikes: int = 0
    max_strikes: int = 0
    appealable_until: datetime | None = None

    @property
    def permanent(self) -> bool:
        return self.until is None

    def retry_after(self, now: datetime) -> int | None:
        """Whole seconds left, rounded up (at least 1); None for a permanent block."""
        if self.until is None:
            return None
        return max(1, math.ceil((self.until - now).total_seconds()))


@dataclass(frozen=True, slots=True)
class UserInput:
    """The user-authored part of a request: what the detectors judge, and what they cannot read.

    `unjudgeable` names the parts no detector reads (audio, files, images referenced by file id,
    token ids), as the request parameter that holds them (`messages[2].content[1]`, a form
    field's name): GATEWAY_UNJUDGEABLE decides whether such a call is forwarded or refused.
    """

    texts: tuple[str, ...] = ()
    images: tuple[str, ...] = ()  # image URLs, data: URLs included
    unjudgeable: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.texts or self.images)


@dataclass(frozen=True, slots=True)
class Verdict:
    """A detector's finding against one request. Only flagged verdicts are returned."""

    detector: str
    categories: tuple[str, ...]
    text_sha256: str  # of the flagged text or image URL; the audit keeps this, never the text
    rule: str | None = None
    scores: Mapping[str, float] = field(default_factory=dict)  # scores that crossed a threshold


@dataclass(frozen=True, slots=True)
class Violation:
    """What the store records for a flagged call. `app`: the application that made it, when known."""

    verdict: Verdict
    path: str
    app: str | None = None


@dataclass(frozen=True, slots=True)
class StrikeOutcome:
    """The user's state right after a violation was recorded, and what the violation was.

    `strikes` are the points that count now and `max_strikes` the limit; `block` is set when
    the user is blocked now (by this violation, or already). `event_id` is the violation's audit
    event, `categories` its flagged categories, `points` what it added (0 for a warning, for
    a violation that does not count, and for one recorded while the user was blocked),
    `warning` whether it was answered as a warning; it may be appealed until
    `appealable_until` (None: not appealable).
    """

    strikes: int
    max_strikes: int
    block: Block | None
    event_id: str | None = None
    categories: tuple[str, ...] = ()
    points: int = 0
    warning: bool = False
    appealable_until: datetime | None = None


class StoreUnavailable(Exception):
    """The database could not answer; the middleware applies GATEWAY_STORE_FAILURE."""


class DetectorFailed(Exception):
    """A detector could not judge; the middleware applies GATEWAY_MODERATION_FAILURE."""


class InputRefused(Exception):
    """The input cannot be judged as sent (say, the moderation endpoint cannot fetch an image URL).

    Neither an outage nor a violation: the call is answered 400 `invalid_request` with `param`
    naming the part, whatever GATEWAY_MODERATION_FAILURE says, and no strike is recorded. A
    client must not be able to turn a detector's refusal into a bypass (failure mode `open`) or
    into free retries of flagged text (failure mode `closed`).
    """

    def __init__(self, message: str, part: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.part = part


class StrikeStore(Protocol):
    def cached_block(self, user_id: str) -> tuple[bool, Block | None]:
        """`(True, block or None)` when the store can tell from memory now, without I/O; else
        `(False, None)` and only `current_block` can tell. The middleware asks this first on
        every call: answering here spares a coroutine on the hot path. Never raises."""
        ...

    async def current_block(self, user_id: str) -> Block | None:
        """The block in force for this user, or None. Raises StoreUnavailable."""
        ...

    async def record_violation(self, user_id: str, violation: Violation) -> StrikeOutcome:
        """Record a violation under the policy atomically (a warning, or its points, blocking at
        the limit or at once for zero tolerance). Raises StoreUnavailable."""
        ...

    async def record_shadow_violation(self, user_id: str, violation: Violation) -> None:
        """Audit a violation seen in shadow mode: no strike, no block."""
        ...

    async def record_output_violation(self, user_id: str, violation: Violation, *, counts: bool) -> StrikeOutcome:
        """Record a flagged answer of the model to this user (an `output_violation` event).

        `counts`: it counts against the user like an input violation (points, warnings, blocks
        under the same policy); otherwise it is only audited and adds no points. Raises
        StoreUnavailable.
        """
        ...


class Detector(Protocol):
    name: str
    cost: int  # detectors run cheapest first

    async def check(self, user_input: UserInput, authorization: str | None) -> Verdict | None:
        """A verdict if the input is flagged, None if clean. Raises DetectorFailed.

        `authorization` is the client's Authorization header, for detectors that call the
        upstream with the call's own credentials.
        """
        ...


@runtime_checkable
class LocalDetector(Detector, Protocol):
    """A detector that judges in-process, without I/O (the rules): the middleware calls
    `check_now` instead of awaiting `check`, which spares a coroutine per detector and call."""

    def check_now(self, user_input: UserInput) -> Verdict | None:
        """The same verdict as `check` gives. Raises DetectorFailed."""
        ...


# POST `body` (JSON) to `url` with `headers`, within `timeout` seconds: (status, response body).
# Raises DetectorFailed on a connection failure or timeout.
JsonPost = Callable[[str, bytes, Mapping[str, str], float], Awaitable[tuple[int, bytes]]]
