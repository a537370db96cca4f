"""GATEWAY_MODERATION_TIMING=during_call: the upstream call starts while the input is judged, its
answer held until the verdict clears it; a flag cancels it and answers as before."""

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx2
import pytest

from gateway.app import create_app
from gateway.settings import Settings
from middleware.asgi import Message, Receive, Scope, Send
from middleware.timing import EarlyCall
from tests.detector_mocks import MockGuard, serving
from tests.servers import run_app
from tests.upstream import MockUpstream

SettingsFactory = Callable[..., Settings]
CHAT = "/v1/chat/completions"


@pytest.fixture
async def guard() -> AsyncIterator[MockGuard]:
    mock = MockGuard(delay=0.3)
    async with serving(mock):
        yield mock


def during_call(settings_factory: SettingsFactory, upstream: MockUpstream, guard: MockGuard, **extra: Any) -> Settings:
    return settings_factory(
        upstream_url=upstream.url,
        moderation="guard",
        guard_url=guard.base_url,
        guard_model="llama-guard3:1b",
        moderation_timing="during_call",
        **extra,
    )


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}


async def test_the_upstream_call_starts_before_the_verdict(
    settings_factory: SettingsFactory, upstream: MockUpstream, guard: MockGuard
) -> None:
    seen_by_then: list[list[str]] = []
    guard.on_answer = lambda: seen_by_then.append([request.path for request in upstream.requests])
    with run_app(create_app(during_call(settings_factory, upstream, guard))) as url:
        async with httpx2.AsyncClient(base_url=url, headers={"X-User-ID": "ann"}) as client:
            answer = await client.post(CHAT, json=chat("a kind question"))
    assert answer.status_code == 200
    assert answer.json()["object"] == "chat.completion"
    assert seen_by_then == [[CHAT]]  # the upstream had the call before the guard answered


async def test_a_flag_answers_as_before_and_cancels_the_upstream_call(
    settings_factory: SettingsFactory, upstream: MockUpstream, guard: MockGuard
) -> None:
    upstream.behaviors[CHAT] = "slow-headers=0.8"
    with run_app(create_app(during_call(settings_factory, upstream, guard))) as url:
        async with httpx2.AsyncClient(base_url=url, headers={"X-User-ID": "mallory"}) as client:
            refused = await client.post(CHAT, json=chat("a violent plan"))
        cancelled = await asyncio.to_thread(upstream.disconnected.wait, 2)
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "content_policy_violation"
    assert cancelled  # the gateway closed the upstream call instead of waiting for its answer


async def test_nothing_of_an_answer_that_came_first_reaches_a_flagged_client(
    settings_factory: SettingsFactory, upstream: MockUpstream, guard: MockGuard
) -> None:
    # the upstream answers (and streams) at once; the guard flags 0.3 s later
    with run_app(create_app(during_call(settings_factory, upstream, guard))) as url:
        async with httpx2.AsyncClient(base_url=url, headers={"X-User-ID": "mallory"}) as client:
            refused = await client.post(CHAT, json=chat("a violent plan", stream=True))
    assert refused.status_code == 400
    assert refused.headers["content-type"] == "application/json"
    assert refused.json()["error"]["categories"] == ["violent_crimes"]
    assert [request.path for request in upstream.requests] == [CHAT]


async def test_a_cleared_stream_arrives_whole(
    settings_factory: SettingsFactory, upstream: MockUpstream, guard: MockGuard
) -> None:
    with run_app(create_app(during_call(settings_factory, upstream, guard))) as url:
        async with httpx2.AsyncClient(base_url=url, headers={"X-User-ID": "ann"}) as client:
            answer = await client.post(CHAT, json=chat("a kind question", stream=True))
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/event-stream")
    assert answer.text.rstrip().endswith("data: [DONE]")


async def test_shadow_mode_forwards_with_the_header(
    settings_factory: SettingsFactory, upstream: MockUpstream, guard: MockGuard
) -> None:
    settings = during_call(settings_factory, upstream, guard, enforcement="shadow")
    with run_app(create_app(settings)) as url:
        async with httpx2.AsyncClient(base_url=url, headers={"X-User-ID": "mallory"}) as client:
            answer = await client.post(CHAT, json=chat("a violent plan"))
    assert answer.status_code == 200
    assert answer.headers["x-gateway-shadow-violation"] == "violent_crimes"


async def test_a_failed_detector_in_closed_mode_cancels_the_call(
    settings_factory: SettingsFactory, upstream: MockUpstream, guard: MockGuard
) -> None:
    guard.status = 503
    upstream.behaviors[CHAT] = "slow-headers=0.8"
    with run_app(create_app(during_call(settings_factory, upstream, guard))) as url:
        async with httpx2.AsyncClient(base_url=url, headers={"X-User-ID": "ann"}) as client:
            refused = await client.post(CHAT, json=chat("a kind question"))
        cancelled = await asyncio.to_thread(upstream.disconnected.wait, 2)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "moderation_unavailable"
    assert cancelled


class Recorder:
    """A `send` that keeps what it is sent, and a `receive` with nothing more to give."""

    def __init__(self) -> None:
        self.sent: list[Message] = []

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    @staticmethod
    async def receive() -> Message:
        return {"type": "http.disconnect"}


async def test_an_early_call_holds_every_message_until_released() -> None:
    recorder = Recorder()
    inner_done = asyncio.Event()

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"hi"})
        inner_done.set()

    early = EarlyCall(inner, {"type": "http"}, recorder.receive)
    await asyncio.sleep(0.05)
    assert recorder.sent == []
    assert not inner_done.is_set()
    await early.release(recorder.send)
    assert [message["type"] for message in recorder.sent] == ["http.response.start", "http.response.body"]


async def test_a_cancelled_early_call_sends_nothing() -> None:
    recorder = Recorder()
    cancelled = asyncio.Event()

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": []})
        except asyncio.CancelledError:
            cancelled.set()
            raise

    early = EarlyCall(inner, {"type": "http"}, recorder.receive)
    await asyncio.sleep(0.01)
    await early.cancel()
    assert cancelled.is_set()
    assert recorder.sent == []
