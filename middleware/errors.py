"""OpenAI-shaped error answers: the one place where the gateway's own errors are built.

The official SDKs pick the exception class from the status and read `error.code`,
`error.type` and `error.param`; enforcement answers also carry `x-should-retry: false` so
the SDK does not retry a refusal (openai-python `_base_client.py`).
"""

from __future__ import annotations

from typing import Any

import orjson

from middleware.asgi import Send

# status -> the `type` OpenAI uses for it
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "server_error",
    504: "timeout_error",
}
# statuses an SDK must not retry: the same call would get the same refusal (the SDK retries a 409
# unless told not to; the gateway's conflicts do not clear by themselves)
_FINAL = frozenset({400, 401, 403, 404, 409, 413})


class GatewayError(Exception):
    """An error the gateway answers itself; raise it anywhere below a route or middleware."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.headers = headers or {}
        self.extra = extra

    def body(self) -> bytes:
        return error_body(self.code, self.message, self.status, param=self.param, **self.extra)

    def response_headers(self) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", b"application/json")]
        if self.status in _FINAL:
            headers.append((b"x-should-retry", b"false"))
        headers.extend((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items())
        return headers

    async def send(self, send: Send) -> None:
        body = self.body()
        headers = self.response_headers()
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def error_body(code: str, message: str, status: int, *, param: str | None = None, **extra: Any) -> bytes:
    error: dict[str, Any] = {
        "message": message,
        "type": _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
        "param": param,
        "code": code,
    }
    error.update(extra)
    return orjson.dumps({"error": error})


def sse_error_event(code: str, message: str, status: int = 502) -> bytes:
    """The last event of an SSE stream cut by the upstream; the SDK raises it as an APIError."""
    return b"data: " + error_body(code, message, status) + b"\n\n"


class Refused(Exception):
    """Ends a call with the gateway's own answer; `decision` is what the access line records."""

    def __init__(self, decision: str, error: GatewayError) -> None:
        super().__init__(error.message)
        self.decision = decision
        self.error = error
