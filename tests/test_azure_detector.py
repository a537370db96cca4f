"""The `azure` detector against a loopback Azure AI Content Safety `text:analyze`."""

import hashlib
import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx2
import pytest

from gateway.app import create_app
from gateway.settings import Settings, SettingsError, load_settings
from middleware.detectors import AzureDetector
from middleware.detectors.azure import MAX_CALLS, MAX_CHARS, OVERLAP, windows
from middleware.protocols import DetectorFailed, InputRefused, JsonPost, UserInput, Verdict
from tests.detector_mocks import MockAzure, serving
from tests.servers import run_app
from tests.upstream import MockUpstream

SettingsFactory = Callable[..., Settings]


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@pytest.fixture
async def azure() -> AsyncIterator[MockAzure]:
    mock = MockAzure()
    async with serving(mock):
        yield mock


def detector(post: JsonPost, mock: MockAzure, *, key: str = "azure-key", severity: int = 4) -> AzureDetector:
    return AzureDetector(post, mock.base_url, key, severity, 5.0)


async def test_a_category_at_or_above_the_severity_flags(post: JsonPost, azure: MockAzure) -> None:
    verdict = await detector(post, azure).check(UserInput(texts=("hello", "a violent and hateful text")), None)
    assert verdict == Verdict(
        detector="azure",
        categories=("hate", "violence"),
        text_sha256=sha("a violent and hateful text"),
        scores={"hate": 6.0, "violence": 7.0},
    )
    headers, query, payload = azure.calls[-1]
    assert headers["Ocp-Apim-Subscription-Key"] == "azure-key"
    assert query == "api-version=2024-09-01"
    assert payload == {
        "text": "a violent and hateful text",
        "categories": ["Hate", "SelfHarm", "Sexual", "Violence"],
        "outputType": "EightSeverityLevels",
    }


async def test_below_the_severity_is_clean_and_the_threshold_is_the_operators(post: JsonPost, azure: MockAzure) -> None:
    mild = UserInput(texts=("some mild violence",))
    assert await detector(post, azure).check(mild, None) is None
    verdict = await detector(post, azure, severity=2).check(mild, None)
    assert verdict is not None
    assert verdict.categories == ("violence",)


async def test_verdicts_are_cached_per_text(post: JsonPost, azure: MockAzure) -> None:
    azured = detector(post, azure)
    assert await azured.check(UserInput(texts=("hello",)), None) is None
    flagged = await azured.check(UserInput(texts=("hello", "violent")), None)
    again = await azured.check(UserInput(texts=("violent",)), None)
    assert flagged == again
    assert [payload["text"] for _, _, payload in azure.calls] == ["hello", "violent"]


async def test_a_long_text_is_judged_in_overlapping_windows(post: JsonPost, azure: MockAzure) -> None:
    text = "calm words " * 2_000 + "a violent end"  # 22,013 characters: past one call's limit
    verdict = await detector(post, azure).check(UserInput(texts=(text,)), None)
    assert verdict is not None
    assert verdict.text_sha256 == sha(text)
    sent = [payload["text"] for _, _, payload in azure.calls]
    assert len(sent) == 3
    assert all(len(window) <= MAX_CHARS for window in sent)


def test_windows_cover_the_text_and_overlap() -> None:
    text = "".join(chr(65 + index % 26) for index in range(25_000))
    parts = list(windows(text))
    assert parts[0] == text[:MAX_CHARS]
    assert parts[-1].endswith(text[-OVERLAP:])
    for before, after in itertools.pairwise(parts):
        assert before[-OVERLAP:] == after[:OVERLAP]
    astral = "😀" * 6_000  # 12,000 UTF-16 units
    assert all(len(part.encode("utf-16-le")) // 2 <= MAX_CHARS for part in windows(astral))
    assert list(windows("short")) == ["short"]


async def test_a_phrase_cut_by_a_window_edge_is_whole_in_the_next(post: JsonPost, azure: MockAzure) -> None:
    text = "x" * (MAX_CHARS - 4) + " violent " + "y" * 5_000
    verdict = await detector(post, azure).check(UserInput(texts=(text,)), None)
    assert verdict is not None


async def test_too_much_new_text_is_refused_without_a_call(post: JsonPost, azure: MockAzure) -> None:
    text = "z" * ((MAX_CALLS + 1) * MAX_CHARS)
    with pytest.raises(InputRefused, match="at most 320,000 new characters"):
        await detector(post, azure).check(UserInput(texts=(text,)), None)
    assert azure.calls == []


async def test_rate_limit_is_an_outage(post: JsonPost, azure: MockAzure) -> None:
    azure.rate_limited = True
    with pytest.raises(DetectorFailed, match="HTTP 429: Rate limit is exceeded"):
        await detector(post, azure).check(UserInput(texts=("hello",)), None)


async def test_a_wrong_key_is_an_outage(post: JsonPost, azure: MockAzure) -> None:
    with pytest.raises(DetectorFailed, match="HTTP 401: Access denied"):
        await detector(post, azure, key="wrong").check(UserInput(texts=("hello",)), None)


async def test_images_alone_cost_no_call(post: JsonPost, azure: MockAzure) -> None:
    assert await detector(post, azure).check(UserInput(images=("https://example.com/a.png",)), None) is None
    assert azure.calls == []


def test_missing_settings_stop_start_up_naming_the_variable() -> None:
    with pytest.raises(SettingsError, match="GATEWAY_AZURE_CONTENT_SAFETY_URL is required"):
        load_settings(moderation="azure")
    with pytest.raises(SettingsError, match="GATEWAY_AZURE_CONTENT_SAFETY_KEY is required"):
        load_settings(moderation="azure", azure_content_safety_url="https://cs.cognitiveservices.azure.com")
    with pytest.raises(SettingsError, match="GATEWAY_AZURE_SEVERITY"):
        load_settings(azure_severity="8")
    with pytest.raises(SettingsError, match="GATEWAY_AZURE_SEVERITY"):
        load_settings(azure_severity="high")


async def test_a_flagged_prompt_is_refused_through_the_gateway(
    settings_factory: SettingsFactory, upstream: MockUpstream, azure: MockAzure
) -> None:
    settings = settings_factory(
        upstream_url=upstream.url,
        moderation="azure",
        azure_content_safety_url=azure.base_url,
        azure_content_safety_key="azure-key",
    )
    with run_app(create_app(settings)) as url:
        async with httpx2.AsyncClient(base_url=url, headers={"X-User-ID": "mallory"}) as client:
            body: Any = {"model": "gpt-4o-mini", "input": "a hateful rant"}
            refused = await client.post("/v1/responses", json=body)
            body["input"] = "a kind word"
            served = await client.post("/v1/responses", json=body)
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "content_policy_violation"
    assert refused.json()["error"]["categories"] == ["hate"]
    assert served.status_code == 200
    assert [request.path for request in upstream.requests] == ["/v1/responses"]
