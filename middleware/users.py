"""Who the end user is: the user header's rules, for /v1 calls and admin paths alike."""

from __future__ import annotations

import unicodedata

from middleware.errors import GatewayError, Refused

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


def user_id_from(raw: bytes | None, header: str, repeated: bool) -> str:
    """The user id a call's header names; `repeated`: the header came more than once."""
    if raw is None:
        raise Refused(
            "invalid", GatewayError(400, "missing_user_id", f"Send the end user's id in the {header} header.")
        )
    if repeated:
        # Which of two lines names the user is a guess the gateway and the upstream could make apart.
        raise Refused(
            "invalid", GatewayError(400, "invalid_user_id", f"Send the {header} header once; it came more than once.")
        )
    try:
        user_id = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        user_id = ""
    if user_id_problem(user_id) is not None:
        raise Refused(
            "invalid",
            GatewayError(
                400,
                "invalid_user_id",
                f"The {header} header must be 1 to {MAX_USER_ID_LENGTH} characters of UTF-8 text "
                "without control characters.",
            ),
        )
    return user_id
