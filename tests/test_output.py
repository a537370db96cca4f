"""Output moderation end to end: the official SDK's views of clean and flagged answers on a real
gateway and the fake upstream, streamed and not, for chat completions, completions and responses."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import httpx2
import openai
import orjson
import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from gateway.app import create_app, output_layer
from gateway.proxy import Upstream
from gateway.settings import SettingsError, load_settings
from middleware.budgets import ByteBudget
from middleware.output import OutputModeration
from middleware.output_judge import OutputJudge
from middleware.protocols import UserInput, Verdict
from tests.conftest import SettingsFactory
from tests.judging import ADMIN, USER
from tests.servers import run_app
from tests.upstream import MockUpstream

BAD = "how to build a bomb"  # the rules detector's explosives rule
CLEAN = "Tea grows best on hillsides with plenty of rain and a little shade."
FLAGGED = f"Sure. Here is {BAD} at home, one careful step after another."
MESSAGES: Any = [{"role": "user", "content": "tell me something"}]


@contextmanager
def output_gateway(settings_factory: SettingsFactory, upstream: MockUpstream, **overrides: Any) -> Iterator[str]:
    values: dict[str, Any] = {
        "upstream_url": upstream.url,
        "moderation": "rules",
        "output_moderation": "block",
        "max_strikes": 100,
    }
    with run_app(create_app(settings_factory(**values | overrides))) as url:
        yield url


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="sk-client", default_headers=USER, max_retries=0)


def chat_stream(client: openai.OpenAI, **extra: Any) -> tuple[dict[int, str], dict[int, str | None]]:
    """Each choice's text and last finish_reason, as the SDK's stream gives them."""
    texts: dict[int, str] = {}
    finishes: dict[int, str | None] = {}
    for chunk in client.chat.completions.create(model="m", messages=MESSAGES, stream=True, **extra):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            finishes[choice.index] = choice.finish_reason or finishes.get(choice.index)
    return texts, finishes


def events_of(url: str, user: str = "alice", kind: str = "output_violation", wait: float = 5.0) -> list[Any]:
    """The user's events of `kind`; recorded once the answer went out, so waited for a moment."""
    deadline = time.monotonic() + wait
    while True:
        response = httpx2.get(f"{url}/admin/users/{user}/events", headers=ADMIN)
        found = [e for e in response.json().get("data", []) if e["type"] == kind] if response.status_code == 200 else []
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# -- not streamed ------------------------------------------------------------------------------------


def test_clean_answers_pass_whole(settings_factory: SettingsFactory, upstream: MockUpstream) -> None:
    upstream.reply = CLEAN
    with output_gateway(settings_factory, upstream) as url:
        client = sdk(url)
        raw = client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
        answer = raw.parse()
        assert answer.choices[0].message.content == CLEAN
        assert answer.choices[0].finish_reason == "stop"
        assert raw.headers.get("x-gateway-output-violation") is None
        assert client.completions.create(model="m", prompt="go").choices[0].text == CLEAN
        response = client.responses.create(model="m", input="go")
        assert (response.status, response.output_text) == ("completed", CLEAN)
        assert events_of(url, wait=0) == []


def test_a_flagged_chat_answer_loses_its_content(settings_factory: SettingsFactory, upstream: MockUpstream) -> None:
    upstream.reply = FLAGGED
    with output_gateway(settings_factory, upstream) as url:
        client = sdk(url)
        raw = client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
        assert raw.headers["x-gateway-output-violation"] == "illicit/violent"
        assert int(raw.headers["content-length"]) == len(raw.content)
        choice = raw.parse().choices[0]
        assert (choice.message.content, choice.finish_reason) == (None, "content_filter")
        # the SDK's own signal: .parse() raises on a content_filter finish
        with pytest.raises(openai.ContentFilterFinishReasonError):
            client.chat.completions.parse(model="m", messages=MESSAGES)
        [event, _] = events_of(url)
        assert event["categories"] == ["illicit/violent"]
        assert (event["detector"], event["counted"], event["path"]) == ("rules", False, "/v1/chat/completions")
        assert event["text_sha256"] == sha256(FLAGGED)


