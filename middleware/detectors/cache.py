"""The verdict cache, and the SHA-256 it keys on (also the audit's only trace of a flagged text)."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from middleware.metrics import VERDICT_CACHE
from middleware.protocols import Verdict


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


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

    def texts(self, texts: tuple[str, ...]) -> tuple[Verdict | None, list[tuple[str, str]]]:
        """A cached flag for one of `texts` (keyed by their SHA-256), or None and the texts not
        cached yet, each with its SHA-256."""
        pending: list[tuple[str, str]] = []
        for text in texts:
            sha256 = sha256_hex(text)
            found, verdict = self.get(sha256)
            if verdict is not None:
                return verdict, []
            if not found:
                pending.append((text, sha256))
        return None, pending

    def put(self, key: str, verdict: Verdict | None) -> None:
        self._entries[key] = verdict
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)
