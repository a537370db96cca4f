"""Which headers cross the proxy: hop-by-hop ones never do (RFC 9110 7.6.1)."""

from __future__ import annotations

from collections.abc import Iterable

# RFC 9110 7.6.1; the headers a Connection header names are dropped too.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"trailer",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
_REQUEST_ID = b"x-request-id"
_UPSTREAM_REQUEST_ID = b"x-upstream-request-id"
# aiohttp writes Host and the framing of the body it sends; uvicorn already answered any Expect.
# A method override would make an upstream that honours it serve, say, a GET the gateway did not
# judge as the POST it would have judged.
REQUEST_DROP = _HOP_BY_HOP | {
    b"host",
    b"content-length",
    b"expect",
    b"x-http-method-override",
    b"x-http-method",
    b"x-method-override",
}


def response_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The upstream's response headers as the client gets them: lower-cased, hop-by-hop ones dropped."""
    headers: list[tuple[bytes, bytes]] = []
    connection: bytes | None = None
    for name, value in raw:
        lower = name.lower()
        if lower in _HOP_BY_HOP:
            if lower == b"connection":
                connection = value if connection is None else connection + b"," + value
            continue
        if lower == _REQUEST_ID:
            # X-Request-ID is the gateway's; the upstream's own is kept under another name.
            lower = _UPSTREAM_REQUEST_ID
        headers.append((lower, value))
    if connection is not None:
        named = {token.strip().lower() for token in connection.split(b",")}
        headers = [(name, value) for name, value in headers if name not in named]
    return headers
