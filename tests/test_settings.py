from pathlib import Path

import pytest

from gateway.settings import Settings, SettingsError, load_settings

pytestmark = pytest.mark.usefixtures("clean_environment")


def test_defaults_follow_the_contract() -> None:
    settings = load_settings()
    assert (settings.host, settings.port, settings.workers) == ("127.0.0.1", 8000, 1)
    assert settings.upstream_url == "https://api.openai.com/v1"
    assert settings.openai_api_key is None
    assert settings.api_keys == frozenset()
    assert settings.database_url is None
    assert settings.data_dir == Path(".gateway")
    assert settings.user_header == "X-User-ID"
    assert (settings.max_strikes, settings.block_seconds) == (3, 86400.0)
    assert settings.moderation == ("openai",)
    assert settings.rules_file.name == "rules.toml"
    assert settings.moderation_base_url == settings.upstream_url
    assert (settings.moderation_failure, settings.store_failure) == ("closed", "closed")
    assert (settings.connect_timeout, settings.read_timeout) == (3.0, 120.0)
    assert settings.max_body_bytes == 33554432
    assert settings.shutdown_grace == 30.0
    assert settings.allow_open_relay is False
    assert settings.strike_window_seconds == 0
    assert (settings.block_escalation, settings.max_block_seconds, settings.permanent_after_blocks) == (1, 2592000, 0)
    assert settings.enforcement == "enforce"
    assert settings.moderation_thresholds == {}
    assert settings.safety_identifier == "off"
    assert settings.webhook_url is None
    assert (settings.log_format, settings.log_level) == ("json", "info")


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_PORT", "9001")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-upstream")
    monkeypatch.setenv("DATABASE_URL", "postgresql://db/gw")
    monkeypatch.setenv("GATEWAY_API_KEYS", "key-a, key-b,")
    monkeypatch.setenv("GATEWAY_MODERATION", "rules,openai,rules")
    monkeypatch.setenv("GATEWAY_MODERATION_THRESHOLDS", "violence=0.4, *=0.8")
    monkeypatch.setenv("GATEWAY_BLOCK_SECONDS", "1.5")
    monkeypatch.setenv("GATEWAY_UPSTREAM_URL", "http://localhost:9000/v1/")
    monkeypatch.setenv("GATEWAY_ENFORCEMENT", "SHADOW")
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "10.0.0.0/8,proxy")  # uvicorn's own variable
    settings = load_settings()
    assert settings.port == 9001
    assert settings.openai_api_key is not None
    assert settings.openai_api_key.get_secret_value() == "sk-upstream"
    assert settings.database_url is not None
    assert settings.database_url.get_secret_value() == "postgresql://db/gw"
    assert {key.get_secret_value() for key in settings.api_keys} == {"key-a", "key-b"}
    assert settings.moderation == ("rules", "openai")
    assert settings.moderation_thresholds == {"violence": 0.4, "*": 0.8}
    assert settings.block_seconds == 1.5
    assert settings.upstream_url == "http://localhost:9000/v1"
    assert settings.enforcement == "shadow"
    assert settings.forwarded_allow_ips == "10.0.0.0/8,proxy"


