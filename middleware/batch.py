"""Batch input files: JSONL uploaded to POST /files with purpose `batch`, one request a line.

Each request's body is judged with the extractor of its `url`, so a batch cannot carry what the
same request sent alone would not. A file the gateway could read otherwise than the Batch API
is refused with the line that makes it so, never guessed: a line that is not a JSON object,
holds a duplicate key, or names a url outside the Batch API's endpoints or a method other than POST.
"""

from __future__ import annotations

from typing import Any

import orjson

from middleware import extract
from middleware.bodies import has_duplicate_keys
from middleware.errors import GatewayError
from middleware.extract import Collector, Extractor

# The Batch API's endpoints (POST /batches `endpoint`); None: nothing in it is judged.
ENDPOINTS: dict[str, Extractor | None] = {
    "/v1/responses": extract.responses,
    "/v1/chat/completions": extract.chat,
    "/v1/completions": extract.completions,
    "/v1/images/generations": extract.prompt,
    "/v1/images/edits": extract.image_edit,
    "/v1/videos": extract.video,
    "/v1/embeddings": None,
    "/v1/moderations": None,
}


def read_batch(data: bytes, found: Collector, field: str) -> None:
    """Add every request's user input in a batch file (the form field `field`) to `found`.

    Unreadable parts are named `<field>:<line>:<parameter>`, e.g. `file:3:messages[0].content[1]`.
    Raises GatewayError (400 invalid_request) for a file it cannot read as the Batch API would.
    """
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        raise _refused(field, "The batch file is not UTF-8 JSONL.") from None
    # Lines end at \n alone. A reader that also breaks them at U+2028, U+2029 or U+0085 finds only
    # broken JSON, never another request: JSON holds those characters inside strings only.
    for number, line in enumerate(data.removeprefix(b"\xef\xbb\xbf").split(b"\n"), 1):
        if not line.strip():
            continue
        request = _request(line, field, number)
        url = request.get("url")
        if not isinstance(url, str) or url not in ENDPOINTS:
            known = ", ".join(ENDPOINTS)
            raise _refused(field, f"Line {number} of the batch file: url must be one of {known}.")
        method = request.get("method")
        if method != "POST":
            raise _refused(field, f'Line {number} of the batch file: method must be "POST".')
        extractor = ENDPOINTS[url]
        if extractor is None:
            continue
        body = request.get("body")
        if not isinstance(body, dict):
            raise _refused(field, f"Line {number} of the batch file: body must be a JSON object.")
        found.merge(extractor(body), f"{field}:{number}:")


def _request(line: bytes, field: str, number: int) -> dict[str, Any]:
    try:
        request = orjson.loads(line)  # strict: no NaN, no lone surrogates, one value
    except orjson.JSONDecodeError:
        raise _refused(field, f"Line {number} of the batch file is not JSON.") from None
    if not isinstance(request, dict):
        raise _refused(field, f"Line {number} of the batch file is not a JSON object.")
    if has_duplicate_keys(line, request):
        raise _refused(field, f"Line {number} of the batch file holds a key twice in one object; send each key once.")
    return request


def _refused(field: str, message: str) -> GatewayError:
    return GatewayError(400, "invalid_request", message, param=field)
