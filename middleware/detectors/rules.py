"""The `rules` detector: operator-written regular expressions from a TOML file."""

from __future__ import annotations

import re
import tomllib
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from middleware.detectors.cache import sha256_hex
from middleware.detectors.screen import any_rule_pattern, ascii_prefilter, literal_screen
from middleware.protocols import UserInput, Verdict

# beside the middleware package, not this one: the README and operators' copies point there
DEFAULT_RULES_FILE = Path(__file__).parent.parent / "rules.toml"

# Unicode category Cf (format characters: zero-width spaces and joiners, the soft hyphen, bidi
# controls, tags) as of Unicode 15.1; a test holds it against the running Python's database.
_FORMAT_CHARACTERS = re.compile(
    "[\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890-\u0891\u08e2\u180e\u200b-\u200f\u202a-\u202e"
    "\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd\U00013430-\U0001343f"
    "\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f]"
)

# Compatibility characters of everyday text (CJK punctuation, no-break spaces) with their NFKC
# forms: replaced first, they let most such texts skip NFKC's slow path, which costs several
# times more per character; what is left unnormalised still goes through NFKC.
_COMMON_COMPATIBILITY = tuple(
    (char, unicodedata.normalize("NFKC", char))
    for char in "\u00a0\u202f\u3000\uff01\uff08\uff09\uff0c\uff1a\uff1b\uff1f\uff5e"
)

# A scoped flag group that turns case-insensitivity off, `(?-i:...)`: such a rule is case-sensitive in part.
_CASE_SENSITIVE_PART = re.compile(r"\(\?[a-zA-Z]*-[a-zA-Z]*i")

# categories end up in metrics labels and a response header: keep them plain
_CATEGORY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_ ./:-]*")
_RULE_KEYS = frozenset({"category", "pattern", "name"})


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    category: str
    pattern: re.Pattern[str]


def load_rules(path: Path) -> tuple[Rule, ...]:
    """Read and compile a rules file; any problem is a ValueError naming the file and the rule."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the rules file ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: the rules file is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: the rules file is not valid TOML ({exc})") from None
    tables = data.get("rules")
    if not isinstance(tables, list) or not tables:
        raise ValueError(f"{path}: expected one or more [[rules]] tables")
    return tuple(_rule(path, index, table) for index, table in enumerate(tables, 1))


def _rule(path: Path, index: int, table: Any) -> Rule:
    where = f"{path}: rule {index}"
    if not isinstance(table, dict):
        raise ValueError(f"{where}: expected a [[rules]] table")
    unknown = sorted(set(table) - _RULE_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} (expected category, pattern and optional name)")
    category = table.get("category")
    if not isinstance(category, str) or not _CATEGORY.fullmatch(category):
        raise ValueError(
            f"{where}: `category` must be a string of letters, digits, spaces and _ . / : - (got {category!r})"
        )
    source = table.get("pattern")
    if not isinstance(source, str) or not source:
        raise ValueError(f"{where}: `pattern` must be a non-empty string (got {source!r})")
    try:
        pattern = re.compile(source, re.IGNORECASE)
    except re.error as exc:
        raise ValueError(f"{where}: `pattern` is not a valid Python regular expression ({exc})") from None
    if pattern.search(""):
        raise ValueError(f"{where}: `pattern` matches empty text, so it would flag every request")
    name = table.get("name", source)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: `name` must be a non-empty string (got {name!r})")
    return Rule(name=name, category=category, pattern=pattern)


def normal_form(text: str) -> str:
    """The text as the rules see it when it is not ASCII: without format characters, NFKC-normalised
    and case-folded, so full-width or mathematical letters, ligatures, no-break spaces and
    zero-width characters inside a word disguise nothing. An ASCII text needs none of it."""
    return _compatible(text).casefold()


def _compatible(text: str) -> str:
    """`text` without format characters, NFKC-normalised (not yet case-folded)."""
    text = _FORMAT_CHARACTERS.sub("", text)
    if not unicodedata.is_normalized("NFKC", text):
        for char, plain in _COMMON_COMPATIBILITY:  # each a compatibility-equivalent step: NFKC's result is unchanged
            if char in text:
                text = text.replace(char, plain)
        if not unicodedata.is_normalized("NFKC", text):
            text = unicodedata.normalize("NFKC", text)
    return text


class RulesDetector:
    """Flags a text when a rule's pattern matches it; the first matching rule decides.

    A text that is not ASCII is judged in its `normal_form`, then as sent: a disguise hides nothing,
    and no rule loses a match it had. Images are not judged. The verdict's `rule` is the rule's
    name (its pattern by default); its `text_sha256` is the text's as sent.
    """

    name = "rules"
    cost = 0

    def __init__(self, rules_file: Path) -> None:
        self.rules = load_rules(rules_file)
        self._any = any_rule_pattern(self.rules)
        ascii_twin = ascii_prefilter(self.rules, self._any)
        self._screen = literal_screen(self.rules) if ascii_twin is not None else None
        self._any_ascii = ascii_twin if ascii_twin is not None else self._any  # the pre-filter for ASCII texts
        # ASCII rules that match case-insensitively throughout lose no match to case folding alone
        self._fold_safe = ascii_twin is not None and not any(
            _CASE_SENSITIVE_PART.search(rule.pattern.pattern) for rule in self.rules
        )

    async def check(self, user_input: UserInput, authorization: str | None) -> Verdict | None:
        return self.check_now(user_input)

    def check_now(self, user_input: UserInput) -> Verdict | None:
        """The verdict, without a coroutine (a `LocalDetector`: the rules need no I/O)."""
        screen = self._screen
        for text in user_input.texts:
            if text.isascii():
                # The common case is a clean text: an ASCII one is cleared by the literal screen
                # when it holds none of the words some rule needs; else one scan of the
                # pre-filter; the rules in order only when it matched.
                if (screen is not None and not screen.may_match(text)) or (
                    (prefilter := self._any_ascii) is not None and not prefilter.search(text)
                ):
                    continue
                found = self._first_rule(text, None)
            else:
                found = self._first_rule_seen_through(text)
            if found is not None:
                return Verdict(
                    detector=self.name, categories=(found.category,), text_sha256=sha256_hex(text), rule=found.name
                )
        return None

    def _first_rule(self, text: str, prefilter: re.Pattern[str] | None) -> Rule | None:
        if prefilter is not None and not prefilter.search(text):
            return None
        for rule in self.rules:
            if rule.pattern.search(text):
                return rule
        return None

    def _first_rule_seen_through(self, text: str) -> Rule | None:
        """The first rule matching a non-ASCII text's normal form, else the text as sent (a rule
        may look for the very characters the normal form drops, such as invisible tags)."""
        compatible = _compatible(text)
        seen = compatible.casefold()
        if not seen.isascii():
            found = self._first_rule(seen, self._any)
        elif self._screen is not None and not self._screen.may_match(seen):
            found = None
        else:
            found = self._first_rule(seen, self._any_ascii)
        if found is None and (compatible != text or (not self._fold_safe and seen != text)):
            found = self._first_rule(text, self._any)
        return found
