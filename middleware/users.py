"""Who the end user is: the user header's rules, for /v1 calls and admin paths alike."""

from __future__ import annotations

import unicodedata

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
