"""Multipart form bodies of the judged routes: read strictly, then judged part by part.

A form that the gateway and the upstream could read differently is refused, never guessed:
exactly one boundary, the body opening with it and closing with it, CRLF line ends, one
`Content-Disposition: form-data` with one plain `name` per part, no transfer encodings, no
nested multiparts. Every part named `prompt` is judged (all of them: whichever one the upstream
reads was judged), every uploaded image becomes a `data:` URL for the image-capable detectors,
and every other upload is named unjudgeable.
"""

from __future__ import annotations

import base64
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError

from middleware.batch import read_batch
from middleware.errors import GatewayError
from middleware.extract import Collector
from middleware.protocols import UserInput

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

MAX_PARTS = 100  # the richest OpenAI form (an image edit: 16 images, a mask, a dozen options) has ~30
MAX_IMAGE_BYTES = 20 * 1024 * 1024  # larger images are unjudgeable rather than sent to a detector
_TCHARS = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"  # RFC 9110 5.6.2
_PARAMETER = re.compile(rf'\s*;\s*({_TCHARS})\s*=\s*("(?:[^"\\\r\n]|\\[^\r\n])*"|{_TCHARS})\s*')
_TRAILING = re.compile(r"\s*;?\s*")
# RFC 2046 5.1.1: 1 to 70 characters, not ending with a space
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
# the names OpenAI's forms use (`image[]`, `expires_after[anchor]`): no quoting or escaping to disagree on
_FIELD_NAME = re.compile(r"[A-Za-z0-9_.\[\]-]+")
_PLAIN_ENCODINGS = frozenset({"7bit", "8bit", "binary"})
_UTF8 = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})
# python-multipart logs a warning for each malformed body it refuses: the client reads why in its
# 400 already, and the log must not be its to fill. Kept for what is the gateway's own fault.
_PARSER_LOG = logging.getLogger("middleware.forms.multipart")
_PARSER_LOG.setLevel(logging.ERROR)
_MEDIA_FIELDS = frozenset({"image", "mask", "input_reference", "video"})
_IMAGE_TYPES = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


@dataclass(frozen=True, slots=True)
class FormPart:
    name: str
    data: bytes
    is_file: bool  # sent with a filename
    charset: str | None  # from the part's Content-Type, lower-cased


def malformed(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(400, "invalid_request", message, param=param)


def is_multipart(content_type: bytes | None) -> bool:
    if content_type is None:
        return False
    return content_type.split(b";", 1)[0].strip().lower() == b"multipart/form-data"


def read_form(body: bytes, content_type: bytes) -> list[FormPart]:
    """The parts of a multipart/form-data body. Raises GatewayError (400 invalid_request)."""
    _, parameters = _header_value(content_type.decode("latin-1"), "Content-Type")
    boundaries = [value for key, value in parameters if key == "boundary"]
    if len(boundaries) != 1 or not _BOUNDARY.fullmatch(boundaries[0]):
        raise malformed("A multipart/form-data body needs exactly one boundary of 1 to 70 characters in Content-Type.")
    boundary = boundaries[0].encode("latin-1")
    delimiter = b"--" + boundary
    # Another parser may read a preamble or an epilogue as parts: neither is allowed here.
    if not body.startswith(delimiter):
        raise malformed("The multipart body must begin with its boundary.")
    close = body.find(b"\r\n" + delimiter + b"--")
    if body.startswith(delimiter + b"--"):
        close, length = 0, len(delimiter) + 2
    else:
        length = len(delimiter) + 4
    if close < 0 or body[close + length :].strip(b"\r\n\t "):
        raise malformed("The multipart body must end with its closing boundary and nothing after it.")
    reader = _Reader()
    parser = MultipartParser(boundary, reader.callbacks())
    parser.logger = _PARSER_LOG
    try:
        parser.write(body)
    except FormParserError as exc:
        raise malformed(f"The multipart body cannot be parsed: {exc}.") from None
    if not reader.ended:
        raise malformed("The multipart body ended before its closing boundary.")
    return reader.parts


class _Reader:
    """python-multipart's callbacks, collecting whole parts."""

    def __init__(self) -> None:
        self.parts: list[FormPart] = []
        self.ended = False
        self._headers: list[tuple[str, str]] = []
        self._field = bytearray()
        self._value = bytearray()
        self._data: list[bytes] = []

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._begin,
            "on_header_field": lambda data, start, end: self._field.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_part_data": lambda data, start, end: self._data.append(data[start:end]),
            "on_part_end": self._end,
            "on_end": self._finish,
        }

    def _begin(self) -> None:
        if len(self.parts) >= MAX_PARTS:
            raise malformed(f"The multipart body has more than {MAX_PARTS} parts.")
        self._headers = []
        self._data = []

    def _header_end(self) -> None:
        name = self._field.decode("latin-1").strip().lower()
        self._headers.append((name, self._value.decode("latin-1").strip()))
        self._field.clear()
        self._value.clear()

    def _end(self) -> None:
        self.parts.append(_part(self._headers, b"".join(self._data)))

    def _finish(self) -> None:
        self.ended = True


