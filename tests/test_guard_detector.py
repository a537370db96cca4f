"""The `guard` detector against a loopback guard model answering as Llama Guard or Qwen3Guard."""

import hashlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx2
import pytest

from gateway.app import create_app
from gateway.settings import Settings, SettingsError, load_settings
from middleware.detectors import GuardDetector
from middleware.detectors.guard import read_answer
from middleware.protocols import DetectorFailed, InputRefused, JsonPost, UserInput, Verdict
from tests.detector_mocks import MockGuard, serving
from tests.servers import run_app
from tests.upstream import MockUpstream

SettingsFactory = Callable[..., Settings]


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@pytest.fixture
async def guard() -> AsyncIterator[MockGuard]:
    mock = MockGuard()
    async with serving(mock):
        yield mock


def detector(
    post: JsonPost, mock: MockGuard, *, api_key: str | None = "guard-key", timeout: float = 5.0
) -> GuardDetector:
    return GuardDetector(post, mock.base_url, "meta-llama/Llama-Guard-3-8B", api_key, timeout)


async def test_llama_guard_hazard_codes_become_readable_categories(post: JsonPost, guard: MockGuard) -> None:
    verdict = await detector(post, guard).check(UserInput(texts=("a violent and hateful plan",)), None)
    assert verdict == Verdict(
        detector="guard", categories=("violent_crimes", "hate"), text_sha256=sha("a violent and hateful plan")
    )
    headers, payload = guard.calls[0]
    assert headers["Authorization"] == "Bearer guard-key"
    assert payload["model"] == "meta-llama/Llama-Guard-3-8B"
    assert payload["messages"] == [{"role": "user", "content": "a violent and hateful plan"}]
    assert payload["temperature"] == 0


async def test_safe_answer_is_no_verdict_and_is_cached(post: JsonPost, guard: MockGuard) -> None:
    guarded = detector(post, guard, api_key=None)
    assert await guarded.check(UserInput(texts=("hello there",)), "Bearer sk-client") is None
    assert await guarded.check(UserInput(texts=("hello there",)), None) is None
    assert len(guard.calls) == 1
    assert "Authorization" not in guard.calls[0][0]  # the client's key never goes to the guard


async def test_a_flagged_text_is_remembered(post: JsonPost, guard: MockGuard) -> None:
    guarded = detector(post, guard)
    first = await guarded.check(UserInput(texts=("violent words",)), None)
    again = await guarded.check(UserInput(texts=("hi", "violent words")), None)
    assert first == again
    assert len(guard.calls) == 1


async def test_qwen3guard_answers_are_read(post: JsonPost, guard: MockGuard) -> None:
    guard.style = "qwen"
    guarded = detector(post, guard)
    verdict = await guarded.check(UserInput(texts=("something violent",)), None)
    assert verdict is not None
    assert verdict.categories == ("violent",)
    assert await guarded.check(UserInput(texts=("a kind word",)), None) is None


def test_answer_formats() -> None:
    assert read_answer("safe") == (False, ())
    assert read_answer("\n\nunsafe\nS4") == (True, ("child_sexual_exploitation",))
    assert read_answer("unsafe\nS9, S14") == (True, ("indiscriminate_weapons", "code_interpreter_abuse"))
    assert read_answer("unsafe") == (True, ("unspecified",))
    assert read_answer("unsafe\nS99") == (True, ("s99",))
    assert read_answer("Safety: Unsafe\nCategories: Non-violent Illegal Acts, Jailbreak") == (
        True,
        ("non_violent_illegal_acts", "jailbreak"),
    )
    assert read_answer("Safety: Controversial\nCategories: Politically Sensitive Topics") == (False, ())
    assert read_answer("Safety: Safe\nCategories: None\nRefusal: Yes") == (False, ())
    assert read_answer("Sure! Here is how to bake bread.") is None
    assert read_answer("") is None


