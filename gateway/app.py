"""The ASGI application: `create_app` wires settings, store, detectors, middleware and routes."""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, cast

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from gateway.admin import admin_app
from gateway.auth import ClientKeyMiddleware
from gateway.blockcache import BlockCache
from gateway.context import RequestContextMiddleware
from gateway.database import Database
from gateway.logs import configure_logging
from gateway.proxy import Upstream
from gateway.settings import Settings, SettingsError, load_settings
from gateway.store import Policy, Store
from gateway.sweeper import ExpirySweeper
from gateway.webhooks import WebhookSender
from middleware.asgi import ASGIApp, Receive, Scope, Send
from middleware.detectors import OpenAIDetector, RulesDetector
from middleware.errors import GatewayError
from middleware.moderation import ModerationMiddleware
from middleware.protocols import Detector, StoreUnavailable

if TYPE_CHECKING:
    from uvicorn._types import ASGI3Application

log = structlog.get_logger("gateway")


def build_detectors(settings: Settings, upstream: Upstream) -> Sequence[Detector]:
    """The detectors named by GATEWAY_MODERATION; a bad rules file is a start-up error."""
    detectors: list[Detector] = []
    if "rules" in settings.moderation:
        try:
            detectors.append(RulesDetector(settings.rules_file))
        except ValueError as exc:
            raise SettingsError(f"GATEWAY_RULES_FILE: {exc}") from None
    if "openai" in settings.moderation:
        key = settings.openai_api_key
        detectors.append(
            OpenAIDetector(
                upstream.post_json,
                settings.moderation_base_url,
                key.get_secret_value() if key else None,
                settings.moderation_thresholds,
                settings.moderation_timeout,
            )
        )
    return detectors


def _error_response(error: GatewayError) -> Response:
    headers = {key.decode(): value.decode() for key, value in error.response_headers()}
    return Response(error.body(), status_code=error.status, headers=headers)


async def _gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return _error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        code, message = "not_found", f"No route {request.url.path}: the gateway serves /v1/*, /admin/*, /healthz."
    elif exc.status_code == 405:
        code, message = "method_not_allowed", f"{request.method} is not allowed on {request.url.path}."
    else:
        code, message = "http_error", str(exc.detail)
    return _error_response(GatewayError(exc.status_code, code, message, headers=dict(exc.headers or {})))


def _internal_error() -> GatewayError:
    return GatewayError(500, "internal_error", "The gateway failed on this request; see its logs.")


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled_error", path=request.url.path)
    return _error_response(_internal_error())


def _v1_error(scope: Scope, exc: Exception) -> GatewayError:
    """The answer to an exception on the /v1 path, as the Starlette handlers above would give it."""
    if isinstance(exc, GatewayError):
        return exc
    log.exception("unhandled_error", path=scope["path"])
    return _internal_error()


class _Mounted:
    """What `Mount("/v1", app)` does to the scope before calling its app, without the routing.

    A plain function returning the app's awaitable, not a coroutine of its own: each coroutine
    layer between the server and the proxy is made, awaited through and torn down per request.
    """

    def __init__(self, app: ASGIApp, prefix: str) -> None:
        self.app = app
        self.prefix = prefix

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        scope["app_root_path"] = scope.get("app_root_path", "")
        scope["root_path"] = self.prefix
        return self.app(scope, receive, send)


class GatewayApp(Starlette):
    """The Starlette app, with /v1 calls handed straight to their own middleware chain.

    Starlette's error and exception middlewares, its router and the /v1 Mount each add a
    coroutine per ASGI message and did nothing on this path that the chain does not do itself
    (request context, client keys, moderation, proxy: the same middleware, in the same order).
    Everything else, and /v1 under a server root_path, goes through Starlette as before.
    """

    v1: Callable[[Scope, Receive, Send], Coroutine[Any, Any, None]] | None = None
    # Everything else, behind uvicorn's X-Forwarded-For/-Proto middleware (the server's own is
    # off): the client address and scheme a trusted proxy reports, for Starlette's redirects.
    forwarded: Callable[..., Coroutine[Any, Any, None]] | None = None

    # Returns the coroutine of the app it picks (the server awaits it) instead of awaiting it in
    # a coroutine of its own, as _Mounted does; marked so that servers telling ASGI 3 from
    # ASGI 2 by `inspect.iscoroutinefunction` (uvicorn does) still see an ASGI 3 app.
    @inspect.markcoroutinefunction
    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Coroutine[Any, Any, None]:
        v1 = self.v1
        if (
            v1 is not None
            and scope["type"] == "http"
            and scope["path"].startswith("/v1/")
            and not scope.get("root_path")
        ):
            scope["app"] = self
            return v1(scope, receive, send)
        forwarded = self.forwarded
        if forwarded is not None:
            return forwarded(scope, receive, send)
        return super().__call__(scope, receive, send)


