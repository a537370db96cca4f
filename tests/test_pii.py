"""GATEWAY_PII: personal data and secrets found, masked in the forwarded body byte for byte, or refused."""

import json
import re
from collections.abc import Callable
from typing import Any

import httpx2
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.app import create_app
from gateway.settings import Settings, SettingsError, load_settings
from middleware import extract
from middleware.detectors import pii
from middleware.errors import Refused
from middleware.masking import PiiScreen
from middleware.protocols import UserInput
from tests.servers import run_app
from tests.upstream import MockUpstream

SettingsFactory = Callable[..., Settings]

SAMPLES = {
    "email": ["alice.smith+news@example.co.uk", "bob@mail.example.org"],
    "phone": ["+44 20 7946 0958", "(415) 555-0132", "415-555-0132", "+1 415 555 0132", "020 7946 0958"],
    "card": ["4111 1111 1111 1111", "5500-0000-0000-0004", "378282246310005"],
    "iban": ["DE89 3704 0044 0532 0130 00", "GB82WEST12345698765432"],
    "secret": [
        "sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv",
        "AKIAIOSFODNN7EXAMPLE",
        "ghp_" + "a1B2" * 9,
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----",
    ],
}


@pytest.mark.parametrize(
    ("kind", "sample"), [(kind, sample) for kind, samples in SAMPLES.items() for sample in samples]
)
def test_each_kind_is_found_and_masked(kind: str, sample: str) -> None:
    text = f"Please use {sample} for this."
    assert [(found.kind, text[found.start : found.end]) for found in pii.find(text)] == [(kind, sample)]
    assert pii.mask(text) == f"Please use {pii.PLACEHOLDERS[kind]} for this."


@pytest.mark.parametrize(
    "text",
    [
        "order 4111 1111 1111 1112 shipped",  # 16 digits failing the Luhn check
        "invoice 1234567890123456",
        "DE89 3704 0044 0532 0130 01 is no IBAN",  # checksum off by one
        "released 2024-01-15 at 12:30, version 1.2.3",
        "pi is 3.14159265358979",
        "a risk-averse plan",  # sk- inside a word
        "user@localhost is not an address",
        "call me at 5550132",
    ],
)
def test_look_alikes_pass(text: str) -> None:
    assert pii.find(text) == []


def test_checksums() -> None:
    assert pii.luhn("4111111111111111")
    assert not pii.luhn("4111111111111112")
    assert pii.iban_valid("DE89370400440532013000")
    assert not pii.iban_valid("DE89370400440532013001")
    assert not pii.iban_valid("DE8937040044053201300")  # a German IBAN has 22 characters


def test_hostile_texts_take_linear_work() -> None:
    # each would take quadratic or worse work with an unanchored pattern; here they finish at once
    for text in ("a" * 200_000 + "@", "@" * 200_000, "1 " * 100_000, "-----BEGIN PRIVATE KEY-----" * 5_000):
        pii.find(text)


def test_block_refuses_naming_the_kinds() -> None:
    screen = PiiScreen("block")
    user_input = UserInput(texts=("mail me at bob@mail.example.org or 415-555-0132",))
    with pytest.raises(Refused) as caught:
        screen.apply(b"{}", user_input, lambda request: user_input)
    error = caught.value.error
    assert (error.status, error.code, error.extra["kinds"]) == (400, "pii_detected", ["email", "phone"])
    assert "bob@" not in error.message


def chat_screen(body: bytes) -> tuple[bytes, UserInput]:
    user_input = extract.chat(orjson.loads(body))
    return PiiScreen("mask").apply(body, user_input, extract.chat)


def test_mask_changes_only_the_pieces_inside_the_users_strings() -> None:
    body = (
        b'{"model": "gpt-4o-mini",\n "messages": [{"role": "system", "content": "Card 4111 1111 1111 1111 demo"},'
        b' {"role": "user", "content": "My card is 4111 1111 1111 1111, caf\\u00e9 \xc3\xa9"},'
        b' {"role": "user", "content": [{"type": "text", "text": "mail alice.smith+news@example.co.uk"}]}],'
        b' "temperature": 1.50, "n": 12345678901234567890}'
    )
    masked, user_input = chat_screen(body)
    assert masked == (
        b'{"model": "gpt-4o-mini",\n "messages": [{"role": "system", "content": "Card 4111 1111 1111 1111 demo"},'
        b' {"role": "user", "content": "My card is [CARD], caf\xc3\xa9 \xc3\xa9"},'
        b' {"role": "user", "content": [{"type": "text", "text": "mail [EMAIL]"}]}],'
        b' "temperature": 1.50, "n": 12345678901234567890}'
    )
    assert user_input.texts == ("My card is [CARD], café é", "mail [EMAIL]")


def test_the_applications_copy_of_the_users_words_is_left_alone() -> None:
    words = "reach me at bob@mail.example.org"
    body = orjson.dumps(
        {
            "messages": [
                {"role": "system", "content": words},
                {"role": "user", "content": words},
                {"role": "assistant", "content": words},
                {"role": "user", "content": words},
            ]
        }
    )
    masked, _ = chat_screen(body)
    contents = [message["content"] for message in orjson.loads(masked)["messages"]]
    assert contents == [words, "reach me at [EMAIL]", words, "reach me at [EMAIL]"]


