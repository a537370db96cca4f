"""The load scripts' shared harness: the gateway environment they start it with."""

from __future__ import annotations

from pathlib import Path

import httpx2
import pytest

from loadtests import floor_proxy
from loadtests.harness import gateway_env
from tests.servers import run_app
from tests.upstream import MockUpstream


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


@pytest.mark.parametrize("hop", ["session", "lean"])
def test_floor_proxy_relays_answers_and_streams_either_way(hop: str) -> None:
    # The benchmark's floor, both ways of calling the upstream: a JSON answer whole, an SSE stream chunk by chunk.
    with MockUpstream() as mock, run_app(floor_proxy.build(mock.base_url, hop)) as url:
        answer = httpx2.post(f"{url}/v1/chat/completions", json={"model": "m", "messages": []}, timeout=10)
        streamed = httpx2.post(
            f"{url}/v1/chat/completions", json={"model": "m", "messages": [], "stream": True}, timeout=10
        )
    assert answer.status_code == 200
    assert answer.json()["choices"][0]["message"]["content"] == mock.reply
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert streamed.text.rstrip().endswith("data: [DONE]")
    assert [request.path for request in mock.requests] == ["/v1/chat/completions"] * 2
