"""The console's ASGI app, mounted at /admin/console: security headers on every answer, the
switch of /admin, sessions, sign-in and sign-out, static assets, and how a page runs.

A page is declared with its method, path and role (gateway/console/pages.py); `Console` looks up
the session (or sends the browser to sign in), checks the form's CSRF token on a POST and the
operator's role (`operators.require`, as the REST calls do), and renders what the page returns.
Refusals become an HTML page with the admin API's status and message.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import structlog
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route, Router
from starlette.websockets import WebSocketClose

from gateway.console.forms import Form, check_csrf, read_form, same_origin
from gateway.console.sessions import COOKIE, Session, Sessions
from gateway.operators import Operators, Role, require
from gateway.settings import Settings
from gateway.store import Store
from gateway.throttle import AuthThrottle, peer
from middleware.asgi import Message, Receive, Scope, Send
from middleware.errors import GatewayError
from middleware.protocols import StoreUnavailable

log = structlog.get_logger("gateway.console")

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)
_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
]
_STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}

Handler = Callable[["Console", Request, Session, Form], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class Page:
    method: str
    path: str
    role: Role
    handler: Handler


class Console:
    """The moderator console; `pages` are its routes behind a session."""

    def __init__(
        self,
        store: Store,
        operators: Operators,
        settings: Settings,
        pages: list[Page],
        *,
        throttle: AuthThrottle | None = None,
    ) -> None:
        self.store = store
        self.operators = operators
        self.settings = settings
        self.sessions = Sessions(store.database, operators, hours=settings.console_session_hours)
        self._throttle = AuthThrottle() if throttle is None else throttle
        self._templates = Environment(
            loader=PackageLoader("gateway.console", "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
        )
        self._static = {
            entry.name: entry.read_bytes()
            for entry in (resources.files("gateway.console") / "static").iterdir()
            if entry.name.endswith(tuple(_STATIC_TYPES))
        }
        routes = [
            Route("/signin", self._signin_page, methods=["GET"]),
            Route("/signin", self._signin, methods=["POST"]),
            Route("/signout", self._signout, methods=["POST"]),
            Route("/static/{name}", self._asset, methods=["GET"]),
        ]
        routes += [Route(page.path, self._runner(page), methods=[page.method]) for page in pages]
        self._router = Router(routes=routes, redirect_slashes=False, default=self._not_found)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await WebSocketClose()(scope, receive, send)
            return

        async def guarded(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                headers += [header for header in _HEADERS if header[0] not in names]
                if b"cache-control" not in names:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        try:
            if not await self.operators.enabled():
                raise GatewayError(
                    503,
                    "admin_disabled",
                    "The admin API and its console are disabled here: GATEWAY_ADMIN=off, or no "
                    "GATEWAY_ADMIN_TOKEN and no operator stored.",
                )
            await self._router(scope, receive, guarded)
        except GatewayError as error:
            await error.send(guarded)
        except StoreUnavailable:
            request = Request(scope)
            await self.error_page(request, 503, "The database does not answer; try again in a moment.")(
                scope, receive, guarded
            )

    # -- rendering -------------------------------------------------------------------------------

    def render(
        self, request: Request, template: str, session: Session | None = None, *, http_status: int = 200, **values: Any
    ) -> HTMLResponse:
        base = request.scope.get("root_path", "")
        values = {"done": None, "failed": False, **values}  # what base.html and signin.html may show
        body = self._templates.get_template(template).render(base=base, session=session, **values)
        return HTMLResponse(body, status_code=http_status)

    def error_page(self, request: Request, status: int, message: str, session: Session | None = None) -> HTMLResponse:
        return self.render(request, "error.html", session, http_status=status, code=status, message=message)

    def redirect(self, request: Request, path: str) -> RedirectResponse:
        """A 303 to `path` under the console (after a POST, the browser GETs it)."""
        return RedirectResponse(request.scope.get("root_path", "") + path, status_code=303)

    # -- pages behind a session ------------------------------------------------------------------

    def _runner(self, page: Page) -> Callable[[Request], Awaitable[Response]]:
        async def run(request: Request) -> Response:
            session = await self.sessions.find(request.cookies.get(COOKIE))
            if session is None:
                if request.method == "GET":
                    return self.redirect(request, "/signin")
                return self.error_page(request, 403, "You are signed out: sign in again, then send the form again.")
            try:
                form = Form()
                if request.method == "POST":
                    form = await read_form(request)
                    check_csrf(request, form, session.csrf)
                require(session.operator, page.role)
                return await page.handler(self, request, session, form)
            except GatewayError as error:
                if error.code == "csrf_refused":
                    log.warning("console_csrf_refused", operator=session.operator.name, path=request.url.path)
                return self.error_page(request, error.status, error.message, session)

        return run

    # -- sign-in and sign-out --------------------------------------------------------------------

    async def _signin_page(self, request: Request) -> Response:
        if await self.sessions.find(request.cookies.get(COOKIE)) is not None:
            return self.redirect(request, "/")
        return self.render(request, "signin.html")

    async def _signin(self, request: Request) -> Response:
        form = await read_form(request)
        if not same_origin(request):
            return self.error_page(request, 403, "This sign-in did not come from this console's own page.")
        address = peer(request.scope)
        operator = await self.operators.authenticate(form.text("token"))
        if operator is None:
            log.warning("console_signin_failed", peer=address)
            await self._throttle.failed(address)
            return self.render(request, "signin.html", http_status=401, failed=True)
        self._throttle.succeeded(address)
        raw, _ = await self.sessions.open(operator)
        log.info("console_signed_in", operator=operator.name, role=operator.role)
        response = self.redirect(request, "/")
        response.set_cookie(
            COOKIE,
            raw,
            max_age=int(self.settings.console_session_hours * 3600),
            path=request.scope.get("root_path", "") or "/",
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )
        return response

    async def _signout(self, request: Request) -> Response:
        raw = request.cookies.get(COOKIE)
        session = await self.sessions.find(raw)
        if session is not None:
            try:
                check_csrf(request, await read_form(request), session.csrf)
            except GatewayError as error:
                return self.error_page(request, error.status, error.message, session)
            await self.sessions.revoke(raw)
            log.info("console_signed_out", operator=session.operator.name)
        response = self.redirect(request, "/signin")
        response.delete_cookie(COOKIE, path=request.scope.get("root_path", "") or "/", httponly=True, samesite="strict")
        return response

    # -- assets ----------------------------------------------------------------------------------

    async def _asset(self, request: Request) -> Response:
        name = request.path_params["name"]
        body = self._static.get(name)
        if body is None:
            return self.error_page(request, 404, "No such file.")
        media_type = _STATIC_TYPES["." + name.rpartition(".")[2]]
        return Response(body, media_type=media_type, headers={"Cache-Control": "private, max-age=300"})

    async def _not_found(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.error_page(Request(scope), 404, "No such console page.")(scope, receive, send)
