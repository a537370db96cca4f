"""The Store's casework: what users and moderators do with the record, as the Store's methods.

A user's standing and appeals; a moderator's decisions, reversals and notes; erasure and
retention. Each change is one transaction under the user's row lock, as a strike is: the SQL
and the rules live in gateway/appeals.py, reversal.py, lifecycle.py, users.py and events.py;
this class holds the transactions, and what follows their commit (the block cache, metrics,
logs). `Store` (gateway/store.py) is built on it and provides the database (`_db`) and the lock.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import structlog

from gateway import appeals, events, lifecycle, reversal, users
from gateway.appeals import Appeal
from gateway.database import Connection, Database
from gateway.metrics import APPEAL_DECISION_SECONDS, APPEALS_DECIDED, APPEALS_OPENED
from gateway.policy import Policy
from gateway.users import STATUS, UserStatus, status_from
from middleware.protocols import Block

log = structlog.get_logger("gateway.store")


class Casework:
    """Standing, appeals, reversal, notes, erasure and retention; `Store` supplies the rest."""

    _db: Database
    policy: Policy

    # -- what the Store supplies --------------------------------------------------------------------

    async def _lock(self, conn: Connection, user_id: str) -> asyncpg.Record | None:
        raise NotImplementedError

    def _learned(self, user_id: str, block: Block | None) -> None:
        raise NotImplementedError

    # -- the user's -----------------------------------------------------------------------------------

    async def standing(self, user_id: str) -> dict[str, Any]:
        """The user's standing for their application (gateway/users.py) with their appeals."""

        async def work(conn: Connection) -> dict[str, Any]:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                found = await users.standing(conn, self.policy, user_id)
                found["appeals"] = [appeal.to_json() for appeal in await appeals.of_user(conn, user_id)]
                return found

        return await self._db.read(work)

    async def file_appeal(self, user_id: str, event_id: int, message: str) -> Appeal:
        """The user's appeal of one of their violations or blocks; raises GatewayError (gateway/appeals.py)."""
        async with self._db.connection() as conn, conn.transaction():
            await self._lock(conn, user_id)
            appeal = await appeals.file(conn, self.policy, user_id, event_id, message)
        APPEALS_OPENED.inc()
        log.info("appeal filed", user_id=user_id, appeal_id=appeal.id, event_id=event_id)
        return appeal

    # -- the moderator's ------------------------------------------------------------------------------

    async def appeal(self, appeal_id: int) -> Appeal | None:
        return await self._db.read(lambda conn: appeals.one(conn, appeal_id))

    async def list_appeals(
        self, status: appeals.Status = "open", *, limit: int = 100, after: str | None = None
    ) -> tuple[list[Appeal], str | None]:
        """A page of appeals in `status`, oldest first, and the next page's cursor."""
        return await self._db.read(lambda conn: appeals.page(conn, status, limit=limit, after=after))

    async def decide_appeal(self, appeal_id: int, *, accept: bool, reason: str, operator: str = "admin") -> Appeal:
        """Accept (reversing the event and what it caused) or reject an open appeal, in one transaction.

        Raises GatewayError 404 `appeal_not_found`, 409 `appeal_decided`.
        """
        async with self._db.connection() as conn, conn.transaction():
            user_id = await appeals.owner(conn, appeal_id)
            state = None if user_id is None else await self._lock(conn, user_id)
            appeal = None if state is None else await appeals.lock(conn, appeal_id)
            if user_id is None or state is None or appeal is None:
                raise appeals.not_found(appeal_id)
            if appeal.status != "open":
                raise appeals.decided(appeal)
            done = None
            if accept:
                done = await reversal.reverse(
                    conn, self.policy, user_id, state, appeal.event_id, operator=operator, reason=reason
                )
            decided = await appeals.decide(conn, appeal, "accepted" if accept else "rejected", operator, reason)
            kind: reversal.Decision = "appeal_accepted" if accept else "appeal_rejected"
            await reversal.record(
                conn,
                self.policy,
                user_id,
                kind,
                event_id=appeal.event_id,
                operator=operator,
                reason=reason,
                reversal=done,
                appeal=decided,
            )
            answer = await appeals.one(conn, appeal_id)
        if done is not None and done.lifted:
            self._learned(user_id, None)
        assert answer is not None
        assert decided.decided_at is not None
        APPEALS_DECIDED.labels(decided.status).inc()
        APPEAL_DECISION_SECONDS.observe((decided.decided_at - decided.created_at).total_seconds())
        log.info("appeal decided", user_id=user_id, appeal_id=appeal_id, status=decided.status, operator=operator)
        return answer

    async def reverse_event(self, event_id: int, *, reason: str, operator: str = "admin") -> UserStatus:
        """A moderator's own correction: reverse the event and what it caused (gateway/reversal.py).

        Idempotent; raises GatewayError 404 `event_not_found`.
        """
        async with self._db.connection() as conn, conn.transaction():
            user_id = await reversal.owner(conn, event_id)
            state = None if user_id is None else await self._lock(conn, user_id)
            if user_id is None or state is None:
                raise reversal.event_not_found(event_id)
            done = await reversal.reverse(conn, self.policy, user_id, state, event_id, operator=operator, reason=reason)
            if done.reversed:
                await reversal.record(
                    conn,
                    self.policy,
                    user_id,
                    "reversed",
                    event_id=event_id,
                    operator=operator,
                    reason=reason,
                    reversal=done,
                )
            row = await conn.fetchrow(STATUS, self.policy.window, user_id)
        if done.lifted:
            self._learned(user_id, None)
        log.info("event reversed", user_id=user_id, event_id=event_id, reversed=done.reversed, operator=operator)
        assert row is not None
        return status_from(row, self.policy)

    async def add_note(self, user_id: str, operator: str, text: str) -> dict[str, Any] | None:
        """A moderator's note on the user's timeline (an event of type `note`); None if the user is unknown."""
        async with self._db.connection() as conn:
            return await events.add_note(conn, user_id, operator, text)

    # -- the data's lifecycle -------------------------------------------------------------------------

    async def erase_user(self, user_id: str, *, operator: str = "admin") -> bool:
        """Erase the user's state, events and appeals, keeping one `erased` event; False if unknown."""
        async with self._db.connection() as conn, conn.transaction():
            erased = await lifecycle.erase(conn, user_id, operator=operator)
        if erased:
            self._learned(user_id, None)
            # The log keeps what the audit keeps: the hash, never the id.
            log.info("user erased", user_sha256=lifecycle.user_hash(user_id), operator=operator)
        return erased

    async def sweep_retention(self) -> int:
        """Delete expendable events past the retention, and outbox rows delivered over a week ago,
        in batches of their own short transactions; the number of events deleted."""
        deleted = 0
        days = self.policy.retention_days
        position = lifecycle.START
        while days > 0:
            async with self._db.connection() as conn, conn.transaction():
                batch, position = await lifecycle.delete_old_events(
                    conn, days=days, window=self.policy.window, after=position
                )
            deleted += batch
            if batch < lifecycle.BATCH:
                break
        while True:
            async with self._db.connection() as conn, conn.transaction():
                batch = await lifecycle.delete_delivered(conn)
            if batch < lifecycle.BATCH:
                return deleted
