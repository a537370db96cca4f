"""Client keys: with GATEWAY_API_KEYS set, every /v1 call must carry one of them."""

from __future__ import annotations

import hmac

from middleware.asgi import ASGIApp, Receive, Scope, Send, header
from middleware.errors import GatewayError

_PREFIX = "/v1/"


class ClientKeyMiddleware:
    """Answers 401 `invalid_api_key` to /v1 calls without `Authorization: Bearer <a client key>`."""

    def __init__(self, app: ASGIApp, *, keys: frozenset[str]) -> None:
        self.app = app
        self.keys = tuple(key.encode() for key in keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.keys and scope["type"] == "http" and scope["path"].startswith(_PREFIX) and not self._valid(scope):
            scope.setdefault("state", {})["decision"] = "invalid_api_key"
            await GatewayError(
                401,
                "invalid_api_key",
                "Missing or invalid gateway API key: send Authorization: Bearer <one of GATEWAY_API_KEYS>.",
            ).send(send)
            return
        await self.app(scope, receive, send)

    def _valid(self, scope: Scope) -> bool:
        value = header(scope, b"authorization")
        if value is None or value[:7].lower() != b"bearer ":
            return False
        presented = value[7:].strip()
        # Compare with every key so the time taken says nothing about which one nearly matched.
        matched = False
        for key in self.keys:
            matched |= hmac.compare_digest(presented, key)
        return matched
