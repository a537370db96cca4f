"""Webhook delivery from the outbox and the expiry sweeper, on a real PostgreSQL and a real receiver."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from gateway.database import Database
from gateway.settings import Settings
from gateway.store import Policy, Store
from gateway.sweeper import ExpirySweeper
from gateway.webhooks import WebhookSender
from middleware.protocols import Verdict, Violation

SECRET = "whsec-test-secret"
VIOLATION = Violation(Verdict(detector="rules", categories=("violence",), text_sha256="0" * 64), "/v1/chat/completions")


def signature_ok(body: bytes, header: str | None) -> bool:
    # Exactly as docs/WEBHOOKS.md tells receivers to check it.
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return header is not None and hmac.compare_digest(expected, header)


class Receiver:
    """A webhook endpoint on a loopback port: records what arrives, answers `status`, can go down."""

    def __init__(self) -> None:
        self.status = 200
        self.delay = 0.0
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    @property
    def events(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.received]

    async def _handle(self, request: web.Request) -> web.Response:
        self.received.append((dict(request.headers), await request.read()))
        if self.delay:
            await asyncio.sleep(self.delay)
        return web.Response(status=self.status, text="nope" if self.status >= 300 else "")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hooks", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        # Port 0 the first time; the same port when it comes back, like a restarted service.
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    await receiver.start()
    yield receiver
    await receiver.stop()


@pytest.fixture
def hook_settings(settings_factory: Callable[..., Settings], database_url: str, receiver: Receiver) -> Settings:
    return settings_factory(database_url=database_url, webhook_url=receiver.url, webhook_secret=SECRET)


@pytest.fixture
async def database(hook_settings: Settings) -> AsyncIterator[Database]:
    database = Database(hook_settings)
    await database.open()
    yield database
    await database.close()


@pytest.fixture
def hook_store(database: Database, hook_settings: Settings) -> Store:
    policy = dataclasses.replace(Policy.from_settings(hook_settings), max_strikes=3, webhooks=True)
    return Store(database, policy)


@pytest.fixture
async def sender_factory(database: Database, receiver: Receiver) -> AsyncIterator[Callable[..., WebhookSender]]:
    senders: list[WebhookSender] = []

    def make(db: Database = database, **options: Any) -> WebhookSender:
        sender = WebhookSender(db, receiver.url, SECRET, **options)
        senders.append(sender)
        return sender

    yield make
    for sender in senders:
        await sender.close()


async def outbox(database: Database) -> list[dict[str, Any]]:
    rows = await database.pool.fetch(
        "SELECT id, event_id, attempts, next_attempt_at > now() AS later, delivered_at IS NOT NULL AS delivered,"
        " last_error, payload::text AS body FROM webhook_outbox ORDER BY id"
    )
    return [dict(row) for row in rows]


async def make_due(database: Database) -> None:
    await database.pool.execute("UPDATE webhook_outbox SET next_attempt_at = now() WHERE delivered_at IS NULL")


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


async def test_policy_block_and_admin_unblock_are_delivered_signed(
    hook_store: Store, database: Database, receiver: Receiver, sender_factory: Callable[..., WebhookSender]
) -> None:
    for _ in range(3):
        outcome = await hook_store.record_violation("alice", VIOLATION)
    assert outcome.block is not None
    await hook_store.unblock("alice", reason="appeal accepted")

    assert await sender_factory().deliver_due() == 2

    assert len(receiver.received) == 2
    for headers, body in receiver.received:
        assert headers["Content-Type"] == "application/json"
        assert signature_ok(body, headers.get("X-Gateway-Signature"))
        assert not signature_ok(body + b" ", headers.get("X-Gateway-Signature"))
        assert headers["X-Gateway-Event-Id"] == json.loads(body)["id"]
        assert headers["X-Gateway-Delivery-Attempt"] == "1"
    blocked, unblocked = receiver.events
    assert blocked["type"] == "user.blocked"
    assert blocked["user_id"] == "alice"
    assert blocked["actor"] == "policy"
    assert blocked["block_number"] == 1
    assert blocked["permanent"] is False
    assert blocked["blocked_until"] is not None
    assert unblocked["type"] == "user.unblocked"
    assert unblocked["actor"] == "admin"
    assert unblocked["reason"] == "appeal accepted"
    assert blocked["id"] != unblocked["id"]
    # What was signed and sent is the stored payload, byte for byte.
    rows = await outbox(database)
    assert [row["body"].encode() for row in rows] == [body for _, body in receiver.received]
    assert all(row["delivered"] and row["attempts"] == 1 and row["last_error"] is None for row in rows)
    # Delivered events are not sent again.
    assert await sender_factory().deliver_due() == 0
    assert len(receiver.received) == 2


async def test_rejected_delivery_backs_off_then_is_delivered(
    hook_store: Store, database: Database, receiver: Receiver, sender_factory: Callable[..., WebhookSender]
) -> None:
    await hook_store.block("bob", seconds=600, reason="spam")
    sender = sender_factory(min_backoff=60)
    receiver.status = 500

    assert await sender.deliver_due() == 0
    [row] = await outbox(database)
    assert not row["delivered"]
    assert row["attempts"] == 1
    assert row["later"]
    assert row["last_error"].startswith("HTTP 500")
    # Not due yet: nothing is sent.
    assert await sender.deliver_due() == 0
    assert len(receiver.received) == 1

    receiver.status = 204
    await make_due(database)
    assert await sender.deliver_due() == 1
    [row] = await outbox(database)
    assert row["delivered"]
    assert row["attempts"] == 2
    assert receiver.received[-1][0]["X-Gateway-Delivery-Attempt"] == "2"
    assert receiver.received[0][1] == receiver.received[1][1]
    assert receiver.events[-1]["actor"] == "admin"


async def test_redirect_and_timeout_count_as_failures(
    hook_store: Store, database: Database, receiver: Receiver, sender_factory: Callable[..., WebhookSender]
) -> None:
    await hook_store.block("carol", seconds=600)
    receiver.status = 307
    assert await sender_factory(min_backoff=60).deliver_due() == 0
    [row] = await outbox(database)
    assert row["last_error"].startswith("HTTP 307")

    receiver.status = 200
    receiver.delay = 0.6
    await make_due(database)
    assert await sender_factory(min_backoff=60, timeout=0.2).deliver_due() == 0
    [row] = await outbox(database)
    assert not row["delivered"]
    assert row["attempts"] == 2
    assert "no answer" in row["last_error"]


async def test_receiver_down_then_back_gets_the_event(
    hook_store: Store, database: Database, receiver: Receiver, sender_factory: Callable[..., WebhookSender]
) -> None:
    await receiver.stop()
    await hook_store.block("dave", permanent=True)
    sender = sender_factory(max_backoff=0.2, min_backoff=0.1)

    assert await sender.deliver_due() == 0
    [row] = await outbox(database)
    assert row["attempts"] == 1
    assert not row["delivered"]
    assert row["last_error"]

    await receiver.start()

    async def retried() -> bool:
        # A tiny max_backoff: the retry is due within 0.2 s.
        return await sender.deliver_due() == 1

    await eventually(retried)
    assert await _delivered(database)
    assert receiver.events[0]["user_id"] == "dave"
    assert receiver.events[0]["permanent"] is True


async def _delivered(database: Database) -> bool:
    return all(row["delivered"] for row in await outbox(database))


async def test_a_restarted_sender_delivers_what_the_old_one_left(
    hook_store: Store,
    database: Database,
    hook_settings: Settings,
    receiver: Receiver,
    sender_factory: Callable[..., WebhookSender],
) -> None:
    await hook_store.block("erin", seconds=600)
    receiver.status = 503
    old = sender_factory(min_backoff=60)
    assert await old.deliver_due() == 0
    await old.close()

    receiver.status = 200
    await make_due(database)
    other = Database(hook_settings)
    await other.open()
    try:
        assert await sender_factory(other).deliver_due() == 1
    finally:
        await other.close()
    assert [event["user_id"] for event in receiver.events] == ["erin", "erin"]
    assert await _delivered(database)


async def test_two_replicas_send_each_event_exactly_once(
    hook_store: Store,
    database: Database,
    hook_settings: Settings,
    receiver: Receiver,
    sender_factory: Callable[..., WebhookSender],
) -> None:
    users = [f"user-{n}" for n in range(24)]
    for user in users:
        await hook_store.block(user, seconds=600)
    receiver.delay = 0.01
    other = Database(hook_settings)
    await other.open()
    try:
        first, second = sender_factory(batch=4), sender_factory(other, batch=4)
        delivered = 0
        for _ in range(20):
            counts = await asyncio.gather(first.deliver_due(), second.deliver_due())
            delivered += sum(counts)
            if delivered == len(users):
                break
    finally:
        await other.close()

    assert delivered == len(users)
    ids = [event["id"] for event in receiver.events]
    assert len(ids) == len(set(ids)) == len(users)
    assert sorted(event["user_id"] for event in receiver.events) == sorted(users)


async def test_one_users_events_wait_behind_a_failed_one(
    hook_store: Store, database: Database, receiver: Receiver, sender_factory: Callable[..., WebhookSender]
) -> None:
    await hook_store.block("frank", seconds=600)
    await hook_store.unblock("frank")
    receiver.status = 500

    assert await sender_factory(min_backoff=60).deliver_due() == 0
    # Only the first was tried; the unblock waits with it instead of overtaking it.
    assert [event["type"] for event in receiver.events] == ["user.blocked"]
    first, second = await outbox(database)
    assert (first["attempts"], second["attempts"]) == (1, 0)
    assert first["later"]
    assert second["later"]

    receiver.status = 200
    await make_due(database)
    assert await sender_factory().deliver_due() == 2
    assert [event["type"] for event in receiver.events] == ["user.blocked", "user.blocked", "user.unblocked"]


async def test_background_loop_delivers_and_closes(
    hook_store: Store, database: Database, receiver: Receiver, sender_factory: Callable[..., WebhookSender]
) -> None:
    sender = sender_factory(poll_interval=0.05)
    await sender.start()
    await hook_store.block("gina", seconds=600)

    async def arrived() -> bool:
        return len(receiver.received) == 1

    await eventually(arrived)
    await sender.close()
    assert await _delivered(database)


async def test_sweeper_sends_the_expiry_unblock(
    hook_store: Store, database: Database, receiver: Receiver, sender_factory: Callable[..., WebhookSender]
) -> None:
    await hook_store.block("hank", seconds=1)
    sweeper = ExpirySweeper(hook_store, interval=0.1)
    await sweeper.start()

    async def unblock_queued() -> bool:
        return len(await outbox(database)) == 2

    try:
        await eventually(unblock_queued, timeout=8)
    finally:
        await sweeper.close()

    assert await sender_factory().deliver_due() == 2
    blocked, unblocked = receiver.events
    assert blocked["type"] == "user.blocked"
    assert unblocked["type"] == "user.unblocked"
    assert unblocked["actor"] == "expiry"
    assert unblocked["user_id"] == "hank"
    assert all(signature_ok(body, headers.get("X-Gateway-Signature")) for headers, body in receiver.received)


async def test_loops_keep_going_while_the_database_is_away(hook_settings: Settings, receiver: Receiver) -> None:
    # Not open yet: every pass and sweep raises StoreUnavailable until it is.
    database = Database(hook_settings)
    store = Store(database, dataclasses.replace(Policy.from_settings(hook_settings), webhooks=True))
    sweeper = ExpirySweeper(store, interval=0.05)
    sender = WebhookSender(database, receiver.url, SECRET, poll_interval=0.05)
    await sweeper.start()
    await sender.start()
    try:
        await asyncio.sleep(0.3)
        await database.open()
        await store.block("ivy", seconds=0.3)

        async def both_arrived() -> bool:
            return [event["type"] for event in receiver.events] == ["user.blocked", "user.unblocked"]

        await eventually(both_arrived, timeout=8)
    finally:
        await sender.close()
        await sweeper.close()
        await database.close()
    assert receiver.events[1]["actor"] == "expiry"
