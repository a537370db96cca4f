"""What a moderation endpoint's error answer means: an outage, or a refusal of the input itself.

The difference matters for safety. An outage (DetectorFailed) follows GATEWAY_MODERATION_FAILURE:
with `open` the call goes through unjudged. A refusal of the input (say, an image URL the endpoint
cannot fetch, or too many images) is the client's doing: counted as an outage, it would let any
client walk past the detector on purpose. So a 400, 413 or 422 is a refusal of the input unless
its body says it is about something else (the gateway's own model name or key).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

_INPUT_STATUSES = frozenset({400, 413, 422})
# The input's name in the endpoint's request; `input[2].image_url.url` or `input.2` names one item.
_INPUT_PARAM = re.compile(r"input(?:\[(\d+)\]|\.(\d+))?(?=$|[.\[])")
# Codes about the gateway's account or configuration, whatever the status says.
_ACCOUNT_CODES = frozenset(
    {"invalid_api_key", "insufficient_quota", "model_not_found", "billing_not_active", "invalid_organization"}
)
_MAX_MESSAGE = 200


@dataclass(frozen=True, slots=True)
class ErrorAnswer:
    """An error answer's status and what its body says: OpenAI's `{"error": {"message", "param",
    "code"}}`, or the `{"detail": [{"loc", "msg"}]}` of the FastAPI servers that imitate it."""

    status: int
    message: str = ""  # cut to 200 characters; "" when the body says nothing readable
    param: str | None = None
    code: str | None = None

    @classmethod
    def read(cls, status: int, body: bytes) -> ErrorAnswer:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return cls(status)
        if not isinstance(data, dict):
            return cls(status)
        error = data.get("error")
        if isinstance(error, dict):
            code = error.get("code")
            return cls(
                status,
                _text(error.get("message")),
                _text(error.get("param")) or None,
                code if isinstance(code, str) else None,
            )
        detail = data.get("detail")
        if isinstance(detail, list) and detail and isinstance(detail[0], dict):
            first: dict[str, Any] = detail[0]
            return cls(status, _text(first.get("msg")), _location(first.get("loc")))
        return cls(status, _text(detail))

    @property
    def about_input(self) -> bool:
        """Whether the endpoint refused the input itself rather than the gateway's call."""
        if self.status not in _INPUT_STATUSES or self.code in _ACCOUNT_CODES:
            return False
        return self.param is None or _INPUT_PARAM.match(self.param) is not None

    @property
    def input_index(self) -> int | None:
        """The position in the sent `input` array of the item the error names, if it names one."""
        found = _INPUT_PARAM.match(self.param or "")
        if found is None or not (index := found.group(1) or found.group(2)):
            return None
        return int(index)

    def detail(self) -> str:
        """`: <the endpoint's message>` for a log line or an error message, or ""."""
        return f": {self.message}" if self.message else ""


def _text(value: Any) -> str:
    return value[:_MAX_MESSAGE] if isinstance(value, str) else ""


def _location(loc: Any) -> str | None:
    """FastAPI's `["body", "input", 1, "image_url"]` as `input[1].image_url`."""
    if not isinstance(loc, list):
        return None
    parts = [part for part in loc if isinstance(part, str | int) and not isinstance(part, bool)]
    if parts[:1] == ["body"]:
        parts = parts[1:]
    if not parts:
        return None
    text = str(parts[0])
    for part in parts[1:]:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text
