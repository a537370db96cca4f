"""The forwarded path is exactly the judged one and never leaves the upstream URL's path.

An attack run found `GET /v1/../internal/secret` forwarded with the `..` intact (reaching
`/internal/secret` on the upstream host with the gateway's key) and `POST /v1/x/../chat/completions`
reaching a chat route unjudged. Such paths are refused with 400 `invalid_path`, never normalised.
"""

from __future__ import annotations

import http.client
from collections.abc import Callable, Iterator

import orjson
import pytest

from gateway.app import create_app
from gateway.settings import Settings
from middleware.paths import path_problem
from tests.servers import run_app
from tests.upstream import MockUpstream

SettingsFactory = Callable[..., Settings]

REFUSED = [
    "/../internal/secret",
    "/%2e%2e/internal/secret",
    "/%2E%2E/internal/secret",
    "/..%2finternal/secret",
    "/..%2Finternal",
    "/x/../chat/completions",
    "/./chat/completions",
    "/chat/completions/..",
    "/chat%2Fcompletions",
    "/chat%5ccompletions",
    "/chat/completions;x=1",
    "/chat/completions%3B",
    "/chat/completions%00",
    "/chat/completions%20",
    "/chat/completions%0a",
    "/chat/completions%",
    "/chat/completions%zz",
    "/chat/completions%25",
    "/chat\\completions",
    "/chat/compl etions",
    '/chat/"completions"',
    "/chat/<completions>",
    "/models/gpt\x7f",
]
ALLOWED = [
    "/chat/completions",
    "/models/ft:gpt-4o-mini:acme::abc123",
    "/models/ft%3Agpt-4o%3Aacme",
    "/files/file-abc_123/content",
    "/vector_stores/vs_1/files/file-2",
    "/models/gpt-3.5-turbo",
    "/a/.../b",
    "/",
]


@pytest.mark.parametrize("path", REFUSED)
def test_paths_an_upstream_might_resolve_differently_are_refused(path: str) -> None:
    assert path_problem(path) is not None


@pytest.mark.parametrize("path", ALLOWED)
def test_plain_paths_are_forwarded(path: str) -> None:
    assert path_problem(path) is None


@pytest.fixture(scope="module")
def recording() -> Iterator[MockUpstream]:
    with MockUpstream() as mock:
        yield mock


def raw_request(url: str, method: str, target: str, body: bytes = b"") -> tuple[int, dict[str, object]]:
    """Send `target` as the request line holds it (clients normalise dot segments)."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.putrequest(method, target, skip_accept_encoding=True)
        connection.putheader("X-User-ID", "mallory")
        connection.putheader("X-Mock", "echo")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, orjson.loads(response.read() or b"{}")
    finally:
        connection.close()


@pytest.mark.parametrize(
    "target",
    [
        "/v1/../internal/secret",
        "/v1/%2e%2e/internal/secret",
        "/v1/..%2finternal/secret",
        "/v1/x/../chat/completions",
        "/v1/chat/completions;x=1",
        "/v1/chat/completions%3B",
        "/v1/chat/completions%00",
        "/v1/chat/completions%20",
    ],
)
def test_the_gateway_refuses_them_before_anything_goes_upstream(
    settings_factory: SettingsFactory, recording: MockUpstream, target: str
) -> None:
    recording.reset()
    settings = settings_factory(upstream_url=recording.url, moderation="rules", openai_api_key="sk-gateway")
    flagged = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "how to build a bomb"}]})
    with run_app(create_app(settings)) as url:
        status, body = raw_request(url, "POST", target, flagged)
        get_status, _ = raw_request(url, "GET", target)
    assert (status, get_status) == (400, 400)
    assert body["error"] == {
        "message": body["error"]["message"],  # type: ignore[index]
        "type": "invalid_request_error",
        "param": "path",
        "code": "invalid_path",
    }
    assert recording.requests == []


def test_a_plain_path_still_reaches_the_upstream_as_sent(
    settings_factory: SettingsFactory, recording: MockUpstream
) -> None:
    recording.reset()
    settings = settings_factory(upstream_url=recording.url, openai_api_key="sk-gateway")
    with run_app(create_app(settings)) as url:
        status, _ = raw_request(url, "GET", "/v1/models/ft%3Agpt-4o%3Aacme")
    assert status == 200
    assert [request.raw_path for request in recording.requests] == ["/v1/models/ft%3Agpt-4o%3Aacme"]
