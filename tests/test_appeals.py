"""Appeals and reversal in the store, against a real PostgreSQL: filing, accepting, rejecting,
reversing strikes and blocks (and what they caused), webhooks, replicas, a database that drops
mid-decision."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import orjson
import pytest
from prometheus_client import REGISTRY

from gateway.settings import Settings
from gateway.store import Store
from middleware.errors import GatewayError
from middleware.protocols import StoreUnavailable
from tests.test_ladder import POLICY, flagged, policy_store
from tests.test_store import db_now, fetch

SettingsFactory = Callable[..., Settings]
# No warnings: every violation adds its points at once.
STRICT = dataclasses.replace(POLICY, warnings=0)


def refusal(caught: pytest.ExceptionInfo[GatewayError]) -> tuple[int, str]:
    return caught.value.status, caught.value.code


async def event_ids(store: Store, user_id: str, kind: str) -> list[int]:
    """The user's events of `kind`, oldest first."""
    found = await store.events(user_id)
    assert found is not None
    return [event["id"] for event in reversed(found) if event["type"] == kind]


async def status_of(store: Store, user_id: str) -> tuple[int, bool, int]:
    status = await store.status(user_id)
    assert status is not None
    return status.strikes, status.blocked, status.blocks


async def block_three_times(store: Store, user_id: str) -> str:
    """Three one-point strikes: the third blocks. The block's event id."""
    for _ in range(3):
        outcome = await store.record_violation(user_id, flagged("harassment"))
    assert outcome.block is not None
    assert outcome.block.event_id is not None
    return outcome.block.event_id


def zero_standing(user_id: str) -> dict[str, Any]:
    """The standing of a user the gateway never saw (max_strikes 3)."""
    return {
        "user_id": user_id,
        "strikes": 0,
        "max_strikes": 3,
        "blocked": False,
        "blocked_until": None,
        "permanent": False,
        "warnings": 0,
        "active_strikes": [],
        "active_warnings": [],
        "block": None,
        "appeals": [],
    }


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_one_appeal_per_event_of_ones_own(settings_factory: SettingsFactory) -> None:
    async with policy_store(settings_factory, STRICT) as store:
        strike = await store.record_violation("alice", flagged("harassment"))
        await store.record_violation("bob", flagged("harassment"))
        await store.record_shadow_violation("alice", flagged("hate"))
        opened = metric("gateway_appeals_opened_total")
        appeal = await store.file_appeal("alice", int(strike.event_id or 0), "I was quoting a film.")
        assert (appeal.status, appeal.user_id, appeal.event_id, appeal.message) == (
            "open",
            "alice",
            int(strike.event_id or 0),
            "I was quoting a film.",
        )
        assert appeal.to_json()["id"] == str(appeal.id)
        assert appeal.to_json()["decided_at"] is None
        assert metric("gateway_appeals_opened_total") == opened + 1

        with pytest.raises(GatewayError) as again:
            await store.file_appeal("alice", appeal.event_id, "Once more.")
        assert refusal(again) == (409, "appeal_exists")
        assert again.value.extra["appeal_id"] == str(appeal.id)
        # Another user's event, a shadow violation and an event that does not exist look alike.
        bobs = (await event_ids(store, "bob", "violation"))[0]
        shadow = (await event_ids(store, "alice", "violation"))[-1]
        for event_id in (bobs, shadow, 10**15):
            with pytest.raises(GatewayError) as missing:
                await store.file_appeal("alice", event_id, "Mine?")
            assert refusal(missing) == (404, "event_not_found")
        with pytest.raises(GatewayError) as stranger:
            await store.file_appeal("carol", bobs, "Never seen.")
        assert refusal(stranger) == (404, "event_not_found")


async def test_an_appeal_past_the_window_is_refused(settings_factory: SettingsFactory, database_url: str) -> None:
    async with policy_store(settings_factory, dataclasses.replace(STRICT, appeal_window_days=1)) as store:
        old = await store.record_violation("dan", flagged("harassment"))
        await fetch(
            database_url, "UPDATE events SET at = now() - interval '25 hours' WHERE id = $1", int(old.event_id or 0)
        )
        with pytest.raises(GatewayError) as late:
            await store.file_appeal("dan", int(old.event_id or 0), "Too late?")
        assert refusal(late) == (400, "appeal_window_closed")
        assert "1 days" in late.value.message
    async with policy_store(settings_factory, dataclasses.replace(STRICT, appeal_window_days=0)) as store:
        fresh = await store.record_violation("dan", flagged("harassment"))
        with pytest.raises(GatewayError) as off:
            await store.file_appeal("dan", int(fresh.event_id or 0), "Any appeals?")
        assert refusal(off) == (400, "appeal_window_closed")


