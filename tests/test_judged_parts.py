"""Parts of a judged call the detectors cannot read (GATEWAY_UNJUDGEABLE), and bodies the gateway
and the upstream could read apart (refused), end to end through a real gateway."""

from __future__ import annotations

import gzip
from typing import Any

import httpx2
import orjson
import pytest

from tests.conftest import SettingsFactory
from tests.judging import ADMIN, FLAG, PNG, USER, error, form, gateway, reached
from tests.upstream import MockUpstream

AUDIO = {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}
MP4 = b"\x00\x00\x00\x18ftypmp42" + bytes(32)


def batch_line(body: dict[str, Any]) -> bytes:
    return orjson.dumps({"custom_id": "1", "method": "POST", "url": "/v1/chat/completions", "body": body})


def unjudgeable_calls() -> list[tuple[str, bytes, str, str]]:
    """path, body, Content-Type, the part named first; each call also holds clean user text."""
    video_edit, video_type = form({"prompt": "slower"}, {"video": ("clip.mp4", MP4, "video/mp4")})
    speech = {"role": "user", "content": [{"type": "text", "text": "what is this?"}, AUDIO]}
    batch, batch_type = form({"purpose": "batch"}, {"file": ("b.jsonl", batch_line({"messages": [speech]}), "a")})
    as_json = "application/json"
    return [
        ("/v1/chat/completions", orjson.dumps({"messages": [speech]}), as_json, "messages[0].content[1]"),
        ("/v1/completions", orjson.dumps({"prompt": [1734, 374], "suffix": "end"}), as_json, "prompt"),
        (
            "/v1/responses",
            orjson.dumps({"input": [{"role": "user", "content": ["hi", {"type": "input_file", "file_id": "f"}]}]}),
            as_json,
            "input[0].content[1]",
        ),
        ("/v1/images/edits", orjson.dumps({"prompt": "hi", "images": [{"file_id": "file-1"}]}), as_json, "images[0]"),
        ("/v1/uploads", orjson.dumps({"purpose": "batch", "filename": "b.jsonl", "bytes": 9}), as_json, "purpose"),
        ("/v1/videos/edits", video_edit, video_type, "video"),
        ("/v1/files", batch, batch_type, "file:1:messages[0].content[1]"),
    ]


def test_unjudgeable_parts_are_forwarded_by_default_and_the_rest_still_judged(
    settings_factory: SettingsFactory, upstream: MockUpstream
) -> None:
    calls = unjudgeable_calls()
    for path, *_ in calls:
        upstream.behaviors[path] = "echo"
    beside_flag = orjson.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": FLAG}, AUDIO]}]})
    with gateway(settings_factory, upstream) as url, httpx2.Client(base_url=url, headers=USER) as client:
        for path, body, content_type, _ in calls:
            answer = client.post(path, content=body, headers={"Content-Type": content_type})
            assert answer.status_code == 200, (path, answer.text)
            assert reached(upstream, path)[-1].body == body
        refused = client.post("/v1/chat/completions", content=beside_flag)
        assert error(refused)["code"] == "content_policy_violation"
    assert len(reached(upstream, "/v1/chat/completions")) == 1


def test_unjudgeable_parts_are_refused_when_set_before_any_detector_and_without_a_strike(
    settings_factory: SettingsFactory, upstream: MockUpstream
) -> None:
    with (
        gateway(settings_factory, upstream, unjudgeable="refuse") as url,
        httpx2.Client(base_url=url, headers=USER) as client,
    ):
        for path, body, content_type, part in unjudgeable_calls():
            answer = client.post(path, content=body, headers={"Content-Type": content_type})
            assert answer.status_code == 400, (path, answer.text)
            assert answer.headers["x-should-retry"] == "false"
            refusal = error(answer)
            assert (refusal["code"], refusal["param"], refusal["unjudgeable"]) == ("unjudgeable_input", part, [part])
            assert part in refusal["message"]
        # flagged text beside an unreadable part: refused the same way, no strike (no oracle either)
        beside = {"messages": [{"role": "user", "content": [{"type": "text", "text": FLAG}, AUDIO]}]}
        answer = client.post("/v1/chat/completions", json=beside)
        assert error(answer)["code"] == "unjudgeable_input"
        assert client.get("/admin/users/alice", headers=ADMIN).status_code == 404  # never recorded
        assert client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}).is_success
    assert [request.path for request in upstream.requests] == ["/v1/moderations", "/v1/chat/completions"]


def test_many_unjudgeable_parts_are_named_up_to_ten(settings_factory: SettingsFactory, upstream: MockUpstream) -> None:
    content = [{"type": "input_file", "file_id": f"file-{n}"} for n in range(25)]
    with (
        gateway(settings_factory, upstream, unjudgeable="refuse") as url,
        httpx2.Client(base_url=url, headers=USER) as client,
    ):
        answer = client.post("/v1/responses", json={"input": [{"role": "user", "content": content}]})
    refusal = error(answer)
    assert refusal["unjudgeable"] == [f"input[0].content[{n}]" for n in range(10)]
    assert "and 15 more" in refusal["message"]


