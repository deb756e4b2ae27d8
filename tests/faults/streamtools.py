"""Helpers for the stream-fault tests: a private broker, submitting with positions, and a
results collector that counts every answer (so duplicates are seen, not folded away)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from tako_stream.client import results_reader
from tako_stream.core.models import CORRELATION_HEADER, ExecutionResult
from tako_stream.kafka import broker as embedded
from tako_stream.kafka.clients import producer_options
from tako_stream.kafka.codec import dumps, loads
from tako_stream.kafka.reader import TopicReader
from tako_stream.settings import Settings
from tests.integration.stack import Stack, free_port


@dataclass
class PrivateBroker:
    """An embedded broker process of the test's own, so it can be frozen and resumed."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def bootstrap(self) -> str:
        return f"localhost:{self.port}"

    def freeze(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)


@contextlib.contextmanager
def private_broker(workdir: Path) -> Iterator[PrivateBroker]:
    port = free_port()
    log_path = workdir / "broker.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            embedded.command("127.0.0.1", port), stdout=out, stderr=subprocess.STDOUT
        )
    try:
        if not embedded.wait_until_listening("127.0.0.1", port, 30):
            raise RuntimeError(f"private broker did not start:\n{log_path.read_text()}")
        yield PrivateBroker(proc, port, log_path)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


async def submit(
    settings: Settings, requests: list[Mapping[str, Any]]
) -> dict[str, tuple[int, int]]:
    """Produce requests (key = execution id); returns where each landed: (partition, offset)."""
    placed: dict[str, tuple[int, int]] = {}
    async with AIOKafkaProducer(**producer_options(settings)) as producer:
        sent = []
        for request in requests:
            execution_id = str(request["execution_id"])
            sent.append(
                (
                    execution_id,
                    await producer.send(
                        settings.requests_topic,
                        value=dumps(dict(request)),
                        key=execution_id.encode(),
                        headers=[(CORRELATION_HEADER, execution_id.encode())],
                    ),
                )
            )
        for execution_id, future in sent:
            meta = await future
            placed[execution_id] = (meta.partition, meta.offset)
    return placed


async def committed_offsets(settings: Settings) -> dict[int, int]:
    """The consumer group's committed position of each request partition (-1: none)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        group_id=settings.consumer_group,
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        out = {}
        for p in range(settings.topic_partitions):
            pos = await consumer.committed(TopicPartition(settings.requests_topic, p))
            out[p] = -1 if pos is None else pos
        return out
    finally:
        await consumer.stop()


async def topic_config(settings: Settings, topic: str) -> dict[str, str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    finally:
        await admin.close()
    config: dict[str, str] = {}
    for response in responses:
        for resource in response.resources:
            for entry in resource[4]:
                config[entry[0]] = entry[1]
    return config


@dataclass
class Answers:
    """Every result record on the results topic from now on, per execution id, in order."""

    settings: Settings
    stack: Stack | None = None
    results: dict[str, list[ExecutionResult]] = field(default_factory=dict)
    bad_keys: list[tuple[bytes | None, str]] = field(default_factory=list)
    _reader: TopicReader | None = None
    _task: asyncio.Task[None] | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def __aenter__(self) -> Answers:
        self._reader = results_reader(self.settings)
        await self._reader.start()
        await self._reader.from_end()
        self._task = asyncio.ensure_future(self._collect())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._reader is not None:
            await self._reader.stop()

    async def _collect(self) -> None:
        assert self._reader is not None
        while True:
            records = await self._reader.fetch(timeout=0.5)
            for record in records:
                result = ExecutionResult.model_validate(loads(record.value or b""))
                if record.key != result.execution_id.encode():
                    self.bad_keys.append((record.key, result.execution_id))
                self.results.setdefault(result.execution_id, []).append(result)
            if records:
                self._changed.set()

    def answered(self, ids: set[str]) -> set[str]:
        return ids & set(self.results)

    async def wait(self, ids: set[str], count: int | None = None, timeout: float = 180) -> None:
        """Until ``count`` (default: all) of ``ids`` have at least one answer."""
        want = len(ids) if count is None else count
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.answered(ids)) < want:
            assert self._task is not None
            if self._task.done():
                self._task.result()
            left = deadline - loop.time()
            if left <= 0:
                logs = ""
                if self.stack is not None:
                    logs = "\n\n".join(
                        f"== {w.worker_id}\n{w.log_tail()}" for w in self.stack.workers
                    )
                missing = len(ids) - len(self.answered(ids))
                raise AssertionError(f"{missing} of {len(ids)} job(s) unanswered:\n{logs}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 1.0))

    def duplicates(self, ids: set[str]) -> dict[str, int]:
        return {k: len(v) for k, v in self.results.items() if k in ids and len(v) > 1}


def job(n: int, seconds: float, execution_id: str) -> dict[str, Any]:
    return {
        "execution_id": execution_id,
        "code": f"import time\ntime.sleep({seconds})\nprint({n})",
    }
