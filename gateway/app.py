"""The ASGI application: `create_app` builds the parts and joins them into one pipeline.

Every request takes one path (docs/DESIGN.md draws it):

    Gateway: /v1/... or the rest (lifespan and websockets go to the site app)
      RequestContextMiddleware: request id, access line, metrics, unexpected errors as JSON
        /v1/...   (a mount) ClientKeyMiddleware -> ModerationMiddleware -> Upstream (the proxy)
        the rest  uvicorn's ProxyHeadersMiddleware -> Starlette: /healthz /readyz /metrics /admin /gateway

The /v1 branch is pure ASGI with no router: Starlette's routing, its error middlewares and the
proxy-headers middleware each add work per message and nothing /v1 needs (it reads neither the
client's scheme nor a forwarded address).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, cast

import structlog
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.datastructures import State
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from gateway.admin import admin_app
from gateway.auth import ClientKeyMiddleware
from gateway.blockcache import BlockCache
from gateway.console import console_routes
from gateway.context import RequestContextMiddleware
from gateway.database import Database
from gateway.exposition import Exposition
from gateway.jsonpost import JsonPoster
from gateway.logs import configure_logging
from gateway.operators import Operators
from gateway.proxy import Upstream
from gateway.settings import Settings, SettingsError, load_settings
from gateway.standing import standing_app
from gateway.store import Policy, Store
from gateway.sweeper import ExpirySweeper
from gateway.throttle import AuthThrottle
from gateway.webhooks import WebhookSender
from middleware.access import KeyReach
from middleware.asgi import ASGIApp, Receive, Scope, Send
from middleware.budgets import ByteBudget
from middleware.detectors import AzureDetector, GuardDetector, OpenAIDetector, RulesDetector
from middleware.errors import GatewayError
from middleware.moderation import ModerationMiddleware
from middleware.output import OutputModeration
from middleware.output_judge import OutputJudge
from middleware.protocols import Detector, StoreUnavailable

if TYPE_CHECKING:
    from uvicorn._types import ASGI3Application

log = structlog.get_logger("gateway")

V1 = "/v1"


class Gateway:
    """The gateway's ASGI app: the request context, then /v1 calls or the site's routes."""

    def __init__(self, v1: ASGIApp, site: Starlette, settings: Settings) -> None:
        self._site = site
        self._prefix = V1 + "/"
        # Each branch starts with the request context (request id, access line, metrics, errors).
        self._v1_call = RequestContextMiddleware(v1, on_error=_unexpected)
        # uvicorn's X-Forwarded-For/-Proto middleware, for the site's routes only (the server's is off).
        forwarded = ProxyHeadersMiddleware(cast("ASGI3Application", site), trusted_hosts=settings.forwarded_allow_ips)
        self._forwarded = cast("ASGIApp", forwarded)
        self._site_call = RequestContextMiddleware(self._site_route, on_error=_unexpected)
        self.state: State = site.state

    # A plain function returning the awaitable of the app it picks, not a coroutine of its own
    # (each coroutine layer costs every request); marked so that servers telling ASGI 3 from
    # ASGI 2 by `inspect.iscoroutinefunction` (uvicorn does) see an ASGI 3 app.
    @inspect.markcoroutinefunction
    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] != "http":
            return self._site(scope, receive, send)  # the lifespan; websockets (refused there)
        root: str = scope.get("root_path", "")
        if scope["path"].startswith(root + self._prefix if root else self._prefix):
            # A mount, as Starlette's Mount makes it: root_path gains the prefix, path stays whole.
            scope["root_path"] = root + V1
            return self._v1_call(scope, receive, send)
        return self._site_call(scope, receive, send)

    def _site_route(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        client = scope.get("client")
        # The socket's peer, before a trusted proxy's X-Forwarded-For replaces scope["client"].
        scope["state"]["peer"] = str(client[0]) if client else None
        return self._forwarded(scope, receive, send)


def build_detectors(settings: Settings, upstream: Upstream) -> Sequence[Detector]:
    """The detectors named by GATEWAY_MODERATION; a bad rules file is a start-up error."""
    detectors: list[Detector] = []
    poster = JsonPoster(lambda: upstream.session)  # the remote detectors share the upstream's session
    if "rules" in settings.moderation:
        try:
            detectors.append(RulesDetector(settings.rules_file))
        except ValueError as exc:
            raise SettingsError(f"GATEWAY_RULES_FILE: {exc}") from None
    if "openai" in settings.moderation:
        key = settings.openai_api_key
        detectors.append(
            OpenAIDetector(
                poster,
                settings.moderation_base_url,
                key.get_secret_value() if key else None,
                settings.moderation_thresholds,
                settings.moderation_timeout,
            )
        )
    # the settings refuse to start without the URLs, model and key these need
    if "guard" in settings.moderation and settings.guard_url and settings.guard_model:
        key = settings.guard_api_key
        detectors.append(
            GuardDetector(
                poster,
                settings.guard_url,
                settings.guard_model,
                key.get_secret_value() if key else None,
                settings.guard_timeout,
            )
        )
    if "azure" in settings.moderation and settings.azure_content_safety_url and settings.azure_content_safety_key:
        detectors.append(
            AzureDetector(
                poster,
                settings.azure_content_safety_url,
                settings.azure_content_safety_key.get_secret_value(),
                settings.azure_severity,
                settings.azure_timeout,
            )
        )
    return detectors


def output_layer(
    upstream: ASGIApp, settings: Settings, detectors: Sequence[Detector], store: Store, budget: ByteBudget
) -> ASGIApp:
    """The proxy, behind output moderation unless GATEWAY_OUTPUT_MODERATION=off (then nothing is added)."""
    if settings.output_moderation == "off":
        return upstream
    judge = OutputJudge(
        detectors,
        settings.moderation_failure,
        store,
        mode=settings.output_moderation,
        strikes=settings.output_strikes,
    )
    return OutputModeration(upstream, judge, holdback=settings.output_holdback_chars, budget=budget)


def error_response(error: GatewayError) -> Response:
    """A GatewayError as a Starlette response, for the site's routes and handlers."""
    headers = {key.decode(): value.decode() for key, value in error.response_headers()}
    return Response(error.body(), status_code=error.status, headers=headers)


