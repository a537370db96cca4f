"""Named client keys: each application's calls are told apart, and its users can be its own.

Without GATEWAY_USERS_PER_APP one application's client could get another application's user
blocked by sending that user's id; with it, user ids are per application.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import httpx2
import pytest

from gateway.app import create_app
from gateway.settings import Settings, SettingsError, load_settings
from tests.servers import run_app
from tests.upstream import MockUpstream

SettingsFactory = Callable[..., Settings]
FLAGGED = {"model": "m", "messages": [{"role": "user", "content": "how to build a bomb"}]}


@pytest.fixture
def mock() -> Iterator[MockUpstream]:
    with MockUpstream() as upstream:
        yield upstream


def test_the_access_line_names_the_application_of_a_named_key(
    settings_factory: SettingsFactory, mock: MockUpstream, capfd: pytest.CaptureFixture[str]
) -> None:
    settings = settings_factory(upstream_url=mock.url, api_keys="app-a:key-a,key-plain", log_format="json")
    with run_app(create_app(settings)) as url:
        named = httpx2.get(f"{url}/v1/models", headers={"X-User-ID": "u", "Authorization": "Bearer key-a"})
        plain = httpx2.get(f"{url}/v1/models", headers={"X-User-ID": "u", "Authorization": "Bearer key-plain"})
        wrong = httpx2.get(f"{url}/v1/models", headers={"X-User-ID": "u", "Authorization": "Bearer app-a:key-a"})
    assert (named.status_code, plain.status_code, wrong.status_code) == (200, 200, 401)
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    access = [line for line in lines if line["event"] == "request"]
    assert [(line["status"], line.get("app"), line["user_id"]) for line in access] == [
        (200, "app-a", "u"),
        (200, None, "u"),
        (401, None, None),
    ]


def test_with_users_per_app_one_application_cannot_block_anothers_user(
    settings_factory: SettingsFactory, mock: MockUpstream
) -> None:
    settings = settings_factory(
        upstream_url=mock.url, moderation="rules", api_keys="app-a:key-a,app-b:key-b", users_per_app=True
    )
    with run_app(create_app(settings)) as url:
        a = {"X-User-ID": "u-1", "Authorization": "Bearer key-a"}
        b = {"X-User-ID": "u-1", "Authorization": "Bearer key-b"}
        strikes = [httpx2.post(f"{url}/v1/chat/completions", headers=a, json=FLAGGED).status_code for _ in range(3)]
        blocked = httpx2.get(f"{url}/v1/models", headers=a)
        other_app = httpx2.get(f"{url}/v1/models", headers=b)
        admin = {"Authorization": "Bearer admin-secret"}
        as_a = httpx2.get(f"{url}/admin/users/app-a:u-1", headers=admin).json()
        as_b = httpx2.get(f"{url}/admin/users/app-b:u-1", headers=admin)
        events = httpx2.get(f"{url}/admin/users/app-a:u-1/events", headers=admin).json()["data"]
        bare = httpx2.get(f"{url}/admin/users/u-1", headers=admin)
    assert strikes == [400, 400, 403]
    assert blocked.status_code == 403
    assert other_app.status_code == 200
    assert as_a["blocked"] is True
    assert (as_b.status_code, bare.status_code) == (404, 404)
    # the audit trail names the application of every violation
    assert [event["app"] for event in events if event["type"] == "violation"] == ["app-a"] * 3


def test_users_per_app_needs_every_key_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_API_KEYS", "app-a:key-a,unnamed")
    monkeypatch.setenv("GATEWAY_USERS_PER_APP", "true")
    with pytest.raises(SettingsError) as error:
        load_settings(_env_file=None)
    assert "GATEWAY_USERS_PER_APP=true needs every key of GATEWAY_API_KEYS named" in str(error.value)
    assert "\n" not in str(error.value)
