"""Prometheus metrics of the gateway process (the moderation middleware has its own module).

The ones updated on every request are `Hot*` metrics (plain numbers, rendered at scrape time:
middleware/hotmetrics.py); the rest are prometheus-client's own.
"""

from prometheus_client import Counter, Gauge, Histogram

from middleware.hotmetrics import HotCounter, HotHistogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

REQUESTS = HotCounter(
    "gateway_requests_total",
    "Requests answered, by route and status.",
    ["route", "method", "status"],
)
REQUEST_DURATION = HotHistogram(
    "gateway_request_duration_seconds",
    "Time from request to the response's first byte, by route.",
    ["route"],
    buckets=_LATENCY_BUCKETS,
)
IN_FLIGHT = Gauge("gateway_requests_in_flight", "Requests being served, streams included.")
UPSTREAM_DURATION = HotHistogram(
    "gateway_upstream_duration_seconds",
    "Time from sending a request upstream to its response headers.",
    buckets=_LATENCY_BUCKETS,
)
UPSTREAM_ERRORS = Counter(
    "gateway_upstream_errors_total",
    "Upstream failures, by kind (connect, timeout, dropped, circuit_open).",
    ["kind"],
)
UPSTREAM_RETRIES = Counter("gateway_upstream_retries_total", "Upstream connection attempts retried.")
CIRCUIT_OPEN = Gauge("gateway_upstream_circuit_open", "1 while the upstream circuit breaker is open.")
BLOCK_EVENTS = Counter(
    "gateway_block_events_total",
    "Blocks and unblocks recorded by this process, by kind (block, unblock) and actor (policy, admin, expiry).",
    ["kind", "actor"],
)
WARNINGS = Counter(
    "gateway_warnings_total",
    "Violations answered as warnings under the enforcement policy (refused, no points).",
)
BLOCK_CHECKS = HotCounter(
    "gateway_block_checks_total",
    "Block checks, by what answered them: cache (the per-worker block cache) or database (a query).",
    ["source"],
)
BLOCK_CACHE_VALID = Gauge(
    "gateway_block_cache_valid",
    "1 while the block cache is listening and loaded (checks answered from memory); 0: checks query the database.",
)
BLOCK_CACHE_USERS = Gauge("gateway_block_cache_users", "Blocked users held in this worker's block cache.")
SLOW_CLIENTS = Counter(
    "gateway_slow_clients_total",
    "Connections the server cut for a slow client, by reason: headers (not complete in time: 408), "
    "body_rate (a body behind its minimum rate), body_silence (a body silent too long).",
    ["reason"],
)
APPEALS_OPENED = Counter("gateway_appeals_opened_total", "Appeals filed by users (POST /gateway/appeals).")
APPEALS_DECIDED = Counter(
    "gateway_appeals_decided_total", "Appeals decided by a moderator, by outcome (accepted, rejected).", ["outcome"]
)
for _outcome in ("accepted", "rejected"):
    APPEALS_DECIDED.labels(_outcome)  # so dashboards see 0 rather than no series
APPEAL_DECISION_SECONDS = Histogram(
    "gateway_appeal_decision_seconds",
    "Time from an appeal's filing to its decision.",
    buckets=(60, 300, 900, 3600, 4 * 3600, 12 * 3600, 86400, 2 * 86400, 3 * 86400, 7 * 86400, 14 * 86400, 30 * 86400),
)
