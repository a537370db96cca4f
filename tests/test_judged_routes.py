"""Every judged route end to end: a real gateway, PostgreSQL and the recording fake upstream.

For each route family, flagged user text is refused (a strike, the audit naming the path the
client called) and never reaches the upstream; clean text reaches it byte for byte.
"""

from __future__ import annotations

import json
from typing import Any

import httpx2
import orjson
import pytest

from tests.conftest import SettingsFactory
from tests.judging import ADMIN, FLAG, FLAGGED_PNG, PNG, USER, error, form, gateway, reached
from tests.upstream import MockUpstream


def user_says(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def items(text: str) -> list[dict[str, Any]]:
    return [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}]


# path, a clean body (with application text that holds the flag word: never judged), a flagged body
JSON_ROUTES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("/v1/chat/completions", {"model": "m", "messages": user_says("hi")}, {"model": "m", "messages": user_says(FLAG)}),
    ("/v1/completions", {"prompt": "Once", "suffix": "the end"}, {"prompt": "Once", "suffix": FLAG}),
    (
        "/v1/responses",
        {"input": "hi", "instructions": FLAG, "prompt": {"id": "pmpt_1", "variables": {"city": "Paris"}}},
        {"input": "hi", "prompt": {"id": "pmpt_1", "variables": {"city": {"type": "input_text", "text": FLAG}}}},
    ),
    ("/v1/responses/compact", {"model": "m", "input": items("hi")}, {"model": "m", "input": items(FLAG)}),
    ("/v1/conversations", {"items": items("hi")}, {"items": items(FLAG)}),
    ("/v1/conversations/conv_1/items", {"items": items("hi")}, {"items": items(FLAG)}),
    ("/v1/images/generations", {"prompt": "a cat"}, {"prompt": FLAG}),
    (
        "/v1/images/edits",
        {"prompt": "a hat", "images": [{"image_url": "https://img.example/cat.png"}]},
        {"prompt": "a hat", "images": [{"image_url": f"https://img.example/{FLAG}.png"}]},
    ),
    ("/v1/videos", {"prompt": "a cat"}, {"prompt": "a cat", "input_reference": {"image_url": f"https://x/{FLAG}"}}),
    ("/v1/videos/edits", {"prompt": "slower"}, {"prompt": FLAG}),
    ("/v1/videos/extensions", {"prompt": "longer"}, {"prompt": FLAG}),
    ("/v1/videos/video_1/remix", {"prompt": "in red"}, {"prompt": FLAG}),
    ("/v1/audio/speech", {"input": "hello", "voice": "alloy", "instructions": FLAG}, {"input": FLAG, "voice": "a"}),
    ("/v1/threads", {"messages": user_says("hi")}, {"messages": user_says(FLAG)}),
    (
        "/v1/threads/runs",
        {"assistant_id": "asst_1", "instructions": FLAG, "thread": {"messages": user_says("hi")}},
        {"assistant_id": "asst_1", "thread": {"messages": user_says("hi")}, "additional_messages": user_says(FLAG)},
    ),
    (
        "/v1/threads/thread_1/messages",
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "user", "content": [{"type": "text", "text": FLAG}]},
    ),
    (
        "/v1/threads/thread_1/runs",
        {"assistant_id": "asst_1", "additional_messages": [{"role": "assistant", "content": FLAG}]},
        {"assistant_id": "asst_1", "additional_messages": user_says(FLAG)},
    ),
]


@pytest.mark.parametrize(("path", "clean", "flagged"), JSON_ROUTES, ids=[route[0] for route in JSON_ROUTES])
def test_each_json_route_refuses_flagged_text_and_forwards_clean_text_byte_for_byte(
    settings_factory: SettingsFactory, upstream: MockUpstream, path: str, clean: dict[str, Any], flagged: Any
) -> None:
    upstream.behaviors[path] = "echo"
    # spacing and a number no float holds: a body written again by a parser would differ
    sent = json.dumps({**clean, "n": 12345678901234567890123}, indent=1).encode()
    with gateway(settings_factory, upstream) as url, httpx2.Client(base_url=url, headers=USER) as client:
        refused = client.post(path, content=orjson.dumps(flagged), headers={"Content-Type": "application/json"})
        assert refused.status_code == 400, refused.text
        assert error(refused)["code"] == "content_policy_violation"
        assert reached(upstream, path) == []
        passed = client.post(path, content=sent, headers={"Content-Type": "application/json"})
        assert passed.status_code == 200, passed.text
        events = client.get("/admin/users/alice/events", headers=ADMIN).json()["data"]
    (forwarded,) = reached(upstream, path)
    assert forwarded.body == sent
    assert [event["path"] for event in events if event["type"] == "violation"] == [path]


# path, the field that carries the media, the route's other fields
FORM_ROUTES = [
    ("/v1/images/edits", "image[]", {"model": "gpt-image-1", "prompt": "a hat"}),
    ("/v1/images/variations", "image", {"n": "1"}),
    ("/v1/videos", "input_reference", {"model": "sora-2", "prompt": "a cat"}),
    ("/v1/videos/edits", "input_reference", {"prompt": "slower"}),
    ("/v1/videos/extensions", "input_reference", {"prompt": "longer"}),
    ("/v1/videos/video_1/remix", "input_reference", {"prompt": "in red"}),
]


