"""The judged routes through the official OpenAI SDK: each call that carries the user's text is
refused with BadRequestError `content_policy_violation` when the text is flagged (nothing reaches
the upstream), and answered when it is clean."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import openai
import orjson
import pytest

from tests.conftest import SettingsFactory
from tests.judging import FLAG, FLAGGED_PNG, PNG, USER, gateway, reached
from tests.upstream import MockUpstream

# The SDK warns that OpenAI retired Sora: the routes stay judged wherever an upstream serves them.
pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")


def batch_file(text: str) -> bytes:
    body = {"model": "m", "messages": [{"role": "user", "content": text}]}
    return orjson.dumps({"custom_id": "1", "method": "POST", "url": "/v1/chat/completions", "body": body}) + b"\n"


def user_item(text: str) -> Any:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


# the path each call reaches, and the call with the user's text (or image) in it
CALLS: dict[str, tuple[str, Callable[[openai.OpenAI, str], Any]]] = {
    "images.generate": ("/v1/images/generations", lambda c, t: c.images.generate(model="gpt-image-1", prompt=t)),
    "images.edit": (
        "/v1/images/edits",
        lambda c, t: c.images.edit(image=("cat.png", PNG, "image/png"), prompt=t, model="gpt-image-1"),
    ),
    "images.edit (image)": (
        "/v1/images/edits",
        lambda c, t: c.images.edit(image=("i.png", FLAGGED_PNG if t == FLAG else PNG, "image/png"), prompt="a hat"),
    ),
    "audio.speech.create": (
        "/v1/audio/speech",
        lambda c, t: c.audio.speech.create(model="gpt-4o-mini-tts", voice="alloy", input=t, instructions="calm"),
    ),
    "files.create(batch)": (
        "/v1/files",
        lambda c, t: c.files.create(file=("batch.jsonl", batch_file(t), "application/jsonl"), purpose="batch"),
    ),
    "responses.create(prompt variables)": (
        "/v1/responses",
        lambda c, t: c.responses.create(prompt={"id": "pmpt_1", "variables": {"topic": t}}, input="go on"),
    ),
    "conversations.create": ("/v1/conversations", lambda c, t: c.conversations.create(items=[user_item(t)])),
    "conversations.items.create": (
        "/v1/conversations/conv_1/items",
        lambda c, t: c.conversations.items.create("conv_1", items=[user_item(t)]),
    ),
    "completions.create(suffix)": (
        "/v1/completions",
        lambda c, t: c.completions.create(model="gpt-3.5-turbo-instruct", prompt="Once", suffix=t),
    ),
    "videos.create": ("/v1/videos", lambda c, t: c.videos.create(model="sora-2", prompt=t)),
    "videos.remix": ("/v1/videos/video_1/remix", lambda c, t: c.videos.remix("video_1", prompt=t)),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_the_sdks_calls_are_judged(settings_factory: SettingsFactory, upstream: MockUpstream, name: str) -> None:
    path, call = CALLS[name]
    if path not in ("/v1/responses", "/v1/completions"):  # the fake upstream answers these itself
        upstream.behaviors[path] = "echo"
    with gateway(settings_factory, upstream) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-client", default_headers=USER, max_retries=0)
        with pytest.raises(openai.BadRequestError) as caught:
            call(client, FLAG)
        assert caught.value.code == "content_policy_violation"
        assert reached(upstream, path) == []
        call(client, "a quiet afternoon")
    assert len(reached(upstream, path)) == 1
