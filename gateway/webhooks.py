"""Webhook delivery: block, unblock and appeal events POSTed from the transactional outbox, at least once.

The store writes a `webhook_outbox` row (`enqueue`) in the same transaction as the state change;
this module sends those rows, signed `X-Gateway-Signature: sha256=<hex HMAC-SHA256 of the body>`,
and retries failures with capped exponential backoff. All delivery state lives in the table,
so a restart, a second replica or a receiver that is down for hours loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import random
from dataclasses import dataclass
from itertools import groupby
from typing import Any

import aiohttp
import structlog
from prometheus_client import Counter, Gauge
from pydantic import SecretStr

from gateway.database import Connection, Database

log = structlog.get_logger("gateway.webhooks")

DELIVERIES = Counter(
    "gateway_webhook_deliveries_total",
    "Webhook POST attempts, by result (delivered, rejected, timeout, unreachable).",
    ["result"],
)
for _result in ("delivered", "rejected", "timeout", "unreachable"):
    DELIVERIES.labels(_result)  # so dashboards see 0 rather than no series
PENDING = Gauge("gateway_webhook_outbox_pending", "Webhook events not yet delivered, as last seen by this process.")

# Claim due rows by pushing next_attempt_at out to a lease, in one autocommit statement.
# Why a lease and not a transaction held open across the POSTs: a slow receiver would pin a
# pool connection and row locks for the whole batch, and a replica that died mid-POST would
# leave nothing behind but the lease, which simply runs out. SKIP LOCKED plus the re-check of
# `next_attempt_at <= now()` on the row version a concurrent claim committed (READ COMMITTED
# re-evaluates the WHERE clause of a locked row) means each due row is claimed by one replica.
# `attempts` is read from the updated row: the claim does not count as an attempt.
_CLAIM = """
WITH due AS (
    SELECT id FROM webhook_outbox
    WHERE delivered_at IS NULL AND next_attempt_at <= now()
    ORDER BY id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE webhook_outbox AS o
SET next_attempt_at = now() + make_interval(secs => $2)
FROM due
WHERE o.id = due.id
RETURNING o.id, o.event_id, o.attempts, o.payload::text AS body,
          o.payload->>'user_id' AS user_id, o.payload->>'type' AS type
"""

_DELIVERED = """
UPDATE webhook_outbox
SET delivered_at = now(), attempts = attempts + 1, last_error = NULL
WHERE id = ANY($1::bigint[])
"""

# `tried` is false for rows held back behind an earlier failed event of the same user: they
# move with it but were not attempted, so neither their count nor their last error changes.
_RETRY = """
UPDATE webhook_outbox AS o
SET next_attempt_at = now() + make_interval(secs => r.delay),
    attempts = o.attempts + CASE WHEN r.tried THEN 1 ELSE 0 END,
    last_error = CASE WHEN r.tried THEN r.error ELSE o.last_error END
FROM unnest($1::bigint[], $2::float8[], $3::text[], $4::bool[]) AS r(id, delay, error, tried)
WHERE o.id = r.id AND o.delivered_at IS NULL
"""

_PENDING = "SELECT count(*) FROM webhook_outbox WHERE delivered_at IS NULL"
_ENQUEUE = "INSERT INTO webhook_outbox (event_id, payload) VALUES ($1, $2)"

_ERROR_CHARS = 200


@dataclass(frozen=True, slots=True)
class _Row:
    id: int
    event_id: int
    attempts: int
    body: bytes
    user_id: str
    type: str


@dataclass(frozen=True, slots=True)
class _Retry:
    id: int
    delay: float
    error: str | None  # None: held back, not attempted


async def enqueue(conn: Connection, event_id: int, payload: dict[str, Any]) -> None:
    """Queue `payload` for delivery, inside the caller's transaction of the change it announces."""
    await conn.execute(_ENQUEUE, event_id, payload)


def sign(secret: bytes, body: bytes) -> str:
    """The `X-Gateway-Signature` value for `body`: `sha256=` and the hex HMAC-SHA256 keyed with `secret`."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class WebhookSender:
    """Sends the outbox to `url`; `start()` runs the delivery loop, `deliver_due()` is one pass."""

    def __init__(
        self,
        database: Database,
        url: str,
        secret: SecretStr | str,
        *,
        batch: int = 50,
        poll_interval: float = 1.0,
        max_backoff: float = 300.0,
        timeout: float = 10.0,
        min_backoff: float = 1.0,
    ) -> None:
        self._database = database
        self._url = url
        raw = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
        self._secret = raw.encode("utf-8")
        self._batch = batch
        self._poll_interval = poll_interval
        self._max_backoff = max_backoff
        self._min_backoff = min_backoff
        self._timeout = timeout
        # Longer than a pass normally takes (users' chains are sent concurrently, each POST is
        # bounded by `timeout`). A pass that outlives it can lead another replica to send an
        # event again: a duplicate, which at-least-once allows and receivers dedupe by `id`.
        self._lease = timeout * 3 + 5
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        self._stopping.clear()
        self._ensure_session()
        self._task = asyncio.create_task(self._run(), name="webhook-sender")

    async def close(self) -> None:
        """Let the pass in flight finish and record its results (bounded), then stop."""
        self._stopping.set()
        if self._task is not None:
            task, self._task = self._task, None
            try:
                await asyncio.wait_for(asyncio.shield(task), self._timeout + 5)
            except TimeoutError:
                # Rows it claimed keep their lease and are sent again once it runs out.
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def deliver_due(self) -> int:
        """Send the due events once; returns how many the receiver accepted."""
        return (await self._pass())[1]

    async def _run(self) -> None:
        while not self._stopping.is_set():
            claimed = 0
            try:
                claimed, _ = await self._pass()
            except Exception as exc:
                # The database being away is the usual cause; the next pass tries again.
                log.warning("webhook_pass_failed", error=f"{type(exc).__name__}: {exc}"[:_ERROR_CHARS])
            if claimed < self._batch:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self._poll_interval)

    async def _pass(self) -> tuple[int, int]:
        pool = self._database.pool
        records = await pool.fetch(_CLAIM, self._batch, self._lease)
        rows = sorted(
            (
                _Row(r["id"], r["event_id"], r["attempts"], r["body"].encode("utf-8"), r["user_id"] or "", r["type"])
                for r in records
            ),
            key=lambda row: (row.user_id, row.id),
        )
        delivered: list[int] = []
        retries: list[_Retry] = []
        if rows:
            # One user's events go out in order, one after the other; users go concurrently.
            chains = [list(chain) for _, chain in groupby(rows, key=lambda row: row.user_id)]
            results = await asyncio.gather(*(self._send_chain(chain) for chain in chains))
            for chain_delivered, chain_retries in results:
                delivered.extend(chain_delivered)
                retries.extend(chain_retries)
            async with pool.acquire() as conn, conn.transaction():
                if delivered:
                    await conn.execute(_DELIVERED, delivered)
                if retries:
                    await conn.execute(
                        _RETRY,
                        [r.id for r in retries],
                        [r.delay for r in retries],
                        [r.error for r in retries],
                        [r.error is not None for r in retries],
                    )
        PENDING.set(await pool.fetchval(_PENDING))
        return len(rows), len(delivered)

    async def _send_chain(self, chain: list[_Row]) -> tuple[list[int], list[_Retry]]:
        delivered: list[int] = []
        for index, row in enumerate(chain):
            error = await self._post(row)
            if error is None:
                delivered.append(row.id)
                continue
            delay = self._backoff(row.attempts + 1)
            log.warning(
                "webhook_delivery_failed",
                event_id=f"evt_{row.event_id}",
                event_type=row.type,
                attempt=row.attempts + 1,
                retry_in=round(delay, 1),
                error=error,
            )
            # Later events of this user wait with it, so the receiver keeps seeing them in order.
            held = [_Retry(later.id, delay, None) for later in chain[index + 1 :]]
            return delivered, [_Retry(row.id, delay, error), *held]
        return delivered, []

    async def _post(self, row: _Row) -> str | None:
        """POST one event; None when the receiver accepted it (2xx), else a short error text."""
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "chat-gateway-webhooks",
            "X-Gateway-Signature": sign(self._secret, row.body),
            "X-Gateway-Event-Id": f"evt_{row.event_id}",
            "X-Gateway-Event-Type": row.type,
            "X-Gateway-Delivery-Attempt": str(row.attempts + 1),
        }
        session = self._ensure_session()
        try:
            # Redirects are failures: following one would re-send the signed body somewhere else.
            async with session.post(self._url, data=row.body, headers=headers, allow_redirects=False) as response:
                if 200 <= response.status < 300:
                    DELIVERIES.labels("delivered").inc()
                    return None
                snippet = (await response.content.read(_ERROR_CHARS)).decode("utf-8", "replace")
                DELIVERIES.labels("rejected").inc()
                return f"HTTP {response.status} {snippet}".strip()[:_ERROR_CHARS]
        except TimeoutError:
            DELIVERIES.labels("timeout").inc()
            return f"no answer within {self._timeout:g}s"
        except aiohttp.ClientError as exc:
            DELIVERIES.labels("unreachable").inc()
            return f"{type(exc).__name__}: {exc}"[:_ERROR_CHARS]

    def _backoff(self, attempts: int) -> float:
        # Exponential from min_backoff, capped, with jitter so replicas and events that failed
        # together do not retry in lockstep against a receiver that is coming back.
        ceiling = min(self._max_backoff, self._min_backoff * 2.0 ** min(attempts - 1, 62))
        return ceiling * random.uniform(0.5, 1.0)

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout))
        return self._session