def test_a_body_without_personal_data_is_the_same_object() -> None:
    body = b'{"messages": [{"role": "user", "content": "hello"}]}'
    assert chat_screen(body)[0] is body


# Text pieces the property tests build strings from: personal data, near misses, JSON's hard characters.
PIECES = st.sampled_from(
    [sample for samples in SAMPLES.values() for sample in samples]
    + ["hello", " ", "\n", '"', "\\", "é", "😀", "\u2028", "4111 1111", "@", "sk-", "+44", "\x00", "DE89"]
)
TEXTS = st.lists(PIECES, max_size=6).map("".join)
ROLES = st.sampled_from(["system", "developer", "user", "assistant", "tool"])
CONTENT = st.one_of(TEXTS, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXTS}), max_size=3))
MESSAGES = st.lists(st.fixed_dictionaries({"role": ROLES, "content": CONTENT}), min_size=1, max_size=5)


def dumped(value: Any, style: int) -> bytes:
    """JSON written as different clients write it: compact, spaced, indented, ASCII-escaped."""
    if style == 0:
        return orjson.dumps(value)
    if style == 1:
        return json.dumps(value, ensure_ascii=True).encode()
    return json.dumps(value, ensure_ascii=False, indent=2).encode("utf-8")


_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=MESSAGES, style=st.integers(0, 2))
def test_masking_keeps_the_shape_and_the_applications_content(messages: list[dict[str, Any]], style: int) -> None:
    request = {"model": "gpt-4o-mini", "messages": messages, "temperature": 0.5}
    body = dumped(request, style)
    masked, user_input = chat_screen(body)
    result = orjson.loads(masked)

    def expected(message: dict[str, Any]) -> dict[str, Any]:
        if message["role"] != "user":
            return message
        content = message["content"]
        if isinstance(content, str):
            return {**message, "content": pii.mask(content)}
        return {**message, "content": [{**part, "text": pii.mask(part["text"])} for part in content]}

    assert result == {**request, "messages": [expected(message) for message in messages]}
    # every byte outside the string tokens, and every string token not rewritten, is as sent
    assert _TOKEN.sub(b'""', masked) == _TOKEN.sub(b'""', body)
    assert user_input == extract.chat(result)


@settings(max_examples=300, deadline=None)
@given(text=TEXTS)
def test_a_masked_text_holds_no_personal_data(text: str) -> None:
    assert pii.find(pii.mask(text)) == []


def test_settings() -> None:
    assert load_settings(pii="MASK").pii == "mask"
    with pytest.raises(SettingsError, match="GATEWAY_PII: Input should be 'off', 'mask' or 'block'"):
        load_settings(pii="redact")
    with pytest.raises(SettingsError, match="GATEWAY_MODERATION: pii is not listed here: set GATEWAY_PII"):
        load_settings(moderation="openai,pii")


async def test_mask_through_the_gateway(settings_factory: SettingsFactory, upstream: MockUpstream) -> None:
    settings = settings_factory(upstream_url=upstream.url, moderation="openai", pii="mask")
    body = (
        b'{"model":"gpt-4o-mini","messages":[{"role":"system","content":"support for bob@mail.example.org"},'
        b'{"role":"user","content":"I am bob@mail.example.org, card 4111 1111 1111 1111"}]}'
    )
    with run_app(create_app(settings)) as url:
        async with httpx2.AsyncClient(base_url=url, headers={"X-User-ID": "bob"}) as client:
            answer = await client.post(
                "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
            )
    assert answer.status_code == 200
    moderation, forwarded = upstream.requests
    assert orjson.loads(moderation.body)["input"] == ["I am [EMAIL], card [CARD]"]  # the detector saw it masked
    assert forwarded.body == body.replace(
        b"I am bob@mail.example.org, card 4111 1111 1111 1111", b"I am [EMAIL], card [CARD]"
    )
    assert forwarded.headers["content-length"] == str(len(forwarded.body))


async def test_block_through_the_gateway(settings_factory: SettingsFactory, upstream: MockUpstream) -> None:
    settings = settings_factory(upstream_url=upstream.url, moderation="openai", pii="block")
    request = {"model": "gpt-4o-mini", "input": "my key is AKIAIOSFODNN7EXAMPLE"}
    with run_app(create_app(settings)) as url:
        async with httpx2.AsyncClient(base_url=url, headers={"X-User-ID": "bob"}) as client:
            refused = await client.post("/v1/responses", json=request)
            standing = await client.get("/admin/users/bob", headers={"Authorization": "Bearer admin-secret"})
    assert refused.status_code == 400
    assert refused.headers["x-should-retry"] == "false"
    error = refused.json()["error"]
    assert (error["code"], error["kinds"], error["param"]) == ("pii_detected", ["secret"], "input")
    assert upstream.requests == []  # neither judged nor forwarded
    assert standing.status_code == 404  # no strike: the user was never recorded
