"""Every request answered, whatever its values and whatever fails while answering it.

Each test is one way a hostile requester, a crash or a misconfigured topic used to leave a
request unanswered, answered twice differently, or its partition's commits stuck; each ends by
checking that the partition's commits reached its end, so a restarted worker runs nothing again.
"""

from __future__ import annotations

import asyncio
import base64
import signal
import uuid
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tako_stream import dlq
from tako_stream.client import Client, Producer, ResultReader
from tako_stream.core.errors import PublishRefusedError
from tako_stream.core.models import CORRELATION_HEADER, ExecutionResult
from tako_stream.kafka.clients import producer_options
from tako_stream.kafka.reader import TopicReader, read_record, read_to_end
from tako_stream.worker.stream import KafkaSink
from tests.faults.streamtools import Answers, committed_offsets, submit, topic_config
from tests.integration.stack import Stack

pytestmark = [pytest.mark.integration]

#: Offsets are committed only on revoke and stop: a SIGKILLed worker leaves its answers
#: uncommitted, as a crash right after publishing does.
NO_PERIODIC_COMMIT = {"TAKO_COMMIT_INTERVAL": "3600"}


def nested(depth: int) -> str:
    """JSON text of objects nested ``depth`` deep (orjson writes at most 254 levels)."""
    return '{"a":' * (depth - 1) + "{}" + "}" * (depth - 1)


async def end_offsets(stack: Stack) -> dict[int, int]:
    """Where each request partition ends now."""
    async with TopicReader(stack.settings, stack.settings.requests_topic) as reader:
        return {tp.partition: offset for tp, offset in (await reader.end_offsets()).items()}


async def all_committed(stack: Stack, timeout: float = 30) -> None:
    """Until the group's committed positions reach every request partition's end."""
    ends = await end_offsets(stack)
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        committed = await committed_offsets(stack.settings)
        if all(committed.get(p, -1) >= end for p, end in ends.items() if end > 0):
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"commits stuck: committed {committed}, ends {ends}")
        await asyncio.sleep(0.5)


async def all_results(stack: Stack, execution_id: str) -> list[ExecutionResult]:
    """Every result record for ``execution_id`` on the results topic, oldest first."""
    found: list[ExecutionResult] = []

    def keep(key: bytes | None, value: bytes | None) -> None:
        if key == execution_id.encode() and value is not None:
            found.append(ExecutionResult.model_validate_json(value))

    await read_to_end(stack.settings, stack.settings.results_topic, keep)
    return found


async def test_values_an_answer_cannot_carry_are_answered_and_committed(new_stack: Stack) -> None:
    worker = new_stack.start_worker()
    await worker.wait_ready()
    deep_output = f"open('/output/result.json', 'w').write({nested(300)!r})"
    deep_metadata = (
        '{"execution_id": "meta-'
        + new_stack.tag
        + '", "code": "print(1)", "metadata": '
        + nested(254)
        + "}"
    ).encode()
    settings = new_stack.settings
    async with ResultReader(settings) as reader, Producer(settings) as producer:
        output_id = await producer.submit({"code": deep_output})
        await producer.send_raw(deep_metadata, key=f"meta-{new_stack.tag}".encode())
        found = await reader.wait_for({output_id, f"meta-{new_stack.tag}"}, 120)
    output, metadata = found[output_id], found[f"meta-{new_stack.tag}"]
    assert output.error is not None and output.error.type == "invalid_output"
    assert "nested deeper" in output.error.message
    assert metadata.status == "rejected" and metadata.error is not None
    assert metadata.error.type == "invalid_request" and "metadata" in metadata.error.message
    await all_committed(new_stack)


async def test_reply_to_must_name_an_existing_allowed_topic(new_stack: Stack) -> None:
    settings = new_stack.settings
    replies = f"{settings.results_topic}.replies"
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(replies, 1, 1)])
    finally:
        await admin.close()
    worker = new_stack.start_worker(TAKO_REPLY_TO_PATTERN=r"t[0-9a-f]+\..*")
    await worker.wait_ready()
    missing = f"{settings.results_topic}.nowhere"
    found = await new_stack.run_jobs(
        [
            {"execution_id": f"ok-{new_stack.tag}", "code": "print(1)", "reply_to": replies},
            {"execution_id": f"missing-{new_stack.tag}", "code": "print(1)", "reply_to": missing},
            {"execution_id": f"denied-{new_stack.tag}", "code": "print(1)", "reply_to": "other"},
            {
                "execution_id": f"own-{new_stack.tag}",
                "code": "print(1)",
                "reply_to": settings.requests_topic,
            },
        ]
    )
    assert found[f"ok-{new_stack.tag}"].success
    for name, words in (
        ("missing", "does not exist"),
        ("denied", "not an allowed"),
        ("own", "own"),
    ):
        result = found[f"{name}-{new_stack.tag}"]
        assert result.status == "rejected" and result.error is not None, result
        assert words in result.error.message, result.error.message
    # Nobody can create topics through reply_to, even where the broker creates them on use.
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        assert missing not in await admin.list_topics()
    finally:
        await admin.close()
    await all_committed(new_stack)