def test_a_flagged_completion_and_response(settings_factory: SettingsFactory, upstream: MockUpstream) -> None:
    upstream.reply = FLAGGED
    with output_gateway(settings_factory, upstream) as url:
        client = sdk(url)
        choice = client.completions.create(model="m", prompt="go").choices[0]
        assert (choice.text, choice.finish_reason) == ("", "content_filter")
        raw = client.responses.with_raw_response.create(model="m", input="go")
        assert raw.headers["x-gateway-output-violation"] == "illicit/violent"
        response = raw.parse()
        assert response.status == "incomplete"
        assert response.incomplete_details is not None
        assert response.incomplete_details.reason == "content_filter"
        assert response.output_text == ""
        assert BAD not in raw.content.decode()


def test_a_flagged_second_choice_leaves_the_first(settings_factory: SettingsFactory, upstream: MockUpstream) -> None:
    upstream.replies = [CLEAN, FLAGGED]
    with output_gateway(settings_factory, upstream) as url:
        client = sdk(url)
        first, second = client.chat.completions.create(model="m", messages=MESSAGES, n=2).choices
        assert (first.message.content, first.finish_reason) == (CLEAN, "stop")
        assert (second.message.content, second.finish_reason) == (None, "content_filter")
        texts, finishes = chat_stream(client, n=2)
        assert texts[0] == CLEAN
        assert finishes == {0: "stop", 1: "content_filter"}
        assert "bomb" not in texts[1]


# -- streamed ----------------------------------------------------------------------------------------


def test_a_clean_stream_goes_through_event_for_event(settings_factory: SettingsFactory, upstream: MockUpstream) -> None:
    upstream.reply = CLEAN
    upstream.chunks = 12
    body = {"model": "m", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}

    def events(base: str, headers: dict[str, str]) -> list[Any]:
        answer = httpx2.post(f"{base}/chat/completions", json=body, headers=headers)
        raw = [line for line in answer.text.split("\n\n") if line]
        return [orjson.loads(e[6:]) | {"created": 0} if e != "data: [DONE]" else e for e in raw]

    with output_gateway(settings_factory, upstream, output_holdback_chars=20) as url:
        through = events(f"{url}/v1", USER)
    direct = events(upstream.url, {})
    assert through == direct  # the role first, then text, the finish, the usage, [DONE]
    assert through[0]["choices"][0]["delta"]["role"] == "assistant"
    assert through[-2]["usage"] is not None


def test_a_flagged_chat_stream_is_cut(settings_factory: SettingsFactory, upstream: MockUpstream) -> None:
    upstream.reply = FLAGGED
    upstream.chunks = len(FLAGGED.split())  # a word a chunk: the phrase spans five chunks
    with output_gateway(settings_factory, upstream, output_holdback_chars=24) as url:
        client = sdk(url)
        texts, finishes = chat_stream(client)
        assert finishes == {0: "content_filter"}
        assert "bomb" not in texts[0]
        assert texts[0].startswith("Sure.")  # what was cleared before the flagged window
        raw = httpx2.post(
            f"{url}/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "stream": True}, headers=USER
        )
        assert raw.text.endswith("data: [DONE]\n\n")
        assert events_of(url)[0]["categories"] == ["illicit/violent"]


def test_a_phrase_split_across_windows_is_caught(settings_factory: SettingsFactory, upstream: MockUpstream) -> None:
    # the phrase starts in one window and ends in the next: the overlap sees it whole
    upstream.reply = "A calm line of text. " + FLAGGED
    upstream.chunks = len(upstream.reply.split())
    for holdback in (19, 25, 31, 200):
        with output_gateway(settings_factory, upstream, output_holdback_chars=holdback) as url:
            texts, finishes = chat_stream(sdk(url))
        assert finishes == {0: "content_filter"}, holdback
        assert "bomb" not in texts[0], holdback


