"""The enforcement policy: one frozen model, from GATEWAY_POLICY_FILE (TOML) or the strike variables.

The store and `policy replay` take this model and nothing else, so the two apply the same rules:
a violation's points and strike lifetime come from its heaviest flagged category (ties: the
longest lifetime), a category with `action = "block"` blocks at once (zero tolerance), the first
`warnings` violations inside `window` are warnings, and the nth policy block lasts the ladder's
nth step (the last step repeats; the environment's escalation multiplies it past the end).
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gateway.settings import Settings, SettingsError, variable_name

PERMANENT = math.inf
# The longest finite duration, 100 years: longer is what a permanent block is for (and
# PostgreSQL intervals overflow far beyond it).
MAX_SECONDS = 100 * 365 * 86400
MAX_POINTS = 1_000_000
MAX_WARNINGS = 1000
MAX_LADDER = 100
# The strike and block variables a policy file replaces.
POLICY_FIELDS = (
    "max_strikes",
    "block_seconds",
    "strike_window_seconds",
    "block_escalation",
    "max_block_seconds",
    "permanent_after_blocks",
)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)")
_TOP_KEYS = ("max_strikes", "window", "warnings", "ladder", "categories")
_CATEGORY_KEYS = ("weight", "expires", "action", "duration")


class PolicyError(ValueError):
    """A bad policy file: `str()` is one line naming the file, the key and why."""

    def __init__(self, path: Path | str, key: str | None, why: str) -> None:
        where = f"{path}: {key}" if key else str(path)
        super().__init__(f"{where}: {why}")


@dataclass(frozen=True, slots=True)
class CategoryRule:
    """What the policy says about one category. `expires` None: the policy's `window`."""

    weight: int = 1
    expires: float | None = None  # seconds a strike counts; 0: until a block or unblock resets
    action: Literal["strike", "block"] = "strike"
    duration: float | None = None  # zero tolerance's block; None: the ladder's next step


@dataclass(frozen=True, slots=True)
class Judgement:
    """What the policy makes of one violation's categories."""

    points: int
    lifetime: float  # seconds its strike counts; 0: until a block or unblock resets
    zero_tolerance: bool
    # zero tolerance: the block lengths its categories ask for (None: the ladder's next step)
    durations: tuple[float | None, ...] = ()