async def test_accepting_a_strikes_appeal_stops_its_points(settings_factory: SettingsFactory) -> None:
    async with policy_store(settings_factory, STRICT) as store:
        first = await store.record_violation("erin", flagged("harassment"))
        await store.record_violation("erin", flagged("harassment"))
        appeal = await store.file_appeal("erin", int(first.event_id or 0), "A false positive.")
        accepted = metric("gateway_appeals_decided_total", outcome="accepted")
        timed = metric("gateway_appeal_decision_seconds_count")

        decided = await store.decide_appeal(appeal.id, accept=True, reason="Quote from a film.", operator="mod-ann")

        assert (decided.status, decided.decided_by, decided.decision_reason) == (
            "accepted",
            "mod-ann",
            "Quote from a film.",
        )
        assert decided.decided_at is not None
        assert decided.event is not None
        assert (decided.event["id"], decided.event["reversed_by"]) == (appeal.event_id, "mod-ann")
        assert await status_of(store, "erin") == (1, False, 0)
        assert metric("gateway_appeals_decided_total", outcome="accepted") == accepted + 1
        assert metric("gateway_appeal_decision_seconds_count") == timed + 1
        events = await store.events("erin")
        assert events is not None
        audit = events[0]
        assert (audit["type"], audit["operator"], audit["reason"], audit["event_id"], audit["appeal_id"]) == (
            "appeal_accepted",
            "mod-ann",
            "Quote from a film.",
            appeal.event_id,
            str(appeal.id),
        )
        assert audit["reversed_events"] == [appeal.event_id]
        with pytest.raises(GatewayError) as twice:
            await store.decide_appeal(appeal.id, accept=False, reason="Changed my mind.")
        assert refusal(twice) == (409, "appeal_decided")
        assert (b"x-should-retry", b"false") in twice.value.response_headers()


async def test_accepting_a_blocks_appeal_lifts_it_and_takes_it_off_the_ladder(
    settings_factory: SettingsFactory, database_url: str
) -> None:
    async with policy_store(settings_factory, STRICT) as store:
        block_id = await block_three_times(store, "frank")
        assert await status_of(store, "frank") == (3, True, 1)
        appeal = await store.file_appeal("frank", int(block_id), "All three were jokes between friends.")
        await store.decide_appeal(appeal.id, accept=True, reason="Friends joking.", operator="mod-ben")

        # Lifted, off the ladder, and the points reset as an unblock resets them.
        assert await status_of(store, "frank") == (0, False, 0)
        assert await store.current_block("frank") is None
        events = await store.events("frank")
        assert events is not None
        assert [(event["type"], event.get("operator")) for event in events[:3]] == [
            ("appeal_accepted", "mod-ben"),
            ("unblock", "mod-ben"),
            ("block", None),
        ]
        assert events[1]["actor"] == "admin"
        assert events[2]["reversed_by"] == "mod-ben"
        # The next policy block is the ladder's first step again: one day, not seven.
        again = await block_three_times(store, "frank")
        block = await store.current_block("frank")
        assert block is not None
        assert block.until is not None
        assert round((block.until - await db_now(database_url)).total_seconds() / 86400) == 1
        assert again != block_id


async def test_reversing_a_strike_lifts_the_block_it_caused_and_keeps_the_other_points(
    settings_factory: SettingsFactory,
) -> None:
    async with policy_store(settings_factory, STRICT) as store:
        block_id = await block_three_times(store, "gina")
        strikes = await event_ids(store, "gina", "violation")

        status = await store.reverse_event(strikes[1], reason="Misread sarcasm.", operator="mod-cy")

        assert (status.strikes, status.blocked, status.blocks) == (2, False, 0)
        events = await store.events("gina")
        assert events is not None
        reversed_event = events[0]
        assert (reversed_event["type"], reversed_event["operator"], reversed_event["event_id"]) == (
            "reversed",
            "mod-cy",
            strikes[1],
        )
        assert reversed_event["reversed_events"] == [strikes[1], int(block_id)]
        assert events[1]["type"] == "unblock"
        # Reversing it again changes nothing and records nothing.
        assert (await store.reverse_event(strikes[1], reason="Again.")).strikes == 2
        after = await store.events("gina")
        assert after is not None
        assert len(after) == len(events)
        # One more strike reaches the limit again.
        outcome = await store.record_violation("gina", flagged("harassment"))
        assert (outcome.strikes, outcome.block is not None) == (3, True)


