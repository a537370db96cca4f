"""The ASGI application: `create_app` wires settings, store, detectors, middleware and routes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

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
from middleware.detectors import OpenAIDetector, RulesDetector
from middleware.errors import GatewayError
from middleware.moderation import ModerationMiddleware
from middleware.protocols import Detector, StoreUnavailable

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


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled_error", path=request.url.path)
    return _error_response(GatewayError(500, "internal_error", "The gateway failed on this request; see its logs."))


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
    middleware = [
        Middleware(RequestContextMiddleware),
        Middleware(ClientKeyMiddleware, keys=frozenset(key.get_secret_value() for key in settings.api_keys)),
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
        Mount("/admin", app=admin_app(store, settings)),
        Mount("/v1", app=upstream),
    ]
    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={GatewayError: _gateway_error, HTTPException: _http_error, Exception: _server_error},
    )
    app.state.settings = settings
    app.state.store = store
    app.state.upstream = upstream
    return app
