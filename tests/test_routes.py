from typing import Any

import httpx2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from middleware.errors import GatewayError
from middleware.protocols import UserInput
from middleware.routes import ROUTES, Route, match, segments, unjudgeable_error

# every route that sends user text to a model, as a client spells it (ids made up)
JUDGED = {
    "/chat/completions": "chat/completions",
    "/completions": "completions",
    "/responses": "responses",
    "/responses/compact": "responses/compact",
    "/conversations": "conversations",
    "/conversations/conv_68a1/items": "conversations/{id}/items",
    "/images/generations": "images/generations",
    "/images/edits": "images/edits",
    "/images/variations": "images/variations",
    "/videos": "videos",
    "/videos/edits": "videos/edits",
    "/videos/extensions": "videos/extensions",
    "/videos/video_68a1/remix": "videos/{id}/remix",
    "/audio/speech": "audio/speech",
    "/threads": "threads",
    "/threads/runs": "threads/runs",
    "/threads/thread_abc/messages": "threads/{id}/messages",
    "/threads/thread_abc/runs": "threads/{id}/runs",
    "/uploads": "uploads",
    "/files": "files",
}
NOT_JUDGED = [
    "/embeddings",
    "/moderations",
    "/responses/input_tokens",
    "/responses/resp_1/cancel",
    "/audio/transcriptions",
    "/audio/translations",
    "/chat/completions/chatcmpl_1",
    "/files/file-1",
    "/uploads/upload_1/parts",
    "/threads/thread_abc",
    "/threads/thread_abc/runs/run_1/submit_tool_outputs",
    "/conversations/conv_1",
    "/videos/characters",
    "/batches",
    "/models",
    "/chat",
    "/",
    "",
]


def test_every_judged_route_matches_and_nothing_else() -> None:
    assert {route.name for route in ROUTES} == set(JUDGED.values())
    for path, name in JUDGED.items():
        route = match("POST", path)
        assert route is not None, path
        assert route.name == name
    for path in NOT_JUDGED:
        assert match("POST", path) is None, path


