"""The application's routes on behalf of its user (`/gateway`): their standing, and their appeals.

    GET  /gateway/standing   the user's strikes, warnings, block and appeals (200 for anyone)
    POST /gateway/appeals    {"event_id", "message"} -> 201 the appeal

The user is named as on /v1 calls (the user header, read by the same function, `app:user` with
GATEWAY_USERS_PER_APP) and GATEWAY_API_KEYS applies; nothing here is forwarded upstream. A
blocked user is answered too: seeing why and appealing is what a blocked user needs. The user
can only see and appeal their own events: another user's event is as unknown as one that does
not exist.
"""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError
from starlette.requests import Request
from starlette.websockets import WebSocketClose

from gateway.admin_requests import read_body
from gateway.appeals import ID, MAX_MESSAGE
from gateway.auth import ClientKeyMiddleware
from gateway.settings import Settings
from gateway.store import Store
from middleware.asgi import ASGIApp, Receive, Scope, Send, route_path
from middleware.errors import GatewayError
from middleware.protocols import StoreUnavailable
from middleware.users import request_user

_ROUTES = {"/standing": "GET", "/appeals": "POST"}


def _event_id(value: str) -> str:
    if not ID.fullmatch(value):
        raise PydanticCustomError(
            "invalid_request", 'event_id must be an event id in digits, as a refusal or the standing gives it ("1042").'
        )
    return value


def _message(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("invalid_request", "message must say why the decision was wrong; it is empty.")
    if "\x00" in value:
        raise PydanticCustomError("invalid_request", "message must not hold NUL characters.")
    return value


class AppealRequest(BaseModel):
    """The user's appeal: which event, and why it was wrong."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    event_id: Annotated[str, AfterValidator(_event_id)] = Field(
        description="The event appealed: a refusal's `event_id`, or one from GET /gateway/standing."
    )
    message: Annotated[str, Field(max_length=MAX_MESSAGE), AfterValidator(_message)] = Field(
        description=f"The user's words to the moderator, at most {MAX_MESSAGE} characters."
    )


class StandingAPI:
    """The /gateway ASGI app; `standing_app` builds it with its client-key check."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self._store = store
        self._header_key = settings.user_header_key
        self._header_name = settings.user_header
        self._per_app = settings.users_per_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await WebSocketClose()(scope, receive, send)
            return
        try:
            status, answer = await self._respond(scope, receive)
        except StoreUnavailable:
            error = GatewayError(503, "store_unavailable", "The database does not answer; try again in a moment.")
            await error.send(send)
            return
        except GatewayError as error:
            await error.send(send)
            return
        body = orjson.dumps(answer)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            # The user's standing changes with every call: no cache should keep it.
            (b"cache-control", b"no-store"),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _respond(self, scope: Scope, receive: Receive) -> tuple[int, dict[str, Any]]:
        path = route_path(scope)
        method = _ROUTES.get(path)
        if method is None:
            raise GatewayError(
                404, "not_found", "No such route: /gateway serves GET /gateway/standing and POST /gateway/appeals."
            )
        if scope["method"] != method:
            raise GatewayError(
                405,
                "method_not_allowed",
                f"{scope['method']} is not allowed on /gateway{path}; use {method}.",
                headers={"Allow": method},
            )
        state = scope.setdefault("state", {})
        user_id, _ = request_user(scope, state, self._header_key, self._header_name, self._per_app)
        if method == "GET":
            return 200, await self._store.standing(user_id)
        appeal = await read_body(AppealRequest, Request(scope, receive))
        filed = await self._store.file_appeal(user_id, int(appeal.event_id), appeal.message)
        return 201, filed.to_json()


def standing_app(store: Store, settings: Settings) -> ASGIApp:
    """The /gateway routes as an ASGI app to mount at `/gateway`, behind the client keys when set."""
    app: ASGIApp = StandingAPI(store, settings)
    if settings.api_keys:
        app = ClientKeyMiddleware(app, keys=settings.client_keys)
    return app
