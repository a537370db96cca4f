"""The budgets on upstream connections: a bounded wait, a share per client address, 503 `server_busy`.

An attack run held every upstream connection with about 1,000 uploads trickled a byte every
20 s; everyone else's calls then hung with no answer. Now a call waits a bounded time for a
free connection and then gets 503, and one client address holds at most its share.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator

import httpx2
import pytest
from prometheus_client import REGISTRY

from gateway.app import create_app
from gateway.settings import Settings
from middleware.budgets import CallBudget
from middleware.errors import GatewayError
from tests.servers import run_app
from tests.upstream import MockUpstream

SettingsFactory = Callable[..., Settings]


async def test_a_call_past_the_limit_waits_its_turn_then_gets_a_slot() -> None:
    budget = CallBudget(2, wait=5)
    await budget.acquire(None)
    await budget.acquire(None)
    waiting = asyncio.ensure_future(budget.acquire(None))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    budget.release(None)  # the slot passes straight to the waiter
    await asyncio.wait_for(waiting, 1)
    assert budget.used == 2
    budget.release(None)
    budget.release(None)
    assert budget.used == 0


async def test_a_call_that_waited_too_long_gets_503_server_busy() -> None:
    budget = CallBudget(1, wait=0.05)
    await budget.acquire(None)
    with pytest.raises(GatewayError) as refused:
        await budget.acquire(None)
    assert (refused.value.status, refused.value.code) == (503, "server_busy")
    assert refused.value.headers == {"Retry-After": "1"}
    budget.release(None)
    assert budget.used == 0
    await budget.acquire(None)  # the timed-out waiter left nothing behind
    assert budget.used == 1


async def test_a_waiter_cancelled_after_being_handed_a_slot_passes_it_on() -> None:
    budget = CallBudget(1, wait=5)
    await budget.acquire(None)
    first = asyncio.ensure_future(budget.acquire(None))
    second = asyncio.ensure_future(budget.acquire(None))
    await asyncio.sleep(0.01)
    budget.release(None)  # handed to `first` ...
    first.cancel()  # ... which goes away before it runs
    await asyncio.wait_for(second, 1)
    assert budget.used == 1


async def test_one_client_address_holds_at_most_its_share() -> None:
    budget = CallBudget(10, wait=5, per_client=2, exempt=lambda address: address == "10.0.0.1")
    a = budget.key(("203.0.113.5", 40000))
    assert a == "203.0.113.5"
    await budget.acquire(a)
    await budget.acquire(a)
    with pytest.raises(GatewayError) as refused:
        await budget.acquire(a)  # at once, without waiting for the total
    assert refused.value.code == "server_busy"
    await budget.acquire(budget.key(("198.51.100.7", 1)))  # another address is not affected
    proxy = budget.key(("10.0.0.1", 1))
    assert proxy is None  # a trusted proxy speaks for many clients: no share of its own
    for _ in range(3):
        await budget.acquire(proxy)
    budget.release(a)
    await budget.acquire(a)
    assert budget.used == 6


@pytest.fixture
def mock() -> Iterator[MockUpstream]:
    with MockUpstream() as upstream:
        yield upstream


def test_trickled_uploads_cannot_starve_other_users(settings_factory: SettingsFactory, mock: MockUpstream) -> None:
    settings = settings_factory(upstream_url=mock.url, upstream_max_connections=3, upstream_queue_seconds=0.3)
    release = threading.Event()
    answers: list[int] = []

    def trickle() -> Iterator[bytes]:
        yield b"x"
        release.wait(20)  # a slow upload: it holds its upstream connection meanwhile
        yield b"y"

    def upload(url: str) -> None:
        # a part of the Uploads API: streamed upstream unjudged (POST /v1/files is judged, so read whole)
        answer = httpx2.post(
            f"{url}/v1/uploads/upload_1/parts",
            content=trickle(),
            headers={"X-User-ID": "slow", "X-Mock": "echo"},
            timeout=30,
        )
        answers.append(answer.status_code)

    with run_app(create_app(settings)) as url:
        uploads = [threading.Thread(target=upload, args=(url,)) for _ in range(3)]
        for thread in uploads:
            thread.start()
        deadline = time.monotonic() + 10
        while REGISTRY.get_sample_value("gateway_requests_in_flight") != 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # each upload is past the budget and sending its first byte upstream
        started = time.monotonic()
        busy = httpx2.get(f"{url}/v1/models", headers={"X-User-ID": "bob"}, timeout=10)
        answered_in = time.monotonic() - started
        release.set()
        for thread in uploads:
            thread.join(20)
        after = httpx2.get(f"{url}/v1/models", headers={"X-User-ID": "bob"}, timeout=10)
    assert busy.status_code == 503
    assert busy.json()["error"]["code"] == "server_busy"
    assert busy.headers["retry-after"] == "1"
    assert answered_in < 5  # an answer, not a hang
    assert answers == [200, 200, 200]
    assert after.status_code == 200
