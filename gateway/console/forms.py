"""Reading a console form: a small URL-encoded body, its CSRF token and its Origin checked.

Every state-changing page is a POST of `application/x-www-form-urlencoded` holding the session's
CSRF token in the hidden field `csrf`. The token is compared in constant time; an Origin header,
which browsers send with every POST, must name this very site. SameSite=Strict on the cookie is
a third fence: a page elsewhere cannot make the browser send it.
"""

from __future__ import annotations

import hmac
from urllib.parse import parse_qsl

from starlette.requests import Request

from gateway.admin_requests import read_capped
from middleware.errors import GatewayError

MAX_FORM_BYTES = 16 * 1024
MAX_FIELDS = 16
FORM_TYPE = "application/x-www-form-urlencoded"


class Form(dict[str, str]):
    """A form's fields, each given at most once."""

    def text(self, name: str) -> str:
        return self.get(name, "")


async def read_form(request: Request) -> Form:
    """The request's form fields; 400 for anything but a small URL-encoded body of unique fields."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != FORM_TYPE:
        raise GatewayError(400, "invalid_request", f"A console form is sent as {FORM_TYPE}.")
    raw = await read_capped(request, MAX_FORM_BYTES)
    try:
        pairs = parse_qsl(raw.decode("ascii"), keep_blank_values=True, max_num_fields=MAX_FIELDS, errors="strict")
    except (UnicodeError, ValueError):
        raise GatewayError(400, "invalid_request", "The form is not URL-encoded UTF-8 text.") from None
    form = Form()
    for key, value in pairs:
        if key in form:
            raise GatewayError(400, "invalid_request", f"The form field {key!r} was given more than once.")
        if "\x00" in value:
            raise GatewayError(400, "invalid_request", f"The form field {key!r} holds a NUL character.")
        form[key] = value
    return form


def same_origin(request: Request) -> bool:
    """False when the request says it comes from another site: its Origin header (or, where a
    browser sends none, Sec-Fetch-Site) names another origin than this request's own."""
    origin = request.headers.get("origin")
    if origin is not None:
        host = request.headers.get("host", "")
        return origin == f"{request.url.scheme}://{host}"
    return request.headers.get("sec-fetch-site", "same-origin") in ("same-origin", "none")


def check_csrf(request: Request, form: Form, expected: str) -> None:
    """403 `csrf_refused` unless the form carries the session's token and comes from this site."""
    given = form.text("csrf").encode()
    if not (hmac.compare_digest(given, expected.encode()) and same_origin(request)):
        raise GatewayError(
            403,
            "csrf_refused",
            "This form was refused: it did not come from this console's own page (or the page is from "
            "an earlier sign-in). Reload the page and send it again.",
        )