def test_a_flagged_completion_stream_is_cut(settings_factory: SettingsFactory, upstream: MockUpstream) -> None:
    upstream.reply = FLAGGED
    upstream.chunks = 6
    with output_gateway(settings_factory, upstream, output_holdback_chars=16) as url:
        text, finish = "", None
        for chunk in sdk(url).completions.create(model="m", prompt="go", stream=True):
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        assert finish == "content_filter"
        assert "bomb" not in text


def test_responses_streams(settings_factory: SettingsFactory, upstream: MockUpstream) -> None:
    upstream.chunks = 6
    with output_gateway(settings_factory, upstream, output_holdback_chars=16) as url:
        client = sdk(url)
        upstream.reply = CLEAN
        clean = list(client.responses.create(model="m", input="go", stream=True))
        assert "".join(e.delta for e in clean if e.type == "response.output_text.delta") == CLEAN
        assert clean[-1].type == "response.completed"
        upstream.reply = FLAGGED
        flagged = list(client.responses.create(model="m", input="go", stream=True))
        text = "".join(e.delta for e in flagged if e.type == "response.output_text.delta")
        assert "bomb" not in text
        last = flagged[-1]
        assert last.type == "response.incomplete"
        assert last.response.status == "incomplete"
        assert last.response.incomplete_details is not None
        assert last.response.incomplete_details.reason == "content_filter"


def test_the_upstream_is_closed_after_a_cut(settings_factory: SettingsFactory, upstream: MockUpstream) -> None:
    upstream.reply = FLAGGED + " More words." * 40
    upstream.chunks = 60
    upstream.chunk_delay = 0.02
    with output_gateway(settings_factory, upstream, output_holdback_chars=32) as url:
        started = time.monotonic()
        _, finishes = chat_stream(sdk(url))
        assert finishes == {0: "content_filter"}
        # the upstream's handler saw its client go away, long before its 60 chunks were written
        assert upstream.disconnected.wait(5)
        assert upstream.disconnect_times[0] - started < 60 * 0.02


@pytest.mark.parametrize("failure", ["closed", "open"])
def test_a_detector_failing_mid_stream(settings_factory: SettingsFactory, upstream: MockUpstream, failure: str) -> None:
    upstream.reply = "A first calm sentence goes out. Then unreliable words follow to the end."
    upstream.chunks = len(upstream.reply.split())
    upstream.fail_words = {"unreliable"}  # /moderations answers 500 for a window holding it
    with output_gateway(
        settings_factory, upstream, moderation="openai", moderation_failure=failure, output_holdback_chars=12
    ) as url:
        texts, finishes = chat_stream(sdk(url))
        if failure == "closed":
            assert finishes == {0: "content_filter"}
            assert texts[0].startswith("A first calm")
            assert "unreliable" not in texts[0]  # never released unjudged
            assert events_of(url, wait=0.2) == []  # an outage is no violation of the user's
        else:
            assert (texts[0], finishes[0]) == (upstream.reply, "stop")


# -- audit, strikes, settings --------------------------------------------------------------------------


def test_audit_records_without_touching(settings_factory: SettingsFactory, upstream: MockUpstream) -> None:
    labels = {"category": "illicit/violent", "detector": "rules", "mode": "audit"}
    before = REGISTRY.get_sample_value("gateway_output_violations_total", labels) or 0.0
    upstream.reply = FLAGGED
    upstream.chunks = 8
    with output_gateway(settings_factory, upstream, output_moderation="audit") as url:
        texts, finishes = chat_stream(sdk(url))
        assert (texts[0], finishes[0]) == (FLAGGED, "stop")
        [event] = events_of(url)
        assert event["text_sha256"] == sha256(FLAGGED)
        assert (event["detector"], event["counted"], event["points"]) == ("rules", False, 0)
        assert "text" not in event
        answer = sdk(url).chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
        assert answer.parse().choices[0].message.content == FLAGGED
        assert answer.headers.get("x-gateway-output-violation") is None
        assert len(events_of(url)) == 2 or len(events_of(url, wait=2)) == 2
        stats = httpx2.get(f"{url}/admin/stats", headers=ADMIN).json()
        assert (stats["output_violations_24h"], stats["violations_24h"]) == (2, 0)  # not the user's own words
    after = REGISTRY.get_sample_value("gateway_output_violations_total", labels)
    assert after == before + 2


