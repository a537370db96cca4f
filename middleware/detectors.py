"""Moderation detectors (placeholder until the detectors land)."""

from pathlib import Path

DEFAULT_RULES_FILE = Path(__file__).with_name("rules.toml")
