"""Reversal: undo a violation or a block, and what it caused, inside the caller's transaction.

A moderator reverses an event directly (`reversed`) or by accepting its appeal
(`appeal_accepted`). The caller holds the user's row lock (with any expired block recorded), so
the reversal is as exact as a strike:

- the event is marked reversed (who, when, why): a reversed violation's points stop counting,
  a reversed warning no longer uses up the user's warnings;
- a reversed violation takes down every policy block it caused whose remaining causes no longer
  reach `max_strikes` (a zero-tolerance block has one cause, so it always goes);
- a reversed block leaves the ladder count (`blocks` goes down); if it is the block in force it
  lifts at once, through the same `unblock` event, notification and `user.unblocked` outbox row
  as any unblock. A block lifted because its violation was reversed keeps the user's other
  points; a block reversed itself resets them, as an unblock does;
- one audit event names the operator, the reason and every event reversed, and an appeal's
  decision goes out as an `appeal.decided` webhook.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import asyncpg

from gateway import blocks, webhooks
from gateway.appeals import Appeal
from gateway.database import Connection
from gateway.events import CONTESTED_KINDS, iso
from gateway.policy import Policy
from middleware.errors import GatewayError

Decision = Literal["reversed", "appeal_accepted", "appeal_rejected"]

_TARGET = """
SELECT kind, shadow, reversed_at IS NOT NULL AS reversed, block_number
FROM events WHERE id = $1 AND user_id = $2
FOR UPDATE
"""
_OWNER = "SELECT user_id FROM events WHERE id = $1"
_MARK = "UPDATE events SET reversed_at = now(), reversed_by = $2, reverse_reason = $3 WHERE id = $1"
# The user's standing policy blocks that violation $2 caused and that no longer stand without it:
# the points of their causes that are not reversed fall below max_strikes ($5).
_BLOCKS_WITHOUT = """
UPDATE events b SET reversed_at = now(), reversed_by = $3, reverse_reason = $4
WHERE b.user_id = $1 AND b.kind = 'block' AND b.reversed_at IS NULL AND $2 = ANY(b.causes)
    AND (SELECT coalesce(sum(c.points), 0) FROM events c
         WHERE c.id = ANY(b.causes) AND c.user_id = $1 AND c.reversed_at IS NULL) < $5
RETURNING b.id, b.block_number
"""
_DECISION = """
INSERT INTO events (user_id, kind, actor, operator, reason, event_ref, appeal_id, affected)
VALUES ($1, $2, 'admin', $3, $4, $5, $6, $7)
RETURNING id, at
"""


@dataclass(frozen=True, slots=True)
class Reversal:
    """What a reversal changed: the events it reversed (the one named first; none if it was
    reversed already) and whether the block in force lifted."""

    reversed: tuple[int, ...]
    lifted: bool


async def owner(conn: Connection, event_id: int) -> str | None:
    """The user whose event it is, None if there is no such event (or it is an erasure's)."""
    user_id: str | None = await conn.fetchval(_OWNER, event_id)
    return user_id


async def reverse(
    conn: Connection,
    policy: Policy,
    user_id: str,
    state: asyncpg.Record,
    event_id: int,
    *,
    operator: str,
    reason: str,
) -> Reversal:
    """Reverse the user's event and what it caused; `state` is the user's locked row.

    Raises GatewayError 404 `event_not_found` unless the event is one of the user's violations,
    warnings or blocks (not a shadow violation).
    """
    target = await conn.fetchrow(_TARGET, event_id, user_id)
    if target is None or target["kind"] not in CONTESTED_KINDS or target["shadow"]:
        raise event_not_found(event_id)
    if target["reversed"]:
        return Reversal((), lifted=False)
    await conn.execute(_MARK, event_id, operator, reason)
    if target["kind"] == "block":
        undone = [(event_id, target["block_number"])]
    else:
        rows = await conn.fetch(_BLOCKS_WITHOUT, user_id, event_id, operator, reason, policy.max_strikes)
        undone = [(row["id"], row["block_number"]) for row in rows]
    lifted = state["blocked"] and any(block == state["block_event_id"] for block, _ in undone)
    policy_blocks = sum(1 for _, number in undone if number is not None)
    if policy_blocks or lifted:
        await blocks.take_back(
            conn,
            policy,
            user_id,
            state,
            policy_blocks=policy_blocks,
            lift=lifted,
            reset_points=target["kind"] == "block",
            reason=reason,
            operator=operator,
        )
    others = tuple(block for block, _ in undone if block != event_id)
    return Reversal((event_id, *others), lifted=lifted)


async def record(
    conn: Connection,
    policy: Policy,
    user_id: str,
    kind: Decision,
    *,
    event_id: int,
    operator: str,
    reason: str,
    reversal: Reversal | None = None,
    appeal: Appeal | None = None,
) -> int:
    """The audit event of a moderator's decision (and an appeal's `appeal.decided` webhook); its id."""
    affected = None if reversal is None else list(reversal.reversed)
    row = await conn.fetchrow(
        _DECISION, user_id, kind, operator, reason, event_id, None if appeal is None else appeal.id, affected
    )
    assert row is not None
    if appeal is not None and policy.webhooks:
        payload = {
            "id": f"evt_{row['id']}",
            "type": "appeal.decided",
            "created_at": iso(row["at"]),
            "user_id": user_id,
            "appeal_id": str(appeal.id),
            "event_id": str(event_id),
            "status": appeal.status,
            "operator": operator,
            "reason": reason,
            "reversed_events": [str(event) for event in affected or ()],
            "unblocked": reversal is not None and reversal.lifted,
        }
        await webhooks.enqueue(conn, row["id"], payload)
    return int(row["id"])


def event_not_found(event_id: int) -> GatewayError:
    return GatewayError(
        404,
        "event_not_found",
        f"There is no violation, warning or block {event_id} to reverse.",
        param="event_id",
    )
