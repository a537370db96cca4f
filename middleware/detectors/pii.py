"""The `pii` detector: personal data and secrets in a text, found as spans with their kind.

Kinds and their placeholders: e-mail addresses `[EMAIL]`, phone numbers `[PHONE]`, payment card
numbers `[CARD]` (a card network's prefix and length, and the Luhn check, so order numbers
mostly pass), IBANs `[IBAN]` (their mod-97 checksum holds) and secret-looking keys
`[SECRET]` (OpenAI-style `sk-...`, AWS access key ids, GitHub and Slack tokens, PEM private
key blocks).

Every pattern is anchored on a character the kind cannot do without (`@`, a digit, a key's
prefix) and bounded in length, so a hostile text costs time linear in its length.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PLACEHOLDERS = {
    "email": "[EMAIL]",
    "phone": "[PHONE]",
    "card": "[CARD]",
    "iban": "[IBAN]",
    "secret": "[SECRET]",
}

_AT = re.compile(r"@")
_LOCAL_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._%+-")
_DIGIT = re.compile(r"[0-9]")
_LOCAL = re.compile(r"[A-Za-z0-9._%+-]{1,64}\Z")
_DOMAIN = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.){1,8}[A-Za-z]{2,24}(?![A-Za-z0-9-])")
# No pattern starts with a look-behind: a pattern that starts with a character or a set of them
# is only tried where one occurs (the regex engine's prefix scan), and what the look-behind
# would check (no digit or letter glued before) is checked on the few matches instead.
_PHONE_SIGNED = re.compile(
    r"\+[0-9]{1,3}(?:[ .-]?\(?[0-9]{1,4}\)?){2,5}(?![0-9A-Za-z_])"  # +44 20 7946 0958, +1 (415) 555-0132
    r"|\([0-9]{3}\) ?[0-9]{3}[-. ][0-9]{4}(?![0-9A-Za-z_])"  # (415) 555-0132
)
_PHONE_DIGITS = re.compile(
    r"[0-9](?:"
    r"[0-9]{2}[-. ][0-9]{3}[-. ][0-9]{4}"  # 415-555-0132
    r"|(?<=0)[0-9]{1,4}[ /-][0-9]{2,4}(?:[ -][0-9]{2,4}){0,3}"  # national with a trunk 0: 020 7946 0958
    r")(?![0-9A-Za-z_])"
)
_CARD = re.compile(r"[2-6][0-9](?:[ -]?[0-9]){11,17}(?![0-9])")
_IBAN = re.compile(r"[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?(?![A-Za-z0-9])")
_KEY_END = r"(?![A-Za-z0-9_-])"
_SECRET = re.compile(
    rf"sk-[A-Za-z0-9_-]{{20,200}}{_KEY_END}"  # OpenAI (sk-, sk-proj-, sk-svcacct-), Anthropic (sk-ant-), ...
    rf"|AKIA[A-Z0-9]{{16}}{_KEY_END}|ASIA[A-Z0-9]{{16}}{_KEY_END}"  # AWS access key ids
    rf"|gh[pousr]_[A-Za-z0-9]{{36,255}}{_KEY_END}|github_pat_[A-Za-z0-9_]{{22,255}}{_KEY_END}"  # GitHub
    rf"|xox[abposr]-[A-Za-z0-9-]{{10,200}}{_KEY_END}"  # Slack tokens
    r"|-----BEGIN[A-Z ]{0,40}PRIVATE KEY-----.*?(?:-----END[A-Z ]{0,40}PRIVATE KEY-----|\Z)",
    re.DOTALL,
)
# Each secret starts with one of these: a substring search is far cheaper than the pattern's scan.
_SECRET_MARKERS = ("sk-", "AKIA", "ASIA", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "xox", "-----BEGIN")
_WORD = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_KEY_GLUE = _WORD | {"-"}
_PHONE_GLUE = _WORD | {"+"}
_CARD_GLUE = frozenset("0123456789-")
# IBAN lengths by country (ISO 13616 registry); a country not listed takes 15 to 34.
_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AT": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29, "CH": 21, "CY": 28, "CZ": 24,
    "DE": 22, "DK": 18, "EE": 20, "ES": 24, "FI": 18, "FR": 27, "GB": 22, "GR": 27, "HR": 21, "HU": 28,
    "IE": 22, "IL": 23, "IS": 26, "IT": 27, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MT": 31,
    "NL": 18, "NO": 15, "PL": 28, "PT": 25, "RO": 24, "SA": 24, "SE": 24, "SI": 19, "SK": 24, "SM": 27,
    "TR": 26,
}  # fmt: skip


# Masking is repeated while it uncovers more; each round masks at least one piece.
_MASK_ROUNDS = 8


@dataclass(frozen=True, slots=True)
class Found:
    """One piece of personal data or a secret: `text[start:end]` is of `kind`."""

    kind: str
    start: int
    end: int


def luhn(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if index % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def iban_valid(candidate: str) -> bool:
    country = candidate[:2]
    expected = _IBAN_LENGTHS.get(country)
    if (expected is not None and len(candidate) != expected) or not 15 <= len(candidate) <= 34:
        return False
    rearranged = candidate[4:] + candidate[:4]
    return int("".join(str(int(char, 36)) for char in rearranged)) % 97 == 1


def card_network(digits: str) -> bool:
    """Whether `digits` has the prefix and length of a card network's numbers (Visa, Mastercard,
    American Express, Diners, JCB, Discover, UnionPay)."""
    length, two = len(digits), digits[:2]
    if digits[0] == "4":
        return length in (13, 16, 19)
    if two in ("34", "37"):
        return length == 15
    if two in ("30", "36", "38"):
        return length in (14, 16)
    if "51" <= two <= "55" or "2221" <= digits[:4] <= "2720":
        return length == 16
    if two in ("35", "62") or digits[:4] == "6011" or two in ("64", "65"):
        return 16 <= length <= 19
    return False


def _card(match: re.Match[str]) -> bool:
    digits = match.group().replace(" ", "").replace("-", "")
    return card_network(digits) and luhn(digits)


def _phone(match: re.Match[str]) -> bool:
    digits = sum(char.isdigit() for char in match.group())
    return 8 <= digits <= 15 if match.group().startswith("+") else 9 <= digits <= 12


def _free(text: str, match: re.Match[str], glue: frozenset[str]) -> bool:
    """Whether no character of `glue` comes right before `match` (it would be part of a longer token)."""
    start = match.start()
    return start == 0 or text[start - 1] not in glue


def find(text: str) -> list[Found]:
    """Every piece of personal data or secret in `text`, in order, none overlapping another."""
    found: list[Found] = []
    if "@" in text:
        for at in _AT.finditer(text):
            if not at.start() or text[at.start() - 1] not in _LOCAL_CHARS:
                continue
            local = _LOCAL.search(text, max(0, at.start() - 64), at.start())
            domain = _DOMAIN.match(text, at.end())
            if local is not None and domain is not None and not local.group().startswith("."):
                found.append(Found("email", local.start(), domain.end()))
    if any(marker in text for marker in _SECRET_MARKERS):
        found.extend(Found("secret", m.start(), m.end()) for m in _SECRET.finditer(text) if _free(text, m, _KEY_GLUE))
    if _DIGIT.search(text):
        found.extend(
            Found("card", m.start(), m.end()) for m in _CARD.finditer(text) if _free(text, m, _CARD_GLUE) and _card(m)
        )
        found.extend(
            Found("iban", m.start(), m.end())
            for m in _IBAN.finditer(text)
            if _free(text, m, _WORD) and iban_valid(m.group().replace(" ", ""))
        )
        for pattern in (_PHONE_SIGNED, _PHONE_DIGITS):
            found.extend(
                Found("phone", m.start(), m.end())
                for m in pattern.finditer(text)
                if _free(text, m, _PHONE_GLUE) and _phone(m)
            )
    if len(found) < 2:
        return found
    # Overlapping pieces become one, of the kind found first (e-mails, then secrets, cards,
    # IBANs, phones): masking their union leaves no part of either behind.
    found.sort(key=lambda item: item.start)
    kept: list[Found] = []
    for item in found:
        if kept and item.start < kept[-1].end:
            if item.end > kept[-1].end:
                kept[-1] = Found(kept[-1].kind, kept[-1].start, item.end)
            continue
        kept.append(item)
    return kept


def mask(text: str, found: list[Found] | None = None) -> str:
    """`text` with each piece found replaced by its kind's placeholder, until none is left.

    A piece glued to a word is not found (`uk+44 20 7946 0958`); once its neighbour is masked it
    may be (`[EMAIL]+44 20 7946 0958`), so the masked text is searched again, a few times at most.
    """
    found = find(text) if found is None else found
    for _ in range(_MASK_ROUNDS):
        if not found:
            break
        parts: list[str] = []
        last = 0
        for item in found:
            parts.append(text[last : item.start])
            parts.append(PLACEHOLDERS[item.kind])
            last = item.end
        parts.append(text[last:])
        text = "".join(parts)
        found = find(text)
    return text
