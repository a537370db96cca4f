"""The access line's writer: whole lines to a descriptor or to a stream without one, and its clock."""

from __future__ import annotations

import io
import os
import re
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from gateway.logs import _AccessLog, _UtcClock, access_log, utc_clock

FIELDS = {"request_id": "req-1", "user_id": "alice", "status": 200}


@pytest.fixture
def log() -> _AccessLog:
    return _AccessLog()


def test_lines_go_to_the_descriptor_whole(log: _AccessLog, tmp_path: Path) -> None:
    with (tmp_path / "access.log").open("wb") as stream:
        log.use(stream)
        assert log.fd == stream.fileno()
        log.write(dict(FIELDS))
        log.write(dict(FIELDS, request_id="req-2"))
    lines = [orjson.loads(line) for line in (tmp_path / "access.log").read_bytes().splitlines()]
    assert [line["request_id"] for line in lines] == ["req-1", "req-2"]
    assert lines[0]["event"] == "request"
    assert lines[0]["level"] == "info"


def test_a_short_write_is_completed(log: _AccessLog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    calls: list[int] = []

    def dribble(fd: int, data: bytes) -> int:  # the kernel may take fewer bytes than offered
        calls.append(len(data))
        return real_write(fd, bytes(data[:7]))

    with (tmp_path / "access.log").open("wb") as stream:
        log.use(stream)
        monkeypatch.setattr(os, "write", dribble)
        log.write(dict(FIELDS))
        monkeypatch.undo()
    data = (tmp_path / "access.log").read_bytes()
    assert orjson.loads(data)["request_id"] == "req-1"
    assert data.endswith(b"\n")
    assert len(calls) > 2


def test_a_stream_without_a_descriptor_gets_buffered_writes(log: _AccessLog) -> None:
    stream = io.BytesIO()
    log.use(stream)
    assert log.fd is None
    log.write(dict(FIELDS))
    assert orjson.loads(stream.getvalue())["user_id"] == "alice"


def test_no_lines_when_disabled(log: _AccessLog) -> None:
    stream = io.BytesIO()
    log.use(stream)
    log.enabled = False
    log.write(dict(FIELDS))
    assert stream.getvalue() == b""


@pytest.mark.parametrize(
    "nanoseconds",
    [1_700_000_000_000_000_000, 1_700_000_000_000_001_999, 1_700_000_000_999_999_000, 1_700_000_001_000_000_000],
)
def test_the_clock_agrees_with_datetime(monkeypatch: pytest.MonkeyPatch, nanoseconds: int) -> None:
    # The microseconds are cut from the count's digits: leading zeros and second boundaries must survive.
    clock = _UtcClock()
    monkeypatch.setattr(time, "time_ns", lambda: nanoseconds)
    expected = datetime.fromtimestamp(nanoseconds // 1000 / 1_000_000, UTC).isoformat(timespec="microseconds")
    assert clock.now() == expected.replace("+00:00", "Z")


def test_the_clock_writes_iso_utc_with_microseconds() -> None:
    stamps = [utc_clock.now() for _ in range(3)]
    for stamp in stamps:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp), stamp
        assert abs((datetime.fromisoformat(stamp) - datetime.now(UTC)).total_seconds()) < 5
    assert stamps == sorted(stamps)


def test_every_line_has_one_json_style(capfd: pytest.CaptureFixture[str]) -> None:
    # uvicorn's lines (through the standard library) were rendered with spaces, the gateway's compact.
    import logging

    import structlog

    from gateway.logs import configure_logging
    from gateway.settings import settings_from

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure_logging(settings_from(log_format="json"))
    try:
        logging.getLogger("uvicorn.error").warning("Application startup complete.")
        structlog.get_logger("gateway").warning("block_check_failed", user_id="u")
        try:
            raise ValueError("boom")
        except ValueError:  # a library logging a failure with its traceback (aiohttp does)
            logging.getLogger("aiohttp.server").exception("Error handling request", extra={"kind": type})
    finally:
        # The configuration points at this test's captured stream, closed after it: put back
        # what the next test expects (the default until the next create_app configures again).
        root.handlers[:] = handlers
        root.setLevel(level)
        structlog.reset_defaults()
        access_log.use(None)
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    assert len(lines) == 3
    for line in lines:
        assert line == orjson.dumps(orjson.loads(line)).decode()  # compact: no spaces between tokens
    assert "ValueError: boom" in orjson.loads(lines[2])["exception"]
