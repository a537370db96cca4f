"""The judged routes: which calls carry user text to a model, and how their bodies are read.

Paths are relative to /v1. A path is matched in a canonical form: lower-cased, each segment cut
to its leading run of `[a-z0-9_-]`, segments left empty dropped. So `//`, a trailing `/`,
`;x=1`, a NUL, a space or `.json` after a route's name never let a body through unjudged: the
call is judged as the route an upstream could read it as (over-judging a path no upstream serves
costs nothing). Dot segments and encoded `/` or `.` are refused before a path gets here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from middleware import extract
from middleware.bodies import UNCOMPRESSED, compressed, json_object
from middleware.errors import GatewayError
from middleware.extract import Extractor
from middleware.forms import FormPart, files_form, is_multipart, malformed, media_form, read_form
from middleware.protocols import UserInput

ID = "{id}"
_NAME_RUN = re.compile(r"[a-z0-9_-]*")
_SHOWN_PARTS = 10  # an error names this many unjudgeable parts at most

FormExtractor = Callable[[list[FormPart]], UserInput]


@dataclass(frozen=True, slots=True)
class Route:
    """A judged route: POST to `name` (its path relative to /v1, `{id}` for an id segment).

    `json` extracts from a body that parsed as JSON; `form` from a multipart/form-data body's
    parts. A route with both reads whichever the call sends (OpenAI takes both there).
    """

    name: str
    json: Extractor | None = None
    form: FormExtractor | None = None

    def reads(self, content_type: bytes | None) -> Literal["json", "multipart"]:
        """How this call's body is read, from its Content-Type.

        Multipart when the route takes forms and the call sends one; else JSON (a body that is
        not a JSON object is refused as today). Raises GatewayError for a form-only route sent
        anything but a form.
        """
        if self.form is not None and is_multipart(content_type):
            return "multipart"
        if self.json is None:
            raise malformed(f"Send the body of /v1/{self.name} as multipart/form-data.")
        return "json"

    def reading(self, headers: Mapping[bytes, bytes]) -> Literal["json", "multipart"]:
        """How this call's body is read, from its headers by lower-case name (see `reads`). A
        compressed form is refused here, before its body is held; compressed JSON as it is parsed."""
        reading = self.reads(headers.get(b"content-type"))
        if reading == "multipart" and compressed(headers.get(b"content-encoding")):
            raise malformed(UNCOMPRESSED)
        return reading

    def read(
        self, body: bytes, headers: Mapping[bytes, bytes], reading: Literal["json", "multipart"]
    ) -> tuple[dict[str, Any] | None, UserInput]:
        """This call's body parsed (a JSON object; None for a form) and the user's input in it,
        read as `reading(headers)` said (which refuses a form-only route's body sent as anything else).

        Raises GatewayError (400) for a body it cannot read one way only: invalid_json for JSON,
        invalid_request for a form.
        """
        if reading == "multipart":
            return None, self.extract_form(body, headers[b"content-type"])
        request = json_object(headers.get(b"content-encoding"), body)
        return request, self.extract(request)

    def extract(self, body: Any) -> UserInput:
        """The user input of a JSON body (any JSON value; a non-object holds none)."""
        return self.json(body) if self.json is not None else UserInput()

    def extract_form(self, body: bytes, content_type: bytes) -> UserInput:
        """The user input of a multipart/form-data body. Raises GatewayError (400 invalid_request)
        for a form it cannot read unambiguously."""
        if self.form is None:
            raise malformed(f"Send the body of /v1/{self.name} as JSON.")
        return self.form(read_form(body, content_type))


ROUTES = (
    Route("chat/completions", json=extract.chat),
    Route("completions", json=extract.completions),
    Route("responses", json=extract.responses),
    Route("responses/compact", json=extract.responses),
    Route("conversations", json=extract.conversation_items),
    Route(f"conversations/{ID}/items", json=extract.conversation_items),
    Route("images/generations", json=extract.prompt),
    Route("images/edits", json=extract.image_edit, form=media_form),
    Route("images/variations", form=media_form),
    Route("videos", json=extract.video, form=media_form),
    Route("videos/edits", json=extract.prompt, form=media_form),
    Route("videos/extensions", json=extract.prompt, form=media_form),
    Route(f"videos/{ID}/remix", json=extract.prompt, form=media_form),
    Route("audio/speech", json=extract.speech),
    Route("threads", json=extract.thread),
    Route("threads/runs", json=extract.thread_run),
    Route(f"threads/{ID}/messages", json=extract.thread_message),
    Route(f"threads/{ID}/runs", json=extract.run),
    Route("uploads", json=extract.upload),
    Route("files", form=files_form),
)
_PATTERNS = tuple((tuple(route.name.split("/")), route) for route in ROUTES)
# the routes' own spellings, found with one dict lookup
_EXACT = {f"/{route.name}": route for route in ROUTES if ID not in route.name}


def segments(path: str, *, keep_empty: bool = False) -> tuple[str, ...]:
    """A path's canonical segments (see the module's docstring).

    `keep_empty`: a segment that holds no name character (`;x`, a space) stays, as "", where an
    id could stand: `/threads/%20thread_1/messages` is judged should an upstream trim its ids.
    """
    runs = (_NAME_RUN.match(segment) for segment in path.lower().split("/") if segment)
    return tuple(run for found in runs if found is not None and ((run := found.group()) or keep_empty))


def match(method: str, path: str) -> Route | None:
    """The judged route a call to `path` (relative to /v1) reaches, or None."""
    if method != "POST" and method.upper() != "POST":
        return None
    route = _EXACT.get(path)
    return route if route is not None else _canonical_match(path)


@lru_cache(maxsize=1024)
def _canonical_match(path: str) -> Route | None:
    found = [_pattern_match(segments(path)), _pattern_match(segments(path, keep_empty=True))]
    first, second = found
    if first is None or second is None or first is second:
        return first or second
    # `/threads/;x/runs`: threads/runs to one reader, threads/{id}/runs to another; judge as both
    return Route(first.name, json=_both(first.json, second.json), form=_both(first.form, second.form))


def _pattern_match(found: tuple[str, ...]) -> Route | None:
    for pattern, route in _PATTERNS:
        if len(pattern) == len(found) and all(
            expected in (actual, ID) for expected, actual in zip(pattern, found, strict=True)
        ):
            return route
    return None


def _both[Body](
    first: Callable[[Body], UserInput] | None, second: Callable[[Body], UserInput] | None
) -> Callable[[Body], UserInput] | None:
    if first is None or second is None:
        return first or second

    def extract_both(body: Body) -> UserInput:
        found = extract.Collector()
        found.merge(first(body), "")
        found.merge(second(body), "")
        return found.result()

    return extract_both


def unjudgeable_error(user_input: UserInput) -> GatewayError:
    """The refusal of a call holding parts no detector reads, under GATEWAY_UNJUDGEABLE=refuse."""
    parts = user_input.unjudgeable
    shown = ", ".join(parts[:_SHOWN_PARTS])
    if len(parts) > _SHOWN_PARTS:
        shown += f" and {len(parts) - _SHOWN_PARTS} more"
    return GatewayError(
        400,
        "unjudgeable_input",
        f"This gateway forwards only input its moderation can read (text and images), and this call "
        f"holds parts it cannot (audio, files, images by file id, token ids, batch files sent in parts): "
        f"{shown}. It was not forwarded.",
        param=parts[0] if parts else None,
        unjudgeable=list(parts[:_SHOWN_PARTS]),
    )
