"""Prometheus metrics of the moderation middleware and its detectors.

Blocks and unblocks are counted by the store, where they happen; these count what the
middleware sees: verdicts, refusals, detector latency and failures, and the verdict cache.
"""

from prometheus_client import Counter

from middleware.hotmetrics import HotHistogram

VIOLATIONS = Counter(
    "gateway_violations_total",
    "Flagged requests, by category and detector; shadow=true when only recorded (GATEWAY_ENFORCEMENT=shadow).",
    ["category", "detector", "shadow"],
)
BLOCKED_REQUESTS = Counter(
    "gateway_blocked_requests_total",
    "Requests refused with 403 because the user was already blocked.",
)
MODERATION_DURATION = HotHistogram(
    "gateway_moderation_duration_seconds",
    "Time one detector took to judge one request's user input.",
    ["detector"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
MODERATION_TOTAL = HotHistogram(
    "gateway_moderation_request_duration_seconds",
    "Time all the detectors took together to judge one request's user input (with several detectors: "
    "in turn their sum, in parallel mode the slowest remote one's).",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
DETECTOR_FAILURES = Counter(
    "gateway_detector_failures_total",
    "Detector calls that could not judge (error, timeout, bad answer).",
    ["detector"],
)
FAIL_OPEN = Counter(
    "gateway_fail_open_total",
    "Requests forwarded although a check could not run (GATEWAY_MODERATION_FAILURE / GATEWAY_STORE_FAILURE=open).",
    ["check"],
)
VERDICT_CACHE = Counter(
    "gateway_verdict_cache_total",
    "Verdict cache lookups per text or image, by detector and result (hit or miss).",
    ["detector", "result"],
)
PII_FOUND = Counter(
    "gateway_pii_detected_total",
    "User inputs holding personal data or secrets (GATEWAY_PII), by kind and action (mask or block).",
    ["kind", "action"],
)
OUTPUT_VIOLATIONS = Counter(
    "gateway_output_violations_total",
    "Flagged answers of the model (GATEWAY_OUTPUT_MODERATION), by category, detector and mode (audit or block).",
    ["category", "detector", "mode"],
)
