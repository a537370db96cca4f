"""The `openai` detector against a loopback /moderations, and its verdict cache."""

import asyncio
import hashlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx2
import openai
import orjson
import pytest
from aiohttp import web

from gateway.app import create_app
from gateway.settings import Settings
from middleware.detectors import MAX_IMAGES, OpenAIDetector, VerdictCache
from middleware.protocols import DetectorFailed, InputRefused, JsonPost, UserInput, Verdict
from tests.servers import run_app
from tests.upstream import MockUpstream


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


Answer = Callable[[web.Request, Any], Awaitable[web.StreamResponse]]


@dataclass
class MockModeration:
    """A loopback /moderations: flags texts containing "violent" and image URLs containing "bad".

    Like OpenAI's, it refuses with 400 more than one image in a call, and an image URL it cannot
    fetch (here: one containing "unfetchable").
    """

    base_url: str = ""
    calls: list[tuple[Mapping[str, str], Any]] = field(default_factory=list)
    answer: Answer | None = None
    release: asyncio.Event = field(default_factory=asyncio.Event)  # set at teardown: frees slow answers


def score(text: str) -> dict[str, Any]:
    violent = "violent" in text or "bad" in text
    return {
        "flagged": violent,
        "categories": {"violence": violent, "harassment": False, "self-harm": False},
        "category_scores": {"violence": 0.91 if violent else 0.02, "harassment": 0.6, "self-harm": 0.001},
    }


async def default_answer(request: web.Request, payload: Any) -> web.StreamResponse:
    sent = payload["input"]
    if all(isinstance(item, str) for item in sent):
        results = [score(text) for text in sent]
    else:  # multimodal: one result for the whole input, as the real endpoint does
        urls = [item["image_url"]["url"] for item in sent if item.get("type") == "image_url"]
        if len(urls) > 1:
            return refusal(f"Number of images ({len(urls)}) exceeds maximum of 1", "input", "too_many_images")
        if urls and "unfetchable" in urls[0]:
            return refusal(f"Failed to download image from {urls[0]}.", None, "invalid_image_url")
        joined = " ".join(item.get("text") or item.get("image_url", {}).get("url", "") for item in sent)
        results = [score(joined)]
    return web.json_response({"id": "modr-1", "model": payload["model"], "results": results})