@dataclass(frozen=True, slots=True)
class Policy:
    """The enforcement policy in force (durations in seconds; PERMANENT is `math.inf`).

    `webhooks`, `appeal_window_days` and `retention_days` are the store's other settings,
    carried here so that the store and the block cache take one object.
    """

    max_strikes: int = 3
    window: float = 0.0
    warnings: int = 0
    ladder: tuple[float, ...] = (86400.0,)
    # Past the ladder's end each block lasts `escalation` times the previous, at most `max_block`.
    escalation: float = 1.0
    max_block: float = MAX_SECONDS
    permanent_after_blocks: int = 0
    categories: Mapping[str, CategoryRule] = field(default_factory=dict)
    file: Path | None = None
    webhooks: bool = False
    appeal_window_days: float = 180.0
    retention_days: float = 365.0

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        """The policy of GATEWAY_POLICY_FILE, or of the strike variables; raises SettingsError."""
        webhooks = settings.webhook_url is not None
        appeal_window_days = settings.appeal_window_days
        retention_days = settings.event_retention_days
        if settings.policy_file is None:
            return cls(
                max_strikes=settings.max_strikes,
                window=settings.strike_window_seconds,
                ladder=(settings.block_seconds,),
                escalation=settings.block_escalation,
                max_block=min(settings.max_block_seconds, MAX_SECONDS),
                permanent_after_blocks=settings.permanent_after_blocks,
                webhooks=webhooks,
                appeal_window_days=appeal_window_days,
                retention_days=retention_days,
            )
        both = [variable_name(name) for name in POLICY_FIELDS if name in settings.model_fields_set]
        if both:
            raise SettingsError(
                f"GATEWAY_POLICY_FILE and {', '.join(both)} are both set: the policy file replaces the strike "
                f"and block variables; unset {', '.join(both)} or GATEWAY_POLICY_FILE"
            )
        try:
            policy = load_policy(settings.policy_file)
        except PolicyError as exc:
            raise SettingsError(f"GATEWAY_POLICY_FILE: {exc}") from None
        return dataclasses.replace(
            policy, webhooks=webhooks, appeal_window_days=appeal_window_days, retention_days=retention_days
        )

    def rule(self, category: str) -> CategoryRule:
        return self.categories.get(category) or _DEFAULT_RULE

    def lifetime(self, rule: CategoryRule) -> float:
        return self.window if rule.expires is None else rule.expires

    def judge(self, categories: Iterable[str]) -> Judgement:
        """Points and lifetime of the heaviest category (ties: the longest lifetime); zero tolerance if any says so."""
        best: tuple[int, float, float] | None = None
        durations: list[float | None] = []
        for category in categories:
            rule = self.rule(category)
            lifetime = self.lifetime(rule)
            key = (rule.weight, math.inf if lifetime == 0 else lifetime, lifetime)
            if best is None or key[:2] > best[:2]:
                best = key
            if rule.action == "block":
                durations.append(rule.duration)
        if best is None:  # a verdict always names a category; an empty one weighs like an unlisted one
            default = self.lifetime(_DEFAULT_RULE)
            best = (_DEFAULT_RULE.weight, 0.0, default)
        return Judgement(points=best[0], lifetime=best[2], zero_tolerance=bool(durations), durations=tuple(durations))

    def block_duration(self, number: int) -> float | None:
        """Seconds policy block `number` (1-based) lasts; None: permanent."""
        if self.permanent_after_blocks and number >= self.permanent_after_blocks:
            return None
        steps = self.ladder
        seconds = steps[min(number, len(steps)) - 1]
        if number > len(steps) and self.escalation != 1 and seconds != PERMANENT:
            try:
                seconds *= self.escalation ** (number - len(steps))
            except OverflowError:
                seconds = self.max_block
        return None if seconds == PERMANENT else min(seconds, self.max_block)

    def block_for(self, judgement: Judgement, number: int) -> float | None:
        """Seconds block `number` lasts when `judgement` caused it; None: permanent.

        A zero-tolerance violation gets the longest block its categories ask for.
        """
        ladder = self.block_duration(number)
        if not judgement.zero_tolerance:
            return ladder
        asked = [ladder if duration is None else _finite(duration) for duration in judgement.durations]
        return None if None in asked else max(d for d in asked if d is not None)

    def to_json(self) -> dict[str, Any]:
        """The policy as `GET /admin/policy` shows it: durations in seconds, or "permanent"."""
        return {
            "source": "environment" if self.file is None else "file",
            "file": None if self.file is None else str(self.file),
            "max_strikes": self.max_strikes,
            "window": self.window,
            "warnings": self.warnings,
            "ladder": [_json_duration(step) for step in self.ladder],
            "escalation": self.escalation,
            "max_block": self.max_block,
            "permanent_after_blocks": self.permanent_after_blocks,
            "categories": {
                name: {
                    "weight": rule.weight,
                    "expires": self.lifetime(rule),
                    "action": rule.action,
                    "duration": None if rule.duration is None else _json_duration(rule.duration),
                }
                for name, rule in sorted(self.categories.items())
            },
            "appeal_window_days": self.appeal_window_days,
        }

    def describe(self) -> str:
        """The policy in plain words, one paragraph."""
        words = [f"A user is blocked when the points of their strikes that count reach {self.max_strikes}."]
        if self.window:
            words.append(f"A strike counts for {say(self.window)} unless its category says otherwise.")
        else:
            words.append("A strike counts until a block or an unblock resets the points.")
        if self.warnings:
            inside = f" inside {say(self.window)}" if self.window else ""
            first = "A first violation" if self.warnings == 1 else f"The first {self.warnings} violations"
            verb = "is a warning" if self.warnings == 1 else "are warnings"
            words.append(f"{first}{inside} {verb}: refused, but no points.")
        words.append(self._describe_ladder())
        for name, rule in sorted(self.categories.items()):
            words.append(self._describe_category(name, rule))
        words.append("Every other category weighs 1 point.")
        return " ".join(words)

    def _describe_ladder(self) -> str:
        steps = self.ladder
        if self.permanent_after_blocks == 1 or steps[0] == PERMANENT:
            return "Every block is for good."
        if len(steps) == 1 and self.escalation == 1:
            sentence = f"Every block lasts {say(steps[0])}"
        else:
            parts = [f"The 1st block lasts {say(steps[0])}"]
            parts += [f"the {_ordinal(n)} {_say_step(step)}" for n, step in enumerate(steps[1:], start=2)]
            if self.escalation != 1:
                parts.append(f"each later one {self.escalation:g} times the one before, at most {say(self.max_block)}")
            elif steps[-1] == PERMANENT:
                parts[-1] += " and so is every later one"
            else:
                parts.append(f"every later one {say(steps[-1])}")
            sentence = ", ".join(parts)
        if self.permanent_after_blocks:
            sentence += f"; the {_ordinal(self.permanent_after_blocks)} block is for good"
        return sentence + "."

    def _describe_category(self, name: str, rule: CategoryRule) -> str:
        label = name[:1].upper() + name[1:]
        if rule.action == "block":
            length = "for the ladder's next step" if rule.duration is None else _say_block(rule.duration)
            return f"{label}: one violation blocks at once, {length}, with no warning."
        plural = "" if rule.weight == 1 else "s"
        lifetime = self.lifetime(rule)
        counts = f"count for {say(lifetime)}" if lifetime else "count until a block or an unblock"
        return f"{label} violations weigh {rule.weight} point{plural}; their strikes {counts}."


