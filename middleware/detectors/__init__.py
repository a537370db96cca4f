"""Moderation detectors: operator-written regex rules, and OpenAI's moderation endpoint.

`rules` holds the rules detector and its file format, `screen` the cheap pre-filters it runs
first, `openai` the moderation endpoint's detector, `cache` the verdict cache in front of it.
"""

from middleware.detectors.cache import VerdictCache, sha256_hex
from middleware.detectors.openai import MAX_IMAGES, MODERATION_MODEL, OpenAIDetector
from middleware.detectors.rules import DEFAULT_RULES_FILE, Rule, RulesDetector, load_rules, normal_form
from middleware.detectors.screen import LiteralScreen, any_rule_pattern, ascii_prefilter, literal_screen

__all__ = [
    "DEFAULT_RULES_FILE",
    "MAX_IMAGES",
    "MODERATION_MODEL",
    "LiteralScreen",
    "OpenAIDetector",
    "Rule",
    "RulesDetector",
    "VerdictCache",
    "any_rule_pattern",
    "ascii_prefilter",
    "literal_screen",
    "load_rules",
    "normal_form",
    "sha256_hex",
]