def refusal(message: str, param: str | None, code: str | None, status: int = 400) -> web.Response:
    """An error answer in OpenAI's shape."""
    error = {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    return web.json_response({"error": error}, status=status)


@pytest.fixture
async def moderation() -> AsyncIterator[MockModeration]:
    mock = MockModeration()

    async def handle(request: web.Request) -> web.StreamResponse:
        payload = await request.json()
        mock.calls.append((dict(request.headers), payload))
        return await (mock.answer or default_answer)(request, payload)

    app = web.Application()
    app.router.add_post("/v1/moderations", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    mock.base_url = f"http://127.0.0.1:{port}/v1"
    yield mock
    mock.release.set()
    await runner.cleanup()


def detector(
    post: JsonPost,
    mock: MockModeration,
    *,
    api_key: str | None = None,
    thresholds: Mapping[str, float] | None = None,
    timeout: float = 5.0,
) -> OpenAIDetector:
    return OpenAIDetector(post, mock.base_url, api_key, thresholds or {}, timeout)


async def test_flagged_result_gives_its_true_categories(post: JsonPost, moderation: MockModeration) -> None:
    openai = detector(post, moderation)
    verdict = await openai.check(UserInput(texts=("hello", "something violent")), None)
    assert verdict == Verdict(detector="openai", categories=("violence",), text_sha256=sha("something violent"))
    headers, payload = moderation.calls[0]
    assert payload == {"model": "omni-moderation-latest", "input": ["hello", "something violent"]}
    assert headers["Content-Type"] == "application/json"


async def test_clean_input_is_no_verdict(post: JsonPost, moderation: MockModeration) -> None:
    assert await detector(post, moderation).check(UserInput(texts=("hello",)), None) is None


async def test_gateway_key_wins_over_the_client_authorization(post: JsonPost, moderation: MockModeration) -> None:
    await detector(post, moderation, api_key="sk-gateway").check(UserInput(texts=("a",)), "Bearer sk-client")
    await detector(post, moderation).check(UserInput(texts=("b",)), "Bearer sk-client")
    await detector(post, moderation).check(UserInput(texts=("c",)), None)
    assert moderation.calls[0][0]["Authorization"] == "Bearer sk-gateway"
    assert moderation.calls[1][0]["Authorization"] == "Bearer sk-client"
    assert "Authorization" not in moderation.calls[2][0]


async def test_thresholds_flag_on_scores_and_report_the_crossed_ones(
    post: JsonPost, moderation: MockModeration
) -> None:
    # harassment scores 0.6 in every answer, with flagged false
    strict = detector(post, moderation, thresholds={"harassment": 0.5})
    verdict = await strict.check(UserInput(texts=("calm words",)), None)
    assert verdict is not None
    assert verdict.categories == ("harassment",)
    assert verdict.scores == {"harassment": 0.6}

    # no threshold for violence and no "*": its boolean still counts, without a score
    both = await detector(post, moderation, thresholds={"harassment": 0.5}).check(UserInput(texts=("violent",)), None)
    assert both is not None
    assert set(both.categories) == {"violence", "harassment"}
    assert both.scores == {"harassment": 0.6}

    lenient = detector(post, moderation, thresholds={"violence": 0.95, "*": 0.7})
    assert await lenient.check(UserInput(texts=("very violent",)), None) is None

    star = detector(post, moderation, thresholds={"*": 0.5})
    crossed = await star.check(UserInput(texts=("violent again",)), None)
    assert crossed is not None
    assert crossed.scores == {"violence": 0.91, "harassment": 0.6}


async def test_images_go_as_one_multimodal_input(post: JsonPost, moderation: MockModeration) -> None:
    openai = detector(post, moderation)
    user_input = UserInput(texts=("what is this?",), images=("https://example.com/bad.png",))
    verdict = await openai.check(user_input, None)
    sent = [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/bad.png"}},
    ]
    assert moderation.calls[0][1]["input"] == sent
    assert verdict is not None
    assert verdict.categories == ("violence",)
    # one result for two inputs: the hash is of what was sent, and nothing is cached
    assert verdict.text_sha256 == hashlib.sha256(orjson.dumps(sent)).hexdigest()
    assert len(openai.cache) == 0


async def test_clean_multimodal_input_is_cached_as_clean(post: JsonPost, moderation: MockModeration) -> None:
    openai = detector(post, moderation)
    user_input = UserInput(texts=("a cat",), images=("https://example.com/cat.png",))
    assert await openai.check(user_input, None) is None
    assert await openai.check(user_input, None) is None
    assert len(moderation.calls) == 1


async def test_cache_sends_only_new_texts(post: JsonPost, moderation: MockModeration) -> None:
    openai = detector(post, moderation)
    assert await openai.check(UserInput(texts=("turn one",)), None) is None
    assert await openai.check(UserInput(texts=("turn one", "turn two")), None) is None
    assert [payload["input"] for _, payload in moderation.calls] == [["turn one"], ["turn two"]]
    assert await openai.check(UserInput(texts=("turn one", "turn two")), None) is None
    assert len(moderation.calls) == 2


async def test_cache_remembers_a_flagged_text(post: JsonPost, moderation: MockModeration) -> None:
    openai = detector(post, moderation)
    first = await openai.check(UserInput(texts=("violent words",)), None)
    again = await openai.check(UserInput(texts=("hello", "violent words")), None)
    assert first is not None
    assert again == first
    assert len(moderation.calls) == 1


def test_verdict_cache_is_bounded_lru() -> None:
    cache = VerdictCache("test", size=2)
    cache.put("a", None)
    cache.put("b", None)
    assert cache.get("a") == (True, None)  # a is now the most recent
    cache.put("c", None)
    assert cache.get("b") == (False, None)
    assert cache.get("a") == (True, None)
    assert len(cache) == 2


async def test_non_2xx_is_a_failure_with_the_upstream_message(post: JsonPost, moderation: MockModeration) -> None:
    async def unauthorized(request: web.Request, payload: Any) -> web.StreamResponse:
        return web.json_response({"error": {"message": "Incorrect API key provided"}}, status=401)

    moderation.answer = unauthorized
    with pytest.raises(DetectorFailed, match="answered HTTP 401: Incorrect API key provided"):
        await detector(post, moderation).check(UserInput(texts=("x",)), None)


@pytest.mark.parametrize("body", [b"not json", b'{"results": []}', b'{"results": "x"}', b"[1, 2]", b'{"results": [1]}'])
async def test_garbage_answers_are_failures(post: JsonPost, moderation: MockModeration, body: bytes) -> None:
    async def garbage(request: web.Request, payload: Any) -> web.StreamResponse:
        return web.Response(body=body, content_type="application/json")

    moderation.answer = garbage
    openai = detector(post, moderation)
    with pytest.raises(DetectorFailed, match="moderation endpoint"):
        await openai.check(UserInput(texts=("x",)), None)
    assert len(openai.cache) == 0


async def test_timeout_is_a_failure(post: JsonPost, moderation: MockModeration) -> None:
    async def slow(request: web.Request, payload: Any) -> web.StreamResponse:
        await asyncio.wait_for(moderation.release.wait(), 10)
        return web.json_response({})

    moderation.answer = slow
    with pytest.raises(DetectorFailed):
        await detector(post, moderation, timeout=0.2).check(UserInput(texts=("x",)), None)


async def test_connection_refused_is_a_failure(post: JsonPost) -> None:
    with socket.socket() as probe:  # a loopback port that was free a moment ago: nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    closed = OpenAIDetector(post, f"http://127.0.0.1:{port}/v1", None, {}, 2)
    with pytest.raises(DetectorFailed):
        await closed.check(UserInput(texts=("x",)), None)


async def test_empty_input_calls_nothing(post: JsonPost, moderation: MockModeration) -> None:
    assert await detector(post, moderation).check(UserInput(), None) is None
    assert moderation.calls == []


# --- refusals of the input, and outages ----------------------------------------------------------


async def test_an_unfetchable_image_is_a_refusal_of_the_input_not_an_outage(
    post: JsonPost, moderation: MockModeration
) -> None:
    openai = detector(post, moderation)
    user_input = UserInput(texts=("what is this?",), images=("https://example.com/unfetchable.png",))
    with pytest.raises(InputRefused) as caught:
        await openai.check(user_input, None)
    refused = caught.value
    assert refused.part == "input"
    assert refused.message == (
        "the moderation endpoint refused the image https://example.com/unfetchable.png (Failed to download image "
        "from https://example.com/unfetchable.png); change or remove it and retry"
    )
    # nothing was cached: the same input is asked again, and refused again
    assert len(openai.cache) == 0
    with pytest.raises(InputRefused):
        await openai.check(user_input, None)
    assert len(moderation.calls) == 2


async def test_images_go_one_per_call_the_texts_with_the_first(post: JsonPost, moderation: MockModeration) -> None:
    openai = detector(post, moderation)
    images = ("https://example.com/cat.png", "https://example.com/bad.png", "https://example.com/dog.png")
    verdict = await openai.check(UserInput(texts=("look", "and this"), images=images), None)
    sent = [payload["input"] for _, payload in moderation.calls]  # in the order they arrived
    assert len(sent) == 3
    assert [{"type": "text", "text": "look"}, {"type": "text", "text": "and this"}, part(images[0])] in sent
    assert [part(images[1])] in sent
    assert [part(images[2])] in sent
    # the flagged image was alone in its call: it is blamed, and cached, by itself
    assert verdict == Verdict(detector="openai", categories=("violence",), text_sha256=sha(images[1]))
    assert await openai.check(UserInput(images=(images[1],)), None) == verdict
    assert len(moderation.calls) == 3


def part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


async def test_a_flag_in_one_call_wins_over_a_refusal_in_another(post: JsonPost, moderation: MockModeration) -> None:
    images = ("https://example.com/unfetchable.png", "https://example.com/bad.png")
    verdict = await detector(post, moderation).check(UserInput(images=images), None)
    assert verdict is not None
    assert verdict.text_sha256 == sha(images[1])
    with pytest.raises(InputRefused, match="unfetchable"):
        await detector(post, moderation).check(UserInput(images=(images[0], "https://example.com/ok.png")), None)


async def test_more_new_images_than_the_limit_are_refused_without_a_call(
    post: JsonPost, moderation: MockModeration
) -> None:
    openai = detector(post, moderation)
    many = tuple(f"https://example.com/{index}.png" for index in range(MAX_IMAGES + 1))
    with pytest.raises(
        InputRefused, match=f"the gateway judges at most {MAX_IMAGES} new images per request and this one has 17"
    ):
        await openai.check(UserInput(images=many), None)
    assert moderation.calls == []
    # images already judged do not count
    assert await openai.check(UserInput(images=many[:MAX_IMAGES]), None) is None
    assert await openai.check(UserInput(images=many), None) is None
    assert len(moderation.calls) == MAX_IMAGES + 1


async def test_the_endpoint_refusing_too_many_images_is_a_refusal_of_the_input(
    post: JsonPost, moderation: MockModeration
) -> None:
    message = "Number of images (2) exceeds maximum of 1"
    moderation.answer = answering(400, openai_error(message, "input", "too_many_images"))
    with pytest.raises(InputRefused, match=r"refused the input \(Number of images \(2\) exceeds maximum of 1\)"):
        await detector(post, moderation).check(UserInput(images=("https://example.com/a.png",)), None)


def answering(status: int, body: bytes, content_type: str = "application/json") -> Answer:
    async def answer(request: web.Request, payload: Any) -> web.StreamResponse:
        return web.Response(status=status, body=body, content_type=content_type)

    return answer


def openai_error(message: str, param: str | None = None, code: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}})


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        # the endpoint names the refused item of its `input` array: the second one, the image
        (
            400,
            openai_error("Invalid image URL: 'input[1].image_url.url'.", "input[1].image_url.url", "invalid_value"),
            "refused the image https://example.com/cat.png (Invalid image URL: 'input[1].image_url.url')",
        ),
        (
            400,
            openai_error("Invalid value.", "input[0]", "invalid_value"),
            "refused one of the user's texts (Invalid value)",
        ),
        # FastAPI-style servers (vLLM, LiteLLM) answer 422 with the field's location
        (
            422,
            orjson.dumps({"detail": [{"loc": ["body", "input", 1, "image_url"], "msg": "bad url", "type": "x"}]}),
            "refused the image https://example.com/cat.png (bad url)",
        ),
        (413, b"<html>413 Request Entity Too Large</html>", "refused the input (HTTP 413)"),
        (400, b"", "refused the input (HTTP 400)"),
        (
            400,
            openai_error("Input is too long.", "input", "string_above_max_length"),
            "refused the input (Input is too long)",
        ),
    ],
)
async def test_a_4xx_about_the_input_names_what_was_refused(
    post: JsonPost, moderation: MockModeration, status: int, body: bytes, expected: str
) -> None:
    moderation.answer = answering(status, body, "application/json" if body.startswith(b"{") else "text/html")
    user_input = UserInput(texts=("look",), images=("https://example.com/cat.png",))
    with pytest.raises(InputRefused) as caught:
        await detector(post, moderation).check(user_input, None)
    assert expected in caught.value.message
    assert caught.value.part == "input"


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (401, openai_error("Incorrect API key provided", None, "invalid_api_key")),
        (403, openai_error("Country, region, or territory not supported", None, "unsupported_country")),
        (404, openai_error("The model `omni-moderation-latest` does not exist", "model", "model_not_found")),
        (429, openai_error("Rate limit reached for requests", None, "rate_limit_exceeded")),
        (500, openai_error("The server had an error while processing your request.")),
        (502, b"<html>Bad Gateway</html>"),
        (503, openai_error("The engine is currently overloaded, please try again later")),
        # a 400 about the gateway's own request is the operator's to fix, not the client's
        (400, openai_error("Invalid model.", "model", "invalid_value")),
        (400, openai_error("You exceeded your current quota.", None, "insufficient_quota")),
    ],
)
async def test_other_error_answers_are_outages(
    post: JsonPost, moderation: MockModeration, status: int, body: bytes
) -> None:
    moderation.answer = answering(status, body, "application/json" if body.startswith(b"{") else "text/html")
    with pytest.raises(DetectorFailed, match=f"answered HTTP {status}"):
        await detector(post, moderation).check(UserInput(texts=("x",)), None)