async def test_an_answer_in_no_known_format_is_a_failure_without_the_answer(post: JsonPost, guard: MockGuard) -> None:
    guard.style = "nonsense"
    with pytest.raises(DetectorFailed) as caught:
        await detector(post, guard).check(UserInput(texts=("hello",)), None)
    assert "no known format" in str(caught.value)
    assert "cannot help" not in str(caught.value)  # a model that is no guard may echo the user's text


@pytest.mark.parametrize("status", [401, 404, 429, 500, 503])
async def test_error_answers_are_outages(post: JsonPost, guard: MockGuard, status: int) -> None:
    guard.status = status
    with pytest.raises(DetectorFailed, match=f"HTTP {status}"):
        await detector(post, guard).check(UserInput(texts=("hello",)), None)


async def test_an_input_past_the_context_length_is_refused(post: JsonPost, guard: MockGuard) -> None:
    guard.status = 400  # vLLM's answer to a prompt longer than the model's context
    with pytest.raises(InputRefused) as caught:
        await detector(post, guard).check(UserInput(texts=("a very long text",)), None)
    assert caught.value.part == "input"


async def test_timeout_is_a_failure(post: JsonPost, guard: MockGuard) -> None:
    guard.delay = 1
    with pytest.raises(DetectorFailed):
        await detector(post, guard, timeout=0.2).check(UserInput(texts=("hello",)), None)


async def test_images_are_not_sent(post: JsonPost, guard: MockGuard) -> None:
    user_input = UserInput(texts=("what is this?",), images=("https://example.com/violent.png",))
    assert await detector(post, guard).check(user_input, None) is None
    assert [payload["messages"][0]["content"] for _, payload in guard.calls] == ["what is this?"]


async def test_many_new_texts_cost_a_bounded_number_of_calls(post: JsonPost, guard: MockGuard) -> None:
    texts = (*tuple(f"text number {index}" for index in range(20)), "the violent one")
    verdict = await detector(post, guard).check(UserInput(texts=texts), None)
    assert verdict is not None
    assert verdict.categories == ("violent_crimes",)
    assert len(guard.calls) == 8
    joined = "\n\n".join(texts[7:])
    assert verdict.text_sha256 == sha(joined)  # blamed on what was sent together


def test_missing_settings_stop_start_up_naming_the_variable() -> None:
    with pytest.raises(SettingsError, match="GATEWAY_GUARD_URL is required when GATEWAY_MODERATION includes guard"):
        load_settings(moderation="guard")
    with pytest.raises(SettingsError, match="GATEWAY_GUARD_MODEL is required"):
        load_settings(moderation="openai,guard", guard_url="http://127.0.0.1:8001/v1")
    with pytest.raises(SettingsError, match="GATEWAY_GUARD_URL: expected an http:// or https:// URL"):
        load_settings(moderation="guard", guard_url="127.0.0.1:8001", guard_model="m")
    with pytest.raises(SettingsError, match="GATEWAY_GUARD_TIMEOUT"):
        load_settings(guard_timeout="0")


async def test_a_flagged_prompt_is_refused_through_the_gateway(
    settings_factory: SettingsFactory, upstream: MockUpstream, guard: MockGuard
) -> None:
    settings = settings_factory(
        upstream_url=upstream.url, moderation="guard", guard_url=guard.base_url, guard_model="llama-guard3:1b"
    )
    with run_app(create_app(settings)) as url:
        async with httpx2.AsyncClient(base_url=url, headers={"X-User-ID": "mallory"}) as client:
            body: Any = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a violent plan"}]}
            refused = await client.post("/v1/chat/completions", json=body)
            body["messages"][0]["content"] = "a kind plan"
            served = await client.post("/v1/chat/completions", json=body)
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "content_policy_violation"
    assert refused.json()["error"]["categories"] == ["violent_crimes"]
    assert served.status_code == 200
    assert [request.path for request in upstream.requests] == ["/v1/chat/completions"]
    assert guard.calls[0][1]["model"] == "llama-guard3:1b"
