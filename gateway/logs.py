"""structlog configuration: one JSON object per line (or console text), cheap on the hot path."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any, BinaryIO

import orjson
import structlog

from gateway.settings import Settings

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class _AccessLog:
    """Writes the access line, one per request: the hottest log call, so JSON skips structlog.

    A structlog call with the configured chain cost about 16 µs, the same line written here
    about 4 µs. Same fields and format as the structlog JSON lines (request_id, level and an
    ISO UTC timestamp included), and the same stream, flushed per line as structlog's is (the
    buffered stream's own lock keeps each line whole). Before `configure_logging`, and in
    console format, lines go through structlog.
    """

    def __init__(self) -> None:
        self.stream: BinaryIO | None = None  # set in JSON format: write straight to it
        self.enabled = True  # False when the level is above info
        self.fallback = structlog.get_logger("gateway.access")

    def write(self, fields: dict[str, Any]) -> None:
        """One access line; `fields` must hold request_id and may be modified."""
        if not self.enabled:
            return
        stream = self.stream
        if stream is None:
            self.fallback.info("request", **fields)
            return
        fields["event"] = "request"
        fields["level"] = "info"
        fields["timestamp"] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        line = orjson.dumps(fields, option=orjson.OPT_APPEND_NEWLINE)
        stream.write(line)
        stream.flush()


access_log = _AccessLog()


def configure_logging(settings: Settings) -> None:
    """Send structlog and the standard library's loggers (uvicorn, asyncio) to stderr, one line each."""
    level = _LEVELS[settings.log_level]
    access_log.enabled = level <= logging.INFO
    access_log.stream = None
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if settings.log_format == "json":
        structlog.configure(
            processors=[
                *shared,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(serializer=orjson.dumps),
            ],
            wrapper_class=structlog.make_filtering_bound_logger(level),
            logger_factory=structlog.BytesLoggerFactory(sys.stderr.buffer),
            cache_logger_on_first_use=True,
        )
        stdlib_renderer: structlog.types.Processor = structlog.processors.JSONRenderer()
        access_log.stream = sys.stderr.buffer
    else:
        structlog.configure(
            processors=[*shared, structlog.dev.ConsoleRenderer()],
            wrapper_class=structlog.make_filtering_bound_logger(level),
            logger_factory=structlog.PrintLoggerFactory(sys.stderr),
            cache_logger_on_first_use=True,
        )
        stdlib_renderer = structlog.dev.ConsoleRenderer()

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, stdlib_renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    # The gateway writes its own access line with more in it than uvicorn's.
    logging.getLogger("uvicorn.access").disabled = True
