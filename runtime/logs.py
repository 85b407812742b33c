"""structlog set-up shared by every pagedserve process: JSON lines in containers, console text on a TTY."""

from __future__ import annotations

import argparse
import enum
import logging
import sys

import structlog


class LogFormat(enum.Enum):
    AUTO = "auto"  # console on a TTY, JSON otherwise
    CONSOLE = "console"
    JSON = "json"


class LogLevel(enum.Enum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def number(self) -> int:
        """The standard library's level number."""
        return int(getattr(logging, self.name))


def add_log_flags(parser: argparse.ArgumentParser) -> None:
    """--log-format and --log-level, which a process hands on to every process it starts."""
    parser.add_argument("--log-format", type=LogFormat, default=LogFormat.AUTO, choices=list(LogFormat),
                        metavar="{" + ",".join(f.value for f in LogFormat) + "}",
                        help="console text, JSON lines, or auto: console on a terminal, JSON otherwise")
    parser.add_argument("--log-level", type=LogLevel, default=LogLevel.INFO, choices=list(LogLevel),
                        metavar="{" + ",".join(level.value for level in LogLevel) + "}",
                        help="least severe event logged")


class _CurrentStderr:
    """sys.stderr as it is at each write, not as it was when logging was configured: loggers are cached on first
    use, so one bound to a stream that is later replaced and closed (contextlib.redirect_stderr, a test's capture)
    would fail every later log line with "I/O operation on closed file"."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(log_format: LogFormat = LogFormat.AUTO, level: int = logging.INFO) -> None:
    """Routes structlog and the standard library's logging to stderr in one format: a pagedserve process's set-up."""
    configure_structlog(log_format, level, cache_loggers=True)
    logging.basicConfig(level=max(level, logging.WARNING), stream=sys.stderr, format="%(name)s: %(message)s")


def configure_structlog(log_format: LogFormat = LogFormat.AUTO, level: int = logging.INFO,
                        cache_loggers: bool = False) -> None:
    """Routes structlog to stderr. cache_loggers: each logger keeps this configuration from its first line on (the
    fast path of a process that configures once); without it a later configure (an application's own, a test's
    structlog.testing.capture_logs) reaches loggers already used."""
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
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=cache_loggers,
    )
