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
