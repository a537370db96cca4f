"""The cascade's modes: detectors in turn, or the remote ones at once (GATEWAY_MODERATION_MODE=parallel)."""

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx2
import pytest
from prometheus_client import REGISTRY

from gateway.app import create_app
from gateway.settings import Settings
from middleware.cascade import Cascade, ParallelCascade, TimedCascade, make_cascade
from middleware.errors import Refused
from middleware.metrics import MODERATION_TOTAL
from middleware.protocols import DetectorFailed, InputRefused, UserInput, Verdict
from tests.detector_mocks import MockGuard, serving
from tests.servers import run_app
from tests.upstream import MockUpstream

SettingsFactory = Callable[..., Settings]
INPUT = UserInput(texts=("hello",))


@dataclass
class Remote:
    """A remote detector whose answer the test decides: `outcome` once `gate` opens."""

    name: str
    outcome: Verdict | Exception | None = None
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    cost: int = 100
    started: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: bool = False

    async def check(self, user_input: UserInput, authorization: str | None) -> Verdict | None:
        self.started.set()
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


@dataclass
class Local:
    name: str = "rules"
    cost: int = 1
    outcome: Verdict | None = None
    calls: int = 0

    async def check(self, user_input: UserInput, authorization: str | None) -> Verdict | None:
        return self.check_now(user_input)

    def check_now(self, user_input: UserInput) -> Verdict | None:
        self.calls += 1
        return self.outcome


def flag(name: str) -> Verdict:
    return Verdict(detector=name, categories=("violence",), text_sha256="0" * 64)


def opened(detector: Remote) -> Remote:
    detector.gate.set()
    return detector


def fail_open() -> float:
    return REGISTRY.get_sample_value("gateway_fail_open_total", {"check": "moderation"}) or 0.0


def total_count() -> float:
    return sum(
        sample.value
        for metric in MODERATION_TOTAL.collect()
        for sample in metric.samples
        if sample.name.endswith("_count")
    )


async def test_remote_detectors_run_at_once() -> None:
    first, second = Remote("openai"), Remote("guard")
    judging = asyncio.create_task(ParallelCascade([first, second], "closed").judge(INPUT, None))
    # each waits for its gate: both can have started only if neither waits for the other
    await asyncio.wait_for(asyncio.gather(first.started.wait(), second.started.wait()), 1)
    first.gate.set()
    second.gate.set()
    assert await judging == (None, False)


async def test_the_first_flag_wins_and_the_others_are_cancelled() -> None:
    slow = Remote("openai")  # never answers
    flagging = opened(Remote("guard", flag("guard")))
    verdict, failed_open = await asyncio.wait_for(ParallelCascade([slow, flagging], "closed").judge(INPUT, None), 1)
    assert verdict == flag("guard")
    assert failed_open is False
    assert slow.cancelled


async def test_local_detectors_run_first_and_short_circuit() -> None:
    local = Local(outcome=flag("rules"))
    remotes = [Remote("openai"), Remote("guard")]
    assert await ParallelCascade([*remotes, local], "closed").judge(INPUT, None) == (flag("rules"), False)
    assert local.calls == 1
    assert not any(remote.started.is_set() for remote in remotes)


async def test_a_flag_wins_over_a_failure_and_a_refusal() -> None:
    detectors = [
        opened(Remote("openai", DetectorFailed("down"))),
        opened(Remote("azure", InputRefused("too long", "input"))),
        Remote("guard", flag("guard")),
    ]
    judging = asyncio.create_task(ParallelCascade(detectors, "closed").judge(INPUT, None))
    await asyncio.sleep(0.01)  # the failure and the refusal come first
    detectors[2].gate.set()
    assert await judging == (flag("guard"), False)


async def test_without_a_flag_a_refusal_comes_before_a_failure() -> None:
    detectors = [opened(Remote("openai", DetectorFailed("down"))), opened(Remote("azure", InputRefused("no", "input")))]
    with pytest.raises(Refused) as caught:
        await ParallelCascade(detectors, "open").judge(INPUT, None)
    assert caught.value.error.status == 400
    assert caught.value.error.code == "invalid_request"


async def test_a_failure_follows_the_failure_mode() -> None:
    with pytest.raises(Refused) as caught:
        await ParallelCascade(
            [opened(Remote("openai", DetectorFailed("down"))), opened(Remote("guard"))], "closed"
        ).judge(INPUT, None)
    assert caught.value.error.status == 503
    before = fail_open()
    failing = [opened(Remote("openai", DetectorFailed("down"))), opened(Remote("guard"))]
    assert await ParallelCascade(failing, "open").judge(INPUT, None) == (None, True)
    assert fail_open() == before + 1


async def test_a_cancelled_judgement_cancels_the_detectors() -> None:
    detectors = [Remote("openai"), Remote("guard")]
    judging = asyncio.create_task(ParallelCascade(detectors, "closed").judge(INPUT, None))
    await asyncio.wait_for(asyncio.gather(*(detector.started.wait() for detector in detectors)), 1)
    judging.cancel()
    with pytest.raises(asyncio.CancelledError):
        await judging
    assert all(detector.cancelled for detector in detectors)


async def test_the_whole_judgement_is_timed_with_several_detectors() -> None:
    before = total_count()
    await ParallelCascade([opened(Remote("openai")), opened(Remote("guard"))], "closed").judge(INPUT, None)
    await TimedCascade([Local(), opened(Remote("openai"))], "closed").judge(INPUT, None)
    assert total_count() == before + 2


def test_the_mode_picks_the_cascade() -> None:
    one = [Remote("openai")]
    assert type(make_cascade(one, "closed", "sequential")) is Cascade
    assert type(make_cascade([*one, Local()], "closed", "parallel")) is TimedCascade  # one remote: nothing to overlap
    assert type(make_cascade([*one, Remote("guard")], "closed", "sequential")) is TimedCascade
    assert type(make_cascade([*one, Remote("guard")], "closed", "parallel")) is ParallelCascade


@pytest.fixture
async def guard() -> AsyncIterator[MockGuard]:
    mock = MockGuard()
    async with serving(mock):
        yield mock


async def test_parallel_mode_through_the_gateway(
    settings_factory: SettingsFactory, upstream: MockUpstream, guard: MockGuard
) -> None:
    upstream.behaviors["/v1/moderations"] = "slow-headers=0.5"  # openai answers clean, late: the guard flags first
    settings = settings_factory(
        upstream_url=upstream.url,
        moderation="openai,guard",
        moderation_mode="parallel",
        guard_url=guard.base_url,
        guard_model="llama-guard3:1b",
    )
    with run_app(create_app(settings)) as url:
        async with httpx2.AsyncClient(base_url=url, headers={"X-User-ID": "mallory"}) as client:
            body: Any = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a violent plan"}]}
            refused = await client.post("/v1/chat/completions", json=body)
    assert refused.status_code == 400
    assert refused.json()["error"]["categories"] == ["violent_crimes"]
    assert [request.path for request in upstream.requests] == ["/v1/moderations"]  # asked at once, never forwarded
