"""What the gateway's own OpenAI key does not carry: routes that mint direct access, and headers
that would pick another organization or project for it.

With OPENAI_API_KEY set, a client spends the gateway's key. These routes would hand it access
that bypasses the gateway (an ephemeral key, a live session or call, an admin or service-account
key), so they are refused by default with 403 `route_not_allowed`; so are the `OpenAI-Organization`
and `OpenAI-Project` headers, which would aim the key elsewhere. GATEWAY_ALLOWED_ROUTES opens
them by name. Without OPENAI_API_KEY the client's own key is forwarded and nothing here applies.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import lru_cache

from middleware.errors import GatewayError
from middleware.routes import segments

# Paths relative to /v1; each covers every method and every path under it.
REFUSED_ROUTES = (
    "realtime",  # client secrets, sessions, transcription and translation sessions, WebRTC and SIP calls
    "live",  # Live sessions: WebRTC sessions, forks onto new connections, SIP calls
    "chatkit/sessions",  # a ChatKit session's client secret
    "organization",  # the Admin API: admin keys, service-account keys, invites, roles
    "projects",  # the Admin API's project roles
)
REFUSED_HEADERS = ("OpenAI-Organization", "OpenAI-Project")


def parse_allowed(value: str | Iterable[str]) -> tuple[str, ...]:
    """GATEWAY_ALLOWED_ROUTES in canonical form: routes as `realtime/calls`, headers lower-cased.

    Raises ValueError naming the first entry that opens nothing (the settings' one line).
    """
    items = value.split(",") if isinstance(value, str) else value
    allowed: dict[str, None] = {}
    headers = {header.lower() for header in REFUSED_HEADERS}
    for item in (item.strip() for item in items):
        if not item:
            continue
        if item.lower() in headers:
            allowed[item.lower()] = None
            continue
        path = "/".join(segments(item))
        if path != item.strip("/").lower() or not any(_under(path, root) for root in REFUSED_ROUTES):
            names = ", ".join((*REFUSED_ROUTES, *REFUSED_HEADERS))
            raise ValueError(f"{item!r} is neither a refused route nor a refused header; expected any of {names}")
        allowed[path] = None
    return tuple(allowed)


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root + "/")


class KeyReach:
    """The refusals for calls on the gateway's key; build one at start-up, only when the key is set."""

    def __init__(self, allowed: Iterable[str] = ()) -> None:
        allowed = parse_allowed(allowed)
        headers = {header.lower(): header for header in REFUSED_HEADERS}
        self._headers = tuple(
            (header, lower.encode("latin-1")) for lower, header in headers.items() if lower not in allowed
        )
        self._open = tuple(tuple(entry.split("/")) for entry in allowed if entry not in headers)
        self._roots = tuple(tuple(root.split("/")) for root in REFUSED_ROUTES)
        self._route = lru_cache(maxsize=1024)(self._refused_route)

    def refusal(self, path: str, headers: Mapping[bytes, bytes]) -> GatewayError | None:
        """Why the gateway's key does not carry this call (`path` relative to /v1; `headers` by
        lower-case name), or None."""
        for header, key in self._headers:
            if key in headers:
                return GatewayError(
                    403,
                    "route_not_allowed",
                    f"This gateway does not send the {header} header with its own OpenAI key; "
                    "remove it (the gateway's key decides the organization and project).",
                )
        route = self._route(path)
        if route is None:
            return None
        return GatewayError(
            403,
            "route_not_allowed",
            f"This gateway does not carry /v1/{route} with its OpenAI key: it would give the client "
            "access that bypasses the gateway.",
        )

    def _refused_route(self, path: str) -> str | None:
        found = segments(path)
        for root in self._roots:
            if found[: len(root)] == root:
                if any(found[: len(entry)] == entry for entry in self._open):
                    return None
                return "/".join(found)
        return None
