"""Moderation detectors: operator-written regex rules, and OpenAI's moderation endpoint."""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import re
import tomllib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from middleware.metrics import VERDICT_CACHE
from middleware.protocols import DetectorFailed, JsonPost, UserInput, Verdict

DEFAULT_RULES_FILE = Path(__file__).with_name("rules.toml")
MODERATION_MODEL = "omni-moderation-latest"

# categories end up in metrics labels and a response header: keep them plain
_CATEGORY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_ ./:-]*")
_RULE_KEYS = frozenset({"category", "pattern", "name"})


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


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


class RulesDetector:
    """Flags a text when a rule's pattern matches it; the first matching rule decides.

    Images are not judged. The verdict's `rule` is the rule's name (its pattern by default).
    """

    name = "rules"
    cost = 0

    def __init__(self, rules_file: Path) -> None:
        self.rules = load_rules(rules_file)
        self._any = any_rule_pattern(self.rules)
        self._any_ascii = ascii_prefilter(self.rules, self._any)
        self._screen = literal_screen(self.rules) if self._any_ascii is not None else None

    async def check(self, user_input: UserInput, authorization: str | None) -> Verdict | None:
        return self.check_now(user_input)

    def check_now(self, user_input: UserInput) -> Verdict | None:
        """The verdict, without a coroutine (a `LocalDetector`: the rules need no I/O)."""
        screen = self._screen
        for text in user_input.texts:
            # The common case is a clean text: an ASCII one is cleared by the literal screen when
            # it holds none of the words some rule needs; else one scan of the pre-filter; the
            # rules in order only when it matched.
            ascii_text = text.isascii()
            if ascii_text and screen is not None and not screen.may_match(text):
                continue
            prefilter = self._any_ascii if ascii_text and self._any_ascii is not None else self._any
            if prefilter is not None and not prefilter.search(text):
                continue
            for rule in self.rules:
                if rule.pattern.search(text):
                    return Verdict(
                        detector=self.name, categories=(rule.category,), text_sha256=sha256_hex(text), rule=rule.name
                    )
        return None


