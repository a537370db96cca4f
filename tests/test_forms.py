import base64
import logging

import httpx2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from middleware.errors import GatewayError
from middleware.forms import MAX_IMAGE_BYTES, MAX_PARTS, files_form, image_data_url, media_form, read_form
from middleware.protocols import UserInput

BOUNDARY = "b0undary"
FORM = f"multipart/form-data; boundary={BOUNDARY}".encode()
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 16
GIF = b"GIF89a" + b"\x00" * 16
WEBP = b"RIFF\x10\x00\x00\x00WEBPVP8 " + b"\x00" * 8


def part(name: str, value: bytes | str, *headers: str, filename: str | None = None) -> bytes:
    disposition = f'Content-Disposition: form-data; name="{name}"'
    if filename is not None:
        disposition += f'; filename="{filename}"'
    lines = [f"--{BOUNDARY}", disposition, *headers, "", ""]
    data = value.encode() if isinstance(value, str) else value
    return "\r\n".join(lines).encode() + data + b"\r\n"


def form(*parts: bytes) -> bytes:
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def refused(body: bytes, content_type: bytes = FORM) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        read_form(body, content_type)
    assert (caught.value.status, caught.value.code) == (400, "invalid_request")
    return caught.value


def test_reads_the_parts_the_sdk_sends() -> None:
    request = httpx2.Request(
        "POST",
        "http://gateway/v1/images/edits",
        data={"prompt": "add a hat", "n": "2"},
        files=[("image[]", ("a.png", PNG, "image/png")), ("mask", ("m.png", PNG, "image/png"))],
    )
    parts = read_form(request.read(), request.headers["content-type"].encode())
    assert [(part.name, part.is_file) for part in parts] == [
        ("prompt", False),
        ("n", False),
        ("image[]", True),
        ("mask", True),
    ]
    assert parts[0].data == b"add a hat"
    assert parts[2].data == PNG
    png_url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert media_form(parts) == UserInput(texts=("add a hat",), images=(png_url,))


def test_images_are_known_by_their_bytes_not_their_label() -> None:
    for data, kind in ((PNG, "png"), (JPEG, "jpeg"), (GIF, "gif"), (WEBP, "webp")):
        assert image_data_url(data) == f"data:image/{kind};base64," + base64.b64encode(data).decode()
    assert image_data_url(b"%PDF-1.7 ...") is None
    assert image_data_url(b"RIFF\x10\x00\x00\x00WAVEfmt ") is None  # audio in a RIFF
    assert image_data_url(b"") is None
    assert image_data_url(PNG, max_bytes=len(PNG) - 1) is None
    body = form(
        part("image", b"just text", "Content-Type: image/png", filename="fake.png"),
        part("image", GIF, "Content-Type: text/plain", filename="real.txt"),
        part("video", b"\x00\x00\x00\x18ftypmp42", "Content-Type: video/mp4", filename="v.mp4"),
    )
    found = media_form(read_form(body, FORM))
    assert found.images == ("data:image/gif;base64," + base64.b64encode(GIF).decode(),)
    assert found.unjudgeable == ("image", "video")


def test_an_image_over_the_cap_is_unjudgeable_not_sent_to_a_detector() -> None:
    huge = PNG + b"\x00" * MAX_IMAGE_BYTES
    found = media_form(read_form(form(part("prompt", "big"), part("image", huge, filename="a.png")), FORM))
    assert found == UserInput(texts=("big",), unjudgeable=("image",))


def test_every_prompt_is_judged_whatever_its_spelling() -> None:
    body = form(
        part("prompt", "first"),
        part("prompt", "second"),
        part("Prompt", "third"),
        part("prompt[]", "fourth"),
        part("prompt", "as a file", "Content-Type: text/plain; charset=utf-8", filename="p.txt"),
        part("model", "sora-2"),
        part("input_reference[image_url]", "https://example.com/r.png"),
        part("input_reference[file_id]", "file-1"),
    )
    assert media_form(read_form(body, FORM)) == UserInput(
        texts=("first", "second", "third", "fourth", "as a file"),
        images=("https://example.com/r.png",),
        unjudgeable=("input_reference[file_id]",),
    )


def test_an_unknown_upload_is_unjudgeable_and_an_unknown_text_field_is_not_input() -> None:
    body = form(part("extra", b"%PDF", filename="x.pdf"), part("size", "1024x1024"), part("image", "http://e.com/a"))
    assert media_form(read_form(body, FORM)) == UserInput(unjudgeable=("extra", "image"))


