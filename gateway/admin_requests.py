"""Reading an admin request into its models: path and query parameters, and the JSON body.

What the models refuse becomes one OpenAI-shaped 400 (`invalid_request`, or the code a check of
ours names) whose `param` is the field at fault; the first fault is named, in a fixed order.
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails
from starlette.requests import ClientDisconnect, Request

from middleware.bodies import too_large
from middleware.errors import GatewayError

MAX_BODY_BYTES = 64 * 1024


def read_params[P: BaseModel](model: type[P], request: Request) -> P:
    """The path and query parameters as `model`; unknown or repeated query parameters are refused."""
    path: dict[str, Any] = dict(request.path_params)
    values = dict(path)
    refusals: list[tuple[int, GatewayError]] = []  # (rank, refusal): a bad path is said first
    for key, value in request.query_params.multi_items():
        if key in path or key not in model.model_fields:
            expected = ", ".join(name for name in model.model_fields if name not in path) or "none here"
            refusals.append((1, _invalid(key, f"Unknown query parameter {key!r}: expected {expected}.")))
        elif key in values:
            refusals.append((1, _invalid(key, f"Query parameter {key!r} given more than once.")))
        else:
            values[key] = value
    try:
        params = model.model_validate(values)
    except ValidationError as exc:
        for error in exc.errors():
            refusals.append((0 if error["loc"] and error["loc"][0] in path else 2, refusal(error)))
    else:
        if not refusals:
            return params
    raise min(refusals, key=lambda refusal: refusal[0])[1]


async def read_capped(request: Request, limit: int) -> bytes:
    """The whole body: 413 past `limit` bytes, and a quiet 400 when the client hangs up before its end
    (an expected event, not the gateway's failure: no 500, no traceback in the log)."""
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:
        raise GatewayError(400, "invalid_request", "The body was cut short: the client hung up mid-body.") from None
    return b"".join(chunks)


async def read_body[B: BaseModel](model: type[B], request: Request) -> B:
    """The JSON object body as `model`; no body at all is `{}`."""
    raw = await read_capped(request, MAX_BODY_BYTES)
    expected = f"expected a JSON object with {', '.join(model.model_fields)}"
    if not any(field.is_required() for field in model.model_fields.values()):
        expected += ", or no body"
    data: object = {}
    if raw.strip():
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise GatewayError(400, "invalid_json", f"The body is not valid JSON: {expected}.") from None
        if not isinstance(data, dict):
            raise GatewayError(400, "invalid_json", f"The body is not a JSON object: {expected}.")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        # An unknown field first: it is most likely a typo of the field that seemed wrong.
        error = min(exc.errors(), key=lambda error: error["type"] != "extra_forbidden")
    if error["type"] == "extra_forbidden":
        key = str(error["loc"][0])
        raise _invalid(key, f"Unknown field {key!r}: {expected}.")
    raise refusal(error)


def refusal(error: ErrorDetails) -> GatewayError:
    """The 400 for one fault a model found, naming its field (the console's forms say it the same way)."""
    param = str(error["loc"][0]) if error["loc"] else None
    if error["type"] in ("invalid_request", "invalid_user_id"):
        return GatewayError(400, error["type"], error["msg"], param=param)
    message = error["msg"]
    return _invalid(param, f"Invalid {param}: {message[:1].lower()}{message[1:]}.")


def _invalid(param: str | None, message: str) -> GatewayError:
    return GatewayError(400, "invalid_request", message, param=param)
