"""The moderation middleware: who is calling, are they blocked, and is what they wrote allowed.

Every call needs the user header, is refused when the gateway's own key does not carry it
(middleware/access.py) and while the user is blocked. The bodies of the judged routes
(middleware/routes.py) are read (bounded), the user's input is judged by the detectors
(middleware/cascade.py), and a flagged call earns a strike instead of reaching the inner app.
Whatever is forwarded gets its body replayed as it came, except for an added
`safety_identifier` or masked personal data when configured. Other calls, bodies included,
stream through untouched.

Paths are relative to the app's mount (`root_path`), as Starlette's Mount gives them:
`path_prefix` says where the judged routes live below it ("" when mounted at /v1).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
from collections.abc import Awaitable, Sequence
from typing import Any, Literal

import structlog

from middleware.access import KeyReach
from middleware.asgi import ASGIApp, Message, Receive, Scope, Send, route_path
from middleware.bodies import Disconnected, add_member, json_object, read_body, read_once, replaying
from middleware.budgets import ByteBudget
from middleware.cascade import make_cascade
from middleware.errors import GatewayError, Refused
from middleware.masking import PiiScreen
from middleware.metrics import BLOCKED_REQUESTS, FAIL_OPEN, VIOLATIONS
from middleware.paths import invalid_path, path_problem
from middleware.protocols import Block, Detector, StoreUnavailable, StrikeStore, UserInput, Verdict, Violation
from middleware.refusals import blocked_error, unrecorded_violation, violation_answer
from middleware.routes import Route, match, unjudgeable_error
from middleware.timing import EarlyCall
from middleware.users import request_user

log = structlog.get_logger(__name__)

SHADOW_HEADER = b"x-gateway-shadow-violation"
# the routes whose bodies take a `safety_identifier` (others would refuse an unknown parameter)
_IDENTIFIED_ROUTES = frozenset({"chat/completions", "completions", "responses"})
_SLASHES = re.compile(r"/{2,}")
# the body's framing headers, replaced when the body changes
_BODY_FRAMING = (b"content-length", b"transfer-encoding")
# Bodies larger than this are parsed, searched for the user's input and judged by local detectors
# off the event loop's thread.
_OFFLOAD_BYTES = 1024 * 1024
_PATHS_CACHED = 1024


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
        path_prefix: str = "",
        body_budget: ByteBudget | None = None,
        users_per_app: bool = False,
        moderation_mode: Literal["sequential", "parallel"] = "sequential",
        pii: Literal["off", "mask", "block"] = "off",
        moderation_timing: Literal["before_call", "during_call"] = "before_call",
        key_reach: KeyReach | None = None,
        unjudgeable: Literal["forward", "refuse"] = "forward",
    ) -> None:
        self.app = app
        self.store = store
        self.cascade = make_cascade(detectors, moderation_failure, moderation_mode)
        self.user_header = user_header
        self.user_header_key = user_header.lower().encode("latin-1")
        self.max_body_bytes = max_body_bytes
        self.max_strikes = max_strikes
        self.store_failure = store_failure
        self.enforcement = enforcement
        self.safety_salt = safety_salt
        self.body_budget = body_budget or ByteBudget(max_body_bytes * 64)
        self.users_per_app = users_per_app
        self.pii = PiiScreen(pii) if pii != "off" else None
        # A form is not rewritten as a JSON body can be, byte for byte: its personal data is refused.
        self.pii_in_forms = PiiScreen("block") if pii != "off" else None
        self.during_call = moderation_timing == "during_call"
        # Built only with OPENAI_API_KEY set: without it the client's own key goes upstream.
        self.key_reach = key_reach
        self.refuse_unjudgeable = unjudgeable == "refuse"
        prefix = path_prefix.rstrip("/")
        self.prefix = prefix + "/"
        self._prefix_length = len(prefix)  # the judged routes' paths are relative to the prefix
        self._plain_paths: set[bytes] = set()

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # A plain function handing back one awaitable: each coroutine layer costs every request.
        if scope["type"] != "http":
            return self.app(scope, receive, send)
        path = route_path(scope)
        if not path.startswith(self.prefix):
            return self.app(scope, receive, send)
        state = scope.get("state")
        # the access log reads these; without a state dict they go nowhere
        note: dict[str, Any] = state if isinstance(state, dict) else {}
        return self._call(scope, receive, send, path, note)

    async def _call(self, scope: Scope, receive: Receive, send: Send, path: str, note: dict[str, Any]) -> None:
        try:
            raw_path = scope.get("raw_path")
            if raw_path is not None and raw_path not in self._plain_paths:
                self._check_path(raw_path, scope)
            user_id, headers = request_user(scope, note, self.user_header_key, self.user_header, self.users_per_app)
            cut = self._prefix_length
            relative = path[cut:] if cut else path
            if self.key_reach is not None:
                refusal = self.key_reach.refusal(relative, headers)
                if refusal is not None:
                    raise Refused("route_not_allowed", refusal)
            known, block = self.store.cached_block(user_id)
            if not known:
                decision = await self._check_block(user_id)
            elif block is not None:
                raise self._blocked(block)
            else:
                decision = "allow"
            route = match(scope["method"], relative)
            if route is None:
                note["decision"] = decision
                await self.app(scope, receive, send)
                return

            if len(headers) != len(scope["headers"]):  # a header came twice: one that says how to read the body?
                read_once(scope["headers"])
            reading = "json" if route.form is None else route.reading(headers)
            budget = self.body_budget
            try:
                body, held = await read_body(receive, headers.get(b"content-length"), self.max_body_bytes, budget)
            except Disconnected:
                note["decision"] = "disconnected"
                return
            try:
                offload = len(body) > _OFFLOAD_BYTES
                if offload:
                    request, user_input = await asyncio.to_thread(route.read, body, headers, reading)
                elif reading == "json" and route.json is not None:  # the common case, without a call
                    request = json_object(headers.get(b"content-encoding"), body)
                    user_input = route.json(request)
                else:
                    request, user_input = route.read(body, headers, reading)
                if self.refuse_unjudgeable and user_input.unjudgeable:
                    # before the detectors: what they cannot read is no violation, and earns no strike
                    raise Refused("unjudgeable", unjudgeable_error(user_input))
                if self.pii is not None:
                    scope, body, user_input = await self._screen_pii(
                        scope, body, user_input, route, offload, form=request is None
                    )
                if (
                    self.safety_salt is not None
                    and request is not None
                    and route.name in _IDENTIFIED_ROUTES
                    and "safety_identifier" not in request
                ):
                    scope, body = self._with_safety_identifier(scope, body, request, user_id)
                # GATEWAY_MODERATION_TIMING=during_call: the upstream call starts now, its answer held.
                early = EarlyCall(self.app, scope, replaying(body, receive)) if self.during_call else None
                try:
                    verdict, failed_open = await self.cascade.judge(
                        user_input, headers.get(b"authorization"), offload=offload
                    )
                    forward = send
                    if verdict is not None:
                        await self._violation(scope, user_id, verdict, path)  # refuses unless shadow
                        note["decision"] = "shadow_violation"
                        categories = ",".join(verdict.categories).encode("latin-1", "replace")
                        forward = _adding_header(send, SHADOW_HEADER, categories)
                    elif failed_open:
                        decision = "fail_open"
                    # Checked again now that the body is in and judged: a call opened before a
                    # block must not slip through after it.
                    if not self._cached_clear(user_id) and await self._check_block(user_id) == "fail_open":
                        decision = "fail_open"  # the store went away meanwhile
                    if verdict is None:
                        note["decision"] = decision
                except BaseException:
                    if early is not None:
                        await early.cancel()
                    raise
                if early is not None:
                    await early.release(forward)
                    return
                await self.app(scope, replaying(body, receive), forward)
            finally:
                budget.give(held)
        except Refused as refused:
            note["decision"] = refused.decision
            await refused.error.send(send)
        except GatewayError as error:  # the body's bounds and shape: 413, 400 invalid_json/_request, 503 server_busy
            note["decision"] = "server_busy" if error.code == "server_busy" else "invalid"
            await error.send(send)

    async def _violation(self, scope: Scope, user_id: str, verdict: Verdict, path: str) -> None:
        """Count, log and record a flagged call: a strike (which refuses it), or in shadow mode an audit."""
        state = scope.get("state")
        app = state.get("app") if isinstance(state, dict) else None
        violation = Violation(verdict=verdict, path=_audit_path(scope, path), app=app)
        shadow = self.enforcement == "shadow"
        for category in verdict.categories:
            VIOLATIONS.labels(category, verdict.detector, "true" if shadow else "false").inc()
        log.info(
            "violation",
            user_id=user_id,
            path=violation.path,
            detector=verdict.detector,
            categories=list(verdict.categories),
            rule=verdict.rule,
            shadow=shadow,
        )
        if not shadow:
            await self._strike(user_id, violation)  # always refuses
        await self._record_shadow(user_id, violation)

    async def _screen_pii(
        self, scope: Scope, body: bytes, user_input: UserInput, route: Route, offload: bool, *, form: bool
    ) -> tuple[Scope, bytes, UserInput]:
        """GATEWAY_PII: refuses personal data (`block`, and in forms), or masks it in the body and the input."""
        screen = self.pii_in_forms if form else self.pii
        assert screen is not None
        if offload:
            masked, user_input = await asyncio.to_thread(screen.apply, body, user_input, route.extract)
        else:
            masked, user_input = screen.apply(body, user_input, route.extract)
        if masked is body:
            return scope, body, user_input
        return _framed(scope, masked), masked, user_input

    def _with_safety_identifier(
        self, scope: Scope, body: bytes, request: dict[str, Any], user_id: str
    ) -> tuple[Scope, bytes]:
        assert self.safety_salt is not None
        identifier = hmac.new(self.safety_salt, user_id.encode(), hashlib.sha256).hexdigest()[:64]
        body = add_member(body, request, "safety_identifier", identifier)
        return _framed(scope, body), body

    def _check_path(self, raw: bytes, scope: Scope) -> None:
        # The path the proxy forwards (the client's, as sent) must be the one judged here.
        root = scope.get("root_path", "").encode("latin-1")
        problem = path_problem((raw[len(root) :] if raw.startswith(root) else raw).decode("latin-1"))
        if problem is not None:
            raise Refused("invalid", invalid_path(problem))
        if len(self._plain_paths) < _PATHS_CACHED:  # paths are the client's choice: keep only so many
            self._plain_paths.add(raw)

    def _cached_clear(self, user_id: str) -> bool:
        """True when the cache knows the user is not blocked; refuses one it knows blocked; False: ask the store."""
        known, block = self.store.cached_block(user_id)
        if block is not None:
            raise self._blocked(block)
        return known

    async def _check_block(self, user_id: str) -> str:
        """The decision so far ("allow" or "fail_open"), asking the store; refuses a blocked user."""
        try:
            block = await self.store.current_block(user_id)
        except StoreUnavailable as exc:
            log.warning("block_check_failed", user_id=user_id, error=str(exc), failure_mode=self.store_failure)
            if self.store_failure == "closed":
                raise Refused(
                    "store_unavailable",
                    GatewayError(
                        503,
                        "store_unavailable",
                        "The gateway cannot check this user's status right now; retry in a moment.",
                    ),
                ) from None
            FAIL_OPEN.labels("store").inc()
            return "fail_open"
        if block is not None:
            raise self._blocked(block)
        return "allow"

    @staticmethod
    def _blocked(block: Block) -> Refused:
        BLOCKED_REQUESTS.inc()
        return Refused("blocked", blocked_error(block, "This user is blocked"))

    async def _strike(self, user_id: str, violation: Violation) -> None:
        categories = ", ".join(violation.verdict.categories)
        flagged = f"The request was flagged by content moderation ({categories}) and was not forwarded"
        try:
            outcome = await self.store.record_violation(user_id, violation)
        except StoreUnavailable as exc:
            log.warning("strike_not_recorded", user_id=user_id, error=str(exc), failure_mode=self.store_failure)
            if self.store_failure == "closed":
                raise Refused(
                    "store_unavailable",
                    GatewayError(
                        503, "store_unavailable", f"{flagged}; the gateway cannot record it right now, retry later."
                    ),
                ) from None
            raise Refused(
                "violation", unrecorded_violation(flagged, violation.verdict.categories, self.max_strikes)
            ) from None
        raise Refused(*violation_answer(flagged, outcome))

    async def _record_shadow(self, user_id: str, violation: Violation) -> None:
        try:
            await self.store.record_shadow_violation(user_id, violation)
        except StoreUnavailable as exc:
            # shadow mode must never cost a call: the metric and the log line above still count it
            log.warning("shadow_violation_not_recorded", user_id=user_id, error=str(exc))


def _audit_path(scope: Scope, path: str) -> str:
    # The route as the client called it, mount and ids included (/v1/threads/thread_1/messages),
    # in one spelling: `//` and a trailing `/` dropped, lower-cased.
    root: str = scope.get("root_path", "")
    return (root + _SLASHES.sub("/", path).rstrip("/")).lower()


def _framed(scope: Scope, body: bytes) -> Scope:
    """`scope` with the framing headers of `body`, which replaced the one the client sent."""
    scope = dict(scope)
    scope["headers"] = [
        *((key, value) for key, value in scope["headers"] if key not in _BODY_FRAMING),
        (b"content-length", str(len(body)).encode()),
    ]
    return scope


def _adding_header(send: Send, name: bytes, value: bytes) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), (name, value)]}
        await send(message)

    return wrapped