def _mount(path: str, app: ASGIApp) -> Mount:
    mount = Mount(path, app=app)
    # Starlette's pattern stops at a newline: a percent-encoded one in a path (an admin user id)
    # must still reach the app below, which answers it (400 invalid_user_id), not the router's 404.
    mount.path_regex = re.compile(mount.path_regex.pattern, re.DOTALL)
    return mount


def create_app(settings: Settings | None = None) -> Starlette:
    """The ASGI app factory (`uvicorn --factory gateway.app:create_app`)."""
    settings = settings or load_settings()
    configure_logging(settings)
    upstream = Upstream(settings)
    database = Database(settings)
    block_cache = BlockCache(statement_cache=settings.db_statement_cache)
    store = Store(database, Policy.from_settings(settings), block_cache)
    detectors = build_detectors(settings, upstream)
    sweeper = ExpirySweeper(store)
    webhooks = (
        WebhookSender(database, settings.webhook_url, settings.webhook_secret)
        if settings.webhook_url and settings.webhook_secret
        else None
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await database.open()
        try:
            listen_url = settings.listen_database_url
            await block_cache.start(listen_url.get_secret_value() if listen_url else database.dsn)
            await upstream.start()
            await sweeper.start()
            if webhooks:
                await webhooks.start()
            log.info(
                "gateway_started",
                upstream=settings.upstream_url,
                moderation=list(settings.moderation),
                enforcement=settings.enforcement,
                embedded_database=settings.database_url is None,
            )
            yield
        finally:
            if webhooks:
                await webhooks.close()
            await sweeper.close()
            await upstream.close()
            await block_cache.close()
            await database.close()
            log.info("gateway_stopped")

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        try:
            await store.ping()
        except StoreUnavailable:
            return _error_response(GatewayError(503, "store_unavailable", "The database does not answer."))
        return JSONResponse({"status": "ok"})

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    salt = None
    if settings.safety_identifier == "hash" and settings.safety_salt:
        salt = settings.safety_salt.get_secret_value().encode()
    client_keys = frozenset(key.get_secret_value() for key in settings.api_keys)
    middleware = [
        Middleware(RequestContextMiddleware),
        # without client keys the layer would only pass calls through: leave it out
        *([Middleware(ClientKeyMiddleware, keys=client_keys)] if client_keys else []),
        Middleware(
            ModerationMiddleware,
            store=store,
            detectors=detectors,
            user_header=settings.user_header,
            max_body_bytes=settings.max_body_bytes,
            max_strikes=settings.max_strikes,
            moderation_failure=settings.moderation_failure,
            store_failure=settings.store_failure,
            enforcement=settings.enforcement,
            safety_salt=salt,
        ),
    ]
    routes = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        _mount("/admin", admin_app(store, settings)),
        _mount("/v1", upstream),
    ]
    app = GatewayApp(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={GatewayError: _gateway_error, HTTPException: _http_error, Exception: _server_error},
    )
    # The same middleware as the Starlette stack's (the request context first), around the proxy.
    v1: ASGIApp = _Mounted(upstream, "/v1")
    for cls, args, kwargs in reversed(middleware[1:]):
        v1 = cls(v1, *args, **kwargs)
    app.v1 = RequestContextMiddleware(v1, on_error=_v1_error)
    # uvicorn's middleware, as `proxy_headers=True` (its default) would wrap the whole app in it.
    app.forwarded = ProxyHeadersMiddleware(
        cast("ASGI3Application", functools.partial(Starlette.__call__, app)), settings.forwarded_allow_ips
    )
    app.state.settings = settings
    app.state.store = store
    app.state.upstream = upstream
    return app
