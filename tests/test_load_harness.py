"""The load scripts' shared harness: the gateway environment they start it with."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtests.harness import gateway_env


def test_gateway_env_settings_override_the_defaults(tmp_path: Path) -> None:
    # Settings passed here once collided with the defaults ("got multiple values for keyword argument").
    env = gateway_env(8001, "http://u/v1", "token", tmp_path, None, GATEWAY_HOST="0.0.0.0", GATEWAY_LOG_LEVEL="warning")
    assert env["GATEWAY_HOST"] == "0.0.0.0"
    assert env["GATEWAY_LOG_LEVEL"] == "warning"
    assert env["GATEWAY_PORT"] == "8001"
    assert env["GATEWAY_DATA_DIR"] == str(tmp_path)
    assert "DATABASE_URL" not in env


def test_gateway_env_passes_the_database_and_nothing_of_the_callers_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_ENFORCEMENT", "shadow")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-real")
    env = gateway_env(8001, "http://u/v1", "token", tmp_path, "postgresql://db/x")
    assert env["DATABASE_URL"] == "postgresql://db/x"
    assert "GATEWAY_ENFORCEMENT" not in env
    assert "OPENAI_API_KEY" not in env
