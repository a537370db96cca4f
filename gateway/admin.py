"""The admin REST API (`/admin`): user status, block, unblock, user listing, audit events, stats.

Routes match the raw, still percent-encoded path, one segment per `{user_id}`, so a user id may
hold any character: `/admin/users/a%2Fb/events` is the events of user `a/b`, and `..%2f` stays
inside the id instead of reaching another route.
"""

from __future__ import annotations

import hmac
import math
import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote, unquote, unquote_to_bytes

import orjson
import structlog
from starlette._utils import get_route_path
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.websockets import WebSocketClose

from gateway.admin_openapi import build_document
from gateway.settings import Settings
from gateway.store import MAX_BLOCK_SECONDS, MAX_PAGE, Store
from gateway.throttle import AuthThrottle
from middleware.asgi import Receive, Scope, Send, header
from middleware.errors import GatewayError
from middleware.protocols import StoreUnavailable
from middleware.users import MAX_USER_ID_LENGTH, user_id_problem

MAX_REASON = 1000
DEFAULT_LIMIT = 100
MAX_BODY_BYTES = 64 * 1024

OPENAPI = build_document(
    max_user_id=MAX_USER_ID_LENGTH,
    max_reason=MAX_REASON,
    max_limit=MAX_PAGE,
    default_limit=DEFAULT_LIMIT,
    max_seconds=MAX_BLOCK_SECONDS,
)
_OPENAPI_BYTES = orjson.dumps(OPENAPI)
_LIMIT = re.compile(r"[0-9]{1,7}")

log = structlog.get_logger("gateway.admin")

Endpoint = Callable[[Request], Awaitable[Response]]


