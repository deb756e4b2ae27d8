"""Logging with the job's ``execution_id`` and ``correlation_id`` on every line.

The ids live in context variables set once per job, so every module logs plainly with
``logging.getLogger(__name__)`` and still gets them; the library installs no handler of its own
(``configure`` is called by the CLI), as a library should.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
from collections.abc import Iterator

import orjson

execution_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("execution_id", default="-")
correlation_id_var: contextvars.ContextVar[str] = contextvars.ContextVar(
    "correlation_id", default="-"
)


@contextlib.contextmanager
def job_context(execution_id: str, correlation_id: str) -> Iterator[None]:
    """Tag log lines emitted inside the block (and tasks started from it) with the job's ids."""
    e = execution_id_var.set(execution_id)
    c = correlation_id_var.set(correlation_id)
    try:
        yield
    finally:
        execution_id_var.reset(e)
        correlation_id_var.reset(c)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.execution_id = execution_id_var.get()
        record.correlation_id = correlation_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "execution_id": getattr(record, "execution_id", "-"),
            "correlation_id": getattr(record, "correlation_id", "-"),
        }
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


TEXT_FORMAT = (
    "%(asctime)s %(levelname)s %(name)s [exec=%(execution_id)s corr=%(correlation_id)s] %(message)s"
)


def configure(level: str = "INFO", fmt: str = "text") -> None:
    """Install one stderr handler with the job-id filter; called by the CLI only."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiokafka narrates every group event at INFO; keep its warnings.
    logging.getLogger("aiokafka").setLevel(max(root.level, logging.WARNING))
