"""The admin REST API (`/admin`): users, blocks, audit events, notes, stats, the policy, appeals,
reversal, erasure and operators.

Every call but the OpenAPI document is made by an operator bearing a token (gateway/operators.py)
and needs the role its operation declares.

Routes match the raw, still percent-encoded path, one segment per `{user_id}`, so a user id may
hold any character: `/admin/users/a%2Fb/events` is the events of user `a/b`, and `..%2f` stays
inside the id instead of reaching another route.

Each operation is declared on its handler with the pydantic models of its parameters, body and
answer (`gateway.admin_models`): they check the request, and the OpenAPI document is made from
them (`gateway.admin_openapi`).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote, unquote

import orjson
import structlog
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.websockets import WebSocketClose

from gateway.admin_answers import (
    AddedOperator,
    Appeal,
    AppealList,
    Event,
    EventList,
    NoContent,
    OperatorInfo,
    OperatorList,
    PolicyDocument,
    RemovedOperator,
    Stats,
    UserList,
    UserStatus,
)
from gateway.admin_models import (
    AppealParams,
    BlockRequest,
    DecisionRequest,
    EventParams,
    ListAppealsParams,
    ListUsersParams,
    NewOperator,
    NoParams,
    NoteRequest,
    OperatorParams,
    ReverseRequest,
    UnblockRequest,
    UserEventsParams,
    UserParams,
)
from gateway.admin_openapi import Operation, Operations, build_document
from gateway.admin_requests import read_body, read_params
from gateway.appeals import not_found as appeal_not_found
from gateway.operators import Operator, OperatorExists, Operators, require
from gateway.settings import Settings
from gateway.store import Store
from gateway.throttle import AuthThrottle
from middleware.asgi import Receive, Scope, Send, header, route_path
from middleware.errors import GatewayError
from middleware.protocols import StoreUnavailable

log = structlog.get_logger("gateway.admin")

Endpoint = Callable[[Request], Awaitable[Response]]
operations = Operations()


class AdminAPI:
    """The admin ASGI app; mount it at `/admin`. `routes` is what `OPENAPI` describes.

    Each call is made by an operator (gateway/operators.py), whose token it bears: the operation's
    role is checked first, the operator's name goes into the audit events it writes, and the
    operator is left in `scope["state"]["operator"]` for whatever runs below.
    """

    def __init__(
        self, store: Store, operators: Operators, settings: Settings, *, throttle: AuthThrottle | None = None
    ) -> None:
        self._store = store
        self._operators = operators
        self._settings = settings
        self._throttle = AuthThrottle() if throttle is None else throttle
        self.routes = [
            Route(operation.path, functools.partial(self._run, operation), methods=[operation.method])
            for operation in operations
        ]
        self.routes.append(Route("/openapi.json", self._openapi, methods=["GET"]))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await WebSocketClose()(scope, receive, send)
            return
        try:
            response = await self._respond(scope, receive)
        except StoreUnavailable:
            error = GatewayError(
                503, "store_unavailable", "The database does not answer; try again when /readyz answers 200."
            )
            await error.send(send)
            return
        except GatewayError as error:
            await error.send(send)
            return
        await response(scope, receive, send)

    async def _respond(self, scope: Scope, receive: Receive) -> Response:
        if not self._operators.switched_on:
            raise GatewayError(
                503,
                "admin_disabled",
                "The admin API is switched off on this gateway (GATEWAY_ADMIN=off): use one that serves it.",
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
        if endpoint == self._openapi:
            if not await self._operators.enabled():
                raise _disabled()
        else:
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
        return await endpoint(request)

    async def _authenticate(self, scope: Scope) -> Operator:
        scheme, _, token = (header(scope, b"authorization") or b"").partition(b" ")
        peer = _peer(scope)
        # The token first and always, so the answer's timing says nothing about the scheme.
        operator = await self._operators.authenticate(token)
        if operator is not None and scheme.lower() == b"bearer":
            self._throttle.succeeded(peer)
            scope.setdefault("state", {})["operator"] = operator
            return operator
        # No token set and no operator stored: disabled, as the answer to anything.
        if not await self._operators.enabled():
            raise _disabled()
        log.warning("admin_auth_failed", client=_client(scope), peer=peer)
        await self._throttle.failed(peer)
        raise GatewayError(
            401,
            "invalid_admin_token",
            "Missing or wrong admin token: send Authorization: Bearer <your operator token or GATEWAY_ADMIN_TOKEN>.",
        )

    async def _run(self, operation: Operation, request: Request) -> Response:
        operator: Operator = request.scope["state"]["operator"]
        require(operator, operation.role)
        params = read_params(operation.params, request)
        body = None if operation.body is None else await read_body(operation.body, request)
        answer = await operation.handler(self, params, body, operator)
        if operation.status == 204:
            return Response(status_code=204)
        # Admin answers describe live state: no cache should keep them.
        content = orjson.dumps(answer.model_dump(mode="json", exclude_unset=True))
        return Response(
            content, status_code=operation.status, media_type="application/json", headers={"Cache-Control": "no-store"}
        )

    async def _openapi(self, request: Request) -> Response:
        return Response(_OPENAPI_BYTES, media_type="application/json")

    # -- operations, in routing order ----------------------------------------------------------

    @operations(
        "GET",
        "/users",
        "listUsers",
        "List users, oldest user id first, one page at a time",
        params=ListUsersParams,
        response=UserList,
        role="viewer",
    )
    async def _list_users(self, params: ListUsersParams, body: None, operator: Operator) -> UserList:
        page, cursor = await self._store.list_users(
            blocked=params.blocked, limit=params.limit, after=params.after, prefix=params.prefix or ""
        )
        return UserList(data=[UserStatus.model_validate(status.to_json()) for status in page], next=cursor)

    @operations(
        "GET",
        "/users/{user_id}",
        "getUser",
        "A user's status",
        params=UserParams,
        response=UserStatus,
        role="viewer",
        not_found=True,
    )
    async def _get_user(self, params: UserParams, body: None, operator: Operator) -> UserStatus:
        status = _known(await self._store.status(params.user_id))
        return UserStatus.model_validate(status.to_json())

    @operations(
        "GET",
        "/users/{user_id}/events",
        "listUserEvents",
        "A user's audit trail, newest first",
        params=UserEventsParams,
        response=EventList,
        role="viewer",
        not_found=True,
    )
    async def _events(self, params: UserEventsParams, body: None, operator: Operator) -> EventList:
        events = _known(await self._store.events(params.user_id, limit=params.limit))
        return EventList(data=[Event.model_validate(event) for event in events])

    @operations(
        "PUT",
        "/block/{user_id}",
        "blockUser",
        "Block a user (creates unknown users)",
        params=UserParams,
        body=BlockRequest,
        response=UserStatus,
        role="moderator",
    )
    async def _block(self, params: UserParams, body: BlockRequest, operator: Operator) -> UserStatus:
        # No span given: the store blocks for the policy's first step (GATEWAY_BLOCK_SECONDS without a file).
        status = await self._store.block(
            params.user_id, seconds=body.seconds, permanent=body.permanent, reason=body.reason, operator=operator.name
        )
        return UserStatus.model_validate(status.to_json())

    @operations(
        "PUT",
        "/unblock/{user_id}",
        "unblockUser",
        "Lift a user's block and reset strikes to 0 (idempotent)",
        params=UserParams,
        body=UnblockRequest,
        response=UserStatus,
        role="moderator",
        not_found=True,
    )
    async def _unblock(self, params: UserParams, body: UnblockRequest, operator: Operator) -> UserStatus:
        status = _known(await self._store.unblock(params.user_id, reason=body.reason, operator=operator.name))
        return UserStatus.model_validate(status.to_json())

    @operations(
        "POST",
        "/users/{user_id}/notes",
        "addNote",
        "Add a moderator's note to a user's timeline",
        params=UserParams,
        body=NoteRequest,
        response=Event,
        role="moderator",
        status=201,
        not_found=True,
    )
    async def _add_note(self, params: UserParams, body: NoteRequest, operator: Operator) -> Event:
        return Event.model_validate(_known(await self._store.add_note(params.user_id, operator.name, body.text)))

    @operations(
        "GET",
        "/stats",
        "getStats",
        "Blocked users now; violations and blocks over the last 24 hours",
        params=NoParams,
        response=Stats,
        role="viewer",
    )
    async def _stats(self, params: NoParams, body: None, operator: Operator) -> Stats:
        return Stats.model_validate(await self._store.stats())

    @operations(
        "DELETE",
        "/users/{user_id}",
        "eraseUser",
        "Erase a user's state, events and appeals; one `erased` event keeps only a SHA-256 of the id",
        params=UserParams,
        response=NoContent,
        role="admin",
        status=204,
        not_found=True,
    )
    async def _erase(self, params: UserParams, body: None, operator: Operator) -> NoContent:
        if not await self._store.erase_user(params.user_id, operator=operator.name):
            _known(None)
        return NoContent()

    @operations(
        "GET",
        "/policy",
        "getPolicy",
        "The enforcement policy in force",
        params=NoParams,
        response=PolicyDocument,
        role="viewer",
    )
    async def _policy(self, params: NoParams, body: None, operator: Operator) -> PolicyDocument:
        return PolicyDocument.model_validate(self._store.policy.to_json())

    @operations(
        "GET",
        "/appeals",
        "listAppeals",
        "Appeals in one status (the open queue by default), oldest first, one page at a time",
        params=ListAppealsParams,
        response=AppealList,
        role="viewer",
    )
    async def _list_appeals(self, params: ListAppealsParams, body: None, operator: Operator) -> AppealList:
        page, cursor = await self._store.list_appeals(params.status, limit=params.limit, after=params.after)
        return AppealList(data=[Appeal.model_validate(appeal.to_admin_json()) for appeal in page], next=cursor)

    @operations(
        "GET",
        "/appeals/{appeal_id}",
        "getAppeal",
        "An appeal",
        params=AppealParams,
        response=Appeal,
        role="viewer",
        not_found=True,
    )
    async def _get_appeal(self, params: AppealParams, body: None, operator: Operator) -> Appeal:
        appeal = await self._store.appeal(params.appeal_id)
        if appeal is None:
            raise appeal_not_found(params.appeal_id)
        return Appeal.model_validate(appeal.to_admin_json())

    @operations(
        "POST",
        "/appeals/{appeal_id}/decision",
        "decideAppeal",
        "Accept or reject an open appeal",
        params=AppealParams,
        body=DecisionRequest,
        response=Appeal,
        role="moderator",
        not_found=True,
        conflict=True,
    )
    async def _decide(self, params: AppealParams, body: DecisionRequest, operator: Operator) -> Appeal:
        appeal = await self._store.decide_appeal(
            params.appeal_id, accept=body.decision == "accept", reason=body.reason, operator=operator.name
        )
        return Appeal.model_validate(appeal.to_admin_json())

    @operations(
        "POST",
        "/events/{event_id}/reverse",
        "reverseEvent",
        "Reverse a violation, warning or block and what it caused; the user's status after it",
        params=EventParams,
        body=ReverseRequest,
        response=UserStatus,
        role="moderator",
        not_found=True,
    )
    async def _reverse(self, params: EventParams, body: ReverseRequest, operator: Operator) -> UserStatus:
        status = await self._store.reverse_event(params.event_id, reason=body.reason, operator=operator.name)
        return UserStatus.model_validate(status.to_json())

    @operations(
        "GET",
        "/operators",
        "listOperators",
        "The operators and their roles",
        params=NoParams,
        response=OperatorList,
        role="admin",
    )
    async def _list_operators(self, params: NoParams, body: None, operator: Operator) -> OperatorList:
        listed = await self._operators.list()
        return OperatorList(data=[OperatorInfo.model_validate(record.to_json()) for record in listed])

    @operations(
        "POST",
        "/operators",
        "addOperator",
        "Add an operator; the answer holds its token, shown this once",
        params=NoParams,
        body=NewOperator,
        response=AddedOperator,
        role="admin",
        status=201,
        conflict=True,
    )
    async def _add_operator(self, params: NoParams, body: NewOperator, operator: Operator) -> AddedOperator:
        try:
            record, token = await self._operators.add(body.name, body.role, by=operator.name)
        except OperatorExists:
            raise GatewayError(
                409,
                "operator_exists",
                f"An operator named {body.name} exists: remove it first to give the name a new token or role.",
                param="name",
            ) from None
        return AddedOperator.model_validate({**record.to_json(), "token": token})

    @operations(
        "DELETE",
        "/operators/{name}",
        "removeOperator",
        "Remove an operator: its token and console sessions stop working at once",
        params=OperatorParams,
        response=RemovedOperator,
        role="admin",
        not_found=True,
    )
    async def _remove_operator(self, params: OperatorParams, body: None, operator: Operator) -> RemovedOperator:
        removed = await self._operators.remove(params.name, by=operator.name)
        if removed is None:
            raise GatewayError(404, "operator_not_found", f"No operator named {params.name} is stored.")
        return RemovedOperator.model_validate(removed.to_json())


OPENAPI = build_document(operations)
_OPENAPI_BYTES = orjson.dumps(OPENAPI)


def admin_app(
    store: Store, settings: Settings, *, operators: Operators | None = None, throttle: AuthThrottle | None = None
) -> AdminAPI:
    """The admin API as an ASGI app, to mount at `/admin`; its operators by default in the store's database."""
    if operators is None:
        operators = Operators(store.database, settings)
    return AdminAPI(store, operators, settings, throttle=throttle)