class AdminAPI:
    """The admin ASGI app; mount it at `/admin`. `routes` is what `OPENAPI` describes."""

    def __init__(self, store: Store, settings: Settings, *, throttle: AuthThrottle | None = None) -> None:
        self._store = store
        self._settings = settings
        token = settings.admin_token.get_secret_value() if settings.admin_token is not None else ""
        # An empty token would accept "Bearer " from anyone: it disables the API like an unset one.
        self._token = token.encode("utf-8") if token else None
        self._throttle = AuthThrottle() if throttle is None else throttle
        self.routes = [
            Route("/users", self._list_users, methods=["GET"]),
            Route("/users/{user_id}", self._get_user, methods=["GET"]),
            Route("/users/{user_id}/events", self._events, methods=["GET"]),
            Route("/block/{user_id}", self._block, methods=["PUT"]),
            Route("/unblock/{user_id}", self._unblock, methods=["PUT"]),
            Route("/stats", self._stats, methods=["GET"]),
            Route("/openapi.json", self._openapi, methods=["GET"]),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await WebSocketClose()(scope, receive, send)
            return
        try:
            response = await self._respond(scope, receive)
        except GatewayError as error:
            await error.send(send)
            return
        await response(scope, receive, send)

    async def _respond(self, scope: Scope, receive: Receive) -> Response:
        # Disabled means disabled, the schema included: one answer for every /admin path, so
        # an operator who forgot the token sees why at once, whatever tool asks first.
        if self._token is None:
            raise GatewayError(
                503, "admin_disabled", "The admin API is disabled: set GATEWAY_ADMIN_TOKEN to enable it."
            )
        probe = {"type": "http", "path": _encoded_route_path(scope), "root_path": "", "method": scope["method"]}
        endpoint: Endpoint | None = None
        params: dict[str, Any] = {}
        allowed: set[str] = set()
        for route in self.routes:
            match, child = route.matches(probe)
            if match is Match.FULL:
                endpoint, params = route.endpoint, child["path_params"]
                break
            if match is Match.PARTIAL:
                allowed |= route.methods or set()
        # The schema is public while the API is enabled (tools fetch it before they hold a
        # token); everything else, unknown paths included, needs the token first.
        if endpoint != self._openapi:
            await self._authenticate(scope)
        if endpoint is None:
            if allowed:
                raise GatewayError(
                    405,
                    "method_not_allowed",
                    f"{scope['method']} is not allowed here; use {', '.join(sorted(allowed))}.",
                    headers={"Allow": ", ".join(sorted(allowed))},
                )
            raise GatewayError(404, "not_found", "No such admin route; see /admin/openapi.json.")
        request = Request({**scope, "path_params": params}, receive)
        try:
            return await endpoint(request)
        except StoreUnavailable:
            raise GatewayError(
                503, "store_unavailable", "The database does not answer; try again when /readyz answers 200."
            ) from None

    async def _authenticate(self, scope: Scope) -> None:
        assert self._token is not None
        scheme, _, token = (header(scope, b"authorization") or b"").partition(b" ")
        peer = _peer(scope)
        # compare_digest first and always, so the answer's timing says nothing about the token
        if hmac.compare_digest(token.strip(), self._token) and scheme.lower() == b"bearer":
            self._throttle.succeeded(peer)
            return
        log.warning("admin_auth_failed", client=_client(scope), peer=peer)
        await self._throttle.failed(peer)
        raise GatewayError(
            401,
            "invalid_admin_token",
            "Missing or wrong admin token: send Authorization: Bearer <GATEWAY_ADMIN_TOKEN>.",
        )

    async def _get_user(self, request: Request) -> Response:
        user_id = _user_id(request)
        _query(request, ())
        status = await self._store.status(user_id)
        if status is None:
            raise _user_not_found()
        return _json(status.to_json())

    async def _block(self, request: Request) -> Response:
        user_id = _user_id(request)
        _query(request, ())
        body = await _body(request, ("seconds", "permanent", "reason"))
        permanent = body.get("permanent", False)
        if not isinstance(permanent, bool):
            raise _invalid("permanent", "permanent must be true or false.")
        seconds: float | None = None
        if "seconds" in body:
            value = body["seconds"]
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or not 0 < value <= MAX_BLOCK_SECONDS
            ):
                raise _invalid(
                    "seconds",
                    f"seconds must be a number greater than 0 and at most {MAX_BLOCK_SECONDS}; "
                    "for a block without end send permanent: true.",
                )
            if permanent:
                raise _invalid("permanent", "Send either seconds or permanent: true, not both.")
            seconds = float(value)
        elif not permanent:
            seconds = self._settings.block_seconds
        status = await self._store.block(user_id, seconds=seconds, permanent=permanent, reason=_reason(body))
        return _json(status.to_json())

    async def _unblock(self, request: Request) -> Response:
        user_id = _user_id(request)
        _query(request, ())
        body = await _body(request, ("reason",))
        status = await self._store.unblock(user_id, reason=_reason(body))
        if status is None:
            raise _user_not_found()
        return _json(status.to_json())

    async def _list_users(self, request: Request) -> Response:
        query = _query(request, ("blocked", "limit", "after"))
        blocked: bool | None = None
        if "blocked" in query:
            if query["blocked"].lower() not in ("true", "false"):
                raise _invalid("blocked", "blocked must be true or false.")
            blocked = query["blocked"].lower() == "true"
        try:
            page, cursor = await self._store.list_users(blocked=blocked, limit=_limit(query), after=query.get("after"))
        except ValueError:
            raise _invalid("after", "after must be the next cursor of a previous page.") from None
        return _json({"data": [status.to_json() for status in page], "next": cursor})

    async def _events(self, request: Request) -> Response:
        user_id = _user_id(request)
        events = await self._store.events(user_id, limit=_limit(_query(request, ("limit",))))
        if events is None:
            raise _user_not_found()
        return _json({"data": events})

    async def _stats(self, request: Request) -> Response:
        _query(request, ())
        return _json(await self._store.stats())

    async def _openapi(self, request: Request) -> Response:
        return Response(_OPENAPI_BYTES, media_type="application/json")


def admin_app(store: Store, settings: Settings, *, throttle: AuthThrottle | None = None) -> AdminAPI:
    """The admin API as an ASGI app, to mount at `/admin`."""
    return AdminAPI(store, settings, throttle=throttle)