def test_dotenv_file_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("GATEWAY_MAX_STRIKES=5\nGATEWAY_MODERATION=off\n")
    settings = load_settings()
    assert settings.max_strikes == 5
    assert settings.moderation == ()


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("GATEWAY_PORT", "eighty", "GATEWAY_PORT: Input should be a valid integer"),
        ("GATEWAY_MAX_STRIKES", "0", "GATEWAY_MAX_STRIKES: Input should be greater than or equal to 1"),
        ("GATEWAY_BLOCK_SECONDS", "-1", "GATEWAY_BLOCK_SECONDS: Input should be greater than 0"),
        (
            "GATEWAY_MODERATION",
            "openai,magic",
            "GATEWAY_MODERATION: expected a comma list of openai, rules, guard, azure, or off",
        ),
        ("GATEWAY_MODERATION_FAILURE", "maybe", "GATEWAY_MODERATION_FAILURE: Input should be 'closed' or 'open'"),
        ("GATEWAY_MODERATION_THRESHOLDS", "violence", "GATEWAY_MODERATION_THRESHOLDS: expected category=score"),
        ("GATEWAY_MODERATION_THRESHOLDS", "violence=1.5", "GATEWAY_MODERATION_THRESHOLDS: expected category=score"),
        ("GATEWAY_UPSTREAM_URL", "api.openai.com", "GATEWAY_UPSTREAM_URL: expected an http:// or https:// URL"),
        ("GATEWAY_USER_HEADER", "X User", "GATEWAY_USER_HEADER: expected an HTTP header name"),
        ("GATEWAY_BLOCK_ESCALATION", "0.5", "GATEWAY_BLOCK_ESCALATION: Input should be greater than or equal to 1"),
        ("GATEWAY_ENFORCEMENT", "strict", "GATEWAY_ENFORCEMENT: Input should be 'enforce' or 'shadow'"),
        ("GATEWAY_BODY_TIMEOUT", "0", "GATEWAY_BODY_TIMEOUT: Input should be greater than 0"),
        ("GATEWAY_BODY_TIMEOUT", "inf", "GATEWAY_BODY_TIMEOUT: Input should be a finite number"),
        ("GATEWAY_BODY_MIN_RATE", "-1", "GATEWAY_BODY_MIN_RATE: Input should be greater than or equal to 0"),
        ("GATEWAY_BODY_MIN_RATE", "fast", "GATEWAY_BODY_MIN_RATE: Input should be a valid number"),
        ("GATEWAY_ADMIN", "maybe", "GATEWAY_ADMIN: Input should be a valid boolean"),
        ("GATEWAY_UNJUDGEABLE", "drop", "GATEWAY_UNJUDGEABLE: Input should be 'forward' or 'refuse'"),
        (
            "GATEWAY_ALLOWED_ROUTES",
            "realtime/calls,chat/completions",
            "GATEWAY_ALLOWED_ROUTES: 'chat/completions' is neither a refused route nor a refused header",
        ),
        (
            "GATEWAY_EVENT_RETENTION_DAYS",
            "-1",
            "GATEWAY_EVENT_RETENTION_DAYS: Input should be greater than or equal to 0",
        ),
        ("GATEWAY_EVENT_RETENTION_DAYS", "a year", "GATEWAY_EVENT_RETENTION_DAYS: Input should be a valid number"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith(expected)
    assert "\n" not in message


def test_secrets_are_never_echoed_in_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_WEBHOOK_URL", "ftp://hooks.example/secret-path")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert "secret-path" not in str(caught.value).split(":", 1)[0]
    assert str(caught.value).startswith("GATEWAY_WEBHOOK_URL:")


def test_dependent_settings_are_required_together() -> None:
    with pytest.raises(SettingsError, match="GATEWAY_SAFETY_SALT is required"):
        load_settings(safety_identifier="hash")
    with pytest.raises(SettingsError, match="GATEWAY_WEBHOOK_SECRET is required"):
        load_settings(webhook_url="http://127.0.0.1:9/hook")
    assert load_settings(safety_identifier="hash", safety_salt="pepper").safety_salt is not None


def test_the_retention_keeps_events_at_least_as_long_as_they_may_be_appealed() -> None:
    settings = load_settings()
    assert (settings.event_retention_days, settings.appeal_window_days) == (365, 180)
    with pytest.raises(SettingsError) as caught:
        load_settings(event_retention_days=30)
    assert str(caught.value) == (
        "invalid settings: GATEWAY_EVENT_RETENTION_DAYS (30) is shorter than GATEWAY_APPEAL_WINDOW_DAYS (180): "
        "events would be deleted while their users may still appeal them; lengthen the retention or shorten the "
        "appeal window"
    )
    assert load_settings(event_retention_days=30, appeal_window_days=30).event_retention_days == 30
    assert load_settings(event_retention_days=30, appeal_window_days=0).appeal_window_days == 0
    assert load_settings(event_retention_days=0).event_retention_days == 0  # kept for good


@pytest.mark.parametrize(
    ("overrides", "refused"),
    [
        ({"openai_api_key": "sk-x", "host": "0.0.0.0"}, True),
        ({"openai_api_key": "sk-x", "host": "::"}, True),
        ({"openai_api_key": "sk-x", "host": "10.1.2.3"}, True),
        ({"openai_api_key": "sk-x", "host": "127.0.0.1"}, False),
        ({"openai_api_key": "sk-x", "host": "localhost"}, False),
        ({"openai_api_key": "sk-x", "host": "::1"}, False),
        ({"openai_api_key": "sk-x", "host": "0.0.0.0", "api_keys": "client"}, False),
        ({"openai_api_key": "sk-x", "host": "0.0.0.0", "allow_open_relay": True}, False),
        ({"host": "0.0.0.0"}, False),
    ],
)
def test_open_relay_guard(overrides: dict[str, object], refused: bool) -> None:
    problem = Settings(_env_file=None, **overrides).open_relay_problem()  # type: ignore[call-arg, arg-type]
    assert (problem is not None) == refused
    if problem:
        assert "GATEWAY_API_KEYS" in problem
        assert "sk-x" not in problem


def test_user_header_key_is_the_asgi_form() -> None:
    assert Settings(_env_file=None, user_header="X-End-User").user_header_key == b"x-end-user"  # type: ignore[call-arg]


def test_an_empty_value_means_unset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # `.env` files and compose often leave `OPENAI_API_KEY=`: it must not become "Bearer " upstream.
    monkeypatch.setenv("OPENAI_API_KEY", "")
    monkeypatch.setenv("GATEWAY_MAX_STRIKES", "")
    (tmp_path / ".env").write_text("GATEWAY_API_KEYS=\nGATEWAY_PORT=\nDATABASE_URL=\n")
    settings = load_settings()
    assert settings.openai_api_key is None
    assert settings.max_strikes == 3
    assert settings.api_keys == frozenset()
    assert settings.port == 8000
    assert settings.database_url is None


def test_judged_routes_and_the_keys_reach_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = load_settings()
    assert (defaults.unjudgeable, defaults.allowed_routes) == ("forward", ())
    monkeypatch.setenv("GATEWAY_UNJUDGEABLE", "Refuse")
    monkeypatch.setenv("GATEWAY_ALLOWED_ROUTES", " Realtime/Calls/, OpenAI-Project,")
    settings = load_settings()
    assert settings.unjudgeable == "refuse"
    assert settings.allowed_routes == ("realtime/calls", "openai-project")  # canonical, parsed once
    monkeypatch.setenv("GATEWAY_ALLOWED_ROUTES", "")
    assert load_settings().allowed_routes == ()