@pytest.mark.parametrize(("path", "media", "fields"), FORM_ROUTES, ids=[route[0] for route in FORM_ROUTES])
def test_each_form_route_judges_its_prompt_and_images(
    settings_factory: SettingsFactory, upstream: MockUpstream, path: str, media: str, fields: dict[str, str]
) -> None:
    upstream.behaviors[path] = "echo"
    clean, clean_type = form(fields, {media: ("cat.png", PNG, "image/png")})
    # declared a text file: the image is known by its bytes, not by what the client says
    flagged_image, image_type = form(fields, {media: ("notes.txt", FLAGGED_PNG, "text/plain")})
    with gateway(settings_factory, upstream) as url, httpx2.Client(base_url=url, headers=USER) as client:
        answers = [client.post(path, content=flagged_image, headers={"Content-Type": image_type})]
        if "prompt" in fields:
            flagged_text, text_type = form(
                {**fields, "prompt": f"a {FLAG} cat"}, {media: ("cat.png", PNG, "image/png")}
            )
            answers.append(client.post(path, content=flagged_text, headers={"Content-Type": text_type}))
        for refused in answers:
            assert refused.status_code == 400, refused.text
            assert error(refused)["code"] == "content_policy_violation"
        assert reached(upstream, path) == []
        passed = client.post(path, content=clean, headers={"Content-Type": clean_type})
        assert passed.status_code == 200, passed.text
    (forwarded,) = reached(upstream, path)
    assert forwarded.body == clean
    assert forwarded.headers["Content-Type"] == clean_type


def batch(*bodies: tuple[str, dict[str, Any]]) -> bytes:
    lines = [
        orjson.dumps({"custom_id": str(number), "method": "POST", "url": url, "body": body})
        for number, (url, body) in enumerate(bodies)
    ]
    return b"\n".join(lines) + b"\n"


def test_a_batch_file_is_judged_line_by_line(settings_factory: SettingsFactory, upstream: MockUpstream) -> None:
    upstream.behaviors["/v1/files"] = "echo"
    clean_file = batch(
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "system", "content": FLAG}, *user_says("hi")]}),
        ("/v1/embeddings", {"input": FLAG}),  # embeddings are not judged, in a batch or alone
    )
    flagged_file = batch(("/v1/responses", {"input": "hi"}), ("/v1/images/generations", {"prompt": FLAG}))
    clean, clean_type = form({"purpose": "batch"}, {"file": ("batch.jsonl", clean_file, "application/jsonl")})
    flagged, flagged_type = form({"purpose": "batch"}, {"file": ("b.jsonl", flagged_file, "application/jsonl")})
    broken, broken_type = form({"purpose": "batch"}, {"file": ("b.jsonl", clean_file + b'{"url": \n', "text/plain")})
    # not a batch: a file for an assistant's file search is judged where a request uses it
    other, other_type = form({"purpose": "assistants"}, {"file": ("notes.txt", FLAG.encode(), "text/plain")})
    with gateway(settings_factory, upstream) as url, httpx2.Client(base_url=url, headers=USER) as client:
        refused = client.post("/v1/files", content=flagged, headers={"Content-Type": flagged_type})
        assert refused.status_code == 400
        assert error(refused)["code"] == "content_policy_violation"
        malformed = client.post("/v1/files", content=broken, headers={"Content-Type": broken_type})
        assert malformed.status_code == 400
        assert error(malformed)["code"] == "invalid_request"
        assert error(malformed)["param"] == "file"
        assert "Line 3 of the batch file is not JSON" in error(malformed)["message"]
        as_json = client.post("/v1/files", json={"purpose": "batch", "file": "x"})
        assert (as_json.status_code, error(as_json)["code"]) == (400, "invalid_request")
        assert reached(upstream, "/v1/files") == []
        for body, content_type in ((clean, clean_type), (other, other_type)):
            assert client.post("/v1/files", content=body, headers={"Content-Type": content_type}).status_code == 200
    assert [request.body for request in reached(upstream, "/v1/files")] == [clean, other]


def test_a_large_form_is_judged(settings_factory: SettingsFactory, upstream: MockUpstream) -> None:
    # Over a MiB: parsed off the event loop's thread (tests/test_judged_bodies.py shows where).
    upstream.behaviors["/v1/files"] = "echo"
    big = batch(*[("/v1/completions", {"prompt": f"line {n} " + "x" * 1000}) for n in range(1100)])
    last = batch(("/v1/completions", {"prompt": FLAG}))
    flagged, flagged_type = form({"purpose": "batch"}, {"file": ("b.jsonl", big + last, "application/jsonl")})
    clean, clean_type = form({"purpose": "batch"}, {"file": ("b.jsonl", big, "application/jsonl")})
    assert len(clean) > 1024 * 1024
    with gateway(settings_factory, upstream) as url, httpx2.Client(base_url=url, headers=USER) as client:
        refused = client.post("/v1/files", content=flagged, headers={"Content-Type": flagged_type})
        assert (refused.status_code, error(refused)["code"]) == (400, "content_policy_violation")
        assert client.post("/v1/files", content=clean, headers={"Content-Type": clean_type}).status_code == 200
    assert [request.body for request in reached(upstream, "/v1/files")] == [clean]
