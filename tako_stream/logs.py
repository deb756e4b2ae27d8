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
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

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


#: Seconds between two lines about a condition that stays bad, and between two copies of a
#: library's repeated warning.
REMIND_EVERY = 30.0

#: Libraries that log every failed attempt (aiokafka: ~120 ERROR lines a second with the broker
#: gone): their repeats are held back by ``RepeatFilter``.
NOISY = ("aiokafka", "kafka", "faust", "mode", "aiodocker", "aiohttp")


class RepeatFilter(logging.Filter):
    """Lets a library's warning through once per ``interval`` seconds per message template,
    saying how many like it were held back since."""

    def __init__(
        self, interval: float = REMIND_EVERY, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.interval = interval
        self._clock = clock
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not record.name.startswith(NOISY):
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = self._clock()
        last, held = self._seen.get(key, (float("-inf"), 0))
        if now - last < self.interval:
            self._seen[key] = (last, held + 1)
            return False
        if len(self._seen) > 1000:  # templates, not messages: stays small; bound it anyway
            self._seen.clear()
        self._seen[key] = (now, 0)
        if held:
            record.msg = f"{record.msg} [{held} more like this in the last {self.interval:g}s]"
        return True


class Condition:
    """Something that can be wrong for a while (the broker unreachable, Docker down): logged
    once when it goes wrong, once when it is right again, and reminded of every
    ``REMIND_EVERY`` seconds in between, however often it is reported."""

    def __init__(
        self,
        what: str,
        logger: logging.Logger,
        *,
        remind: float = REMIND_EVERY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what = what
        self._log = logger
        self._remind = remind
        self._clock = clock
        self._reminded = 0.0
        self.reason: str | None = None
        #: When it went wrong (wall clock), None while it is right.
        self.since: datetime | None = None

    @property
    def ok(self) -> bool:
        return self.since is None

    def wrong(self, reason: object) -> None:
        self.reason = str(reason)
        now = self._clock()
        if self.since is None:
            self.since = datetime.now(UTC)
            self._reminded = now
            self._log.warning("%s: %s", self.what, reason)
        elif now - self._reminded >= self._remind:
            self._reminded = now
            self._log.warning(
                "%s: still, since %s (%s)",
                self.what,
                self.since.isoformat(timespec="seconds"),
                reason,
            )

    def right(self) -> None:
        if self.since is not None:
            seconds = (datetime.now(UTC) - self.since).total_seconds()
            self._log.warning("%s: over after %.0fs", self.what, seconds)
        self.since = None
        self.reason = None


def configure(level: str = "INFO", fmt: str = "text") -> None:
    """Install one stderr handler with the job-id filter; called by the CLI only."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ContextFilter())
    handler.addFilter(RepeatFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiokafka narrates every group event at INFO; keep its warnings.
    logging.getLogger("aiokafka").setLevel(max(root.level, logging.WARNING))
