"""The ASGI types the middleware speaks (the same shapes as `starlette.types`)."""

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of a request header; `name` is lower-case."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None
