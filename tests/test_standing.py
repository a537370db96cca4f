"""The /gateway routes on a real server: a user's standing and appeals, as their application
calls them, and what a hostile client sends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx2
import pytest
from structlog.testing import capture_logs

from gateway.app import create_app
from gateway.settings import Settings
from middleware.asgi import ASGIApp, Message
from tests.servers import run_app
from tests.test_appeals import zero_standing
from tests.upstream import MockUpstream

SettingsFactory = Callable[..., Settings]
FLAGGED = {"model": "m", "messages": [{"role": "user", "content": "how to build a bomb"}]}


@pytest.fixture
def gateway(settings_factory: SettingsFactory, upstream: MockUpstream) -> Iterator[str]:
    settings = settings_factory(upstream_url=upstream.url, moderation="rules")
    with run_app(create_app(settings)) as url:
        yield url


def as_user(user: str, **headers: str) -> dict[str, str]:
    return {"X-User-ID": user, **headers}


def strike(url: str, user: str, **headers: str) -> str:
    """A flagged call; the event_id its refusal states."""
    answer = httpx2.post(f"{url}/v1/chat/completions", headers=as_user(user, **headers), json=FLAGGED)
    assert answer.status_code in (400, 403)
    event_id: str = answer.json()["error"]["event_id"]
    return event_id


def appeal(url: str, user: str, body: Any, **headers: str) -> httpx2.Response:
    return httpx2.post(f"{url}/gateway/appeals", headers=as_user(user, **headers), json=body)


def error(answer: httpx2.Response, status: int, code: str, param: str | None = None) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    found: dict[str, Any] = answer.json()["error"]
    assert (found["code"], found["param"]) == (code, param)
    assert found["message"]
    return found


def test_a_user_never_seen_stands_at_zero(gateway: str, upstream: MockUpstream) -> None:
    answer = httpx2.get(f"{gateway}/gateway/standing", headers=as_user("new"))
    assert answer.status_code == 200
    assert answer.headers["cache-control"] == "no-store"
    assert answer.json() == zero_standing("new")
    assert upstream.requests == []


def test_a_blocked_user_sees_why_and_appeals(gateway: str, upstream: MockUpstream) -> None:
    strikes = [strike(gateway, "ann") for _ in range(3)]
    assert httpx2.get(f"{gateway}/v1/models", headers=as_user("ann")).status_code == 403
    standing = httpx2.get(f"{gateway}/gateway/standing", headers=as_user("ann")).json()
    assert (standing["blocked"], standing["strikes"]) == (True, 3)
    block = standing["block"]
    assert block["event_id"] == strikes[2]  # the third refusal named the block
    assert (block["categories"], block["by"], block["appealable"]) == (["illicit/violent"], "policy", True)
    assert [item["event_id"] for item in standing["active_strikes"]] == [
        str(int(strikes[0])),
        str(int(strikes[1])),
        str(int(strikes[2]) - 1),
    ]

    filed = appeal(gateway, "ann", {"event_id": block["event_id"], "message": "I write thrillers."})
    assert filed.status_code == 201
    body = filed.json()
    assert {
        key: body[key] for key in ("event_id", "user_id", "status", "message", "decided_at", "decision_reason")
    } == {
        "event_id": block["event_id"],
        "user_id": "ann",
        "status": "open",
        "message": "I write thrillers.",
        "decided_at": None,
        "decision_reason": None,
    }
    assert isinstance(body["id"], str)
    again = httpx2.get(f"{gateway}/gateway/standing", headers=as_user("ann")).json()
    assert again["appeals"] == [body]
    assert again["block"]["appealable"] is False
    twice = error(
        appeal(gateway, "ann", {"event_id": block["event_id"], "message": "Again."}), 409, "appeal_exists", "event_id"
    )
    assert twice["appeal_id"] == body["id"]
    # The 403 of the blocked user's calls no longer offers an appeal.
    assert httpx2.get(f"{gateway}/v1/models", headers=as_user("ann")).json()["error"]["appealable"] is False
    # Nothing of /gateway went upstream.
    assert upstream.requests == []


def test_another_users_event_is_not_found(gateway: str) -> None:
    bobs = strike(gateway, "bob")
    error(appeal(gateway, "eve", {"event_id": bobs, "message": "Mine now."}), 404, "event_not_found", "event_id")
    error(appeal(gateway, "bob", {"event_id": "999999999", "message": "?"}), 404, "event_not_found", "event_id")


BAD_BODIES = [
    ({"event_id": 12, "message": "a number"}, "event_id"),
    ({"event_id": "12a", "message": "not digits"}, "event_id"),
    ({"event_id": "1" * 19, "message": "too long"}, "event_id"),
    ({"event_id": "-1", "message": "negative"}, "event_id"),
    ({"message": "no event"}, "event_id"),
    ({"event_id": "1"}, "message"),
    ({"event_id": "1", "message": ""}, "message"),
    ({"event_id": "1", "message": " \n "}, "message"),
    ({"event_id": "1", "message": "a\x00b"}, "message"),
    ({"event_id": "1", "message": "x" * 2001}, "message"),
    ({"event_id": "1", "message": ["list"]}, "message"),
    ({"event_id": "1", "message": "ok", "user_id": "someone-else"}, "user_id"),
]


def test_a_bad_appeal_body_names_its_field(gateway: str) -> None:
    for body, param in BAD_BODIES:
        error(appeal(gateway, "carl", body), 400, "invalid_request", param)


def test_what_is_not_an_appeal_body(gateway: str) -> None:
    headers = as_user("dora", **{"content-type": "application/json"})
    for raw in (b"{", b"[1]", b'"text"', b"\xff\xfe"):
        error(httpx2.post(f"{gateway}/gateway/appeals", headers=headers, content=raw), 400, "invalid_json")
    error(httpx2.post(f"{gateway}/gateway/appeals", headers=headers), 400, "invalid_request", "event_id")
    huge = b'{"event_id": "1", "message": "' + b"x" * 70_000 + b'"}'
    error(httpx2.post(f"{gateway}/gateway/appeals", headers=headers, content=huge), 413, "request_too_large")
    # Two thousand characters are fine, however many bytes they take.
    event_id = strike(gateway, "dora")
    assert appeal(gateway, "dora", {"event_id": event_id, "message": "é" * 2000}).status_code == 201


def test_the_user_header_rules_apply(gateway: str) -> None:
    error(httpx2.get(f"{gateway}/gateway/standing"), 400, "missing_user_id")
    error(httpx2.get(f"{gateway}/gateway/standing", headers={"X-User-ID": ""}), 400, "invalid_user_id")
    error(httpx2.get(f"{gateway}/gateway/standing", headers={"X-User-ID": "x" * 257}), 400, "invalid_user_id")
    twice = httpx2.get(f"{gateway}/gateway/standing", headers=[("X-User-ID", "a"), ("X-User-ID", "b")])
    error(twice, 400, "invalid_user_id")


def test_routes_and_methods(gateway: str) -> None:
    user = as_user("fred")
    for path in ("/gateway", "/gateway/", "/gateway/standing/", "/gateway/appeals/1", "/gateway/v1/models"):
        error(httpx2.get(f"{gateway}{path}", headers=user), 404, "not_found")
    wrong = httpx2.post(f"{gateway}/gateway/standing", headers=user, json={})
    error(wrong, 405, "method_not_allowed")
    assert wrong.headers["allow"] == "GET"
    assert httpx2.get(f"{gateway}/gateway/appeals", headers=user).headers["allow"] == "POST"


def test_client_keys_guard_the_gateway_routes(settings_factory: SettingsFactory, upstream: MockUpstream) -> None:
    settings = settings_factory(upstream_url=upstream.url, moderation="rules", api_keys="key-plain")
    with run_app(create_app(settings)) as url:
        error(httpx2.get(f"{url}/gateway/standing", headers=as_user("gus")), 401, "invalid_api_key")
        wrong = as_user("gus", authorization="Bearer nope")
        error(httpx2.get(f"{url}/gateway/standing", headers=wrong), 401, "invalid_api_key")
        error(appeal(url, "gus", {"event_id": "1", "message": "hi"}), 401, "invalid_api_key")
        good = httpx2.get(f"{url}/gateway/standing", headers=as_user("gus", authorization="Bearer key-plain"))
        assert good.status_code == 200


def test_with_users_per_app_each_application_sees_its_own_user(
    settings_factory: SettingsFactory, upstream: MockUpstream
) -> None:
    settings = settings_factory(
        upstream_url=upstream.url, moderation="rules", api_keys="app-a:key-a,app-b:key-b", users_per_app=True
    )
    with run_app(create_app(settings)) as url:
        a = {"authorization": "Bearer key-a"}
        b = {"authorization": "Bearer key-b"}
        event_id = strike(url, "u-1", **a)
        seen_by_a = httpx2.get(f"{url}/gateway/standing", headers=as_user("u-1", **a)).json()
        seen_by_b = httpx2.get(f"{url}/gateway/standing", headers=as_user("u-1", **b)).json()
        assert (seen_by_a["user_id"], seen_by_a["strikes"]) == ("app-a:u-1", 1)
        assert (seen_by_b["user_id"], seen_by_b["strikes"]) == ("app-b:u-1", 0)
        error(
            appeal(url, "u-1", {"event_id": event_id, "message": "not yours"}, **b), 404, "event_not_found", "event_id"
        )
        assert appeal(url, "u-1", {"event_id": event_id, "message": "mine"}, **a).status_code == 201


def test_a_database_that_does_not_answer_is_503(settings_factory: SettingsFactory, upstream: MockUpstream) -> None:
    settings = settings_factory(upstream_url=upstream.url, database_url="postgresql://postgres@127.0.0.1:9/none")
    app = create_app(settings)
    with run_app(app, lifespan="off") as url:
        error(httpx2.get(f"{url}/gateway/standing", headers=as_user("hal")), 503, "store_unavailable")


@asynccontextmanager
async def started(app: ASGIApp) -> AsyncIterator[None]:
    """`app` through its lifespan's startup, on this event loop (so its database pool is usable here)."""
    events: asyncio.Queue[Message] = asyncio.Queue()
    answers: asyncio.Queue[Message] = asyncio.Queue()
    await events.put({"type": "lifespan.startup"})
    task = asyncio.ensure_future(app({"type": "lifespan", "asgi": {"version": "3.0"}}, events.get, answers.put))
    assert (await answers.get())["type"] == "lifespan.startup.complete"
    try:
        yield
    finally:
        await events.put({"type": "lifespan.shutdown"})
        await answers.get()
        await task


