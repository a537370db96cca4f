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
    """A user's block in force. `until` is None for a permanent block."""

    until: datetime | None

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
    """The user-authored part of a request: what the detectors judge."""

    texts: tuple[str, ...] = ()
    images: tuple[str, ...] = ()  # image URLs, data: URLs included

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
    """What the store records for a flagged call."""

    verdict: Verdict
    path: str


@dataclass(frozen=True, slots=True)
class StrikeOutcome:
    """The user's state right after a strike: `block` is set when the user is now blocked."""

    strikes: int
    max_strikes: int
    block: Block | None


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
        """Add one strike atomically, blocking at the limit. Raises StoreUnavailable."""
        ...

    async def record_shadow_violation(self, user_id: str, violation: Violation) -> None:
        """Audit a violation seen in shadow mode: no strike, no block."""
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
