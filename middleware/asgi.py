"""The ASGI types the middleware speaks (the same shapes as `starlette.types`), and the two
things it reads from a scope: a header, and the path below the mount point."""

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


def route_path(scope: Scope) -> str:
    """The path below the app's mount point (`root_path` taken off the front), as Starlette's
    router matches it; the path whole when it does not start at `root_path`."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if not root_path or not path.startswith(root_path):
        return path
    rest = path[len(root_path) :]
    return rest if not rest or rest.startswith("/") else path
