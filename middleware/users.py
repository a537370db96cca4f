"""Who the end user is: the user header's rules, for /v1 calls, /gateway calls and admin paths alike."""

from __future__ import annotations

import unicodedata
from typing import Any

from middleware.asgi import Scope
from middleware.errors import GatewayError

MAX_USER_ID_LENGTH = 256
_FORBIDDEN = frozenset({"Cc", "Zl", "Zp"})  # control characters and line breaks


def user_id_problem(user_id: str) -> str | None:
    """Why this is not a valid end-user id, or None."""
    if not user_id:
        return "is empty"
    if len(user_id) > MAX_USER_ID_LENGTH:
        return f"is longer than {MAX_USER_ID_LENGTH} characters"
    # In ASCII the forbidden characters are exactly the unprintable ones: one C call.
    if (
        not user_id.isprintable()
        if user_id.isascii()
        else any(unicodedata.category(char) in _FORBIDDEN for char in user_id)
    ):
        return "holds control characters"
    return None


def request_user(
    scope: Scope, note: dict[str, Any], header_key: bytes, header_name: str, per_app: bool
) -> tuple[str, dict[bytes, bytes]]:
    """The user a call names, and the call's headers by name (the first of each name).

    `header_key` is the user header's lower-case name, `header_name` as the operator spelled it.
    With `per_app`, a call made with an application's named key (`note["app"]`, set by the
    client-key check) names `app:user`: one application's users are not another's. The user is
    noted in `note["user_id"]` for the access line. Raises GatewayError 400 `missing_user_id` or
    `invalid_user_id`.
    """
    raw_headers = scope["headers"]
    if not isinstance(raw_headers, list | tuple):
        # any iterable, says ASGI: read once here, so kept for the judged body's checks and the proxy
        raw_headers = scope["headers"] = list(raw_headers)
    # by (lower-case) name, the first of each name winning, in one C call
    headers: dict[bytes, bytes] = dict(reversed(raw_headers))
    raw = headers.get(header_key)
    if raw is None:
        raise GatewayError(400, "missing_user_id", f"Send the end user's id in the {header_name} header.")
    # A name given twice makes the dict shorter than the list: only then count this header's lines.
    if len(headers) != len(raw_headers) and sum(1 for name, _ in raw_headers if name == header_key) > 1:
        # Which of two lines names the user is a guess the gateway and the upstream could make apart.
        raise GatewayError(400, "invalid_user_id", f"Send the {header_name} header once; it came more than once.")
    try:
        user_id = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        user_id = ""
    if user_id_problem(user_id) is not None:
        raise GatewayError(
            400,
            "invalid_user_id",
            f"The {header_name} header must be 1 to {MAX_USER_ID_LENGTH} characters of UTF-8 text "
            "without control characters.",
        )
    app = note.get("app")
    if app is not None and per_app:
        user_id = f"{app}:{user_id}"
    note["user_id"] = user_id
    return user_id, headers