def test_headers_that_say_twice_how_to_read_a_judged_body_are_refused(
    settings_factory: SettingsFactory, upstream: MockUpstream
) -> None:
    chat = orjson.dumps({"messages": [{"role": "user", "content": "hi"}]})
    edit, edit_type = form({"prompt": "a hat"}, {"image": ("cat.png", PNG, "image/png")})
    twice = [
        ("/v1/chat/completions", chat, [("Content-Type", "application/json"), ("Content-Type", "text/plain")]),
        ("/v1/images/edits", edit, [("Content-Type", edit_type), ("Content-Type", "application/json")]),
        ("/v1/images/edits", edit, [("Content-Type", edit_type), ("content-encoding", ""), ("Content-Encoding", "br")]),
    ]
    with gateway(settings_factory, upstream) as url, httpx2.Client(base_url=url, headers=USER) as client:
        for path, body, headers in twice:
            answer = client.post(path, content=body, headers=headers)
            assert answer.status_code == 400, (path, headers)
            refusal = error(answer)
            assert refusal["code"] == "invalid_request"
            assert refusal["param"] == headers[-1][0].title()
            assert "once" in refusal["message"]
        # other headers twice are not the gateway's to judge
        accept = [("Content-Type", "application/json"), ("Accept", "a"), ("Accept", "b")]
        assert client.post("/v1/chat/completions", content=chat, headers=accept).status_code == 200
    (forwarded,) = [request for request in upstream.requests if request.path != "/v1/moderations"]
    assert forwarded.headers.getall("Accept") == ["a", "b"]


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "identity, gzip"])
def test_compressed_bodies_are_refused_on_every_judged_route(
    settings_factory: SettingsFactory, upstream: MockUpstream, encoding: str
) -> None:
    edit, edit_type = form({"prompt": "a hat"}, {"image": ("cat.png", PNG, "image/png")})
    speech = orjson.dumps({"input": FLAG, "voice": "alloy"})
    with gateway(settings_factory, upstream) as url, httpx2.Client(base_url=url, headers=USER) as client:
        for path, body, content_type, code in (
            ("/v1/images/edits", edit, edit_type, "invalid_request"),
            ("/v1/audio/speech", speech, "application/json", "invalid_json"),
        ):
            headers = {"Content-Type": content_type, "Content-Encoding": encoding}
            answer = client.post(path, content=gzip.compress(body), headers=headers)
            assert answer.status_code == 400
            assert error(answer)["code"] == code
            assert "uncompressed" in error(answer)["message"]
    assert upstream.requests == []


def test_a_malformed_form_is_refused_with_a_clear_message(
    settings_factory: SettingsFactory, upstream: MockUpstream
) -> None:
    edit, edit_type = form({"prompt": "a hat"}, {"image": ("cat.png", PNG, "image/png")})
    boundary = edit_type.split("boundary=", 1)[1]
    cases = [
        (edit, "multipart/form-data"),  # no boundary
        (edit, f"multipart/form-data; boundary={boundary}; boundary=other"),
        (b"preamble\r\n" + edit, edit_type),
        (edit + b"epilogue: another part?", edit_type),
        (edit[: len(edit) // 2], edit_type),
        (edit.replace(b'name="prompt"', b'name="prompt"; name="image"'), edit_type),
    ]
    with gateway(settings_factory, upstream) as url, httpx2.Client(base_url=url, headers=USER) as client:
        for body, content_type in cases:
            answer = client.post("/v1/images/edits", content=body, headers={"Content-Type": content_type})
            assert answer.status_code == 400, content_type
            assert error(answer)["code"] == "invalid_request"
    assert upstream.requests == []


def test_personal_data_in_a_form_is_refused_where_a_json_body_is_masked(
    settings_factory: SettingsFactory, upstream: MockUpstream
) -> None:
    # GATEWAY_PII=mask rewrites JSON strings byte for byte; a form (or a batch file in one) is not
    # rewritten, so personal data in it is refused instead of forwarded.
    upstream.behaviors["/v1/images/edits"] = "echo"
    edit, edit_type = form({"prompt": "a hat for bob@example.com"}, {"image": ("cat.png", PNG, "image/png")})
    with (
        gateway(settings_factory, upstream, pii="mask") as url,
        httpx2.Client(base_url=url, headers=USER) as client,
    ):
        refused = client.post("/v1/images/edits", content=edit, headers={"Content-Type": edit_type})
        assert refused.status_code == 400
        assert (error(refused)["code"], error(refused)["kinds"]) == ("pii_detected", ["email"])
        assert client.post("/v1/images/edits", json={"prompt": "a hat for bob@example.com"}).status_code == 200
    (forwarded,) = reached(upstream, "/v1/images/edits")
    assert orjson.loads(forwarded.body) == {"prompt": "a hat for [EMAIL]"}
