"""The gateway's handlers over HTTP, through its middleware, with the broker faked: what a
client sees when the store lags or a request carries values no handler foresaw."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiokafka.structs import RecordMetadata

from tako_stream.core.jobtypes import JobTypes
from tako_stream.gateway.app import Gateway
from tako_stream.settings import Settings

# The gateway keeps the correlation id under a string key, as aiohttp allows (with a warning,
# which this suite's settings would turn into an error).
pytestmark = pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning")


class Sent:
    """What the gateway produced, each landing at the next offset of partition 0."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    async def send_raw(self, value: bytes | None, **kw: Any) -> RecordMetadata:
        self.records.append({"value": value, **kw})
        topic = kw.get("topic") or "tako.requests"
        return RecordMetadata(topic, 0, None, len(self.records) - 1, -1, -1, -1)

    async def __aexit__(self, *exc: object) -> None:
        pass


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    """A gateway whose store is empty and caught up, and whose producer only records."""
    gateway = Gateway(Settings(gateway_state_dir=tmp_path), JobTypes.load())
    gateway.view.ready.set()
    gateway.view.producer = Sent()  # type: ignore[assignment]
    yield gateway
    await gateway.view.stop()


@pytest.fixture
async def client(gateway: Gateway) -> AsyncIterator[TestClient[Any, Any]]:
    app = gateway.app()
    app.on_startup.clear()  # no broker: the view is driven by hand
    app.on_cleanup.clear()
    async with TestClient(TestServer(app)) as client:
        yield client


async def test_an_idempotent_submit_whose_read_back_times_out_is_a_503_not_a_409(
    gateway: Gateway, client: TestClient[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def lagging(*_: object) -> None:
        raise TimeoutError  # the store has not read the record back in time

    monkeypatch.setattr(gateway.view, "wait_for_position", lagging)
    body = {"code": "print(1)", "idempotency_key": "order-12345"}
    resp = await client.post("/execute/async", json=body, headers={"X-Correlation-ID": "c-1"})
    answer = await resp.json()
    # The job is queued: a 409 would have the client retry under a new key and run it twice.
    assert resp.status == 503, answer
    assert answer["correlation_id"] == "c-1" and "retry" in answer["detail"]
    assert len(gateway.view.producer.records) == 1  # type: ignore[attr-defined]
