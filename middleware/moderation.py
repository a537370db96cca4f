"""The moderation middleware: who is calling, are they blocked, and is what they wrote allowed.

Every call under the path prefix needs the user header and is refused while the user is
blocked. The bodies of the moderated routes are read (bounded), the user's input is judged by
the detectors, cheapest first, and a flagged call earns a strike instead of reaching the inner
app. Whatever is forwarded gets its body replayed as it came, except for an added
`safety_identifier` when configured. Other calls, bodies included, stream through untouched.
"""

from __future__ import annotations

import hashlib
import hmac
import posixpath
import re
import unicodedata
from collections.abc import Awaitable, Iterable, Sequence
from time import perf_counter
from typing import Any, Literal

import orjson
import structlog

from middleware.asgi import ASGIApp, Message, Receive, Scope, Send
from middleware.errors import GatewayError
from middleware.extract import extract_user_input
from middleware.metrics import BLOCKED_REQUESTS, DETECTOR_FAILURES, FAIL_OPEN, MODERATION_DURATION, VIOLATIONS
from middleware.protocols import (
    Block,
    Detector,
    DetectorFailed,
    LocalDetector,
    StoreUnavailable,
    StrikeStore,
    UserInput,
    Verdict,
    Violation,
)
from middleware.refusals import blocked_error, violation_answer

log = structlog.get_logger(__name__)

MAX_USER_ID_LENGTH = 256
SHADOW_HEADER = b"x-gateway-shadow-violation"
_ROUTES = {"/chat/completions": "chat", "/completions": "completions", "/responses": "responses"}
_FORBIDDEN_IN_USER_ID = frozenset({"Cc", "Zl", "Zp"})  # control characters and line breaks
_SLASHES = re.compile(r"/{2,}")
# the body's framing headers, replaced when the body changes
_BODY_FRAMING = (b"content-length", b"transfer-encoding")


def user_id_problem(user_id: str) -> str | None:
    """Why this is not a valid end-user id (for the user header and admin paths alike), or None."""
    if not user_id:
        return "is empty"
    if len(user_id) > MAX_USER_ID_LENGTH:
        return f"is longer than {MAX_USER_ID_LENGTH} characters"
    # In ASCII the forbidden characters are exactly the unprintable ones: one C call.
    if (
        not user_id.isprintable()
        if user_id.isascii()
        else any(unicodedata.category(char) in _FORBIDDEN_IN_USER_ID for char in user_id)
    ):
        return "holds control characters"
    return None


class _Refused(Exception):
    """Ends a call with the gateway's own answer; `decision` goes to the access log."""

    def __init__(self, decision: str, error: GatewayError) -> None:
        self.decision = decision
        self.error = error


class ModerationMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        store: StrikeStore,
        detectors: Sequence[Detector],
        user_header: str,
        max_body_bytes: int,
        max_strikes: int,
        moderation_failure: Literal["closed", "open"],
        store_failure: Literal["closed", "open"],
        enforcement: Literal["enforce", "shadow"],
        safety_salt: bytes | None,
        path_prefix: str = "/v1",
    ) -> None:
        self.app = app
        self.store = store
        self.detectors = sorted(detectors, key=lambda detector: detector.cost)
        # Each detector with its check_now when it judges in-process (called without a coroutine)
        # and its timer.
        self._steps = [
            (
                detector,
                detector.check_now if isinstance(detector, LocalDetector) else None,
                MODERATION_DURATION.labels(detector.name),
            )
            for detector in self.detectors
        ]
        self._failures = {detector.name: DETECTOR_FAILURES.labels(detector.name) for detector in self.detectors}
        self.user_header = user_header
        self.user_header_key = user_header.lower().encode("latin-1")
        self.max_body_bytes = max_body_bytes
        self.max_strikes = max_strikes
        self.moderation_failure = moderation_failure
        self.store_failure = store_failure
        self.enforcement = enforcement
        self.safety_salt = safety_salt
        prefix = path_prefix.rstrip("/")
        self.prefix = prefix + "/"
        self.routes = {(prefix + suffix).lower(): route for suffix, route in _ROUTES.items()}

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # A plain function handing back one awaitable: each coroutine layer costs every request.
        if scope["type"] != "http":
            return self.app(scope, receive, send)
        path = _app_path(scope)
        if not path.startswith(self.prefix):
            return self.app(scope, receive, send)
        state = scope.get("state")
        # the access log reads these; without a state dict they go nowhere
        note: dict[str, Any] = state if isinstance(state, dict) else {}
        return self._call(scope, receive, send, path, note)

    async def _call(self, scope: Scope, receive: Receive, send: Send, path: str, note: dict[str, Any]) -> None:
        try:
            headers = _first_values(scope["headers"])
            user_id = self._user_id(headers.get(self.user_header_key))
            note["user_id"] = user_id
            known, block = self.store.cached_block(user_id)
            if not known:
                decision = await self._check_block(user_id)
            elif block is not None:
                raise self._blocked(block)
            else:
                decision = "allow"

            # Match the route as an upstream would see it: a trailing slash or `//` must not skip moderation.
            # A path that is already a route's own spelling (the usual case) needs no normalising.
            route_path = path
            route = None
            if scope["method"] == "POST":
                route = self.routes.get(path)
                if route is None:
                    route_path = posixpath.normpath(_SLASHES.sub("/", path)).lower()
                    route = self.routes.get(route_path)
            if route is None:
                note["decision"] = decision
                await self.app(scope, receive, send)
                return

            body = await self._read_body(headers.get(b"content-length"), receive)
            if body is None:
                note["decision"] = "disconnected"
                return
            request = _json_object(headers.get(b"content-encoding"), body)
            user_input = extract_user_input(route, request)
            verdict, failed_open = await self._moderate(user_input, headers.get(b"authorization"))
            if failed_open:
                decision = "fail_open"

            forward = send
            if verdict is not None:
                violation = Violation(verdict=verdict, path=route_path)
                shadow = self.enforcement == "shadow"
                for category in verdict.categories:
                    VIOLATIONS.labels(category, verdict.detector, "true" if shadow else "false").inc()
                log.info(
                    "violation",
                    user_id=user_id,
                    path=route_path,
                    detector=verdict.detector,
                    categories=list(verdict.categories),
                    rule=verdict.rule,
                    shadow=shadow,
                )
                if not shadow:
                    await self._strike(user_id, violation)  # always refuses
                await self._record_shadow(user_id, violation)
                decision = "shadow_violation"
                forward = _adding_header(send, SHADOW_HEADER, ",".join(verdict.categories).encode("latin-1", "replace"))

            if self.safety_salt is not None and "safety_identifier" not in request:
                identifier = hmac.new(self.safety_salt, user_id.encode(), hashlib.sha256).hexdigest()[:64]
                body = _add_member(body, request, "safety_identifier", identifier)
                scope = dict(scope)
                scope["headers"] = [
                    *((key, value) for key, value in scope["headers"] if key not in _BODY_FRAMING),
                    (b"content-length", str(len(body)).encode()),
                ]
            note["decision"] = decision
            await self.app(scope, _replaying(body, receive), forward)
        except _Refused as refused:
            note["decision"] = refused.decision
            await refused.error.send(send)

    def _user_id(self, raw: bytes | None) -> str:
        if raw is None:
            raise _Refused(
                "invalid",
                GatewayError(
                    400, "missing_user_id", f"Send the end user's id in the {self.user_header} header.", param=None
                ),
            )
        try:
            user_id = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            user_id = ""
        if user_id_problem(user_id) is not None:
            raise _Refused(
                "invalid",
                GatewayError(
                    400,
                    "invalid_user_id",
                    f"The {self.user_header} header must be 1 to {MAX_USER_ID_LENGTH} characters of UTF-8 text "
                    "without control characters.",
                ),
            )
        return user_id

    async def _check_block(self, user_id: str) -> str:
        """The decision so far ("allow" or "fail_open"); refuses a blocked user."""
        try:
            block = await self.store.current_block(user_id)
        except StoreUnavailable as exc:
            if self.store_failure == "closed":
                log.warning("block_check_failed", user_id=user_id, error=str(exc), failure_mode="closed")
                raise _Refused(
                    "store_unavailable",
                    GatewayError(
                        503,
                        "store_unavailable",
                        "The gateway cannot check this user's status right now; retry in a moment.",
                    ),
                ) from None
            log.warning("block_check_failed", user_id=user_id, error=str(exc), failure_mode="open")
            FAIL_OPEN.labels("store").inc()
            return "fail_open"
        if block is not None:
            raise self._blocked(block)
        return "allow"

    @staticmethod
    def _blocked(block: Block) -> _Refused:
        BLOCKED_REQUESTS.inc()
        return _Refused("blocked", blocked_error(block, "This user is blocked"))

    async def _read_body(self, declared: bytes | None, receive: Receive) -> bytes | None:
        """The whole request body (`declared`: its Content-Length), or None if the client went away first."""
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_body_bytes:
            raise self._too_large()
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._too_large()
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)

    def _too_large(self) -> _Refused:
        return _Refused(
            "invalid",
            GatewayError(
                413,
                "request_too_large",
                f"The request body is larger than the gateway's limit of {self.max_body_bytes} bytes.",
            ),
        )

    async def _moderate(self, user_input: UserInput, raw_authorization: bytes | None) -> tuple[Verdict | None, bool]:
        """The first detector's verdict, cheapest first; and whether a failed detector was skipped."""
        if not user_input:
            return None, False
        failed_open = False
        for detector, check_now, timer in self._steps:
            started = perf_counter()
            try:
                if check_now is not None:
                    verdict = check_now(user_input)
                else:
                    authorization = raw_authorization.decode("latin-1") if raw_authorization is not None else None
                    verdict = await detector.check(user_input, authorization)
            except DetectorFailed as exc:
                self._failures[detector.name].inc()
                log.warning(
                    "detector_failed", detector=detector.name, error=str(exc), failure_mode=self.moderation_failure
                )
                if self.moderation_failure == "closed":
                    raise _Refused(
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
            finally:
                timer.observe(perf_counter() - started)
            if verdict is not None:
                return verdict, failed_open
        return None, failed_open

    async def _strike(self, user_id: str, violation: Violation) -> None:
        categories = ", ".join(violation.verdict.categories)
        flagged = f"The request was flagged by content moderation ({categories}) and was not forwarded"
        try:
            outcome = await self.store.record_violation(user_id, violation)
        except StoreUnavailable as exc:
            log.warning("strike_not_recorded", user_id=user_id, error=str(exc), failure_mode=self.store_failure)
            if self.store_failure == "closed":
                raise _Refused(
                    "store_unavailable",
                    GatewayError(
                        503, "store_unavailable", f"{flagged}; the gateway cannot record it right now, retry later."
                    ),
                ) from None
            raise _Refused(
                "violation",
                GatewayError(
                    400,
                    "content_policy_violation",
                    f"{flagged}.",
                    strikes=None,
                    max_strikes=self.max_strikes,
                ),
            ) from None
        raise _Refused(*violation_answer(flagged, outcome))

    async def _record_shadow(self, user_id: str, violation: Violation) -> None:
        try:
            await self.store.record_shadow_violation(user_id, violation)
        except StoreUnavailable as exc:
            # shadow mode must never cost a call: the metric and the log line above still count it
            log.warning("shadow_violation_not_recorded", user_id=user_id, error=str(exc))


def _first_values(headers: Iterable[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    """The request's headers by (lower-case) name, the first of each name winning.

    One C call instead of a loop over the headers in Python: a third of the bytecode.
    """
    return dict(reversed(headers if isinstance(headers, list | tuple) else list(headers)))


def _app_path(scope: Scope) -> str:
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    # ASGI puts root_path inside path; the prefix is relative to the app
    if root and path.startswith(root):
        return path[len(root) :]
    return path


def _json_object(encoding: bytes | None, body: bytes) -> dict[str, Any]:
    if encoding is not None and encoding.strip().lower() not in (b"", b"identity"):
        raise _Refused(
            "invalid",
            GatewayError(
                400,
                "invalid_json",
                "Send this request's body uncompressed: the gateway must read it to moderate it.",
            ),
        )
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError:
        request = None
    if not isinstance(request, dict):
        raise _Refused("invalid", GatewayError(400, "invalid_json", "The request body must be a JSON object."))
    return request


def _add_member(body: bytes, request: dict[str, Any], key: str, value: str) -> bytes:
    """`body` with one more string member, spliced in after the opening brace.

    Splicing instead of re-serialising keeps every other byte as the client sent it: integers
    beyond 64 bits and float spellings would not survive a round trip through a parser.
    """
    start = body.index(b"{") + 1  # only whitespace can precede it in a body that parsed as an object
    member = orjson.dumps(key) + b":" + orjson.dumps(value)
    return body[:start] + member + (b"," if request else b"") + body[start:]


def _replaying(body: bytes, receive: Receive) -> Receive:
    """A `receive` that yields the buffered body once, then the real one (for http.disconnect)."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def _adding_header(send: Send, name: bytes, value: bytes) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), (name, value)]}
        await send(message)

    return wrapped