async def cut_short(app: ASGIApp, path: str, part: bytes, headers: dict[str, str]) -> tuple[list[Message], Any]:
    """POST `part` of a longer body to `path`, then hang up as a client does: what the app sent, and its log."""
    incoming: list[Message] = [{"type": "http.request", "body": part, "more_body": True}]
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    announced = {"content-length": str(len(part) * 4), "host": "gateway", **headers}
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(name.encode(), value.encode()) for name, value in announced.items()],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    with capture_logs() as logs:
        await app(scope, receive, send)
    return sent, logs


def status_of(sent: list[Message]) -> int | None:
    return next((message["status"] for message in sent if message["type"] == "http.response.start"), None)


async def test_an_appeal_whose_client_hangs_up_mid_body_ends_quietly(
    settings_factory: SettingsFactory, upstream: MockUpstream
) -> None:
    app = create_app(settings_factory(upstream_url=upstream.url, moderation="rules"))
    async with started(app):
        headers = {"x-user-id": "ivy", "content-type": "application/json"}
        sent, logs = await cut_short(app, "/gateway/appeals", b'{"event_id": "1", "mess', headers)
    assert status_of(sent) == 400
    assert [line for line in logs if line["log_level"] in ("error", "critical")] == []
    assert "unhandled_error" not in [line["event"] for line in logs]