@pytest.mark.parametrize("strikes", [True, False])
def test_strikes_only_when_asked(settings_factory: SettingsFactory, upstream: MockUpstream, strikes: bool) -> None:
    upstream.reply = FLAGGED
    with output_gateway(settings_factory, upstream, output_strikes=strikes) as url:
        sdk(url).chat.completions.create(model="m", messages=MESSAGES)
        [event] = events_of(url)
        assert event["counted"] is strikes
        status = httpx2.get(f"{url}/admin/users/alice", headers=ADMIN).json()
        assert status["strikes"] == (1 if strikes else 0)


def test_off_adds_nothing(settings_factory: SettingsFactory) -> None:
    settings = settings_factory()
    upstream = Upstream(settings)
    assert output_layer(upstream, settings, [], None, ByteBudget(1)) is upstream  # type: ignore[arg-type]


def test_output_moderation_needs_a_detector(clean_environment: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_MODERATION", "off")
    monkeypatch.setenv("GATEWAY_OUTPUT_MODERATION", "audit")
    with pytest.raises(SettingsError, match="GATEWAY_OUTPUT_MODERATION=audit needs a detector"):
        load_settings()


@pytest.mark.parametrize(
    ("variable", "value", "said"),
    [
        ("GATEWAY_OUTPUT_MODERATION", "bloc", "GATEWAY_OUTPUT_MODERATION: Input should be 'off', 'audit' or 'block'"),
        ("GATEWAY_OUTPUT_HOLDBACK_CHARS", "0", "GATEWAY_OUTPUT_HOLDBACK_CHARS: Input should be greater than"),
        ("GATEWAY_OUTPUT_HOLDBACK_CHARS", "1000000", "GATEWAY_OUTPUT_HOLDBACK_CHARS: Input should be less than"),
        ("GATEWAY_OUTPUT_STRIKES", "maybe", "GATEWAY_OUTPUT_STRIKES: Input should be a valid boolean"),
    ],
)
def test_bad_settings_stop_start_up(
    clean_environment: None, monkeypatch: pytest.MonkeyPatch, variable: str, value: str, said: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert str(caught.value).startswith(said)
    assert "\n" not in str(caught.value)


def test_a_stored_answer_read_back_is_judged(settings_factory: SettingsFactory, upstream: MockUpstream) -> None:
    # a cut answer must not be one `retrieve` away
    upstream.reply = FLAGGED
    with output_gateway(settings_factory, upstream, output_holdback_chars=16) as url:
        client = sdk(url)
        stored = client.responses.retrieve("resp_mock")
        assert (stored.status, stored.output_text) == ("incomplete", "")
        replayed = list(client.responses.retrieve("resp_mock", stream=True))
        assert "bomb" not in "".join(e.delta for e in replayed if e.type == "response.output_text.delta")
        assert replayed[-1].type == "response.incomplete"
        upstream.reply = CLEAN
        assert client.responses.retrieve("resp_mock").output_text == CLEAN


def test_a_stored_chat_completion_read_back_is_judged(
    settings_factory: SettingsFactory, upstream: MockUpstream
) -> None:
    upstream.reply = FLAGGED
    with output_gateway(settings_factory, upstream) as url:
        client = sdk(url)
        choice = client.chat.completions.retrieve("chatcmpl-mock").choices[0]
        assert (choice.message.content, choice.finish_reason) == (None, "content_filter")
        upstream.reply = CLEAN
        assert client.chat.completions.retrieve("chatcmpl-mock").choices[0].message.content == CLEAN


def test_a_read_back_stream_cannot_choose_where_windows_fall(
    settings_factory: SettingsFactory, upstream: MockUpstream
) -> None:
    # `starting_after` would start the judge mid-text with no overlap: a phrase split over two calls
    upstream.reply = FLAGGED
    with output_gateway(settings_factory, upstream, output_holdback_chars=16) as url:
        for query in ("stream=true&starting_after=3", "starting%5Fafter=&stream=true", "starting_after=0"):
            answer = httpx2.get(f"{url}/v1/responses/resp_mock?{query}", headers=USER)
            assert answer.status_code == 400, query
            error = answer.json()["error"]
            assert (error["code"], error["param"]) == ("invalid_request", "starting_after")
        assert not any(request.path == "/v1/responses/resp_mock" for request in upstream.requests)
    with output_gateway(settings_factory, upstream, output_moderation="audit") as url:
        answer = httpx2.get(f"{url}/v1/responses/resp_mock?stream=true&starting_after=3", headers=USER)
        assert answer.status_code == 200


@pytest.mark.parametrize("behaviour", ["gzip", "large=64"])
def test_an_answer_that_cannot_be_read(
    settings_factory: SettingsFactory, upstream: MockUpstream, behaviour: str
) -> None:
    # compressed although asked not to be, or neither JSON nor a stream: never passed on unjudged when closed
    body = {"model": "m", "messages": MESSAGES}
    headers = USER | {"X-Mock": behaviour}
    with output_gateway(settings_factory, upstream) as url:
        answer = httpx2.post(f"{url}/v1/chat/completions", json=body, headers=headers)
        assert answer.status_code == 502
        assert answer.json()["error"]["code"] == "output_unjudgeable"
        assert upstream.requests[-1].headers["Accept-Encoding"] == "identity"
    with output_gateway(settings_factory, upstream, moderation_failure="open") as url:
        assert httpx2.post(f"{url}/v1/chat/completions", json=body, headers=headers).status_code == 200


def test_audit_reads_every_api(settings_factory: SettingsFactory, upstream: MockUpstream) -> None:
    upstream.reply = FLAGGED
    with output_gateway(settings_factory, upstream, output_moderation="audit") as url:
        client = sdk(url)
        assert client.completions.create(model="m", prompt="go").choices[0].text == FLAGGED
        streamed = list(client.responses.create(model="m", input="go", stream=True))
        assert streamed[-1].type == "response.completed"
        assert client.responses.create(model="m", input="go").output_text == FLAGGED
        deadline = time.monotonic() + 5
        while len(found := events_of(url)) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sorted(event["path"] for event in found) == ["/v1/completions", "/v1/responses", "/v1/responses"]
        assert {event["text_sha256"] for event in found} == {sha256(FLAGGED)}


class _Inner:
    """An inner app answering one JSON body in pieces, as the proxy streams a large one."""

    def __init__(self, body: bytes, pieces: int = 4) -> None:
        self.body = body
        self.pieces = pieces

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(self.body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        size = len(self.body) // self.pieces + 1
        for start in range(0, len(self.body), size):
            more = start + size < len(self.body)
            await send({"type": "http.response.body", "body": self.body[start : start + size], "more_body": more})


@pytest.mark.parametrize("failure", ["closed", "open"])
@pytest.mark.parametrize("problem", ["too large", "not JSON"])
async def test_a_json_answer_that_cannot_be_judged(failure: Literal["closed", "open"], problem: str) -> None:
    body = orjson.dumps({"choices": [{"index": 0, "message": {"content": FLAGGED}, "finish_reason": "stop"}]})
    if problem == "not JSON":
        body = b"\xef\xbb\xbf" + body  # a byte-order mark: some readers skip it, orjson does not
    judge = OutputJudge([], failure, None, mode="block", strikes=False)  # type: ignore[arg-type]
    limit = len(body) // 2 if problem == "too large" else len(body)
    budget = ByteBudget(1 << 20)
    layer = OutputModeration(_Inner(body), judge, holdback=10, budget=budget, max_answer_bytes=limit)
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "root_path": "/v1", "headers": []}
    await layer(scope, None, send)  # type: ignore[arg-type]
    assert budget.used == 0
    if failure == "closed":
        assert sent[0]["status"] == 502
        assert b"output_unjudgeable" in sent[1]["body"]
    else:  # passed on as it came, in order
        assert sent[0]["status"] == 200
        assert b"".join(message.get("body", b"") for message in sent[1:]) == body


async def test_answers_held_count_against_the_byte_budget() -> None:
    body = orjson.dumps({"choices": [{"index": 0, "message": {"content": CLEAN}, "finish_reason": "stop"}]})
    judge = OutputJudge([], "closed", None, mode="block", strikes=False)  # type: ignore[arg-type]
    budget = ByteBudget(len(body) - 1)  # the rest is held by other calls
    layer = OutputModeration(_Inner(body), judge, holdback=10, budget=budget)
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "root_path": "/v1", "headers": []}
    await layer(scope, None, send)  # type: ignore[arg-type]
    assert sent[0]["status"] == 503
    assert b"server_busy" in sent[1]["body"]
    assert budget.used == 0
    budget.limit = len(body)
    sent.clear()
    await layer(scope, None, send)  # type: ignore[arg-type]
    assert sent[0]["status"] == 200
    assert sent[1]["body"] == body
    assert budget.used == 0


class _Flags:
    """A detector flagging any text that names a bomb."""

    name = "test"
    cost = 0

    async def check(self, user_input: UserInput, authorization: str | None) -> Verdict | None:
        found = any("bomb" in text for text in user_input.texts)
        return Verdict(detector="test", categories=("bad",), text_sha256="0" * 64) if found else None


async def _answer(layer: OutputModeration, path: str = "/v1/chat/completions") -> list[Any]:
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "root_path": "/v1", "headers": []}
    await layer(scope, None, send)  # type: ignore[arg-type]
    return sent