def _unexpected(scope: Scope, exc: Exception) -> GatewayError:
    """The answer to an exception that reached the request context before any byte was sent."""
    if isinstance(exc, GatewayError):
        return exc
    log.exception("unhandled_error", path=scope["path"])
    return GatewayError(500, "internal_error", "The gateway failed on this request; see its logs.")


async def _gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        code, message = (
            "not_found",
            f"No route {request.url.path}: the gateway serves /v1/*, /gateway/*, /admin/*, /healthz.",
        )
    elif exc.status_code == 405:
        code, message = "method_not_allowed", f"{request.method} is not allowed on {request.url.path}."
    else:
        code, message = "http_error", str(exc.detail)
    return error_response(GatewayError(exc.status_code, code, message, headers=dict(exc.headers or {})))


async def _server_error(request: Request, exc: Exception) -> Response:
    return error_response(_unexpected(request.scope, exc))


def _mount(path: str, app: ASGIApp) -> Mount:
    mount = Mount(path, app=app)
    # Starlette's pattern stops at a newline: a percent-encoded one in a path (an admin user id)
    # must still reach the app below, which answers it (400 invalid_user_id), not the router's 404.
    mount.path_regex = re.compile(mount.path_regex.pattern, re.DOTALL)
    return mount


def create_app(settings: Settings | None = None) -> Gateway:
    """The ASGI app factory (`uvicorn --factory gateway.app:create_app`)."""
    settings = settings or load_settings()
    configure_logging(settings)
    upstream = Upstream(settings)
    database = Database(settings)
    block_cache = BlockCache(statement_cache=settings.db_statement_cache)
    store = Store(database, Policy.from_settings(settings), block_cache)
    operators = Operators(database, settings)
    detectors = build_detectors(settings, upstream)
    sweeper = ExpirySweeper(store)
    exposition = Exposition.for_workers(settings.workers)
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
            await exposition.start()
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
            await exposition.close()
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
            return error_response(GatewayError(503, "store_unavailable", "The database does not answer."))
        return JSONResponse({"status": "ok"})

    async def metrics(request: Request) -> Response:
        return Response(exposition.render(), media_type=CONTENT_TYPE_LATEST)

    throttle = AuthThrottle()
    site = Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
            # Before /admin, which would take its paths; one throttle for both: they check the same tokens.
            *console_routes(store, operators, settings, throttle=throttle),
            _mount("/admin", admin_app(store, settings, operators=operators, throttle=throttle)),
            _mount("/gateway", standing_app(store, settings)),
        ],
        lifespan=lifespan,
        exception_handlers={GatewayError: _gateway_error, HTTPException: _http_error, Exception: _server_error},
    )
    # A redirect to the slash-less (or slashed) path would be built from the request's Host.
    site.router.redirect_slashes = False

    salt = None
    if settings.safety_identifier == "hash" and settings.safety_salt:
        salt = settings.safety_salt.get_secret_value().encode()
    budget = ByteBudget(settings.max_buffered_bytes)  # request bodies, and answers held to be judged
    v1: ASGIApp = ModerationMiddleware(
        output_layer(upstream, settings, detectors, store, budget),
        store=store,
        detectors=detectors,
        user_header=settings.user_header,
        max_body_bytes=settings.max_body_bytes,
        max_strikes=store.policy.max_strikes,
        moderation_failure=settings.moderation_failure,
        store_failure=settings.store_failure,
        enforcement=settings.enforcement,
        safety_salt=salt,
        body_budget=budget,
        users_per_app=settings.users_per_app,
        moderation_mode=settings.moderation_mode,
        pii=settings.pii,
        moderation_timing=settings.moderation_timing,
        key_reach=KeyReach(settings.allowed_routes) if settings.openai_api_key is not None else None,
        unjudgeable=settings.unjudgeable,
    )
    if settings.api_keys:  # without keys the layer would only pass calls through: leave it out
        v1 = ClientKeyMiddleware(v1, keys=settings.client_keys)
    app = Gateway(v1, site, settings)
    app.state.settings = settings
    app.state.store = store
    app.state.operators = operators
    app.state.upstream = upstream
    return app