def any_rule_pattern(rules: Sequence[Rule]) -> re.Pattern[str] | None:
    """One pattern that matches a text exactly when some rule's pattern does, or None.

    Python's `re` tries an alternation's branches one by one at every position, so the
    alternation alone saves little over a search per rule (8 µs against 9.5 µs for the bundled
    rules on a 100-character text). A lookahead for the characters a match can start with lets
    it skip every other position quickly (3 µs). It only pre-filters: which rule matched, and
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
    """`combined` in ASCII mode, for ASCII texts only: it scans about twice as fast (4.6 -> 2.4 µs).

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
    alternation at almost every position of a text (1.5 µs for a 75-character chat message on
    the bundled rules, about 29,000 instructions); lower() and a substring test per literal cost
    a third of that. Only for ASCII texts and ASCII rules (see `ascii_prefilter`), where lower-casing
    is exact: `str.lower` and case-insensitive matching agree on every ASCII character.
    """

    literals: tuple[str, ...]
    rest: re.Pattern[str] | None

    def may_match(self, text: str) -> bool:
        """False when no rule can match `text` (an ASCII text); True: ask the rules."""
        lowered = text.lower()
        for literal in self.literals:  # a plain loop: any(map(lowered.__contains__, ...)) costs 70 % more
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


class VerdictCache:
    """A bounded LRU of verdicts by the SHA-256 of one text or image URL; None is a clean verdict."""

    def __init__(self, detector: str, size: int = 10_000) -> None:
        self._entries: OrderedDict[str, Verdict | None] = OrderedDict()
        self._size = size
        self._hits = VERDICT_CACHE.labels(detector, "hit")
        self._misses = VERDICT_CACHE.labels(detector, "miss")

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> tuple[bool, Verdict | None]:
        """(found, verdict)."""
        if key not in self._entries:
            self._misses.inc()
            return False, None
        self._hits.inc()
        self._entries.move_to_end(key)
        return True, self._entries[key]

    def put(self, key: str, verdict: Verdict | None) -> None:
        self._entries[key] = verdict
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)


@dataclass(frozen=True, slots=True)
class _Item:
    kind: str  # "text" or "image"
    value: str
    sha256: str

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.sha256}"

    def part(self) -> dict[str, Any]:
        if self.kind == "text":
            return {"type": "text", "text": self.value}
        return {"type": "image_url", "image_url": {"url": self.value}}


class OpenAIDetector:
    """OpenAI's moderation endpoint (`POST {base_url}/moderations`, model omni-moderation-latest).

    Credentials: `Bearer <api_key>` when the gateway has one, else the call's own Authorization.

    Flagging. Without thresholds, a result with `flagged: true` is a violation and its true
    `categories` are the categories. With thresholds (`{"violence": 0.5, "*": 0.9}`), `flagged` is
    not consulted: each category is flagged when its `category_scores` entry is at or above its own
    threshold, else the `*` one; a category with neither keeps its boolean from `categories`. The
    verdict's `scores` holds the scores that crossed a threshold.

    Caching. Every text and image URL is looked up by its SHA-256 in a bounded LRU first, so a
    conversation's history resent every turn is judged once; only the rest is sent. Texts alone are
    sent as an array of strings, which the endpoint answers with one result per string: each is
    cached with its own verdict. With images the input is one multimodal array, which the endpoint
    may answer with a single result for everything: then no input can be blamed alone, so the
    inputs are cached only when that result is clean, a flagged result is not cached, and its
    verdict's `text_sha256` is the SHA-256 of the JSON input array that was sent.
    """

    name = "openai"
    cost = 100

    def __init__(
        self,
        post: JsonPost,
        base_url: str,
        api_key: str | None,
        thresholds: Mapping[str, float],
        timeout: float,
        *,
        cache_size: int = 10_000,
    ) -> None:
        self._post = post
        self.url = base_url.rstrip("/") + "/moderations"
        self._api_key = api_key
        self._thresholds = dict(thresholds)
        self._timeout = timeout
        self.cache = VerdictCache(self.name, cache_size)

    async def check(self, user_input: UserInput, authorization: str | None) -> Verdict | None:
        items = [_Item("text", text, sha256_hex(text)) for text in user_input.texts]
        items += [_Item("image", url, sha256_hex(url)) for url in user_input.images]
        pending: list[_Item] = []
        for item in items:
            found, verdict = self.cache.get(item.key)
            if verdict is not None:
                return verdict
            if not found:
                pending.append(item)
        if not pending:
            return None

        if any(item.kind == "image" for item in pending):
            sent: list[Any] = [item.part() for item in pending]
        else:
            sent = [item.value for item in pending]
        results = await self._moderate(sent, authorization)

        if len(results) == len(pending):
            first: Verdict | None = None
            for item, result in zip(pending, results, strict=True):
                verdict = self._judge(result, item.sha256)
                self.cache.put(item.key, verdict)
                first = first or verdict
            return first
        whole = hashlib.sha256(orjson.dumps(sent)).hexdigest()
        for result in results:
            verdict = self._judge(result, whole)
            if verdict is not None:
                return verdict
        for item in pending:
            self.cache.put(item.key, None)
        return None

    async def _moderate(self, sent: list[Any], authorization: str | None) -> Sequence[Any]:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        elif authorization:
            headers["Authorization"] = authorization
        payload = orjson.dumps({"model": MODERATION_MODEL, "input": sent})
        try:
            async with asyncio.timeout(self._timeout):
                status, body = await self._post(self.url, payload, headers, self._timeout)
        except TimeoutError:
            raise DetectorFailed(f"the moderation endpoint {self.url} did not answer within {self._timeout}s") from None
        except OSError as exc:
            raise DetectorFailed(f"the moderation endpoint {self.url} could not be reached: {exc}") from None
        if not 200 <= status < 300:
            raise DetectorFailed(f"the moderation endpoint {self.url} answered HTTP {status}{_error_detail(body)}")
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise DetectorFailed(f"the moderation endpoint {self.url} answered a body that is not JSON") from None
        results = data.get("results") if isinstance(data, dict) else None
        if not isinstance(results, list) or not results or not all(isinstance(r, dict) for r in results):
            raise DetectorFailed(f"the moderation endpoint {self.url} answered JSON without a `results` list")
        return results

    def _judge(self, result: Mapping[str, Any], sha256: str) -> Verdict | None:
        flags = result.get("categories")
        flags = flags if isinstance(flags, dict) else {}
        scores = result.get("category_scores")
        scores = scores if isinstance(scores, dict) else {}
        if not self._thresholds:
            if result.get("flagged") is not True:
                return None
            names = tuple(name for name, flagged in flags.items() if flagged is True) or ("unspecified",)
            return Verdict(detector=self.name, categories=names, text_sha256=sha256)

        default = self._thresholds.get("*")
        categories: list[str] = []
        crossed: dict[str, float] = {}
        for name in dict.fromkeys([*scores, *flags]):
            threshold = self._thresholds.get(name, default)
            score = scores.get(name)
            if threshold is None:
                if flags.get(name) is True:
                    categories.append(name)
            elif isinstance(score, int | float) and not isinstance(score, bool) and score >= threshold:
                categories.append(name)
                crossed[name] = float(score)
        if not categories:
            return None
        return Verdict(detector=self.name, categories=tuple(categories), text_sha256=sha256, scores=crossed)


def _error_detail(body: bytes) -> str:
    """The upstream's own error message, if it sent an OpenAI-shaped one (e.g. a wrong key)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ""
    error = data.get("error") if isinstance(data, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return f": {message[:200]}" if isinstance(message, str) and message else ""