async def test_a_data_url_is_named_by_its_media_type_only(post: JsonPost, moderation: MockModeration) -> None:
    image = "data:image/png;base64," + "A" * 5000
    moderation.answer = answering(400, openai_error("Invalid image.", "input[0].image_url.url", "invalid_image"))
    with pytest.raises(InputRefused) as caught:
        await detector(post, moderation).check(UserInput(images=(image,)), None)
    assert "the image data:image/png;base64,... (Invalid image)" in caught.value.message
    assert len(caught.value.message) < 300


# --- through the gateway: a client cannot switch moderation off ----------------------------------

SettingsFactory = Callable[..., Settings]


@pytest.mark.parametrize("failure", ["open", "closed"])
def test_an_input_the_endpoint_refuses_is_refused_in_either_failure_mode(
    settings_factory: SettingsFactory, upstream: MockUpstream, failure: str
) -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.com/unfetchable.png"}}
    messages: Any = [{"role": "user", "content": [{"type": "text", "text": "what is this?"}, image]}]
    upstream.behaviors["/v1/moderations"] = "status=400"  # what OpenAI answers for an image it cannot fetch
    settings = settings_factory(
        upstream_url=upstream.url, moderation="openai", moderation_failure=failure, max_strikes=1
    )
    with run_app(create_app(settings)) as url:
        client = openai.OpenAI(
            base_url=f"{url}/v1", api_key="sk-client", default_headers={"X-User-ID": "mallory"}, max_retries=0
        )
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="gpt-4o-mini", messages=messages)
        standing = httpx2.get(f"{url}/admin/users/mallory", headers={"Authorization": "Bearer admin-secret"})
    assert caught.value.code == "invalid_request"
    assert caught.value.param == "input"
    assert "the moderation endpoint refused the input (the mock upstream answers 400)" in caught.value.message
    assert [request.path for request in upstream.requests] == ["/v1/moderations"]  # nothing was forwarded
    assert standing.status_code == 404  # and no strike: the user was never recorded
