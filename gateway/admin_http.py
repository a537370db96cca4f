"""Serving declared operations over HTTP: the admin API's routing, its operators' tokens and
roles, reading a request into its models and writing the answer.

`OperationsApp` knows nothing of users or appeals: `gateway.admin.AdminAPI` declares its
operations (`gateway.admin_openapi.Operations`) and this serves them. Routes match the raw, still
percent-encoded path, one segment per `{user_id}`, so a user id may hold any character:
`/admin/users/a%2Fb/events` is the events of user `a/b`, and `..%2f` stays inside the id instead
of reaching another route.
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

from gateway.admin_openapi import Operation, Operations
from gateway.admin_requests import read_body, read_params
from gateway.operators import Operator, Operators, require
from gateway.throttle import AuthThrottle, client_address, peer
from middleware.asgi import Receive, Scope, Send, header, route_path
from middleware.errors import GatewayError
from middleware.protocols import StoreUnavailable

log = structlog.get_logger("gateway.admin")

Endpoint = Callable[[Request], Awaitable[Response]]


class OperationsApp:
    """An ASGI app serving `operations` (and `document`, their OpenAPI JSON, at /openapi.json).

    Each call is made by an operator (gateway/operators.py), whose token it bears: the operation's
    role is checked first, the operator's name goes to the handler (for the audit events it
    writes), and the operator is left in `scope["state"]["operator"]` for whatever runs below.
    """

    def __init__(
        self, operations: Operations, document: bytes, operators: Operators, throttle: AuthThrottle | None
    ) -> None:
        self._operators = operators
        self._document = document
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
        address = peer(scope)
        # The token first and always, so the answer's timing says nothing about the scheme.
        operator = await self._operators.authenticate(token)
        if operator is not None and scheme.lower() == b"bearer":
            self._throttle.succeeded(address)
            scope.setdefault("state", {})["operator"] = operator
            return operator
        # No token set and no operator stored: disabled, as the answer to anything.
        if not await self._operators.enabled():
            raise _disabled()
        log.warning("admin_auth_failed", client=client_address(scope), peer=address)
        await self._throttle.failed(address)
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
        return Response(self._document, media_type="application/json")


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
