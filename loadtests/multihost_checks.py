"""The multi-host run's checks: the answers clients got against the audit trail, the balancer's log, the webhooks.

- Strikes: a strike a client saw is the violation event a 400 names, or the violation that
  caused the block a 403 to a violation names (its newest cause). Those must be the counted
  violations in `events`, one for one: none missing (lost); none extra (doubled), except as
  many as that user's calls whose answer never arrived (their strike may have committed).
- Client errors: every answer not expected of its journey step is an error, and each must be a
  call the balancer's log shows in flight on the killed replica when it died (or a call whose
  connection was closed without an answer, and without a line in the balancer's log, at that
  very moment: seen when a keep-alive call meets the replica's death), or a 503
  `store_unavailable` to a call that needed the database while PgBouncer restarted (its safe
  shutdown holds new queries, then cuts them: the gateway cannot know whether one ran, so it
  answers 503, which the OpenAI SDK retries; a strike is never retried by the gateway).
- Webhooks: every outbox event delivered and received; an event received twice only if its
  first copy came from the killed replica just before it died (the mark of delivery died with
  it) or while PgBouncer restarted (the mark could not be written).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from loadtests.propagation import PROBE_PREFIX
from loadtests.receiver import Delivery

VIOLATOR_PREFIX = "loadtest-violator-"
STRIKING = frozenset({"violation", "probe violation"})
_REFUSED: dict[int, str | None] = {400: "content_policy_violation", 403: "user_blocked"}
# Per journey step: the statuses expected, with the error code they must carry (None: any).
EXPECTED: dict[str, dict[int, str | None]] = {
    "chat": {200: None},
    "chat (stream)": {200: None},
    "violation": _REFUSED,
    "violator clean chat": {200: None, 403: "user_blocked"},
    "admin list blocked": {200: None},
    "admin unblock": {200: None},
    "probe violation": _REFUSED,
    "probe watch": {400: "invalid_json", 403: "user_blocked"},
    "probe chat": {200: None},
    "probe unblock": {200: None},
    "probe admin block": {200: None},
}
# How long after a replica's death a call the balancer had sent it may still fail (the kernel's
# resets of its connections reach HAProxy at once: this is margin for the clocks' millisecond),
# and after PgBouncer listens again a call cut by its restart may still be answered.
KILL_MARGIN = 0.2
RESTART_MARGIN = 0.5
# HAProxy's log line (proxies.haproxy_config): accept date, server, status, termination, Th, Ti, Ta, {request id}.
_BALANCER_LINE = re.compile(r"^(\d+\.\d+) (\S+) (-?\d+) (\S+) (-?\d+) (-?\d+) (-?\d+) \{([^}]*)\}")


@dataclass(frozen=True)
class Served:
    """One call as the balancer logged it."""

    accepted: float
    server: str
    status: int
    termination: str
    total: float  # seconds

    @property
    def ended(self) -> float:
        return self.accepted + max(self.total, 0.0)


@dataclass(frozen=True)
class Faults:
    killed: str  # the replica killed with SIGKILL
    killed_at: float
    killed_address: str
    pgbouncer: tuple[float, float]  # told to stop, listening again


@dataclass
class Findings:
    figures: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def read_journal(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def read_balancer_log(path: Path) -> dict[str, Served]:
    """The balancer's calls by request id."""
    served: dict[str, Served] = {}
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        match = _BALANCER_LINE.match(line)
        if match and match.group(8):
            accept, server, status, termination, handshake, idle, total, request_id = match.groups()
            began = float(accept) + (max(int(handshake), 0) + max(int(idle), 0)) / 1000
            served[request_id] = Served(began, server, int(status), termination, int(total) / 1000)
    return served


def is_error(entry: dict[str, Any]) -> bool:
    if entry.get("failure"):
        return True
    allowed = EXPECTED.get(entry["name"])
    if allowed is None or entry["status"] not in allowed:
        return True
    code = allowed[entry["status"]]
    return code is not None and entry.get("code") != code


def _spans(began: float, ended: float, moment: float) -> bool:
    return began - KILL_MARGIN <= moment <= ended + KILL_MARGIN


def check_errors(
    journal: list[dict[str, Any]], served: dict[str, Served], faults: Faults, findings: Findings
) -> set[str]:
    """Every error must be a call in flight on the killed replica; the request ids of the errors."""
    errors = [entry for entry in journal if is_error(entry)]
    in_flight = [
        call
        for call in served.values()
        if call.server == faults.killed
        and call.accepted <= faults.killed_at + KILL_MARGIN
        and call.ended >= faults.killed_at
    ]
    explained: list[dict[str, Any]] = []
    restart: list[dict[str, Any]] = []
    unexplained: list[dict[str, Any]] = []
    began, listening = faults.pgbouncer
    for entry in errors:
        call = served.get(entry["request_id"])
        if call is None:  # closed without an answer or a log line, as the replica died
            on_killed = entry["status"] == 0 and _spans(entry["t0"], entry["t1"], faults.killed_at)
        else:
            on_killed = call.server == faults.killed and _spans(call.accepted, call.ended, faults.killed_at)
        cut_by_restart = (
            entry["status"] == 503
            and entry.get("code") == "store_unavailable"
            and entry["t0"] <= listening + RESTART_MARGIN
            and entry["t1"] >= began
        )
        if on_killed:
            explained.append(entry)
        elif cut_by_restart:
            restart.append(entry)
        else:
            unexplained.append(entry)
    findings.figures["calls"] = len(journal)
    findings.figures["client errors"] = len(errors)
    closed = [entry for entry in explained if entry["request_id"] not in served]
    findings.figures["in flight on the killed replica"] = len(in_flight) + len(closed)
    findings.figures["errors: in flight on the killed replica"] = len(explained)
    findings.figures["errors: 503 store_unavailable while PgBouncer restarted"] = len(restart)
    findings.figures["errors: other"] = len(unexplained)
    kinds = Counter(
        f"{entry['name']}: {entry['status']} {entry.get('code') or entry.get('transport') or entry.get('failure')}"
        for entry in unexplained
    )
    for kind, count in kinds.most_common(8):
        findings.problems.append(f"{count} client errors not explained by the killed replica: {kind}")
    return {entry["request_id"] for entry in errors}


