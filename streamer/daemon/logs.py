"""Structured logging: one event name plus key-values, JSON lines unless stderr is a TTY.

``configure(level, fmt)`` sets structlog up once per process; logs always go to stderr so
stdout stays free for data (``jsonl:-``). ``fmt``: ``auto`` (pretty on a terminal, JSON
otherwise, e.g. under systemd/journald), ``json`` or ``pretty``.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}  # fmt: skip


class _Stderr:
    """A structlog logger writing to whatever ``sys.stderr`` is at the time of each call
    (binding the file object at configure time breaks when stderr is swapped, e.g. by
    pytest's capture)."""

    def msg(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


def _stderr_logger(*_args: object) -> _Stderr:
    return _Stderr()


def configure(level: str = "info", fmt: Literal["auto", "json", "pretty"] | str = "auto") -> None:
    """Configure structlog for this process (stderr; JSON or pretty)."""
    pretty = fmt == "pretty" or (fmt == "auto" and sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if pretty
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
