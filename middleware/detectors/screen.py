"""Cheap ways to clear a clean text before the rules run: one combined pre-filter pattern, its
ASCII-mode twin, and a literal screen of substring tests.

They are built from the rules' parsed patterns, read with the standard library's private regex
parser (`re._parser`). That use stays in this module: when the parser is missing or answers
unexpectedly, each builder returns None and the rules run one by one, as they would anyway.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from middleware.detectors.rules import Rule


def any_rule_pattern(rules: Sequence[Rule]) -> re.Pattern[str] | None:
    """One pattern that matches a text exactly when some rule's pattern does, or None.

    Python's `re` tries an alternation's branches one by one at every position, so the
    alternation alone saves little over a search per rule. A lookahead for the characters a
    match can start with lets it skip every other position quickly (docs/PERFORMANCE.md has the
    figures). It only pre-filters: which rule matched, and
    the first one, is still decided rule by rule. None when a pattern cannot be combined
    (backreferences, named groups, global inline flags) or the combination fails to compile.
    """
    parts: list[str] = []
    starts: set[str] | None = set()
    for rule in rules:
        tree = _parse(rule.pattern)
        if tree is None or rule.pattern.groupindex or _has_group_reference(tree):
            return None
        first = _first_chars(tree)
        starts = None if first is None or starts is None else starts | first
        parts.append(f"(?:{rule.pattern.pattern})")
    prefix = "" if not starts else "(?=[" + "".join(re.escape(char) for char in sorted(starts)) + "])"
    try:
        return re.compile(prefix + "(?:" + "|".join(parts) + ")", re.IGNORECASE)
    except re.error:
        return None


def ascii_prefilter(rules: Sequence[Rule], combined: re.Pattern[str] | None) -> re.Pattern[str] | None:
    """`combined` in ASCII mode, for ASCII texts only: it scans about twice as fast.

    On an ASCII text, an ASCII pattern matches the same in both modes: `\\w`, `\\d` and `\\b` agree
    on ASCII characters, and case-insensitive matching differs only for non-ASCII characters
    (the Kelvin sign, the long s). `\\s` does not agree: in Unicode mode it also matches
    \\x1c-\\x1f. So None when a rule is not ASCII or uses `\\s` or `\\S`, and the Unicode
    pre-filter serves every text. "ASCII" is judged on the parsed pattern, not its text: an
    escape such as `\\u212a` (the Kelvin sign, which matches "k") is ASCII text.
    """
    if combined is None:
        return None
    for rule in rules:
        tree = _parse(rule.pattern)
        if tree is None or not _ascii_only(tree) or _uses_space_class(tree):
            return None
    try:
        return re.compile(combined.pattern, re.IGNORECASE | re.ASCII)
    except re.error:  # pragma: no cover (a scoped (?u:...) in a rule)
        return None


@dataclass(frozen=True, slots=True)
class LiteralScreen:
    """Clears an ASCII text that no rule can match, with substring tests instead of a regex scan.

    Every match of most rules must contain one of a few literal strings: one of `myself` or
    `yourself` for `(how|ways?) to (kill|hurt) (myself|yourself)`. `literals` holds, lower-cased,
    such strings for the rules that have them; `rest` is the pre-filter of the rules that have
    none (None if every rule has some). A text none of whose lower-cased substrings is a literal,
    and that `rest` does not match, matches no rule. Python's regex engine tries the rules'
    alternation at almost every position of a text; lower() and a substring test per literal
    cost a fraction of that. Only for ASCII texts and ASCII rules (see `ascii_prefilter`), where lower-casing
    is exact: `str.lower` and case-insensitive matching agree on every ASCII character.
    """

    literals: tuple[str, ...]
    rest: re.Pattern[str] | None

    def may_match(self, text: str) -> bool:
        """False when no rule can match `text` (an ASCII text); True: ask the rules."""
        lowered = text.lower()
        for literal in self.literals:  # a plain loop: cheaper than any(map(lowered.__contains__, ...))
            if literal in lowered:
                return True
        return self.rest is not None and self.rest.search(text) is not None


_MAX_LITERALS = 64  # per rule; more alternatives than this are not worth testing one by one
_MAX_CLASS_EXPANSION = 4  # a class of at most this many characters extends a literal ([- ] in full[- ]auto)


def literal_screen(rules: Sequence[Rule]) -> LiteralScreen | None:
    """A `LiteralScreen` for ASCII rules; None if a rule is not ASCII, the rest cannot be
    combined, or no rule has a literal or one's best is a single letter or sign (a screen that
    passes nearly every text only costs time)."""
    literals: dict[str, None] = {}
    rest: list[Rule] = []
    for rule in rules:
        tree = _parse(rule.pattern)
        if tree is None or not _ascii_only(tree):
            return None
        needed = _needed_literals(list(tree))
        if needed is None:
            rest.append(rule)
        else:
            literals.update(dict.fromkeys(sorted(needed)))
    rest_pattern = None
    if rest:
        combined = any_rule_pattern(rest)
        rest_pattern = ascii_prefilter(rest, combined)
        if rest_pattern is None:
            return None
    kept = _shortest(set(literals))
    if not kept or any(len(text) == 1 and not text.isdigit() for text in kept):
        # no literal at all (the pre-filter alone does the same), or a single letter or sign
        # (`a.b`): nearly every text would pass the screen, for nothing
        return None
    return LiteralScreen(literals=tuple(text for text in literals if text in kept), rest=rest_pattern)


def _needed_literals(items: list[Any]) -> set[str] | None:
    """Lower-cased strings one of which every match of the sequence `items` contains, or None.

    Among the candidate sets the sequence offers (each literal run, each group or alternation
    whose branches all have one, each repeat of at least one), the one whose shortest string has
    the most letters and digits is kept: such strings are rare in clean text ("how " is not).
    """
    candidates: list[set[str]] = []
    run: set[str] = {""}  # the literal text matched so far, one string per spelling ([- ] makes two)

    def end_run() -> None:
        nonlocal run
        if "" not in run:
            candidates.append(run)
        run = {""}

    for op, av in items:
        if op is _ops.LITERAL:
            run = {text + chr(av).lower() for text in run}
        elif op is _ops.AT:
            continue  # zero width: the literal text on both sides is still contiguous
        elif op is _ops.IN and (chars := _small_class(av)) is not None and len(run) * len(chars) <= _MAX_LITERALS:
            run = {text + char for text in run for char in chars}
        else:
            end_run()
            found: set[str] | None = None
            if op is _ops.SUBPATTERN:
                found = _needed_literals(list(av[3]))
            elif op is _ops.BRANCH:
                found = set()
                for branch in av[1]:
                    needed = _needed_literals(list(branch))
                    if needed is None:
                        found = None
                        break
                    found |= needed
            elif op in (_ops.MAX_REPEAT, _ops.MIN_REPEAT, _ops.POSSESSIVE_REPEAT) and av[0] >= 1:
                found = _needed_literals(list(av[2]))
            # anything else (an optional part, a class, a lookaround, a reference): no literal
            if found is not None and len(found) <= _MAX_LITERALS:
                candidates.append(found)
    end_run()
    if not candidates:
        return None
    return max(map(_shortest, candidates), key=lambda found: (min(map(_alnum_count, found)), -len(found)))


def _shortest(found: set[str]) -> set[str]:
    """`found` without the strings that contain another one of it (found whenever that one is)."""
    return {text for text in found if not any(other != text and other in text for other in found)}


def _alnum_count(text: str) -> int:
    return sum(char.isalnum() for char in text)


def _small_class(items: Any) -> list[str] | None:
    """The lower-cased characters of a class of a few plain characters, or None."""
    chars: set[str] = set()
    for op, av in items:
        if op is not _ops.LITERAL:
            return None  # ranges, categories, negation
        chars.add(chr(av).lower())
    return sorted(chars) if len(chars) <= _MAX_CLASS_EXPANSION else None


def _ascii_only(tree: Any) -> bool:
    """Whether every character the parsed pattern names (literals, class members, ranges) is ASCII."""
    stack: list[Any] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, tuple | list) or type(node).__name__ == "SubPattern":
            items = list(node)
            if len(items) == 2 and items[0] in (_ops.LITERAL, _ops.NOT_LITERAL) and items[1] > 127:
                return False
            if len(items) == 2 and items[0] is _ops.RANGE and items[1][1] > 127:
                return False
            stack.extend(items)
    return True


def _uses_space_class(tree: Any) -> bool:
    spaces = {_ops.CATEGORY_SPACE, _ops.CATEGORY_NOT_SPACE, _ops.CATEGORY_UNI_SPACE, _ops.CATEGORY_UNI_NOT_SPACE}
    stack: list[Any] = [tree]
    while stack:
        node = stack.pop()
        if any(node is space for space in spaces):
            return True
        if isinstance(node, tuple | list) or type(node).__name__ == "SubPattern":
            stack.extend(list(node))
    return False


# The standard library's own regular expression parser: private, hence looked up at run time
# and used only when it answers as expected; any surprise means "no combined pattern".
try:
    _sre: Any = importlib.import_module("re._parser")
    _ops: Any = importlib.import_module("re._constants")
except ImportError:  # pragma: no cover (Python without re._parser)
    _sre = _ops = None
_MAX_FIRST_CHARS = 256


def _parse(pattern: re.Pattern[str]) -> Any:
    if _sre is None:
        return None  # pragma: no cover
    try:
        return _sre.parse(pattern.pattern, pattern.flags)
    except Exception:  # pragma: no cover (it compiled once already)
        return None


def _has_group_reference(tree: Any) -> bool:
    # Group numbers shift once a pattern sits inside the alternation; global flags would
    # apply to every pattern (and fail to compile anywhere but at the start).
    if tree.state.flags & ~(re.IGNORECASE | re.UNICODE):
        return True
    refs: tuple[Any, ...] = (_ops.GROUPREF, _ops.GROUPREF_EXISTS, _ops.GROUPREF_IGNORE)
    refs += (_ops.GROUPREF_LOC_IGNORE, _ops.GROUPREF_UNI_IGNORE)
    stack: list[Any] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, tuple | list) or type(node).__name__ == "SubPattern":
            items = list(node)
            if len(items) == 2 and any(items[0] is ref for ref in refs):
                return True
            stack.extend(items)
    return False


def _first_chars(items: Any) -> set[str] | None:
    """Every character a match of `items` can start with (a superset), or None if unknown or empty-able."""
    chars: set[str] = set()
    for op, av in items:
        if op is _ops.AT:
            continue  # zero width: \b, ^, $
        if op is _ops.LITERAL:
            return chars | {chr(av)}
        if op is _ops.IN:
            found = _class_chars(av)
            return None if found is None else chars | found
        if op is _ops.SUBPATTERN:
            _group, add_flags, del_flags, sub = av
            if add_flags or del_flags:
                return None
            found = _first_chars(sub)
            if found is None:
                return None
            chars |= found
            if sub.getwidth()[0] > 0:
                return chars
            continue
        if op is _ops.BRANCH:
            _unused, branches = av
            for branch in branches:
                found = _first_chars(branch)
                if found is None:
                    return None
                chars |= found
            if min(branch.getwidth()[0] for branch in branches) > 0:
                return chars
            continue
        if op in (_ops.MAX_REPEAT, _ops.MIN_REPEAT, _ops.POSSESSIVE_REPEAT):
            low, _high, sub = av
            found = _first_chars(sub)
            if found is None:
                return None
            chars |= found
            if low > 0 and sub.getwidth()[0] > 0:
                return chars
            continue
        return None  # any other construct: don't guess
    return None  # the whole sequence can match empty text


def _class_chars(items: Any) -> set[str] | None:
    chars: set[str] = set()
    for op, av in items:
        if op is _ops.LITERAL:
            chars.add(chr(av))
        elif op is _ops.RANGE and av[1] - av[0] < _MAX_FIRST_CHARS:
            chars.update(chr(code) for code in range(av[0], av[1] + 1))
        else:
            return None  # categories (\d is every Unicode digit), negations: don't guess
    return chars