_DEFAULT_RULE = CategoryRule()


def load_policy(path: Path) -> Policy:
    """Parse a policy file; raises PolicyError (one line: the file, the key, why)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise PolicyError(path, None, f"cannot read it: {reason}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(path, None, f"not valid TOML: {exc}") from None
    return parse_policy(data, path)


def parse_policy(data: Mapping[str, Any], path: Path) -> Policy:
    """The policy a parsed TOML document describes; raises PolicyError."""
    _known(data, _TOP_KEYS, path, None)
    max_strikes = _integer(data.get("max_strikes", 3), path, "max_strikes", minimum=1, maximum=MAX_POINTS)
    window = _duration(data.get("window", 0), path, "window", lifetime=True)
    warnings = _integer(data.get("warnings", 0), path, "warnings", minimum=0, maximum=MAX_WARNINGS)
    raw_ladder = data.get("ladder", ["1d"])
    if not isinstance(raw_ladder, list) or not raw_ladder:
        raise PolicyError(path, "ladder", 'expected a non-empty list of durations, e.g. ["1d", "7d", "permanent"]')
    if len(raw_ladder) > MAX_LADDER:
        raise PolicyError(path, "ladder", f"at most {MAX_LADDER} steps (the last one repeats)")
    ladder: list[float] = []
    for index, raw in enumerate(raw_ladder):
        key = f"ladder[{index}]"
        if ladder and ladder[-1] == PERMANENT:
            raise PolicyError(path, key, 'a step after "permanent" is never reached; end the ladder there')
        ladder.append(_duration(raw, path, key, lifetime=False))
    raw_categories = data.get("categories", {})
    if not isinstance(raw_categories, dict):
        raise PolicyError(path, "categories", "expected a table of categories, e.g. [categories.harassment]")
    categories = {name: _category(name, raw, path) for name, raw in raw_categories.items()}
    return Policy(
        max_strikes=max_strikes,
        window=window,
        warnings=warnings,
        ladder=tuple(ladder),
        categories=categories,
        file=path,
    )


def _category(name: str, raw: Any, path: Path) -> CategoryRule:
    where = f"categories.{_key(name)}"
    if not name.strip() or len(name) > 256:
        raise PolicyError(path, where, "a category name is 1 to 256 characters")
    if not isinstance(raw, dict):
        raise PolicyError(path, where, "expected a table with weight, expires, action or duration")
    _known(raw, _CATEGORY_KEYS, path, where)
    weight = _integer(raw.get("weight", 1), path, f"{where}.weight", minimum=0, maximum=MAX_POINTS)
    expires = None if "expires" not in raw else _duration(raw["expires"], path, f"{where}.expires", lifetime=True)
    action = raw.get("action", "strike")
    if action not in ("strike", "block"):
        raise PolicyError(path, f"{where}.action", f'expected "strike" or "block", got {action!r}')
    duration = None
    if "duration" in raw:
        if action != "block":
            raise PolicyError(path, f"{where}.duration", 'only a category with action = "block" has a duration')
        duration = _duration(raw["duration"], path, f"{where}.duration", lifetime=False)
    return CategoryRule(weight=weight, expires=expires, action=action, duration=duration)


def _known(table: Mapping[str, Any], keys: tuple[str, ...], path: Path, where: str | None) -> None:
    for key in table:
        if key not in keys:
            full = f"{where}.{_key(key)}" if where else _key(key)
            raise PolicyError(path, full, f"unknown key; expected {', '.join(keys)}")


def _integer(value: Any, path: Path, key: str, *, minimum: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PolicyError(path, key, f"expected a whole number, got {value!r}")
    if value < minimum:
        why = "must not be negative" if minimum == 0 else f"must be at least {minimum}"
        raise PolicyError(path, key, f"{why}, got {value}")
    if value > maximum:
        raise PolicyError(path, key, f"must be at most {maximum}, got {value}")
    return value


def parse_duration(value: Any) -> float:
    """Seconds from a number or "90s", "15m", "12h", "7d", "permanent" (math.inf); ValueError otherwise."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "permanent":
            return PERMANENT
        match = _DURATION.fullmatch(text)
        if match is None:
            raise ValueError(f'expected seconds or "<n>s", "<n>m", "<n>h", "<n>d" or "permanent", got {value!r}')
        seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise ValueError(f'expected seconds or a string like "7d", got {value!r}')
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"must not be negative, got {value!r}")
    if seconds > MAX_SECONDS:
        raise ValueError(f"must be at most 100 years ({MAX_SECONDS:.0f} seconds), got {value!r}")
    return seconds