async def check_strikes(
    conn: asyncpg.Connection[asyncpg.Record],
    journal: list[dict[str, Any]],
    errors: AbstractSet[str],
    findings: Findings,
) -> None:
    seen: dict[str, set[int]] = defaultdict(set)
    unsure: Counter[str] = Counter()
    block_answers: dict[int, str] = {}
    for entry in journal:
        if entry["name"] not in STRIKING:
            continue
        user = entry["user"]
        if entry["request_id"] in errors:
            unsure[user] += 1
        elif entry["status"] == 400 and entry.get("event_id"):
            seen[user].add(int(entry["event_id"]))
        elif entry["status"] == 403 and entry.get("event_id"):
            block_answers[int(entry["event_id"])] = user
    rows = await conn.fetch(
        "SELECT id, user_id, causes FROM events WHERE kind = 'block' AND id = ANY($1::bigint[])", list(block_answers)
    )
    for row in rows:
        if row["causes"]:
            seen[row["user_id"]].add(max(row["causes"]))
    recorded_rows = await conn.fetch(
        "SELECT id, user_id FROM events WHERE kind = 'violation' AND counted"
        " AND (starts_with(user_id, $1) OR starts_with(user_id, $2))",
        VIOLATOR_PREFIX,
        PROBE_PREFIX,
    )
    recorded: dict[str, set[int]] = defaultdict(set)
    for row in recorded_rows:
        recorded[row["user_id"]].add(row["id"])
    lost = doubled = unsure_strikes = 0
    for user in sorted(set(seen) | set(recorded)):
        missing = seen[user] - recorded[user]
        extra = recorded[user] - seen[user]
        lost += len(missing)
        if missing:
            findings.problems.append(f"{user}: clients were told of strikes {sorted(missing)}, not in the audit trail")
        if len(extra) > unsure[user]:
            doubled += len(extra) - unsure[user]
            findings.problems.append(
                f"{user}: strikes {sorted(extra)} recorded but never answered, with {unsure[user]} calls unanswered"
            )
        unsure_strikes += min(len(extra), unsure[user])
    findings.figures["strikes seen by clients"] = sum(len(ids) for ids in seen.values())
    findings.figures["strikes in the audit trail"] = len(recorded_rows)
    findings.figures["strikes lost"] = lost
    findings.figures["strikes doubled"] = doubled
    findings.figures["strikes of unanswered calls"] = unsure_strikes
    findings.figures["violating users"] = len(set(seen) | set(recorded))


async def check_webhooks(
    conn: asyncpg.Connection[asyncpg.Record], deliveries: list[Delivery], faults: Faults, findings: Findings
) -> None:
    rows = await conn.fetch("SELECT event_id, delivered_at IS NOT NULL AS delivered FROM webhook_outbox")
    outbox = {f"evt_{row['event_id']}" for row in rows}
    undelivered = [row["event_id"] for row in rows if not row["delivered"]]
    copies: dict[str, list[Delivery]] = defaultdict(list)
    for delivery in sorted(deliveries, key=lambda d: d.at):
        copies[delivery.event_id].append(delivery)
    missing = outbox - set(copies)
    unknown = set(copies) - outbox
    explained = unexplained = 0
    began, listening = faults.pgbouncer
    for event_id, received in copies.items():
        if len(received) < 2:
            continue
        first = received[0]
        from_killed = first.sender == faults.killed_address and faults.killed_at - 2.0 <= first.at <= faults.killed_at
        during_restart = began - 2.0 <= first.at <= listening + 2.0
        if from_killed or during_restart:
            explained += len(received) - 1
        else:
            unexplained += len(received) - 1
            findings.problems.append(f"webhook {event_id} received {len(received)} times, first from {first.sender}")
    if undelivered:
        findings.problems.append(f"{len(undelivered)} outbox events never delivered (first: {undelivered[:5]})")
    if missing:
        findings.problems.append(
            f"{len(missing)} outbox events never reached the receiver (first: {sorted(missing)[:5]})"
        )
    if unknown:
        findings.problems.append(f"{len(unknown)} webhooks received that the outbox does not hold")
    findings.figures["webhook events"] = len(outbox)
    findings.figures["webhooks received"] = len(deliveries)
    findings.figures["webhook duplicates explained by the faults"] = explained
    findings.figures["webhook duplicates unexplained"] = unexplained
    findings.figures["webhook senders"] = len({delivery.sender for delivery in deliveries})
