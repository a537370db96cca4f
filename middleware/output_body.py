"""The text of an answer that is not streamed, and the answer with its flagged text taken out.

Judged: each chat choice's `message.content`, each completion choice's `text`, a response's
`output_text` parts (all of them together: they are one answer). Flagged, a chat choice's
content becomes null and a completion's text "", each with `finish_reason: "content_filter"`
and `logprobs: null`;
a response becomes `status: "incomplete"`, `incomplete_details.reason: "content_filter"`,
without its message items (tool calls and reasoning items stay).
"""

from __future__ import annotations

from typing import Any, Literal

Kind = Literal["chat", "completions", "responses"]


def answer_texts(kind: Kind, document: Any) -> dict[int, str]:
    """The texts to judge, by choice index (a response's whole text under 0)."""
    if not isinstance(document, dict):
        return {}
    if kind == "responses":
        whole = "".join(_response_texts(document))
        return {0: whole} if whole else {}
    texts: dict[int, str] = {}
    choices = document.get("choices")
    for position, choice in enumerate(choices if isinstance(choices, list) else []):
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        text: Any = (
            choice.get("text")
            if kind == "completions"
            else message.get("content")
            if isinstance(message, dict)
            else None
        )
        if isinstance(text, str) and text:
            texts[int_or(choice.get("index"), position)] = text
    return texts


def filtered(kind: Kind, document: dict[str, Any], flagged: set[int]) -> dict[str, Any]:
    """`document` with the text of the `flagged` choices (or the response) taken out."""
    if kind == "responses":
        output = document.get("output")
        kept = [item for item in output if not _is_message(item)] if isinstance(output, list) else []
        document = {**document, "status": "incomplete", "incomplete_details": {"reason": "content_filter"}}
        document["output"] = kept
        document.pop("output_text", None)  # a convenience copy some servers add
        return document
    choices = document.get("choices")
    assert isinstance(choices, list)
    rewritten = []
    for position, choice in enumerate(choices):
        if isinstance(choice, dict) and int_or(choice.get("index"), position) in flagged:
            # logprobs hold every token of the text
            choice = {**choice, "finish_reason": "content_filter", "logprobs": None}
            if kind == "chat" and isinstance(choice.get("message"), dict):
                choice["message"] = {**choice["message"], "content": None}
            elif kind == "completions":
                choice["text"] = ""
        rewritten.append(choice)
    return {**document, "choices": rewritten}


def int_or(value: Any, default: int = 0) -> int:
    """`value` if it is a JSON integer (an index), else `default`."""
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _is_message(item: Any) -> bool:
    return isinstance(item, dict) and item.get("type", "message") == "message"


def _response_texts(document: dict[str, Any]) -> list[str]:
    texts: list[str] = []
    output = document.get("output")
    for item in output if isinstance(output, list) else []:
        content = item.get("content") if _is_message(item) else None
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and part.get("type") == "output_text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
    if not texts and isinstance(document.get("output_text"), str):
        texts.append(document["output_text"])
    return texts
