"""What the judged routes' end-to-end tests share: a gateway on the fake upstream, forms, images.

The fake upstream's `/moderations` flags any text or image URL holding one of its flag words:
FLAG for texts, and a fragment of FLAGGED_PNG's base64 for that image sent as a `data:` URL.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx2

from gateway.app import create_app
from gateway.settings import Settings
from tests.servers import run_app
from tests.upstream import MockUpstream, RecordedRequest

FLAG = "forbidden"  # the fake upstream's /moderations flags it (violence)
USER = {"X-User-ID": "alice"}
ADMIN = {"Authorization": "Bearer admin-secret"}
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(48))  # an image, known by its bytes
FLAGGED_PNG = b"\x89PNG\r\n\x1a\n" + b"\xfe" * 48
# a piece of FLAGGED_PNG's base64 that PNG's lacks: the fake endpoint flags the image by it
_IMAGE_MARK = base64.b64encode(FLAGGED_PNG).decode()[-24:-4]


@contextmanager
def gateway(settings_factory: Callable[..., Settings], upstream: MockUpstream, **overrides: Any) -> Iterator[str]:
    """A gateway judging with the `openai` detector on the fake upstream; yields its base URL."""
    upstream.flag_words[_IMAGE_MARK] = "sexual"
    values: dict[str, Any] = {"upstream_url": upstream.url, "moderation": "openai", "max_strikes": 100}
    with run_app(create_app(settings_factory(**values | overrides))) as url:
        yield url


def form(fields: dict[str, str], files: dict[str, tuple[str, bytes, str]] | None = None) -> tuple[bytes, str]:
    """A multipart/form-data body as httpx (and so the OpenAI SDK) writes it, and its Content-Type."""
    request = httpx2.Request("POST", "http://gateway/", data=fields, files=files or {})
    return request.read(), request.headers["content-type"]


def reached(upstream: MockUpstream, path: str) -> list[RecordedRequest]:
    """The calls to `path` the upstream received (not the detector's /moderations)."""
    return [request for request in upstream.requests if request.path == path]


def error(response: httpx2.Response) -> dict[str, Any]:
    found: dict[str, Any] = response.json()["error"]
    return found
