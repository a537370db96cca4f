"""The user-authored input of a JSON request body: what the detectors judge, and what they cannot read.

One extractor per body shape of the judged routes (middleware/routes.py maps routes to them).
System, developer, assistant and tool content and every `instructions` field are the
application's, not the user's, and are never extracted. Any JSON value is accepted: parts of
the wrong type are skipped, never an error, because the upstream is the judge of a request's
shape and the gateway only has to find the user's words. A user's part the detectors cannot
read (audio, a file, an image by file id, token ids, a part type the gateway does not know) is
named in `UserInput.unjudgeable` by the parameter that holds it, e.g. `messages[2].content[1]`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from middleware.protocols import UserInput

_TEXT_PARTS = frozenset({"text", "input_text"})
_IMAGE_PARTS = frozenset({"image_url", "input_image"})
# the part types a responses input list may hold bare, for the caller
_BARE_PARTS = _TEXT_PARTS | _IMAGE_PARTS | {"input_file", "input_audio", "file", "image_file"}

Extractor = Callable[[Any], UserInput]


class Collector:
    """The user's texts, images and unreadable parts found so far (forms and batch files fill one too)."""

    __slots__ = ("images", "texts", "unjudgeable")

    def __init__(self) -> None:
        # dicts keep insertion order: deduplicated, in the order the user wrote them
        self.texts: dict[str, None] = {}
        self.images: dict[str, None] = {}
        self.unjudgeable: dict[str, None] = {}

    def text(self, value: Any) -> None:
        if isinstance(value, str) and value.strip():
            self.texts[value] = None

    def unreadable(self, where: str) -> None:
        self.unjudgeable[where] = None

    def image(self, value: Any, where: str) -> None:
        """An image part's `image_url` (chat: `{"url": ...}`; responses: the URL itself)."""
        if isinstance(value, dict):
            value = value.get("url")
        if isinstance(value, str) and value:
            self.images[value] = None
        else:  # by file id, or no URL at all: nothing a detector can fetch
            self.unreadable(where)

    def image_reference(self, value: Any, where: str) -> None:
        """An `{"image_url": ...}` or `{"file_id": ...}` reference (image edits, video references)."""
        if isinstance(value, dict):
            self.image(value.get("image_url"), where)

    def content(self, content: Any, where: str) -> None:
        """A message's content: a string or a list of parts."""
        if isinstance(content, str):
            self.text(content)
        elif isinstance(content, list):
            for index, part in enumerate(content):
                self.part(part, f"{where}[{index}]")

    def part(self, part: Any, where: str) -> None:
        if isinstance(part, str):
            self.text(part)
            return
        if not isinstance(part, dict):
            return
        kind = _kind(part)
        if kind in _TEXT_PARTS:
            self.text(part.get("text"))
        elif kind in _IMAGE_PARTS:
            self.image(part.get("image_url"), where)
        elif kind is not None:
            # audio, files, image files, and part types invented after this gateway
            self.unreadable(where)
        else:
            # no type: the upstream refuses it, but its text is judged should one take it
            self.text(part.get("text"))

    def messages(self, messages: Any, key: str) -> None:
        if isinstance(messages, list):
            for index, message in enumerate(messages):
                self.message(message, f"{key}[{index}]")

    def message(self, message: Any, where: str) -> None:
        """An Assistants message (threads): the user's content and attachments."""
        if not isinstance(message, dict) or message.get("role") != "user":
            return
        self.content(message.get("content"), _join(where, "content"))
        if message.get("attachments"):
            self.unreadable(_join(where, "attachments"))

    def items(self, items: Any, key: str) -> None:
        """A responses `input` or a conversation's `items`: a string or a list of items."""
        if isinstance(items, str):
            self.text(items)
            return
        if not isinstance(items, list):
            return
        for index, item in enumerate(items):
            if isinstance(item, str):
                self.text(item)
                continue
            if not isinstance(item, dict):
                continue
            role = item.get("role")
            kind = _kind(item)
            where = f"{key}[{index}]"
            if role == "user" and kind in (None, "message"):
                self.content(item.get("content"), f"{where}.content")
            elif role is None and kind == "message":
                # a message without a role has no author but the caller: judge it as the user's
                self.content(item.get("content"), f"{where}.content")
            elif role is None and kind in _BARE_PARTS:
                # a bare content part in the input list: the caller's, not a tool's or the model's
                self.part(item, where)

    def completion_prompt(self, prompt: Any) -> None:
        """A completion's prompt: a string, a list of strings, or token ids (lists of ints)."""
        if isinstance(prompt, str):
            self.text(prompt)
        elif isinstance(prompt, list):
            for index, item in enumerate(prompt):
                if isinstance(item, str):
                    self.text(item)
                elif isinstance(item, list):
                    self.unreadable(f"prompt[{index}]")
                elif isinstance(item, int) and not isinstance(item, bool):
                    # token ids are text the detectors cannot read; one name for the whole list
                    self.unreadable("prompt")

    def merge(self, found: UserInput, prefix: str) -> None:
        """Another body's input (a batch file's request), its unreadable parts named under `prefix`."""
        self.texts.update(dict.fromkeys(found.texts))
        self.images.update(dict.fromkeys(found.images))
        self.unjudgeable.update(dict.fromkeys(f"{prefix}{where}" for where in found.unjudgeable))

    def result(self) -> UserInput:
        return UserInput(tuple(self.texts), tuple(self.images), tuple(self.unjudgeable))


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _kind(item: dict[str, Any]) -> str | None:
    # `type` is whatever the client sent: a list or an object there must not raise.
    kind = item.get("type")
    return kind if isinstance(kind, str) else None


