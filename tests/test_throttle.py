"""The failed-token throttle on its own: per peer, overall, bounded; time is a fake clock."""

from __future__ import annotations

from gateway.throttle import AuthThrottle


class RecordingSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_the_throttle_forgets_a_peer_and_stays_bounded() -> None:
    clock, sleep = Clock(), RecordingSleep()
    throttle = AuthThrottle(
        free_failures=1, global_free_failures=1000, delay=1, forget_after=60, max_peers=3, sleep=sleep, clock=clock
    )
    for index in range(10):
        await throttle.failed(f"10.0.0.{index}")
    assert len(throttle) == 3
    await throttle.failed("10.0.0.9")
    assert sleep.delays == [1]
    clock.now = 61
    await throttle.failed("10.0.0.9")
    assert sleep.delays == [1], "failures older than forget_after start over"
    await throttle.failed("10.0.0.0")  # evicted long ago: counts from 1 again
    assert sleep.delays == [1]


async def test_failures_from_many_peers_are_slowed_together() -> None:
    clock, sleep = Clock(), RecordingSleep()
    throttle = AuthThrottle(
        free_failures=5, global_free_failures=3, window=60, delay=0.5, max_delay=1.5, sleep=sleep, clock=clock
    )
    for index in range(6):  # one failure per address: no address reaches its own allowance
        await throttle.failed(f"198.51.100.{index}")
    assert sleep.delays == [0.5, 1.0, 1.5]
    throttle.succeeded("192.0.2.1")  # an operator elsewhere: the guesser's count stands
    await throttle.failed("198.51.100.99")
    assert sleep.delays[-1] == 1.5
    clock.now = 61
    await throttle.failed("198.51.100.100")
    assert sleep.delays == [0.5, 1.0, 1.5, 1.5], "failures older than the window no longer count"


async def test_a_success_forgives_its_own_peer_only() -> None:
    sleep = RecordingSleep()
    throttle = AuthThrottle(free_failures=5, global_free_failures=4, delay=1, sleep=sleep, clock=Clock())
    for _ in range(3):
        await throttle.failed("192.0.2.1")  # an operator's typos
    await throttle.failed("198.51.100.1")
    assert sleep.delays == []
    throttle.succeeded("192.0.2.1")
    for index in range(3):
        await throttle.failed(f"198.51.100.{index + 2}")
    assert sleep.delays == [], "the operator's forgiven failures left room for three"
    await throttle.failed("198.51.100.9")
    assert sleep.delays == [1]


async def test_a_long_guessing_run_keeps_being_answered_at_the_longest_delay() -> None:
    # The doubling once overflowed a float after about a thousand failures from one peer.
    sleep = RecordingSleep()
    throttle = AuthThrottle(
        free_failures=5, global_free_failures=20, delay=0.25, max_delay=4, sleep=sleep, clock=Clock()
    )
    for _ in range(2000):
        await throttle.failed("198.51.100.7")
    assert len(sleep.delays) == 1995
    assert sleep.delays[:5] == [0.25, 0.5, 1.0, 2.0, 4.0]
    assert set(sleep.delays[5:]) == {4.0}
