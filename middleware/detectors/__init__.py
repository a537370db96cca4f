"""Moderation detectors: operator-written regex rules, OpenAI's moderation endpoint, a guard
model, Azure AI Content Safety, and the personal data finder behind GATEWAY_PII.

`rules` holds the rules detector and its file format, `screen` the cheap pre-filters it runs
first, `openai` the moderation endpoint's detector, `cache` the verdict cache in front of the
remote ones, `guard` and `azure` the other remote detectors (`remote`: their calls), `pii`
the personal data and secrets finder.
"""

from middleware.detectors.azure import AzureDetector
from middleware.detectors.cache import VerdictCache, sha256_hex
from middleware.detectors.guard import GuardDetector
from middleware.detectors.openai import MAX_IMAGES, MODERATION_MODEL, OpenAIDetector
from middleware.detectors.rules import DEFAULT_RULES_FILE, Rule, RulesDetector, load_rules, normal_form
from middleware.detectors.screen import LiteralScreen, any_rule_pattern, ascii_prefilter, literal_screen

__all__ = [
    "DEFAULT_RULES_FILE",
    "MAX_IMAGES",
    "MODERATION_MODEL",
    "AzureDetector",
    "GuardDetector",
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
