"""The gateway's materialiser: whatever stops it, it starts over, and says it is not ready."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from tako_stream.gateway.views import ClusterView
from tako_stream.settings import Settings
from tests.fakes import WAIT


async def test_an_unexpected_failure_is_logged_and_reading_starts_over_not_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    view = ClusterView(Settings(gateway_state_dir=tmp_path))
    view.ready.set()  # it had caught up before the failures
    starts: list[tuple[bool, object]] = []
    restarted = asyncio.Event()

    async def follow(failing: Any, ends: object) -> None:
        starts.append((view.ready.is_set(), ends))
        if len(starts) <= 2:  # a bug of ours, or a record nothing foresaw: twice in a row
            raise RuntimeError("unforeseen")
        restarted.set()
        await asyncio.Event().wait()  # reading on

    monkeypatch.setattr(view, "_follow", follow)
    with caplog.at_level(logging.WARNING, logger="tako_stream.gateway.views"):
        materialising = asyncio.create_task(view._materialise())
        waiting = asyncio.create_task(restarted.wait())
        done, _ = await asyncio.wait(
            {materialising, waiting}, timeout=WAIT * 2, return_when=asyncio.FIRST_COMPLETED
        )
        for task in (materialising, waiting):
            task.cancel()
        await asyncio.gather(materialising, waiting, return_exceptions=True)
    assert waiting in done, f"the materialiser ended: {materialising!r}"
    # Not ready from the first failure on; readiness is earned anew (no end offsets kept).
    assert starts == [(True, None), (False, None), (False, None)]
    assert not view.ready.is_set()
    tracebacks = [r for r in caplog.records if r.exc_info is not None]
    assert len(tracebacks) == 1, caplog.text  # once, not once per attempt
    assert "unforeseen" in caplog.text
