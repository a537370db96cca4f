"""The policy model: the file's every error, the environment's policy, the rules both share."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path
from typing import Any

import pytest

from gateway.policy import PERMANENT, CategoryRule, Policy, PolicyError, load_policy, parse_duration
from gateway.settings import SettingsError, settings_from
from tests.test_cli import _run

EXAMPLE = """
max_strikes = 3          # points at which the user is blocked
window = "90d"           # default lifetime of a strike
warnings = 1             # the first N violations inside `window` are warnings
ladder = ["1d", "7d", "30d", "permanent"]

[categories.harassment]
weight = 1
expires = "30d"

[categories."test-weapons"]
weight = 2

[categories."sexual/minors"]
action = "block"
duration = "permanent"
"""
DAY = 86400.0


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_the_example_file(tmp_path: Path) -> None:
    path = write(tmp_path, EXAMPLE)
    policy = load_policy(path)
    assert (policy.max_strikes, policy.window, policy.warnings) == (3, 90 * DAY, 1)
    assert policy.ladder == (DAY, 7 * DAY, 30 * DAY, PERMANENT)
    assert policy.categories == {
        "harassment": CategoryRule(weight=1, expires=30 * DAY),
        "test-weapons": CategoryRule(weight=2),
        "sexual/minors": CategoryRule(action="block", duration=PERMANENT),
    }
    assert policy.file == path
    assert [policy.block_duration(n) for n in (1, 2, 3, 4, 5)] == [DAY, 7 * DAY, 30 * DAY, None, None]


def test_defaults_of_an_empty_file_match_the_environments(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, ""))
    assert (policy.max_strikes, policy.window, policy.warnings, policy.ladder) == (3, 0, 0, (DAY,))
    assert policy.block_duration(7) == DAY
    assert policy.judge(["anything"]).points == 1


@pytest.mark.parametrize(
    ("text", "key", "why"),
    [
        ("max_strikes = 0", "max_strikes", "must be at least 1"),
        ('max_strikes = "3"', "max_strikes", "expected a whole number"),
        ("max_strikes = true", "max_strikes", "expected a whole number"),
        ("max_strikes = 2.5", "max_strikes", "expected a whole number"),
        ("warnings = -1", "warnings", "must not be negative"),
        ("warnings = 100000", "warnings", "must be at most 1000"),
        ('window = "90 days"', "window", 'expected seconds or "<n>s"'),
        ('window = "1w"', "window", 'expected seconds or "<n>s"'),
        ("window = -5", "window", "must not be negative"),
        ('window = "permanent"', "window", "a strike lifetime is a duration"),
        ("window = [1]", "window", 'expected seconds or a string like "7d"'),
        ('window = "40000d"', "window", "must be at most 100 years"),
        ('ladder = ["1d", "permanent", "7d"]', "ladder[2]", 'a step after "permanent" is never reached'),
        ("ladder = []", "ladder", "expected a non-empty list"),
        ('ladder = "1d"', "ladder", "expected a non-empty list"),
        ('ladder = ["1d", "0s"]', "ladder[1]", "a block lasts more than 0 seconds"),
        ('ladder = ["1d", "soon"]', "ladder[1]", 'expected seconds or "<n>s"'),
        ("ladder = [" + ", ".join(['"1d"'] * 101) + "]", "ladder", "at most 100 steps"),
        ("strikes = 3", "strikes", "unknown key; expected max_strikes, window, warnings, ladder, categories"),
        ('categories = "all"', "categories", "expected a table of categories"),
        ("categories.harassment = 2", "categories.harassment", "expected a table"),
        ("[categories.harassment]\nweight = -1", "categories.harassment.weight", "must not be negative"),
        ("[categories.harassment]\nweight = 1.5", "categories.harassment.weight", "expected a whole number"),
        ("[categories.harassment]\nwieght = 1", "categories.harassment.wieght", "unknown key; expected weight"),
        ('[categories.harassment]\nexpires = "30x"', "categories.harassment.expires", 'expected seconds or "<n>s"'),
        ('[categories.harassment]\naction = "ban"', "categories.harassment.action", 'expected "strike" or "block"'),
        (
            '[categories.harassment]\nduration = "7d"',
            "categories.harassment.duration",
            'only a category with action = "block" has a duration',
        ),
        (
            '[categories."sexual/minors"]\naction = "block"\nduration = 0',
            'categories."sexual/minors".duration',
            "a block lasts more than 0 seconds",
        ),
        ('[categories." "]\nweight = 1', 'categories." "', "a category name is 1 to 256 characters"),
    ],
)
def test_every_error_is_one_line_naming_the_file_the_key_and_why(tmp_path: Path, text: str, key: str, why: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {key}: {why}"), message


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(PolicyError, match=rf"^{missing}: cannot read it: No such file"):
        load_policy(missing)
    with pytest.raises(PolicyError, match=r"policy.toml: not valid TOML: .*line 1"):
        load_policy(write(tmp_path, "max_strikes = = 3"))
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(PolicyError, match=r"binary.toml: cannot read it"):
        load_policy(tmp_path / "binary.toml")


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(0, 0), ("0", 0), (90, 90), (1.5, 1.5), ("90s", 90), ("15m", 900), ("12h", 43200), (" 7D ", 7 * DAY)],
)
def test_durations(value: Any, seconds: float) -> None:
    assert parse_duration(value) == seconds
    assert parse_duration("permanent") == math.inf


def test_a_violation_takes_its_heaviest_category_and_ties_take_the_longest_lifetime() -> None:
    policy = Policy(
        window=90 * DAY,
        categories={
            "harassment": CategoryRule(weight=1, expires=30 * DAY),
            "hate": CategoryRule(weight=2, expires=DAY),
            "threat": CategoryRule(weight=2, expires=7 * DAY),
            "forever": CategoryRule(weight=2, expires=0),
            "minors": CategoryRule(action="block", duration=PERMANENT),
            "scam": CategoryRule(action="block"),
        },
    )
    assert (policy.judge(["harassment"]).points, policy.judge(["harassment"]).lifetime) == (1, 30 * DAY)
    assert (policy.judge(["harassment", "unlisted"]).points, policy.judge(["unlisted"]).lifetime) == (1, 90 * DAY)
    # unlisted (1 point, 90 days) ties harassment (1 point, 30 days): the longer lifetime wins
    assert policy.judge(["harassment", "unlisted"]).lifetime == 90 * DAY
    both = policy.judge(["hate", "threat", "harassment"])
    assert (both.points, both.lifetime, both.zero_tolerance) == (2, 7 * DAY, False)
    # 0 is "until a block or unblock": longer than any lifetime
    assert policy.judge(["threat", "forever"]).lifetime == 0
    zero = policy.judge(["harassment", "minors"])
    assert (zero.zero_tolerance, zero.points) == (True, 1)
    assert policy.block_for(zero, 1) is None
    # without a duration, zero tolerance takes the ladder's next step; with several, the longest
    assert policy.block_for(policy.judge(["scam"]), 1) == DAY
    assert policy.block_for(policy.judge(["scam", "minors"]), 1) is None
    assert policy.block_for(policy.judge(["hate"]), 1) == DAY


def test_the_environments_policy_is_the_same_model() -> None:
    settings = settings_from(
        max_strikes=5,
        block_seconds=60,
        strike_window_seconds=3600,
        block_escalation=3,
        max_block_seconds=1000,
        permanent_after_blocks=5,
        webhook_url="http://127.0.0.1:9/hook",
        webhook_secret="s",
        appeal_window_days=30,
        event_retention_days=90,
    )
    policy = Policy.from_settings(settings)
    assert (policy.max_strikes, policy.window, policy.warnings, policy.file) == (5, 3600, 0, None)
    assert [policy.block_duration(n) for n in range(1, 6)] == [60, 180, 540, 1000, None]
    assert (policy.webhooks, policy.appeal_window_days, policy.retention_days) == (True, 30, 90)
    assert policy.judge(["violence"]).lifetime == 3600
    assert policy.to_json()["source"] == "environment"


def test_the_file_with_a_strike_variable_stops_start_up_naming_both(tmp_path: Path) -> None:
    path = write(tmp_path, EXAMPLE)
    with pytest.raises(SettingsError) as caught:
        Policy.from_settings(settings_from(policy_file=path, max_strikes=5, block_escalation=2))
    assert str(caught.value).startswith(
        "GATEWAY_POLICY_FILE and GATEWAY_MAX_STRIKES, GATEWAY_BLOCK_ESCALATION are both set"
    )
    # Their defaults alone do not conflict: only variables that were set do.
    policy = Policy.from_settings(settings_from(policy_file=path, appeal_window_days=7, event_retention_days=8))
    assert (policy.max_strikes, policy.warnings, policy.appeal_window_days, policy.retention_days) == (3, 1, 7, 8)
    with pytest.raises(SettingsError, match=r"^GATEWAY_POLICY_FILE: .*policy.toml: max_strikes: must be at least 1"):
        Policy.from_settings(settings_from(policy_file=write(tmp_path, "max_strikes = 0")))


def test_the_policy_as_json(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, EXAMPLE))
    assert policy.to_json() == {
        "source": "file",
        "file": str(tmp_path / "policy.toml"),
        "max_strikes": 3,
        "window": 90 * DAY,
        "warnings": 1,
        "ladder": [DAY, 7 * DAY, 30 * DAY, "permanent"],
        "escalation": 1.0,
        "max_block": 100 * 365 * 86400,
        "permanent_after_blocks": 0,
        "categories": {
            "harassment": {"weight": 1, "expires": 30 * DAY, "action": "strike", "duration": None},
            "sexual/minors": {"weight": 1, "expires": 90 * DAY, "action": "block", "duration": "permanent"},
            "test-weapons": {"weight": 2, "expires": 90 * DAY, "action": "strike", "duration": None},
        },
        "appeal_window_days": 180.0,
    }


def test_plain_words(tmp_path: Path) -> None:
    words = load_policy(write(tmp_path, EXAMPLE)).describe()
    for phrase in (
        "blocked when the points of their strikes that count reach 3",
        "A strike counts for 90 days unless its category says otherwise",
        "A first violation inside 90 days is a warning",
        "The 1st block lasts 1 day, the 2nd 7 days, the 3rd 30 days, the 4th is for good and so is every later one",
        "Harassment violations weigh 1 point; their strikes count for 30 days",
        "Test-weapons violations weigh 2 points",
        "Sexual/minors: one violation blocks at once, for good, with no warning",
    ):
        assert phrase in words
    environment = Policy(ladder=(60.0,), escalation=2, max_block=3600, permanent_after_blocks=4).describe()
    assert "A strike counts until a block or an unblock resets the points" in environment
    assert "each later one 2 times the one before, at most 1 hour; the 4th block is for good" in environment
    assert "Every block lasts 1 day." in Policy().describe()


def run_cli(tmp_path: Path, *args: str, **variables: str) -> subprocess.CompletedProcess[str]:
    """`python -m gateway ARGS` with only these variables (arguments without spaces)."""
    return _run(tmp_path, ARGS=" ".join(args), **variables)


def test_policy_check_prints_plain_words_or_the_one_line(tmp_path: Path) -> None:
    good = run_cli(tmp_path, "policy", "check", str(write(tmp_path, EXAMPLE)))
    assert good.returncode == 0, good.stderr
    assert "A first violation inside 90 days is a warning" in good.stdout
    bad = run_cli(tmp_path, "policy", "check", str(write(tmp_path, "[categories.x]\nweight = -2")))
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"chat-gateway: {tmp_path / 'policy.toml'}: categories.x.weight: must not be negative, got -2"
    ]


def test_start_up_stops_on_a_bad_file_or_a_conflict(tmp_path: Path) -> None:
    path = write(tmp_path, 'warnings = 1\nwindow = "2 weeks"')
    bad = run_cli(tmp_path, GATEWAY_POLICY_FILE=str(path))
    assert bad.returncode == 2
    (line,) = bad.stderr.strip().splitlines()
    assert line.startswith(f"chat-gateway: GATEWAY_POLICY_FILE: {path}: window: expected seconds")
    both = run_cli(tmp_path, GATEWAY_POLICY_FILE=str(write(tmp_path, EXAMPLE)), GATEWAY_BLOCK_SECONDS="60")
    assert both.returncode == 2
    (line,) = both.stderr.strip().splitlines()
    assert line.startswith("chat-gateway: GATEWAY_POLICY_FILE and GATEWAY_BLOCK_SECONDS are both set")