def _disabled() -> GatewayError:
    return GatewayError(
        503,
        "admin_disabled",
        "The admin API is disabled: set GATEWAY_ADMIN_TOKEN, or add an operator "
        "(python -m gateway operators add NAME --role admin), to enable it.",
    )


def _encoded_route_path(scope: Scope) -> str:
    """The path below the mount point as the client sent it, percent-encoding intact."""
    decoded = route_path(scope)
    raw_path = scope.get("raw_path")
    if not raw_path:
        return quote(decoded, safe="/")
    # raw_path is the whole request target (some servers leave the query on it); the route
    # path is the suffix, cut at a "/", that decodes to the decoded route path. With no such
    # suffix an encoded slash sits in the mount prefix: no route matches that.
    raw = bytes(raw_path).split(b"?", 1)[0].decode("latin-1")
    segments = raw.split("/")
    # Only one suffix decodes to the route path's length (a "/" never ends a UTF-8 sequence, so
    # lengths add up by segment): found from the end, it is compared once. Comparing every suffix
    # was quadratic in the segments, before the token is checked.
    length = 0
    for start in range(len(segments) - 1, 0, -1):
        length += 1 + len(unquote(segments[start]))
        if length >= len(decoded):
            candidate = "/" + "/".join(segments[start:])
            return candidate if length == len(decoded) and unquote(candidate) == decoded else ""
    return ""


def _peer(scope: Scope) -> str:
    """The throttle's key: the socket peer, which the server puts in state["peer"] before any
    X-Forwarded-For is applied; the client address where it did not."""
    peer = scope.get("state", {}).get("peer")
    return peer if isinstance(peer, str) and peer else _client(scope)


def _client(scope: Scope) -> str:
    # The client address as the server reports it: a trusted proxy's X-Forwarded-For rewrites it.
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def _known[T](found: T | None) -> T:
    """What the store found about a user; None means it never recorded the user: 404."""
    if found is None:
        raise GatewayError(404, "user_not_found", "The gateway has never recorded this user.")
    return found