def _encoded_route_path(scope: Scope) -> str:
    """The path below the mount point as the client sent it, percent-encoding intact."""
    decoded = get_route_path(scope)
    raw_path = scope.get("raw_path")
    if not raw_path:
        return quote(decoded, safe="/")
    # raw_path is the whole request target (some servers leave the query on it); the route
    # path is the suffix, cut at a "/", that decodes to the decoded route path. With no such
    # suffix an encoded slash sits in the mount prefix: no route matches that.
    raw = bytes(raw_path).split(b"?", 1)[0].decode("latin-1")
    segments = raw.split("/")
    for start in range(1, len(segments)):
        candidate = "/" + "/".join(segments[start:])
        if unquote(candidate) == decoded:
            return candidate
    return ""


def _peer(scope: Scope) -> str:
    """The socket peer's address: the throttle's key, which no X-Forwarded-For can change."""
    peer = scope.get("state", {}).get("peer")
    return peer if isinstance(peer, str) and peer else _client(scope)


def _client(scope: Scope) -> str:
    # The client address as the server reports it: a trusted proxy's X-Forwarded-For rewrites it.
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def _user_id(request: Request) -> str:
    raw: str = request.path_params["user_id"]
    try:
        user_id = unquote_to_bytes(raw.encode("latin-1")).decode("utf-8")
    except UnicodeError:
        raise GatewayError(
            400, "invalid_user_id", "The user id in the path is not percent-encoded UTF-8.", param="user_id"
        ) from None
    problem = user_id_problem(user_id)
    if problem is not None:
        raise GatewayError(
            400,
            "invalid_user_id",
            f"The user id {problem}: expected 1 to {MAX_USER_ID_LENGTH} characters without control characters.",
            param="user_id",
        )
    return user_id


async def _body(request: Request, fields: tuple[str, ...]) -> dict[str, Any]:
    """The JSON object body holding only `fields`; {} when there is no body."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise GatewayError(413, "request_too_large", f"An admin request body is at most {MAX_BODY_BYTES} bytes.")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        return {}
    expected = f"expected a JSON object with {', '.join(fields)}, or no body"
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise GatewayError(400, "invalid_json", f"The body is not valid JSON: {expected}.") from None
    if not isinstance(body, dict):
        raise GatewayError(400, "invalid_json", f"The body is not a JSON object: {expected}.")
    for key in body:
        if key not in fields:
            raise _invalid(key, f"Unknown field {key!r}: {expected}.")
    return body


def _reason(body: dict[str, Any]) -> str | None:
    reason = body.get("reason")
    if reason is None:
        return None
    if not isinstance(reason, str) or len(reason) > MAX_REASON or "\x00" in reason:
        raise _invalid("reason", f"reason must be a string of at most {MAX_REASON} characters, without NUL.")
    return reason


def _query(request: Request, names: tuple[str, ...]) -> dict[str, str]:
    """The query parameters, each at most once; unknown ones are refused so typos show."""
    query: dict[str, str] = {}
    for key, value in request.query_params.multi_items():
        if key not in names:
            expected = ", ".join(names) or "none here"
            raise _invalid(key, f"Unknown query parameter {key!r}: expected {expected}.")
        if key in query:
            raise _invalid(key, f"Query parameter {key!r} given more than once.")
        query[key] = value
    return query


def _limit(query: dict[str, str]) -> int:
    raw = query.get("limit")
    if raw is None:
        return DEFAULT_LIMIT
    if not _LIMIT.fullmatch(raw) or not 1 <= int(raw) <= MAX_PAGE:
        raise _invalid("limit", f"limit must be a whole number from 1 to {MAX_PAGE}.")
    return int(raw)


def _invalid(param: str, message: str) -> GatewayError:
    return GatewayError(400, "invalid_request", message, param=param)


def _user_not_found() -> GatewayError:
    return GatewayError(404, "user_not_found", "The gateway has never recorded this user.")


def _json(content: object) -> Response:
    # Admin answers describe live state: no cache should keep them.
    return Response(orjson.dumps(content), media_type="application/json", headers={"Cache-Control": "no-store"})