@pytest.mark.parametrize("kind", ["chat", "completions"])
async def test_a_flagged_choice_loses_its_logprobs(kind: str) -> None:
    # the logprobs hold every token of the text: left in, the blocked text would still reach the client
    tokens: list[Any] = [
        {"token": word, "logprob": -0.1, "bytes": None, "top_logprobs": []} for word in FLAGGED.split()
    ]
    if kind == "chat":
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": FLAGGED}}
        choice["logprobs"] = {"content": tokens, "refusal": None}
    else:
        choice = {"index": 0, "text": FLAGGED, "logprobs": {"tokens": FLAGGED.split(), "token_logprobs": []}}
    body = orjson.dumps({"choices": [choice | {"finish_reason": "stop"}]})
    judge = OutputJudge([_Flags()], "closed", None, mode="block", strikes=False)  # type: ignore[arg-type]
    layer = OutputModeration(_Inner(body), judge, holdback=10, budget=ByteBudget(1 << 20))
    sent = await _answer(layer, f"/v1/{'chat/completions' if kind == 'chat' else 'completions'}")
    assert sent[0]["status"] == 200
    answer = orjson.loads(b"".join(message.get("body", b"") for message in sent[1:]))
    assert answer["choices"][0]["finish_reason"] == "content_filter"
    assert answer["choices"][0]["logprobs"] is None
    assert b"bomb" not in sent[1]["body"]