def _part(headers: list[tuple[str, str]], data: bytes) -> FormPart:
    found: dict[str, str] = {}
    for name, value in headers:
        if name in found and name.startswith("content-"):
            raise malformed(f"A part of the multipart body has two {name} headers.")
        found[name] = value
    disposition = found.get("content-disposition")
    if disposition is None:
        raise malformed("Every part of a multipart/form-data body needs a Content-Disposition header.")
    kind, parameters = _header_value(disposition, "Content-Disposition")
    names = [value for key, value in parameters if key == "name"]
    if kind != "form-data" or len(names) != 1 or any(key.startswith("name*") for key, _ in parameters):
        raise malformed('Every part needs "Content-Disposition: form-data" with exactly one plain name.')
    name = names[0]
    if not _FIELD_NAME.fullmatch(name):
        raise malformed(f"The form field name {name!r} holds characters outside letters, digits and _ - . [ ].")
    encoding = found.get("content-transfer-encoding")
    if encoding is not None and encoding.lower() not in _PLAIN_ENCODINGS:
        raise malformed("Form parts must not use a Content-Transfer-Encoding.", param=name)
    media_type, type_parameters = _header_value(found.get("content-type", ""), "Content-Type")
    if media_type.startswith("multipart/"):
        raise malformed("Nested multipart parts are not supported.", param=name)
    charsets = [value.lower() for key, value in type_parameters if key == "charset"]
    return FormPart(
        name=name,
        data=data,
        is_file=any(key.startswith("filename") for key, _ in parameters),
        charset=charsets[0] if charsets else None,
    )


def _header_value(value: str, header: str) -> tuple[str, list[tuple[str, str]]]:
    """A header's lower-cased main value and its parameters (names lower-cased), in order."""
    main, _, rest = value.partition(";")
    rest = ";" + rest if rest else ""
    parameters: list[tuple[str, str]] = []
    position = 0
    while position < len(rest):
        found = _PARAMETER.match(rest, position)
        if found is None:
            if _TRAILING.fullmatch(rest, position):
                break
            raise malformed(f"The {header} header's parameters cannot be parsed.")
        raw = found.group(2)
        if raw.startswith('"'):
            raw = raw[1:-1]
            if "\\" in raw:
                # quoted-pair: parsers disagree on what `\m` stands for
                raise malformed(f"The {header} header's parameters must not use backslash escapes.")
        parameters.append((found.group(1).lower(), raw))
        position = found.end()
    return main.strip().lower(), parameters


def form_text(part: FormPart) -> str:
    """A judged text field's value; one the upstream could decode otherwise is refused."""
    if part.charset is not None and part.charset not in _UTF8:
        raise malformed(f"Send the form field {part.name} as UTF-8.", param=part.name)
    try:
        return part.data.decode("utf-8")
    except UnicodeDecodeError:
        raise malformed(f"The form field {part.name} is not UTF-8 text.", param=part.name) from None


def image_data_url(data: bytes, max_bytes: int = MAX_IMAGE_BYTES) -> str | None:
    """A `data:` URL of an image the detectors can read (PNG, JPEG, GIF, WebP, by its bytes, not by
    what the client declared), or None."""
    if len(data) > max_bytes:
        return None
    media_type = next((kind for magic, kind in _IMAGE_TYPES if data.startswith(magic)), None)
    if media_type is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        media_type = "image/webp"
    if media_type is None:
        return None
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


def media_form(parts: list[FormPart]) -> UserInput:
    """Image edits and variations, videos, video edits, extensions and remixes sent as a form."""
    found = Collector()
    for part in parts:
        lower = part.name.lower()
        base = lower.split("[", 1)[0]
        if base == "prompt":
            found.text(form_text(part))
        elif lower.endswith("[image_url]"):
            found.image(form_text(part), part.name)
        elif lower.endswith("[file_id]"):
            found.unreadable(part.name)
        elif part.is_file or base in _MEDIA_FIELDS:
            found.image(image_data_url(part.data), part.name)
    return found.result()


def files_form(parts: list[FormPart]) -> UserInput:
    """POST /files: a batch input file's requests are judged; files of other purposes carry no model
    input yet (a request that uses one names it unjudgeable)."""
    # strictly, as every judged text: a purpose spelled in another charset may read "batch" upstream
    purposes = {form_text(part).strip().lower() for part in parts if part.name.lower() == "purpose"}
    if "batch" not in purposes:
        return UserInput()
    if len(purposes) > 1:
        raise malformed("The form names more than one purpose.", param="purpose")
    found = Collector()
    for part in parts:
        if part.name.lower() == "file":
            read_batch(part.data, found, part.name)
    return found.result()