def test_only_posts_are_judged() -> None:
    for method in ("GET", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"):
        assert match(method, "/chat/completions") is None
    # methods are case-sensitive on the wire, but a lax server may not care
    route = match("post", "/chat/completions")
    assert route is not None
    assert route.name == "chat/completions"


@pytest.mark.parametrize(
    "path",
    [
        "/Chat/Completions",
        "//chat//completions//",
        "chat/completions",
        "/chat/completions;x=1",
        "/chat;v=2/completions",
        "/chat/completions\x00",
        "/chat/completions ",
        "/chat/completions\t",
        "/chat/completions.json",
        "/chat/completions/;x",
        "/chat/completions\u00a0",
    ],
)
def test_suffixes_and_spellings_still_reach_the_judge(path: str) -> None:
    route = match("POST", path)
    assert route is not None
    assert route.name == "chat/completions"


def test_a_path_read_two_ways_is_judged_both_ways() -> None:
    # `;x` drops to threads/runs for one reader and is a thread id for another
    route = match("POST", "/threads/;x/runs")
    assert route is not None
    body = {
        "thread": {"messages": [{"role": "user", "content": "new thread"}]},
        "additional_messages": [{"role": "user", "content": "added"}],
    }
    assert route.extract(body).texts == ("new thread", "added")
    # an id a lax upstream might trim still counts as an id
    trimmed = match("POST", "/threads/ thread_1/messages")
    assert trimmed is not None
    assert trimmed.name == "threads/{id}/messages"


def test_canonical_segments() -> None:
    assert segments("/Realtime//Client_Secrets/") == ("realtime", "client_secrets")
    assert segments("/a;b/c d/é") == ("a", "c")
    assert segments("/a/;b/c", keep_empty=True) == ("a", "", "c")
    assert segments("") == ()


# what cannot continue a route's name: anything but a letter, digit, _ or - (once lower-cased)
junk = st.text(min_size=1, max_size=6).filter(
    lambda text: text.lower()[0] not in "abcdefghijklmnopqrstuvwxyz0123456789_-/"
)


@given(st.sampled_from(sorted(JUDGED)), junk, st.data())
def test_junk_after_any_segment_never_hides_a_judged_route(path: str, suffix: str, data: st.DataObject) -> None:
    parts = path.split("/")
    at = data.draw(st.integers(1, len(parts) - 1))
    parts[at] += suffix.replace("/", "")
    route = match("POST", "/".join(parts))
    assert route is not None
    assert route.name == JUDGED[path]


@given(st.text(max_size=40), st.sampled_from(["POST", "GET", "post"]))
def test_match_never_raises(path: str, method: str) -> None:
    route = match(method, path)
    assert route is None or isinstance(route, Route)


def test_how_a_body_is_read_follows_its_content_type() -> None:
    form = b"multipart/form-data; boundary=xyz"
    edits = match("POST", "/images/edits")
    chat = match("POST", "/chat/completions")
    files = match("POST", "/files")
    assert edits is not None
    assert chat is not None
    assert files is not None
    assert edits.reads(form) == "multipart"
    assert edits.reads(b"Multipart/Form-Data ; boundary=xyz") == "multipart"
    assert edits.reads(b"application/json") == "json"
    assert edits.reads(None) == "json"
    # a JSON route reads JSON whatever the client declares: a form there is not a JSON object
    assert chat.reads(form) == "json"
    assert files.reads(form) == "multipart"
    for declared in (b"application/json", b"application/x-www-form-urlencoded", None):
        with pytest.raises(GatewayError) as refused:
            files.reads(declared)
        assert (refused.value.status, refused.value.code) == (400, "invalid_request")
        assert "multipart/form-data" in refused.value.message
    with pytest.raises(GatewayError):
        chat.extract_form(b"", form)
    assert files.extract({"purpose": "batch"}) == UserInput()


def test_a_route_reads_the_form_the_openai_sdk_sends() -> None:
    request = httpx2.Request(
        "POST",
        "http://gateway/v1/videos/video_1/remix",
        data={"prompt": "now at night", "model": "sora-2"},
        files={"input_reference": ("r.txt", b"not an image", "image/png")},
    )
    body = request.read()
    content_type = request.headers["content-type"].encode()
    route = match("POST", "/videos/video_1/remix")
    assert route is not None
    assert route.reads(content_type) == "multipart"
    assert route.extract_form(body, content_type) == UserInput(
        texts=("now at night",), unjudgeable=("input_reference",)
    )
    assert route.extract({"prompt": "as JSON"}) == UserInput(texts=("as JSON",))


def test_a_route_reads_a_body_by_its_headers_and_refuses_what_it_cannot_read() -> None:
    edits, files = match("POST", "/images/edits"), match("POST", "/files")
    assert edits is not None
    assert files is not None
    request = httpx2.Request("POST", "http://gateway/", data={"prompt": "a hat"}, files={"image": ("a", b"x", "b")})
    form = {b"content-type": request.headers["content-type"].encode()}
    assert edits.read(request.read(), form, edits.reading(form)) == (
        None,
        UserInput(texts=("a hat",), unjudgeable=("image",)),
    )
    assert edits.read(b'{"prompt": "a hat"}', {}, edits.reading({})) == (
        {"prompt": "a hat"},
        UserInput(texts=("a hat",)),
    )
    refusals = [
        (edits, {**form, b"content-encoding": b"gzip"}, "invalid_request"),  # before a byte is held
        (edits, {b"content-encoding": b"br"}, "invalid_json"),
        (files, {}, "invalid_request"),  # a form-only route's body is never read as JSON
        (files, {b"content-type": b"application/json"}, "invalid_request"),
    ]
    for route, headers, code in refusals:
        with pytest.raises(GatewayError) as refused:
            route.read(b'{"purpose": "batch"}', headers, route.reading(headers))
        assert (refused.value.status, refused.value.code) == (400, code)
    with pytest.raises(GatewayError, match="uncompressed"):
        edits.reading({**form, b"content-encoding": b"gzip"})
    assert edits.reading({b"content-encoding": b"gzip"}) == "json"  # refused as it is parsed


def test_the_unjudgeable_refusal_names_the_parts() -> None:
    error = unjudgeable_error(UserInput(unjudgeable=("messages[0].content[1]", "purpose")))
    assert (error.status, error.code, error.param) == (400, "unjudgeable_input", "messages[0].content[1]")
    assert "messages[0].content[1], purpose" in error.message
    assert error.extra["unjudgeable"] == ["messages[0].content[1]", "purpose"]
    assert (b"x-should-retry", b"false") in error.response_headers()
    many = unjudgeable_error(UserInput(unjudgeable=tuple(f"file:{n}:input[0]" for n in range(1, 1001))))
    assert "and 990 more" in many.message
    assert len(many.extra["unjudgeable"]) == 10
    assert len(many.body()) < 2000


def test_every_route_extracts_from_hostile_json_without_raising() -> None:
    values: list[Any] = [None, 1, "x", [], {}, {"prompt": {"a": []}}, {"messages": "x"}, {"items": [None, [], 1]}]
    for route in ROUTES:
        for value in values:
            found = route.extract(value)
            assert isinstance(found, UserInput)
