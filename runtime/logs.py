"""structlog set-up shared by every pagedserve process: JSON lines in containers, console text on a TTY."""

from __future__ import annotations

import enum
import logging
import sys

import structlog


class LogFormat(enum.Enum):
    AUTO = "auto"  # console on a TTY, JSON otherwise
    CONSOLE = "console"
    JSON = "json"


def configure_logging(log_format: LogFormat = LogFormat.AUTO, level: int = logging.INFO) -> None:
    """Routes structlog and the standard library's logging to stderr in one format."""
    use_json = log_format is LogFormat.JSON or (log_format is LogFormat.AUTO and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(level, logging.WARNING), stream=sys.stderr, format="%(name)s: %(message)s")
