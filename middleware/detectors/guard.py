"""The `guard` detector: a guard model (Llama Guard 3 or 4, Qwen3Guard) behind a chat endpoint.

The model runs wherever the operator serves it (vLLM, Ollama, a provider) behind an
OpenAI-compatible `POST {base_url}/chat/completions`. The user's text goes as the one user
message of a conversation; the model's chat template wraps it in its own safety prompt and
the model answers in its own format:

- Llama Guard 3 and 4: `safe`, or `unsafe` and a line of hazard codes `S1,S10` (the MLCommons
  taxonomy, mapped to readable names below);
- Qwen3Guard-Gen: `Safety: Safe|Unsafe|Controversial` and `Categories: Violent, ...`. Only
  `Unsafe` flags (Qwen's "loose" reading: a controversial prompt is not misconduct).

Any other answer is a detector failure. Images are not sent: they are the `openai` detector's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from middleware.detectors.cache import VerdictCache, sha256_hex
from middleware.detectors.remote import first_flag, post_json
from middleware.protocols import DetectorFailed, JsonPost, UserInput, Verdict

# The MLCommons hazard taxonomy as Llama Guard 3 and 4 number it.
HAZARDS = {
    "S1": "violent_crimes",
    "S2": "non_violent_crimes",
    "S3": "sex_related_crimes",
    "S4": "child_sexual_exploitation",
    "S5": "defamation",
    "S6": "specialized_advice",
    "S7": "privacy",
    "S8": "intellectual_property",
    "S9": "indiscriminate_weapons",
    "S10": "hate",
    "S11": "suicide_self_harm",
    "S12": "sexual_content",
    "S13": "elections",
    "S14": "code_interpreter_abuse",
}
# Qwen3Guard's categories, by the names it writes.
QWEN_CATEGORIES = {
    "violent": "violent",
    "non-violent illegal acts": "non_violent_illegal_acts",
    "sexual content or sexual acts": "sexual_content",
    "pii": "pii",
    "suicide & self-harm": "suicide_self_harm",
    "unethical acts": "unethical_acts",
    "politically sensitive topics": "politically_sensitive_topics",
    "copyright violation": "copyright_violation",
    "jailbreak": "jailbreak",
}
_QWEN_SAFETY = re.compile(r"^\s*safety:\s*(safe|unsafe|controversial)\s*$", re.IGNORECASE | re.MULTILINE)
_QWEN_CATEGORIES = re.compile(r"^\s*categories:\s*(.*?)\s*$", re.IGNORECASE | re.MULTILINE)
_HAZARD_CODE = re.compile(r"S\d{1,2}")
# A guard's answer is a few tokens; room for a Qwen3Guard answer with several categories.
_MAX_TOKENS = 64
# New texts judged in calls of their own per request; more are judged together in one call.
_MAX_CALLS = 8


def read_answer(content: str) -> tuple[bool, tuple[str, ...]] | None:
    """(unsafe, categories) from a guard model's answer, or None when it is in no known format."""
    lines = [line.strip() for line in content.strip().splitlines() if line.strip()]
    if not lines:
        return None
    first = lines[0].lower()
    if first == "safe":
        return False, ()
    if first == "unsafe":
        codes = _HAZARD_CODE.findall(lines[1].upper()) if len(lines) > 1 else []
        names = tuple(dict.fromkeys(HAZARDS.get(code, code.lower()) for code in codes))
        return True, names or ("unspecified",)
    safety = _QWEN_SAFETY.search(content)
    if safety is None:
        return None
    if safety.group(1).lower() != "unsafe":
        return False, ()
    found = _QWEN_CATEGORIES.search(content)
    named = [part.strip() for part in found.group(1).split(",")] if found else []
    names = tuple(
        dict.fromkeys(
            QWEN_CATEGORIES.get(name.lower(), re.sub(r"\W+", "_", name.lower()).strip("_"))
            for name in named
            if name and name.lower() != "none"
        )
    )
    return True, names or ("unspecified",)


class GuardDetector:
    """A guard model judging each new user text (cached by SHA-256, like the `openai` detector's).

    Each text not in the cache is one call, all at once; a request with more than a few new
    texts has the rest judged together in one call, whose flag blames the joined text (its
    verdict hashes what was sent, and it is not cached).
    """

    name = "guard"
    cost = 200

    def __init__(
        self,
        post: JsonPost,
        base_url: str,
        model: str,
        api_key: str | None,
        timeout: float,
        *,
        cache_size: int = 10_000,
    ) -> None:
        self._post = post
        self.url = base_url.rstrip("/") + "/chat/completions"
        self._model = model
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._timeout = timeout
        self.cache = VerdictCache(self.name, cache_size)

    async def check(self, user_input: UserInput, authorization: str | None) -> Verdict | None:
        verdict, pending = self.cache.texts(user_input.texts)
        if verdict is not None or not pending:
            return verdict
        calls: list[Sequence[tuple[str, str]]] = [[item] for item in pending[: _MAX_CALLS - 1]]
        if len(pending) >= _MAX_CALLS:
            calls.append(pending[_MAX_CALLS - 1 :])
        return await first_flag(self._judge(call) for call in calls)

    async def _judge(self, items: Sequence[tuple[str, str]]) -> Verdict | None:
        text = "\n\n".join(text for text, _ in items)
        payload = {
            "model": self._model,
            "messages": [{"role": "user", "content": text}],
            "temperature": 0,
            "max_tokens": _MAX_TOKENS,
            "stream": False,
        }
        data = await post_json(self._post, self.url, payload, self._headers, self._timeout, "the guard model")
        read = read_answer(_content(data, self.url))
        if read is None:
            # Not the answer itself in the message: a model that is no guard may echo the user's text.
            raise DetectorFailed(
                f"the guard model at {self.url} answered in no known format (Llama Guard's or Qwen3Guard's); "
                "check GATEWAY_GUARD_MODEL"
            )
        unsafe, categories = read
        if not unsafe:
            for _, sha256 in items:
                self.cache.put(sha256, None)
            return None
        if len(items) == 1:
            verdict = Verdict(detector=self.name, categories=categories, text_sha256=items[0][1])
            self.cache.put(items[0][1], verdict)
            return verdict
        return Verdict(detector=self.name, categories=categories, text_sha256=sha256_hex(text))


def _content(data: Any, url: str) -> str:
    """The first choice's message content of a chat completion."""
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        content = None
    if not isinstance(content, str):
        raise DetectorFailed(f"the guard model at {url} answered JSON without a chat completion's message content")
    return content
