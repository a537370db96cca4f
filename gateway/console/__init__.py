"""The moderator console at /admin/console/: server-rendered pages over the admin API's store calls.

Imported by create_app only to mount it under /admin; nothing here is on the /v1 path.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from gateway.console.app import Console
from gateway.console.pages import PAGES
from gateway.operators import Operators
from gateway.settings import Settings
from gateway.store import Store
from gateway.throttle import AuthThrottle

PREFIX = "/admin/console"


def console_app(
    store: Store, operators: Operators, settings: Settings, *, throttle: AuthThrottle | None = None
) -> Console:
    """The console as an ASGI app, to mount at /admin/console."""
    return Console(store, operators, settings, PAGES, throttle=throttle)


def console_routes(
    store: Store, operators: Operators, settings: Settings, *, throttle: AuthThrottle | None = None
) -> list[BaseRoute]:
    """The site's routes of the console, to put before the /admin mount: the console, and its
    address without the trailing slash sent to the one with it. Give it the admin API's
    `throttle`: the sign-in checks the same tokens."""

    async def slash(request: Request) -> Response:
        return RedirectResponse(request.scope.get("root_path", "") + PREFIX + "/", status_code=308)

    return [Route(PREFIX, slash), Mount(PREFIX, app=console_app(store, operators, settings, throttle=throttle))]
