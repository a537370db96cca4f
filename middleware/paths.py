"""Which /v1 paths the gateway forwards: plain ones only, refused rather than normalised.

The proxy forwards the client's path as it was sent (its percent-encoding untouched), so the
path that was judged is the path the upstream routes. A path an upstream might resolve to
something else is refused: dot segments (`/v1/../internal`, reaching outside the base URL with
the gateway's key), encoded `/`, `\\` or `.` (`..%2f`, `%2e%2e`), encoded controls, spaces, `;`,
`%`, `?` and `#`, and any character outside the URL path grammar.
"""

from __future__ import annotations

import re

from middleware.errors import GatewayError

# RFC 3986 pchar and "/", less ";" (matrix parameters: `/chat/completions;x=1` must not be a
# second spelling of a judged route). A percent sign must start an escape.
_PLAIN = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,=:@/]|%[0-9A-Fa-f]{2})*")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
# Escapes that decode to a separator, a dot, or what no route name holds.
_REFUSED_BYTES = frozenset({*range(0x21), 0x7F, ord("/"), ord("\\"), ord("."), ord(";"), ord("%"), ord("?"), ord("#")})


def path_problem(path: str) -> str | None:
    """Why `path` (below /v1, as sent, without the query) must not be forwarded; None if it may."""
    if not _PLAIN.fullmatch(path):
        return "holds a character outside the URL path grammar (or `;`, or a `%` that starts no escape)"
    if "%" in path and any(int(code, 16) in _REFUSED_BYTES for code in _ESCAPE.findall(path)):
        return "holds an encoded `/`, `\\`, `.`, `;`, `%`, `?`, `#`, space or control character"
    if "/./" in f"{path}/" or "/../" in f"{path}/":
        return "holds a dot segment (`.` or `..`)"
    return None


def invalid_path(problem: str) -> GatewayError:
    """The answer to a path that `path_problem` refuses."""
    return GatewayError(
        400,
        "invalid_path",
        f"The request path {problem}; the gateway forwards only plain paths below its /v1.",
        param="path",
    )
