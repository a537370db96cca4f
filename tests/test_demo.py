"""`python -m gateway demo`, run the way a newcomer runs it: a subprocess, its output read as a story."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    # Settings that would break the story if the demo read them: it must build its own.
    env.update(
        GATEWAY_MAX_STRIKES="1",
        GATEWAY_API_KEYS="sk-client-key-the-demo-does-not-send",
        GATEWAY_MODERATION="off",
        DATABASE_URL="postgresql://nobody@127.0.0.1:1/nothing",
    )
    return env


def test_demo_tells_the_whole_story() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "demo"],
        cwd=ROOT,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, f"stdout:\n{out}\nstderr:\n{result.stderr}"

    # The steps, in order, each told with what the gateway answered.
    steps = [int(number) for number in re.findall(r"^(\d+)\. ", out, flags=re.MULTILINE)]
    assert steps == list(range(1, 11))
    clean, streamed, strike1, strike2, blocked, refused, status, events, unblocked, again = re.split(
        r"^\d+\. ", out, flags=re.MULTILINE
    )[1:]
    assert 'The upstream replied: Hello from the fake upstream! You said: "What is the capital of France?"' in clean
    assert len(re.findall(r"chunk +\d+: '", streamed)) >= 5
    assert "BadRequestError (HTTP 400), code 'content_policy_violation'" in strike1
    assert "Strikes: 1/3" in strike1
    assert "Strikes: 2/3" in strike2
    assert "PermissionDeniedError (HTTP 403), code 'user_blocked'" in blocked
    assert "Strikes: 3/3" in blocked
    assert re.search(r"Retry-After: \d+ seconds", blocked)
    assert "code 'user_blocked'" in refused
    assert "received 2 chat calls: this one never reached it" in refused
    assert "blocked: true, strikes: 3/3" in status
    assert len(re.findall(r"violation +categories", events)) == 3
    assert "block      by policy" in events
    assert "blocked is now false, strikes are back to 0" in unblocked
    assert 'You said: "Thanks! What is the capital of Italy?"' in again
    assert "Done: every step went as told." in out
    # The gateway's own log lines stay out of the story.
    assert '"event"' not in out
    assert "gateway_started" not in out + result.stderr


def test_demo_without_the_sdk_says_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # As in a production image, where `openai` (a dev dependency) is not installed.
    monkeypatch.setitem(sys.modules, "openai", None)

    assert main(["demo"]) == 1

    captured = capsys.readouterr()
    assert captured.err.strip() == (
        "chat-gateway demo: needs the official OpenAI SDK, which is not installed here: "
        "run `./dev demo` from a checkout, or `pip install openai`"
    )
    assert captured.out == ""