async def test_a_block_that_stands_without_the_reversed_strike_stays(settings_factory: SettingsFactory) -> None:
    async with policy_store(settings_factory, STRICT) as store:
        await store.record_violation("hank", flagged("harassment"))
        await store.record_violation("hank", flagged("harassment"))
        outcome = await store.record_violation("hank", flagged("weapons"))  # 1 + 1 + 2 = 4 points
        assert outcome.block is not None
        first = (await event_ids(store, "hank", "violation"))[0]
        status = await store.reverse_event(first, reason="One was fine.")
        assert (status.strikes, status.blocked, status.blocks) == (3, True, 1)
        events = await store.events("hank")
        assert events is not None
        assert events[0]["reversed_events"] == [first]


async def test_a_zero_tolerance_block_goes_with_its_violation(settings_factory: SettingsFactory) -> None:
    async with policy_store(settings_factory, STRICT) as store:
        await store.record_violation("ivy", flagged("harassment"))
        outcome = await store.record_violation("ivy", flagged("minors"))
        assert outcome.block is not None
        assert outcome.block.permanent
        status = await store.reverse_event(int(outcome.event_id or 0), reason="A medical question.")
        # The block lifts; the unrelated harassment strike still counts.
        assert (status.strikes, status.blocked, status.permanent, status.blocks) == (1, False, False, 0)


async def test_reversing_a_past_block_takes_it_off_the_ladder(settings_factory: SettingsFactory) -> None:
    async with policy_store(settings_factory, STRICT) as store:
        first = await block_three_times(store, "jack")
        await store.unblock("jack")
        await block_three_times(store, "jack")
        assert await status_of(store, "jack") == (3, True, 2)
        status = await store.reverse_event(int(first), reason="The first block was a mistake.")
        # The block in force stays; the ladder counts one block.
        assert (status.blocked, status.blocks) == (True, 1)


async def test_rejecting_changes_nothing_but_the_appeal(settings_factory: SettingsFactory) -> None:
    async with policy_store(settings_factory, STRICT) as store:
        block_id = await block_three_times(store, "kate")
        appeal = await store.file_appeal("kate", int(block_id), "Unfair.")
        rejected = metric("gateway_appeals_decided_total", outcome="rejected")
        decided = await store.decide_appeal(appeal.id, accept=False, reason="Clear violations.", operator="mod-di")
        assert (decided.status, decided.decided_by) == ("rejected", "mod-di")
        assert await status_of(store, "kate") == (3, True, 1)
        assert metric("gateway_appeals_decided_total", outcome="rejected") == rejected + 1
        events = await store.events("kate")
        assert events is not None
        assert (events[0]["type"], events[0]["event_id"], events[0]["appeal_id"]) == (
            "appeal_rejected",
            appeal.event_id,
            str(appeal.id),
        )
        assert "reversed_events" not in events[0]
        assert events[1]["reversed_at"] is None


async def test_unknown_appeals_and_events(settings_factory: SettingsFactory) -> None:
    async with policy_store(settings_factory, STRICT) as store:
        with pytest.raises(GatewayError) as appeal:
            await store.decide_appeal(10**15, accept=True, reason="?")
        assert refusal(appeal) == (404, "appeal_not_found")
        assert await store.appeal(10**15) is None
        with pytest.raises(GatewayError) as event:
            await store.reverse_event(10**15, reason="?")
        assert refusal(event) == (404, "event_not_found")
        await store.block("lena", seconds=60)
        await store.unblock("lena")
        unblock = (await event_ids(store, "lena", "unblock"))[0]
        with pytest.raises(GatewayError) as not_reversible:
            await store.reverse_event(unblock, reason="?")
        assert refusal(not_reversible) == (404, "event_not_found")


async def test_an_appeal_of_a_reversed_event_is_refused(settings_factory: SettingsFactory) -> None:
    async with policy_store(settings_factory, STRICT) as store:
        strike = await store.record_violation("mia", flagged("harassment"))
        await store.reverse_event(int(strike.event_id or 0), reason="Caught it myself.")
        with pytest.raises(GatewayError) as caught:
            await store.file_appeal("mia", int(strike.event_id or 0), "Please.")
        assert refusal(caught) == (409, "event_reversed")


