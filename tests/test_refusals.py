"""The statement of reasons, as the OpenAI SDK sees it: a real gateway with a policy file, a mock
upstream, PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest

from gateway.app import create_app
from gateway.database import Database
from gateway.settings import Settings, settings_from
from gateway.store import Policy, Store
from middleware.detectors import RulesDetector
from tests.servers import run_app
from tests.test_moderation import Inner, call, chat, middleware
from tests.test_policy import EXAMPLE
from tests.upstream import MockUpstream

ADMIN = {"Authorization": "Bearer admin-secret"}
RULES = """
[[rules]]
category = "harassment"
pattern = '\\byou jerk\\b'

[[rules]]
category = "test-weapons"
pattern = '\\bzap gun\\b'

[[rules]]
category = "sexual/minors"
pattern = '\\bforbidden-minor-content\\b'
"""


@pytest.fixture
def upstream() -> Iterator[MockUpstream]:
    with MockUpstream() as mock:
        yield mock


@pytest.fixture
def make_settings(tmp_path: Path, database_url: str, data_dir: Path, upstream: MockUpstream) -> Any:
    """Settings with the example policy file (and none of the strike variables) and three rules."""
    (tmp_path / "policy.toml").write_text(EXAMPLE)
    (tmp_path / "rules.toml").write_text(RULES)

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": database_url,
            "data_dir": data_dir,
            "upstream_url": upstream.url,
            "moderation": "rules",
            "rules_file": tmp_path / "rules.toml",
            "policy_file": tmp_path / "policy.toml",
            "admin_token": "admin-secret",
            "db_pool_size": 5,
            "log_format": "console",
        }
        return settings_from(**{**values, **overrides})

    return make


@contextmanager
def sdk(settings: Settings, user: str = "alice") -> Iterator[tuple[openai.OpenAI, str]]:
    with run_app(create_app(settings)) as url:
        client = openai.OpenAI(
            base_url=f"{url}/v1", api_key="sk-client", default_headers={"X-User-ID": user}, max_retries=0
        )
        yield client, url


def chat_call(client: openai.OpenAI, text: str, user: str | None = None) -> Any:
    headers = {"X-User-ID": user} if user else None
    return client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": text}], extra_headers=headers
    )


def refused(error_class: type[openai.APIStatusError], client: openai.OpenAI, text: str, user: str | None = None) -> Any:
    with pytest.raises(error_class) as caught:
        chat_call(client, text, user)
    assert caught.value.response.headers["x-should-retry"] == "false"
    return caught.value


def seconds_until(moment: str) -> float:
    return (datetime.fromisoformat(moment) - datetime.now(UTC)).total_seconds()


def test_every_refusal_states_its_reasons(make_settings: Any, upstream: MockUpstream) -> None:
    with sdk(make_settings()) as (client, url):
        warning = refused(openai.BadRequestError, client, "you jerk")
        assert warning.code == "content_policy_violation"
        body = warning.body
        assert isinstance(body["event_id"], str)
        assert (body["categories"], body["warning"], body["strikes"], body["max_strikes"]) == (
            ["harassment"],
            True,
            0,
            3,
        )
        assert body["appealable"] is True
        assert "warning" in warning.message

        strike = refused(openai.BadRequestError, client, "where to buy a zap gun").body
        assert (strike["categories"], strike["warning"], strike["strikes"], strike["appealable"]) == (
            ["test-weapons"],
            False,
            2,
            True,
        )
        assert int(strike["event_id"]) > int(body["event_id"])

        blocked = refused(openai.PermissionDeniedError, client, "you jerk")
        assert blocked.code == "user_blocked"
        reasons = blocked.body
        assert (reasons["categories"], reasons["strikes"], reasons["max_strikes"]) == (
            ["harassment", "test-weapons"],
            3,
            3,
        )
        assert (reasons["permanent"], reasons["appealable"]) == (False, True)
        assert 86300 < seconds_until(reasons["blocked_until"]) <= 86400
        assert 86300 < int(blocked.response.headers["retry-after"]) <= 86400

        # The blocked user's ordinary call states the same block.
        again = refused(openai.PermissionDeniedError, client, "hello").body
        for field in ("event_id", "categories", "strikes", "max_strikes", "blocked_until", "permanent", "appealable"):
            assert again[field] == reasons[field], field
        # The event_id is the block's, in the admin timeline.
        events = httpx2.get(f"{url}/admin/users/alice/events", headers=ADMIN).json()["data"]
        assert (str(events[0]["id"]), events[0]["type"]) == (reasons["event_id"], "block")
        assert [event["type"] for event in events[1:]] == ["violation", "violation", "warning"]

        minors = refused(openai.PermissionDeniedError, client, "forbidden-minor-content", user="bob")
        zero = minors.body
        assert (zero["categories"], zero["permanent"], zero["blocked_until"], zero["strikes"]) == (
            ["sexual/minors"],
            True,
            None,
            1,
        )
        assert "retry-after" not in minors.response.headers
    assert [request.path for request in upstream.requests] == []


def test_appealable_is_false_without_an_appeal_window(make_settings: Any) -> None:
    with sdk(make_settings(appeal_window_days=0)) as (client, _):
        assert refused(openai.BadRequestError, client, "you jerk").body["appealable"] is False
        assert refused(openai.PermissionDeniedError, client, "forbidden-minor-content").body["appealable"] is False


def test_shadow_mode_with_a_policy_spends_no_warning(make_settings: Any, upstream: MockUpstream) -> None:
    with sdk(make_settings(enforcement="shadow")) as (client, _):
        for text in ("you jerk", "forbidden-minor-content"):
            raw = client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": text}]
            )
            assert raw.headers["x-gateway-shadow-violation"]
    assert len(upstream.requests) == 2
    with sdk(make_settings()) as (client, _):
        assert refused(openai.BadRequestError, client, "you jerk").body["warning"] is True


def test_the_environments_policy_states_reasons_too(database_url: str, data_dir: Path, tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES)
    settings = settings_from(
        database_url=database_url,
        data_dir=data_dir,
        upstream_url="http://127.0.0.1:9/v1",
        moderation="rules",
        rules_file=rules,
        max_strikes=2,
        log_format="console",
    )
    with sdk(settings) as (client, _):
        strike = refused(openai.BadRequestError, client, "you jerk")
        first = strike.body
        assert (first["warning"], first["strikes"], first["max_strikes"]) == (False, 1, 2)
        assert "Strike 1 of 2: 1 more violation will block this user." in strike.message
        second = refused(openai.PermissionDeniedError, client, "you jerk").body
        assert (second["strikes"], second["categories"]) == (2, ["harassment"])


async def test_a_strike_the_store_cannot_record_says_so(make_settings: Any, tmp_path: Path) -> None:
    settings = make_settings()
    store = Store(Database(settings), Policy.from_settings(settings))  # never opened: unavailable
    detector = RulesDetector(tmp_path / "rules.toml")
    answer = await call(middleware(Inner(), store, [detector], store_failure="open"), body=chat("you jerk"))
    assert answer.status == 400
    assert (answer.error["event_id"], answer.error["strikes"], answer.error["appealable"]) == (None, None, False)
    assert answer.error["categories"] == ["harassment"]
