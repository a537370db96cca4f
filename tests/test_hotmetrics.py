"""The hot-path metrics read, at scrape time, exactly as prometheus-client's own would."""

from __future__ import annotations

import re

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import metrics as prometheus_metrics

from middleware.hotmetrics import HotCounter, HotHistogram

BUCKETS = (0.001, 0.0025, 0.01, 1, 5)
# Values on, between, below and beyond the bounds: a value equal to a bound counts in its bucket.
VALUES = (0.0, 0.0005, 0.001, 0.0011, 0.0025, 0.003, 0.01, 0.5, 1.0, 4.9999, 5.0, 7.0, 1e9)


def _exposition(registry: CollectorRegistry) -> str:
    # The _created samples hold creation times, which differ by construction; everything else must not.
    return re.sub(r"(_created(\{[^}]*\})?) \S+", r"\1 <time>", generate_latest(registry).decode())


def test_counter_and_histogram_render_like_prometheus_client() -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    their_counter = Counter("t_requests_total", "Requests.", ["route", "status"], registry=theirs)
    our_counter = HotCounter("t_requests_total", "Requests.", ["route", "status"], registry=ours)
    their_plain = Counter("t_retries_total", "Retries.", registry=theirs)
    our_plain = HotCounter("t_retries_total", "Retries.", registry=ours)
    their_histogram = Histogram("t_seconds", "Durations.", ["route"], buckets=BUCKETS, registry=theirs)
    our_histogram = HotHistogram("t_seconds", "Durations.", ["route"], buckets=BUCKETS, registry=ours)
    their_single = Histogram("t_single_seconds", "One.", buckets=BUCKETS, registry=theirs)
    our_single = HotHistogram("t_single_seconds", "One.", buckets=BUCKETS, registry=ours)

    for index, value in enumerate(VALUES):
        route = ("/a", "/b")[index % 2]
        status = ("200", "400", "403")[index % 3]
        their_counter.labels(route, status).inc()
        our_counter.labels(route, status).inc()
        their_counter.labels(route, status).inc(2.5)
        our_counter.labels(route, status).inc(2.5)
        their_histogram.labels(route).observe(value)
        our_histogram.labels(route).observe(value)
        their_single.observe(value)
        our_single.observe(value)
    their_plain.inc()
    our_plain.inc()

    expected = _exposition(theirs)
    assert "t_seconds_bucket" in expected
    assert "t_requests_created" in expected
    assert _exposition(ours) == expected
    assert ours.get_sample_value("t_seconds_bucket", {"route": "/a", "le": "0.001"}) == theirs.get_sample_value(
        "t_seconds_bucket", {"route": "/a", "le": "0.001"}
    )


def test_created_series_follow_the_library_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = CollectorRegistry()
    HotCounter("t_switch_total", "Switch.", registry=registry).inc()
    HotHistogram("t_switch_seconds", "Switch.", buckets=BUCKETS, registry=registry).observe(0.1)
    assert "_created" in generate_latest(registry).decode()
    # what PROMETHEUS_DISABLE_CREATED_SERIES=true and disable_created_metrics() set
    monkeypatch.setattr(prometheus_metrics, "_use_created", False)
    text = generate_latest(registry).decode()
    assert "_created" not in text
    assert "t_switch_total 1.0" in text


def test_label_mistakes_are_refused() -> None:
    registry = CollectorRegistry()
    counter = HotCounter("t_labels_total", "Labels.", ["route"], registry=registry)
    with pytest.raises(ValueError, match="expected 1 label values, got 2"):
        counter.labels("/a", "extra")
    with pytest.raises(ValueError, match="use labels"):
        counter.inc()
    with pytest.raises(ValueError, match="increasing"):
        HotHistogram("t_bad_seconds", "Bad.", buckets=(1, 0.5), registry=registry)
    assert counter.labels("/a") is counter.labels("/a")  # a child is kept: callers may hold on to it


def test_a_name_is_registered_once() -> None:
    registry = CollectorRegistry()
    HotCounter("t_once_total", "Once.", registry=registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Counter("t_once_total", "Once again.", registry=registry)