async def test_the_appeals_queue_pages_oldest_first(settings_factory: SettingsFactory) -> None:
    async with policy_store(settings_factory, STRICT) as store:
        filed = []
        for user in ("nora", "omar", "pia"):
            strike = await store.record_violation(user, flagged("harassment"))
            filed.append(await store.file_appeal(user, int(strike.event_id or 0), f"{user} appeals"))
        await store.decide_appeal(filed[1].id, accept=False, reason="No.")
        page, cursor = await store.list_appeals("open", limit=1)
        assert [appeal.id for appeal in page] == [filed[0].id]
        assert page[0].event is not None
        assert page[0].event["categories"] == ["harassment"]
        assert cursor is not None
        page, cursor = await store.list_appeals("open", limit=1, after=cursor)
        assert ([appeal.id for appeal in page], cursor) == ([filed[2].id], None)
        rejected, _ = await store.list_appeals("rejected")
        assert [appeal.id for appeal in rejected] == [filed[1].id]
        for bad in ("nope", "bm9wZQ"):  # not a cursor; a cursor of a non-number
            with pytest.raises(ValueError, match="cursor"):
                await store.list_appeals("open", after=bad)


async def test_a_decision_goes_out_through_the_outbox(settings_factory: SettingsFactory, database_url: str) -> None:
    policy = dataclasses.replace(STRICT, webhooks=True)
    async with policy_store(settings_factory, policy) as store:
        block_id = await block_three_times(store, "quinn")
        appeal = await store.file_appeal("quinn", int(block_id), "Please.")
        await store.decide_appeal(appeal.id, accept=True, reason="Granted.", operator="mod-eve")
        rows = await fetch(database_url, "SELECT payload FROM webhook_outbox ORDER BY id")
        payloads = [orjson.loads(row["payload"]) for row in rows]
    assert [payload["type"] for payload in payloads] == ["user.blocked", "user.unblocked", "appeal.decided"]
    unblocked, decided = payloads[1], payloads[2]
    assert (unblocked["actor"], unblocked["operator"], unblocked["block_number"]) == ("admin", "mod-eve", 1)
    assert {key: decided[key] for key in ("user_id", "appeal_id", "event_id", "status", "operator", "reason")} == {
        "user_id": "quinn",
        "appeal_id": str(appeal.id),
        "event_id": block_id,
        "status": "accepted",
        "operator": "mod-eve",
        "reason": "Granted.",
    }
    assert (decided["reversed_events"], decided["unblocked"]) == ([block_id], True)


async def test_an_appealed_block_is_no_longer_appealable_on_every_replica(settings_factory: SettingsFactory) -> None:
    async with (
        policy_store(settings_factory, STRICT, cache=True) as one,
        policy_store(settings_factory, STRICT, cache=True) as two,
    ):
        block_id = await block_three_times(one, "rita")
        await until(lambda: two.cached_block("rita")[1] is not None)
        block = two.cached_block("rita")[1]
        assert block is not None
        assert block.appealable_until is not None
        await one.file_appeal("rita", int(block_id), "Please.")
        await until(lambda: _appealable_until(two, "rita") is None)
        assert await _fresh_block(settings_factory, "rita") is None


async def test_two_replicas_see_an_accepted_appeals_unblock_within_a_second(
    settings_factory: SettingsFactory,
) -> None:
    async with (
        policy_store(settings_factory, STRICT, cache=True) as one,
        policy_store(settings_factory, STRICT, cache=True) as two,
    ):
        block_id = await block_three_times(one, "sam")
        await until(lambda: two.cached_block("sam")[1] is not None)
        appeal = await two.file_appeal("sam", int(block_id), "Please.")
        await one.decide_appeal(appeal.id, accept=True, reason="Granted.")
        started = time.monotonic()
        await until(lambda: two.cached_block("sam") == (True, None), timeout=1.0)
        assert time.monotonic() - started < 1.0
        assert await two.current_block("sam") is None


async def test_nothing_is_half_applied_when_the_database_drops_mid_decision(
    settings_factory: SettingsFactory, database_url: str
) -> None:
    """The backend deciding the appeal is terminated inside its transaction, after the reversal's
    writes: the appeal stays open, the block stays, no audit event or outbox row is left."""
    policy = dataclasses.replace(STRICT, webhooks=True)
    async with policy_store(settings_factory, policy) as store:
        block_id = await block_three_times(store, "tess")
        appeal = await store.file_appeal("tess", int(block_id), "Please.")
        before = await fetch(database_url, "SELECT count(*) AS n FROM events")
        await _terminate_inside(database_url, "appeals")
        with pytest.raises(StoreUnavailable):
            await store.decide_appeal(appeal.id, accept=True, reason="Granted.")
        await _terminate_inside(database_url, None)
        assert await status_of(store, "tess") == (3, True, 1)
        found = await store.appeal(appeal.id)
        assert found is not None
        assert found.status == "open"
        assert found.event is not None
        assert found.event["reversed_at"] is None
        assert (await fetch(database_url, "SELECT count(*) AS n FROM events"))[0]["n"] == before[0]["n"]
        outbox = await fetch(database_url, "SELECT payload->>'type' AS type FROM webhook_outbox ORDER BY id")
        assert [row["type"] for row in outbox] == ["user.blocked"]
        # The same decision goes through once the database answers again.
        decided = await store.decide_appeal(appeal.id, accept=True, reason="Granted.")
        assert decided.status == "accepted"
        assert await status_of(store, "tess") == (0, False, 0)


