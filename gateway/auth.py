"""Client keys: with GATEWAY_API_KEYS set, every /v1 call must carry one of them.

A key may carry the name of the application it belongs to (`app-a:KEY`): the call's
application is then recorded for the access line, the audit trail and, with
GATEWAY_USERS_PER_APP, the user id (one application's users are not another's).
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from middleware.asgi import ASGIApp, Receive, Scope, Send, header
from middleware.errors import GatewayError


class ClientKeyMiddleware:
    """Answers 401 `invalid_api_key` to every call it sees without `Authorization: Bearer <a client key>`.

    It guards what it wraps (the /v1 branch), whatever the path looks like there. `keys` maps
    each key to its application's name (None: unnamed).
    """

    def __init__(self, app: ASGIApp, *, keys: Mapping[str, str | None]) -> None:
        self.app = app
        self.keys = tuple((key.encode(), name) for key, name in keys.items())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        matched, name = self._match(scope)
        state = scope.setdefault("state", {})
        if not matched:
            state["decision"] = "invalid_api_key"
            await GatewayError(
                401,
                "invalid_api_key",
                "Missing or invalid gateway API key: send Authorization: Bearer <one of GATEWAY_API_KEYS>.",
            ).send(send)
            return
        if name is not None:
            state["app"] = name
        await self.app(scope, receive, send)

    def _match(self, scope: Scope) -> tuple[bool, str | None]:
        value = header(scope, b"authorization")
        if value is None or value[:7].lower() != b"bearer ":
            return False, None
        presented = value[7:].strip()
        # Compare with every key so the time taken says nothing about which one nearly matched.
        matched = False
        found: str | None = None
        for key, name in self.keys:
            if hmac.compare_digest(presented, key):
                matched = True
                found = name
        return matched, found
