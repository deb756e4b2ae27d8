"""Every log line about a job carries its ids, in text and in JSON lines."""

from __future__ import annotations

import io
import logging

import orjson
import pytest

from tako_stream import logs


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_job_ids_on_every_line(fmt: str) -> None:
    stream = io.StringIO()
    logs.configure("INFO", fmt)
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    log = logging.getLogger("tako_stream.test")
    with logs.job_context("exec-1", "corr-9"):
        log.info("running %s", "it")
    log.info("outside")
    first, second = stream.getvalue().splitlines()
    if fmt == "json":
        entry = orjson.loads(first)
        assert entry["execution_id"] == "exec-1" and entry["correlation_id"] == "corr-9"
        assert entry["message"] == "running it" and entry["level"] == "INFO"
        assert orjson.loads(second)["execution_id"] == "-"
    else:
        assert "exec=exec-1 corr=corr-9" in first and first.endswith("running it")
        assert "exec=- corr=-" in second
    logging.getLogger().handlers.clear()


def test_a_condition_logs_its_changes_and_a_reminder_not_every_report(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    condition = logs.Condition(
        "the broker is unreachable", logging.getLogger("t"), clock=lambda: now[0]
    )
    with caplog.at_level(logging.WARNING):
        for second in range(0, 65):
            now[0] = float(second)
            condition.wrong("connection refused")
        assert not condition.ok and condition.since is not None
        condition.right()
        condition.right()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 4, messages  # wrong, reminders at 30 s and 60 s, right
    assert messages[0] == "the broker is unreachable: connection refused"
    assert "still, since" in messages[1] and "still, since" in messages[2]
    assert "over after" in messages[3]
    assert condition.ok and condition.since is None


def test_repeat_filter_holds_back_a_library_s_repeats() -> None:
    now = [0.0]
    keep = logs.RepeatFilter(interval=30, clock=lambda: now[0])

    def record(name: str, msg: str, level: int = logging.ERROR) -> logging.LogRecord:
        return logging.LogRecord(name, level, "x", 1, msg, ("broker",), None)

    passed = []
    for second in range(0, 61):
        now[0] = float(second)
        for _ in range(100):  # aiokafka logs an error per attempt, many a second
            rec = record("aiokafka.conn", "Unable to connect to %s")
            if keep.filter(rec):
                passed.append(rec.getMessage())
    assert len(passed) == 3, passed
    assert "[2999 more like this in the last 30s]" in passed[1]
    # our own lines, and a library's info lines, are never held back
    assert all(keep.filter(record("tako_stream.worker", "answered")) for _ in range(5))
    assert all(keep.filter(record("aiokafka", "joined", logging.INFO)) for _ in range(5))