async def test_notes_go_on_a_known_users_timeline(settings_factory: SettingsFactory) -> None:
    async with policy_store(settings_factory, STRICT) as store:
        await store.record_violation("uma", flagged("harassment"))
        note = await store.add_note("uma", "mod-fay", "Talked to the app team; watch this one.")
        assert note is not None
        assert (note["type"], note["operator"], note["text"]) == (
            "note",
            "mod-fay",
            "Talked to the app team; watch this one.",
        )
        events = await store.events("uma")
        assert events is not None
        assert events[0] == note
        assert await store.add_note("nobody", "mod-fay", "Who?") is None
        for bad in ("", "   ", "a\x00b", "x" * 4001):
            with pytest.raises(ValueError, match="note"):
                await store.add_note("uma", "mod-fay", bad)


async def test_the_standing_of_a_user(settings_factory: SettingsFactory, database_url: str) -> None:
    policy = dataclasses.replace(POLICY, warnings=1, appeal_window_days=30)
    async with policy_store(settings_factory, policy) as store:
        assert await store.standing("vera") == zero_standing("vera")
        warning = await store.record_violation("vera", flagged("harassment"))
        strike = await store.record_violation("vera", flagged("harassment"))
        appeal = await store.file_appeal("vera", int(strike.event_id or 0), "Sarcasm.")
        outcome = await store.record_violation("vera", flagged("weapons"))
        assert outcome.block is not None
        standing = await store.standing("vera")
        assert (standing["strikes"], standing["blocked"], standing["permanent"], standing["warnings"]) == (
            3,
            True,
            False,
            1,
        )
        assert standing["blocked_until"] == standing["block"]["until"]
        assert [(s["event_id"], s["points"], s["appealable"]) for s in standing["active_strikes"]] == [
            (strike.event_id, 1, False),
            (outcome.event_id, 2, True),
        ]
        assert standing["active_strikes"][0]["categories"] == ["harassment"]
        rows = await fetch(database_url, "SELECT expires_at FROM events WHERE id = $1", int(strike.event_id or 0))
        assert standing["active_strikes"][0]["expires_at"] == rows[0]["expires_at"].isoformat().replace("+00:00", "Z")
        assert [w["event_id"] for w in standing["active_warnings"]] == [warning.event_id]
        assert standing["block"]["event_id"] == outcome.block.event_id
        assert (standing["block"]["categories"], standing["block"]["by"], standing["block"]["appealable"]) == (
            ["harassment", "weapons"],
            "policy",
            True,
        )
        assert standing["appeals"] == [appeal.to_json()]


async def until(condition: Callable[[], Any], timeout: float = 3.0) -> None:
    """Wait, in short real steps, until `condition()` holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def _appealable_until(store: Store, user_id: str) -> object:
    block = store.cached_block(user_id)[1]
    assert block is not None
    return block.appealable_until


async def _fresh_block(settings_factory: SettingsFactory, user_id: str) -> object:
    """The block's appealable_until as a replica that starts now reads it."""
    async with policy_store(settings_factory, STRICT, cache=True) as fresh:
        block = fresh.cached_block(user_id)[1]
        assert block is not None
        return block.appealable_until


async def _terminate_inside(database_url: str, table: str | None) -> None:
    """Make the next UPDATE of `table` terminate its own backend, inside its transaction (None: stop)."""
    conn = await asyncpg.connect(database_url)
    try:
        if table is None:
            await conn.execute("DROP TRIGGER terminate_inside ON appeals; DROP FUNCTION terminate_inside()")
            return
        await conn.execute(
            "CREATE FUNCTION terminate_inside() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN PERFORM pg_terminate_backend(pg_backend_pid()); RETURN NEW; END $$;"
            f" CREATE TRIGGER terminate_inside AFTER UPDATE ON {table}"
            " FOR EACH ROW EXECUTE FUNCTION terminate_inside()"
        )
    finally:
        await conn.close()