async def test_audit_copies_count_against_the_byte_budget() -> None:
    body = orjson.dumps({"choices": [{"index": 0, "message": {"content": FLAGGED}, "finish_reason": "stop"}]})
    judge = OutputJudge([_Flags()], "closed", None, mode="audit", strikes=False)  # type: ignore[arg-type]
    held: list[int] = []
    budget = ByteBudget(1 << 20)

    class Inner(_Inner):
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            async def watching(message: Any) -> None:
                await send(message)
                held.append(budget.used)

            await super().__call__(scope, receive, watching)

    layer = OutputModeration(Inner(body), judge, holdback=10, budget=budget)
    with capture_logs() as logs:
        sent = await _answer(layer)
    assert b"".join(message.get("body", b"") for message in sent[1:]) == body
    assert held[-1] == len(body)  # the copy, held while the answer goes out
    assert budget.used == 0
    assert [entry["event"] for entry in logs] == ["output_violation"]
    # a budget spent by other calls: the answer still passes untouched, its copy given up, not judged whole
    budget.limit = 10
    with capture_logs() as logs:
        sent = await _answer(layer)
    assert sent[0]["status"] == 200
    assert b"".join(message.get("body", b"") for message in sent[1:]) == body
    assert budget.used == 0
    assert [entry["event"] for entry in logs] == ["output_not_judged_whole"]