@pytest.mark.parametrize(
    ("content_type", "why"),
    [
        (b"multipart/form-data", "exactly one boundary"),
        (b"multipart/form-data; boundary=", "cannot be parsed"),
        (b"multipart/form-data; boundary=a; boundary=b", "exactly one boundary"),
        (b"multipart/form-data; boundary=" + b"x" * 71, "exactly one boundary"),
        (b'multipart/form-data; boundary="ends with space "', "exactly one boundary"),
        (b"multipart/form-data; boundary=b0undary; junk", "cannot be parsed"),
        (b'multipart/form-data; boundary="b0un\\dary"', "backslash"),
    ],
)
def test_a_content_type_read_two_ways_is_refused(content_type: bytes, why: str) -> None:
    assert why in refused(form(part("prompt", "x")), content_type).message


def test_the_boundary_may_be_quoted_or_cased() -> None:
    body = form(part("prompt", "x"))
    for content_type in (f'multipart/form-data; boundary="{BOUNDARY}"', f"Multipart/Form-Data;BOUNDARY={BOUNDARY};"):
        assert read_form(body, content_type.encode())[0].data == b"x"


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"preamble\r\n" + form(part("prompt", "x")), "begin with its boundary"),
        (b"\r\n" + form(part("prompt", "x")), "begin with its boundary"),
        (part("prompt", "x"), "end with its closing boundary"),  # truncated: no close
        (part("prompt", "x")[:-2] + b"--b0undary--", "end with its closing boundary"),  # close not on its own line
        (form(part("prompt", "x")) + b"epilogue", "nothing after it"),
        (form(part("prompt", "x")) + part("prompt", "after the close") + b"--b0undary--", "nothing after it"),
        (form(part("prompt", "x")).replace(b"\r\n", b"\n"), "end with its closing boundary"),
        # a part without headers swallows the close: it is data to the parser
        (
            b"--b0undary\r\nContent-Disposition: form-data; name=prompt\r\n\r\nx\r\n--b0undary\r\n\r\n--b0undary--",
            "before",
        ),
        (b"--b0undaryX\r\n" + form(part("prompt", "x")), "cannot be parsed"),
    ],
)
def test_a_body_read_two_ways_is_refused(body: bytes, why: str) -> None:
    assert why in refused(body).message


@pytest.mark.parametrize(
    ("raw_part", "why"),
    [
        (b"--b0undary\r\nContent-Type: text/plain\r\n\r\nx\r\n", "needs a Content-Disposition"),
        (
            b'--b0undary\r\nContent-Disposition: form-data; name="a"\r\nContent-Disposition: form-data; name="prompt"'
            b"\r\n\r\nx\r\n",
            "two content-disposition headers",
        ),
        (b'--b0undary\r\nContent-Disposition: form-data; name="a"; name="prompt"\r\n\r\nx\r\n', "exactly one plain"),
        (b"--b0undary\r\nContent-Disposition: form-data; name*=utf-8''prompt\r\n\r\nx\r\n", "exactly one plain"),
        (
            b"--b0undary\r\nContent-Disposition: form-data; name=\"a\"; name*=utf-8''prompt\r\n\r\nx\r\n",
            "exactly one plain",
        ),
        (b'--b0undary\r\nContent-Disposition: attachment; name="prompt"\r\n\r\nx\r\n', "exactly one plain"),
        (b"--b0undary\r\nContent-Disposition: form-data\r\n\r\nx\r\n", "exactly one plain"),
        (b'--b0undary\r\nContent-Disposition: form-data; name="pro\\mpt"\r\n\r\nx\r\n', "backslash"),
        (b'--b0undary\r\nContent-Disposition: form-data; name="p%72ompt"\r\n\r\nx\r\n', "holds characters"),
        (b'--b0undary\r\nContent-Disposition: form-data; name="prompt "\r\n\r\nx\r\n', "holds characters"),
        (b'--b0undary\r\nContent-Disposition: form-data; name=""\r\n\r\nx\r\n', "holds characters"),
        (
            b'--b0undary\r\nContent-Disposition: form-data; name="prompt"\r\nContent-Transfer-Encoding: base64'
            b"\r\n\r\neA==\r\n",
            "Transfer-Encoding",
        ),
        (
            b'--b0undary\r\nContent-Disposition: form-data; name="prompt"\r\nContent-Type: multipart/mixed; '
            b"boundary=inner\r\n\r\n--inner--\r\n",
            "Nested",
        ),
        (b'--b0undary\r\nContent-Disposition: form-data; name="prompt"\r\n folded: header\r\n\r\nx\r\n', "parsed"),
        (b'--b0undary\r\nContent-Disposition: form-data; name="prompt"\r\n' + b"X: y\r\n" * 9 + b"\r\nx\r\n", "parsed"),
    ],
)
def test_a_part_read_two_ways_is_refused(raw_part: bytes, why: str) -> None:
    assert why in refused(form(raw_part)).message


