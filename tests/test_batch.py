from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from middleware.batch import ENDPOINTS, read_batch
from middleware.errors import GatewayError
from middleware.extract import Collector
from middleware.protocols import UserInput


def line(url: str, body: Any, method: str = "POST", custom_id: str = "r") -> bytes:
    return orjson.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body})


def judged(*lines: bytes, separator: bytes = b"\n") -> UserInput:
    found = Collector()
    read_batch(separator.join(lines), found, "file")
    return found.result()


def refused(data: bytes) -> str:
    with pytest.raises(GatewayError) as caught:
        read_batch(data, Collector(), "file")
    assert (caught.value.status, caught.value.code, caught.value.param) == (400, "invalid_request", "file")
    return caught.value.message


def test_each_request_is_judged_with_its_routes_extractor() -> None:
    found = judged(
        line(
            "/v1/chat/completions",
            {"messages": [{"role": "system", "content": "app"}, {"role": "user", "content": "c"}]},
        ),
        line("/v1/completions", {"prompt": "p", "suffix": "s"}),
        line("/v1/responses", {"input": "r", "instructions": "app"}),
        line("/v1/images/generations", {"prompt": "g"}),
        line("/v1/images/edits", {"prompt": "e", "images": [{"image_url": "https://example.com/i.png"}]}),
        line("/v1/videos", {"prompt": "v"}),
        line("/v1/embeddings", {"input": "embeddings are not judged"}),
        line("/v1/moderations", {"input": "nor moderations"}),
        line("/v1/chat/completions", {"messages": [{"role": "user", "content": "c"}]}),  # once is enough
    )
    assert found == UserInput(texts=("c", "p", "s", "r", "g", "e", "v"), images=("https://example.com/i.png",))


def test_unreadable_parts_are_named_by_line() -> None:
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    found = judged(
        line("/v1/responses", {"input": "fine"}),
        line("/v1/chat/completions", {"messages": [{"role": "user", "content": ["x", audio]}]}),
        line("/v1/completions", {"prompt": [1, 2, 3]}),
    )
    assert found.unjudgeable == ("file:2:messages[0].content[1]", "file:3:prompt")


def test_text_holding_other_line_breaks_is_fine() -> None:
    found = judged(line("/v1/completions", {"prompt": "a\u2028b {x} \u2029c\x85"}))
    assert found.texts == ("a\u2028b {x} \u2029c\x85",)


def test_blank_lines_crlf_and_a_byte_order_mark_are_fine() -> None:
    data = (
        b"\xef\xbb\xbf"
        + line("/v1/completions", {"prompt": "one"})
        + b"\r\n\r\n  \n"
        + line("/v1/completions", {"prompt": "two"})
        + b"\r\n"
    )
    found = Collector()
    read_batch(data, found, "file")
    assert found.result().texts == ("one", "two")
    assert judged(b"") == UserInput()


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\xff\xfe{}", "not UTF-8"),
        (b"not json", "Line 1 of the batch file is not JSON"),
        (line("/v1/completions", {"prompt": "a"}) + b"\n{", "Line 2 of the batch file is not JSON"),
        (line("/v1/completions", {}) + line("/v1/completions", {}), "Line 1 of the batch file is not JSON"),
        (b'{"url": "/v1/completions", "method": "POST", "body": {"prompt": NaN}}', "not JSON"),
        (b'{"url": "/v1/completions", "method": "POST", "body": {"prompt": "\\ud800"}}', "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        # a carriage return is whitespace to JSON: two requests on one line to a reader splitting there
        (line("/v1/embeddings", {}) + b"\r" + line("/v1/completions", {"prompt": "x"}), "not JSON"),
        # outside strings U+2028 is no JSON whitespace: the line is refused, not split
        ('{"url": "/v1/embeddings", "method": "POST", "body": {}}\u2028{}'.encode(), "not JSON"),
        (b'"a string"', "not a JSON object"),
        (
            b'{"url": "/v1/completions", "method": "POST", "body": {"prompt": "judged", "prompt": "run"}}',
            "Line 1 of the batch file holds a key twice",
        ),
        (
            b'{"url": "/v1/embeddings", "url": "/v1/completions", "method": "POST", "body": {"prompt": "x"}}',
            "Line 1 of the batch file holds a key twice",
        ),
        (line("/v1/chat/completions/", {}), "url must be one of"),
        (line("/v1/assistants", {}), "url must be one of"),
        (line("/v1/files", {}), "url must be one of"),
        (b'{"method": "POST", "body": {}}', "url must be one of"),
        (orjson.dumps({"method": "POST", "url": ["/v1/completions"], "body": {}}), "url must be one of"),
        (line("/v1/completions", {"prompt": "x"}, method="GET"), 'method must be "POST"'),
        (line("/v1/completions", {"prompt": "x"}, method="post"), 'method must be "POST"'),
        (orjson.dumps({"url": "/v1/completions", "body": {"prompt": "x"}}), 'method must be "POST"'),
        (line("/v1/completions", "a string body"), "body must be a JSON object"),
        (orjson.dumps({"url": "/v1/completions", "method": "POST"}), "body must be a JSON object"),
    ],
)
def test_a_file_read_two_ways_is_refused_with_its_line(data: bytes, why: str) -> None:
    assert why in refused(data)


def test_duplicate_keys_are_found_however_spelled_and_colons_in_strings_are_not_keys() -> None:
    escaped = b'{"url": "/v1/completions", "method": "POST", "body": {"prompt": "a", "\\u0070rompt": "b"}}'
    assert "Line 1 of the batch file holds a key twice" in refused(escaped)
    colons = line("/v1/completions", {"prompt": "a: b", "suffix": "\u003a:"})
    assert judged(colons).texts == ("a: b", "::")


def test_the_endpoints_are_the_batch_apis() -> None:
    assert set(ENDPOINTS) == {
        "/v1/responses",
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/completions",
        "/v1/moderations",
        "/v1/images/generations",
        "/v1/images/edits",
        "/v1/videos",
    }


@given(st.lists(st.text(min_size=1, max_size=20).filter(str.strip), min_size=1, max_size=30), st.data())
def test_every_users_text_in_a_batch_is_found(texts: list[str], data: st.DataObject) -> None:
    lines = []
    for number, text in enumerate(texts):
        url = data.draw(st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/responses"]))
        bodies: dict[str, dict[str, Any]] = {
            "/v1/chat/completions": {"messages": [{"role": "user", "content": text}]},
            "/v1/completions": {"prompt": text},
            "/v1/responses": {"input": [{"role": "user", "content": text}]},
        }
        body = bodies[url]
        lines.append(line(url, body, custom_id=str(number)))
    separator = data.draw(st.sampled_from([b"\n", b"\r\n", b"\n\n"]))
    assert judged(*lines, separator=separator).texts == tuple(dict.fromkeys(texts))


@given(st.binary(max_size=200))
def test_any_bytes_are_judged_or_refused(data: bytes) -> None:
    found = Collector()
    status = 200
    try:
        read_batch(data, found, "file")
    except GatewayError as exc:
        status = exc.status
    assert status in (200, 400)
    assert all(isinstance(text, str) for text in found.result().texts)