def _duration(value: Any, path: Path, key: str, *, lifetime: bool) -> float:
    """A strike lifetime (0: until reset; never "permanent") or a block length (> 0, or "permanent")."""
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise PolicyError(path, key, str(exc)) from None
    if lifetime and seconds == PERMANENT:
        raise PolicyError(path, key, 'a strike lifetime is a duration; "0" keeps strikes until a block or unblock')
    if not lifetime and seconds == 0:
        raise PolicyError(path, key, 'a block lasts more than 0 seconds; say "permanent" for no end')
    return seconds


def _finite(seconds: float) -> float | None:
    return None if seconds == PERMANENT else seconds


def _key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else f'"{name}"'


def _json_duration(seconds: float) -> float | str:
    return "permanent" if seconds == PERMANENT else seconds


def say(seconds: float) -> str:
    """A duration in words: "1 day", "12 hours", "90 seconds"."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = int(seconds // size)
            return f"{count} {unit}{'' if count == 1 else 's'}"
    return f"{seconds:g} second{'' if seconds == 1 else 's'}"


def _say_block(seconds: float) -> str:
    return "for good" if seconds == PERMANENT else f"for {say(seconds)}"


def _say_step(seconds: float) -> str:
    return "is for good" if seconds == PERMANENT else say(seconds)


def _ordinal(number: int) -> str:
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"