async def test_a_request_without_id_or_key_keeps_one_id_across_a_crash(new_stack: Stack) -> None:
    first = new_stack.start_worker(**NO_PERIODIC_COMMIT)
    await first.wait_ready()
    settings = new_stack.settings
    marker = uuid.uuid4().hex
    async with Answers(settings, new_stack) as answers:
        async with AIOKafkaProducer(**producer_options(settings)) as producer:
            meta = await (
                await producer.send(
                    settings.requests_topic,
                    value=orjson.dumps({"code": f"print({marker!r})"}),
                    headers=[(CORRELATION_HEADER, marker.encode())],
                )
            )
        position = f"{settings.requests_topic}:{meta.partition}:{meta.offset}"
        await answers.wait({position}, timeout=120)
        first.kill(signal.SIGKILL)  # answered, not committed
        first.wait_exit(10)
        second = new_stack.start_worker()
        await second.wait_ready(180)
        await all_committed(new_stack, timeout=60)
        await asyncio.sleep(2)
    assert list(answers.results) == [position]  # the one answer, under the position's id
    assert [r.stdout for r in answers.results[position]] == [f"{marker}\n"]


async def test_a_cancel_after_the_answer_never_replaces_it(new_stack: Stack) -> None:
    first = new_stack.start_worker(**NO_PERIODIC_COMMIT)
    await first.wait_ready()
    execution_id = f"done-{new_stack.tag}"
    result = await new_stack.run_job({"execution_id": execution_id, "code": "print('done')"})
    assert result.success
    async with Client(new_stack.settings) as client:
        await client.request_cancel(execution_id)  # arrives before the offset is committed
    first.kill(signal.SIGKILL)
    first.wait_exit(10)
    second = new_stack.start_worker()
    await second.wait_ready(180)
    await all_committed(new_stack, timeout=60)
    assert [r.status for r in await all_results(new_stack, execution_id)] == ["succeeded"]


async def test_a_result_too_large_for_the_topic_is_answered_with_why(new_stack: Stack) -> None:
    """The embedded broker enforces no per-topic ``max.message.bytes``; the producer's own
    limit (``TAKO_KAFKA_MAX_MESSAGE_BYTES``) refuses the same way a topic does."""
    worker = new_stack.start_worker(TAKO_KAFKA_MAX_MESSAGE_BYTES=str(48 * 1024))
    await worker.wait_ready()
    request: dict[str, Any] = {
        "execution_id": f"big-{new_stack.tag}",
        "code": "print('x' * 60000)",
    }
    placed = await submit(new_stack.settings, [request])
    async with ResultReader(new_stack.settings, from_beginning=True) as reader:
        found = await reader.wait_for({str(request["execution_id"])}, 120)
    result = found[str(request["execution_id"])]
    assert result.status == "failed" and result.error is not None
    assert result.error.type == "internal_error" and "refused" in result.error.message
    assert result.stdout == ""
    store = await dlq.read_store(new_stack.settings)
    (entry,) = [e for e in store.records() if e.execution_id == request["execution_id"]]
    assert entry.source.offset == placed[str(request["execution_id"])][1]
    assert orjson.loads(base64.b64decode(entry.original_value or "")) == request
    await all_committed(new_stack)


async def test_the_dlq_topic_is_compacted_and_never_expires(new_stack: Stack) -> None:
    worker = new_stack.start_worker()
    await worker.wait_ready()
    config = await topic_config(new_stack.settings, new_stack.settings.dlq_topic)
    assert config.get("cleanup.policy") == "compact", config
    assert config.get("retention.ms") == "-1", config


async def test_send_all_lands_each_message_and_names_a_refusal_among_them(
    new_stack: Stack,
) -> None:
    """The worker's batched sends against the real broker: every message handed over at once,
    one outcome each, in order; a message too large for the producer refused alone."""
    settings = new_stack.settings.model_copy(update={"kafka_max_message_bytes": 48 * 1024})
    sink = KafkaSink(settings)
    await sink.start()
    topic = settings.results_topic
    messages = [
        (topic, f"k{n}".encode(), b"x" * (60_000 if n == 7 else 100 + n), [("n", str(n).encode())])
        for n in range(30)
    ]
    try:
        outcomes = await asyncio.wait_for(sink.send_all(messages), 60)
    finally:
        await sink.stop()
    assert isinstance(outcomes[7], PublishRefusedError), outcomes[7]
    for n, outcome in enumerate(outcomes):
        if n == 7:
            continue
        assert isinstance(outcome, tuple), (n, outcome)
        partition, offset = outcome
        record = await read_record(settings, TopicPartition(topic, partition), offset, timeout=30)
        assert record is not None and record.key == f"k{n}".encode()
        assert record.value == messages[n][2]