def test_a_refused_form_writes_no_log_line(caplog: pytest.LogCaptureFixture) -> None:
    # python-multipart logs a warning for each body it refuses: a client could fill the log
    caplog.set_level(logging.DEBUG)
    for body in (b"--b0undaryX\r\n" + form(part("prompt", "x")), form(b"--b0undary\r\n folded: x\r\n\r\nx\r\n")):
        assert "cannot be parsed" in refused(body).message
    assert caplog.records == []


def test_plain_transfer_encodings_and_filename_forms_are_fine() -> None:
    body = form(
        part("prompt", "x", "Content-Transfer-Encoding: 8bit"),
        b"--b0undary\r\nContent-Disposition: form-data; name=image; filename*=utf-8''%E2%82%AC.png\r\n\r\n"
        + PNG
        + b"\r\n",
    )
    parts = read_form(body, FORM)
    assert [(p.name, p.is_file) for p in parts] == [("prompt", False), ("image", True)]


def test_a_judged_text_the_upstream_could_decode_otherwise_is_refused() -> None:
    with pytest.raises(GatewayError) as caught:
        media_form(
            read_form(form(part("prompt", "x".encode("utf-16"), "Content-Type: text/plain; charset=utf-16")), FORM)
        )
    assert caught.value.param == "prompt"
    with pytest.raises(GatewayError) as caught:
        media_form(read_form(form(part("prompt", b"caf\xe9")), FORM))
    assert "not UTF-8" in caught.value.message
    # only judged fields must be UTF-8: an option may hold any bytes
    assert media_form(read_form(form(part("model", b"\xff")), FORM)) == UserInput()


def test_too_many_parts_are_refused_before_they_cost_much() -> None:
    assert len(read_form(form(*[part("n", "1")] * MAX_PARTS), FORM)) == MAX_PARTS
    assert "more than" in refused(form(*[part("n", "1")] * 100_000)).message


def test_an_empty_form_holds_nothing() -> None:
    assert read_form(b"--b0undary--\r\n", FORM) == []
    assert media_form([]) == UserInput()


def test_a_huge_form_is_read_whole() -> None:
    data = b"\x00" * (24 * 1024 * 1024)
    parts = read_form(form(part("prompt", "p"), part("video", data, filename="v.mp4")), FORM)
    assert parts[1].data == data


def test_a_batch_purpose_in_a_form_reads_the_file() -> None:
    line = b'{"custom_id":"1","method":"POST","url":"/v1/completions","body":{"prompt":"batched"}}\n'
    assert files_form(read_form(form(part("purpose", "batch"), part("file", line, filename="b.jsonl")), FORM)) == (
        UserInput(texts=("batched",))
    )
    # the purpose may come after the file
    assert files_form(read_form(form(part("file", line, filename="b.jsonl"), part("purpose", " BATCH ")), FORM)).texts
    for purpose in ("assistants", "vision", "user_data", "fine-tune"):
        assert files_form(read_form(form(part("purpose", purpose), part("file", line, filename="f")), FORM)) == (
            UserInput()
        )
    with pytest.raises(GatewayError) as caught:
        files_form(read_form(form(part("purpose", "batch"), part("purpose", "vision"), part("file", line)), FORM))
    assert caught.value.param == "purpose"


def test_a_purpose_an_upstream_could_decode_otherwise_is_refused() -> None:
    line = b'{"custom_id":"1","method":"POST","url":"/v1/completions","body":{"prompt":"batched"}}\n'
    batch_file = part("file", line, filename="b.jsonl")
    # "batch" to an upstream honouring the charset; to a UTF-8 reading, not a purpose at all
    utf16 = part("purpose", "batch".encode("utf-16"), "Content-Type: text/plain; charset=utf-16")
    for purpose in (utf16, part("purpose", b"batch\xff")):
        with pytest.raises(GatewayError) as caught:
            files_form(read_form(form(purpose, batch_file), FORM))
        assert (caught.value.status, caught.value.code, caught.value.param) == (400, "invalid_request", "purpose")
    declared = part("purpose", "batch", "Content-Type: text/plain; charset=utf-8")
    assert files_form(read_form(form(declared, batch_file), FORM)).texts == ("batched",)


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_any_bytes_are_read_or_refused_never_raised_otherwise(body: bytes) -> None:
    for candidate in (body, b"--b0undary\r\n" + body, form(part("prompt", "x")) + body, body + b"--b0undary--"):
        status, found = 200, UserInput()
        try:
            found = media_form(read_form(candidate, FORM))
        except GatewayError as exc:
            status = exc.status
        assert status in (200, 400)
        assert all(isinstance(text, str) for text in found.texts)