def _collect(fill: Callable[[Collector, dict[str, Any]], None]) -> Extractor:
    """An extractor from a function that fills a collector from a body that is a JSON object."""

    def extract(body: Any) -> UserInput:
        if not isinstance(body, dict):
            return UserInput()
        found = Collector()
        fill(found, body)
        return found.result()

    extract.__name__ = fill.__name__
    extract.__doc__ = fill.__doc__
    return extract


def chat(body: Any) -> UserInput:
    """POST /chat/completions: every user message's text, image and unreadable parts."""
    if not isinstance(body, dict):
        return UserInput()
    common = _chat_of_strings(body.get("messages"))
    if common is not None:
        return common
    found = Collector()
    _chat(found, body.get("messages"))
    return found.result()


def _chat_of_strings(messages: Any) -> UserInput | None:
    """The common chat, every user message's content a string, without the collector (3.8 -> 2.5 µs).

    None when a user message has content parts (or no list of messages): the general path then.
    """
    if not isinstance(messages, list):
        return None
    texts: dict[str, None] = {}
    for message in messages:
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if not isinstance(content, str):
                return None
            if content.strip():
                texts[content] = None
    return UserInput(tuple(texts))  # positional: a frozen dataclass's keywords cost 0.25 µs more


def _chat(found: Collector, messages: Any) -> None:
    if not isinstance(messages, list):
        return
    for index, message in enumerate(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            found.content(message.get("content"), f"messages[{index}].content")


@_collect
def completions(found: Collector, body: dict[str, Any]) -> None:
    """POST /completions: the prompt and the suffix."""
    found.completion_prompt(body.get("prompt"))
    found.text(body.get("suffix"))


@_collect
def responses(found: Collector, body: dict[str, Any]) -> None:
    """POST /responses and /responses/compact: the input and the prompt template's variables."""
    found.items(body.get("input"), "input")
    prompt = body.get("prompt")
    variables = prompt.get("variables") if isinstance(prompt, dict) else None
    if isinstance(variables, dict):
        for name, value in variables.items():
            found.part(value, f"prompt.variables.{name}")


@_collect
def conversation_items(found: Collector, body: dict[str, Any]) -> None:
    """POST /conversations and /conversations/{id}/items: the items, as a response's input."""
    found.items(body.get("items"), "items")


@_collect
def prompt(found: Collector, body: dict[str, Any]) -> None:
    """POST /images/generations, and video edits, extensions and remixes as JSON: the prompt."""
    found.text(body.get("prompt"))


@_collect
def image_edit(found: Collector, body: dict[str, Any]) -> None:
    """POST /images/edits as JSON: the prompt, the images and the mask (by URL or file id)."""
    found.text(body.get("prompt"))
    images = body.get("images")
    if isinstance(images, list):
        for index, image in enumerate(images):
            found.image_reference(image, f"images[{index}]")
    found.image_reference(body.get("mask"), "mask")


@_collect
def video(found: Collector, body: dict[str, Any]) -> None:
    """POST /videos as JSON: the prompt and the reference image."""
    found.text(body.get("prompt"))
    found.image_reference(body.get("input_reference"), "input_reference")


@_collect
def speech(found: Collector, body: dict[str, Any]) -> None:
    """POST /audio/speech: the text to speak (its `instructions` are the application's)."""
    found.text(body.get("input"))


@_collect
def thread(found: Collector, body: dict[str, Any]) -> None:
    """POST /threads: the user's messages."""
    found.messages(body.get("messages"), "messages")


@_collect
def thread_run(found: Collector, body: dict[str, Any]) -> None:
    """POST /threads/runs: the new thread's user messages, and any added ones."""
    new_thread = body.get("thread")
    if isinstance(new_thread, dict):
        found.messages(new_thread.get("messages"), "thread.messages")
    found.messages(body.get("additional_messages"), "additional_messages")


@_collect
def thread_message(found: Collector, body: dict[str, Any]) -> None:
    """POST /threads/{id}/messages: the message itself, when the user wrote it."""
    found.message(body, "")


@_collect
def run(found: Collector, body: dict[str, Any]) -> None:
    """POST /threads/{id}/runs: the messages the run adds to its thread."""
    found.messages(body.get("additional_messages"), "additional_messages")


@_collect
def upload(found: Collector, body: dict[str, Any]) -> None:
    """POST /uploads: a batch file sent in parts reaches no detector whole; other purposes carry no
    model input yet (a file is judged, or named unjudgeable, where a request uses it)."""
    purpose = body.get("purpose")
    if isinstance(purpose, str) and purpose.strip().lower() == "batch":
        found.unreadable("purpose")
