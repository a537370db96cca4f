"""Per-request context: the request id, the access log line and the request metrics."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from random import getrandbits
from time import perf_counter

from gateway.logs import REQUEST_ID, access_log
from gateway.metrics import IN_FLIGHT, REQUEST_DURATION, REQUESTS
from middleware.asgi import ASGIApp, Message, Receive, Scope, Send
from middleware.errors import GatewayError

_REQUEST_ID = b"x-request-id"
# Metric labels must stay a small fixed set whatever paths clients send: ids in paths
# (/v1/files/file-abc) and made-up paths fold into their family or "other".
_V1_ROUTES = frozenset(
    {
        "assistants", "audio", "batches", "chat", "completions", "containers", "conversations", "embeddings",
        "evals", "files", "fine_tuning", "images", "models", "moderations", "realtime", "responses", "threads",
        "uploads", "vector_stores", "videos",
    }
)  # fmt: skip
_ADMIN_ROUTES = frozenset(
    {"users", "block", "unblock", "stats", "policy", "appeals", "events", "operators", "console", "openapi.json"}
)
_GATEWAY_ROUTES = frozenset({"/gateway/standing", "/gateway/appeals"})  # a user's own: no ids below them


class _Count:
    # A plain count read at scrape time: a Gauge's inc() and dec() take a lock each, per request.
    # An instance, not a class attribute: writing a class's attribute invalidates the
    # interpreter's caches for that class each time.
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


_in_flight = _Count()
IN_FLIGHT.set_function(lambda: _in_flight.value)


def _count(route: str, method: str, status: int, seconds: float) -> None:
    REQUESTS.labels(route, method, str(status)).inc()
    REQUEST_DURATION.labels(route).observe(seconds)


_labels: dict[str, str] = {}
_MAX_LABELS = 1024  # paths are the client's choice: remember only so many


def route_label(path: str) -> str:
    """A bounded-cardinality name for the route of `path`."""
    label = _labels.get(path)
    if label is None:
        label = _route_label(path)
        if len(_labels) < _MAX_LABELS:
            _labels[path] = label
    return label


def _route_label(path: str) -> str:
    if path.startswith("/v1/"):
        family = path[4:].split("/", 1)[0]
        if family == "chat" and path.startswith("/v1/chat/completions"):
            return "/v1/chat/completions"
        return f"/v1/{family}" if family in _V1_ROUTES else "/v1/other"
    if path.startswith("/admin/"):
        family = path[7:].split("/", 1)[0]
        return f"/admin/{family}" if family in _ADMIN_ROUTES else "/admin/other"
    if path in ("/healthz", "/readyz", "/metrics") or path in _GATEWAY_ROUTES:
        return path
    return "other"


def _request_id(scope: Scope) -> str:
    for key, value in scope["headers"]:
        if key == _REQUEST_ID:
            # Echo the client's id only when it is safe to put back in a header and in a log.
            text: str = value.decode("latin-1")
            if 0 < len(text) <= 200 and text.isprintable():
                return text
            break
    return new_request_id()


def new_request_id() -> str:
    """A fresh request id, 32 hex digits.

    An id, not a secret: getrandbits costs a fraction of uuid4's os.urandom system call, and
    to_bytes().hex() half of formatting the number with "032x" (the same 32 hex digits).
    """
    return getrandbits(128).to_bytes(16).hex()


class RequestContextMiddleware:
    """Gives every response an X-Request-ID, and every request one access log line and its metrics.

    Inner apps must not send an X-Request-ID of their own: the proxy renames the upstream's to
    X-Upstream-Request-ID, since the README reserves X-Request-ID for the gateway's (the
    client's, when it sent one).

    `on_error`, when given, turns an exception from the inner app into the error to answer
    while nothing was sent yet (what Starlette's error middlewares do, for the app's /v1 path
    that skips them); an exception that is not a GatewayError is raised again once answered.
    """

    def __init__(self, app: ASGIApp, on_error: Callable[[Scope, Exception], GatewayError] | None = None) -> None:
        self.app = app
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = perf_counter()
        request_id = _request_id(scope)
        request_id_bytes = request_id.encode("latin-1")
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        path = scope["path"]
        status = 500
        first_byte = 0.0

        def send_with_id(message: Message) -> Awaitable[None]:
            # Hands back the server's own awaitable: a coroutine here would be one more per message.
            nonlocal status, first_byte
            if message["type"] == "http.response.start":
                status = message["status"]
                first_byte = perf_counter() - started
                message["headers"] = [*message.get("headers", ()), (_REQUEST_ID, request_id_bytes)]
            return send(message)

        _in_flight.value += 1
        token = REQUEST_ID.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            if self.on_error is None or first_byte:
                raise
            await self.on_error(scope, exc).send(send_with_id)
            if not isinstance(exc, GatewayError):
                raise
        finally:
            _in_flight.value -= 1
            duration = perf_counter() - started
            method = scope["method"]
            _count(route_label(path), method, status, first_byte or duration)
            upstream = state.get("upstream_seconds")
            fields = {
                "request_id": request_id,
                "user_id": state.get("user_id"),
                "method": method,
                "path": path,
                "status": status,
                # milliseconds to two places; round(x * 1000, 2) goes through decimal strings (2.4x the time)
                "duration_ms": round(duration * 100_000) / 100,
                "upstream_ms": None if upstream is None else round(upstream * 100_000) / 100,
                "decision": state.get("decision"),
            }
            app = state.get("app")
            if app is not None:  # the application a named client key belongs to
                fields["app"] = app
            access_log.write(fields)
            REQUEST_ID.reset(token)
