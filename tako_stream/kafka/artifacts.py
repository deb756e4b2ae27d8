"""Artifacts on Kafka: how one is keyed and labelled, and how to read one back.

Each artifact (a file a job left in /output besides result.json) is one record on the artifacts
topic (``TAKO_ARTIFACTS_TOPIC``, compacted): key ``execution_id/name`` (an execution id has no
``/``), value the file's bytes, headers ``content-type``, ``x-tako-sha256``, ``x-correlation-id``,
``x-tako-execution-id`` and ``x-tako-artifact``.  The worker publishes a job's artifacts before
its result, and the result lists each one that landed with its partition and offset, so a reader
that has the result fetches an artifact with one positioned read (``read_artifact``).
"""

from __future__ import annotations

import asyncio
import hashlib
import mimetypes

from aiokafka import TopicPartition

from tako_stream.core.models import CORRELATION_HEADER, Artifact
from tako_stream.kafka.reader import Record, latest, read_record
from tako_stream.settings import Settings

CONTENT_TYPE_HEADER = "content-type"
SHA256_HEADER = "x-tako-sha256"
EXECUTION_HEADER = "x-tako-execution-id"
NAME_HEADER = "x-tako-artifact"
#: Bytes of a record beyond its key, value and headers (Kafka's v2 record and batch framing,
#: generously): what an artifact's message must leave free under the message size limit.
RECORD_OVERHEAD = 1024


def artifact_key(execution_id: str, name: str) -> bytes:
    return f"{execution_id}/{name}".encode()


def content_type(name: str) -> str:
    """What the name says the file is (``mimetypes``, as Tako VM does), else bytes."""
    guessed, _ = mimetypes.guess_type(name, strict=False)
    return guessed or "application/octet-stream"


def describe(name: str, data: bytes) -> Artifact:
    """The listing of one artifact, computed from its bytes on the host."""
    return Artifact(
        name=name,
        size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        content_type=content_type(name),
    )


def headers(artifact: Artifact, execution_id: str, correlation_id: str) -> list[tuple[str, bytes]]:
    return [
        (CONTENT_TYPE_HEADER, artifact.content_type.encode()),
        (SHA256_HEADER, artifact.sha256.encode()),
        (CORRELATION_HEADER, correlation_id.encode()),
        (EXECUTION_HEADER, execution_id.encode()),
        (NAME_HEADER, artifact.name.encode()),
    ]


def message_size(artifact: Artifact, execution_id: str, correlation_id: str) -> int:
    """Bytes the artifact's message takes, as counted against ``max.message.bytes``."""
    key = artifact_key(execution_id, artifact.name)
    head = sum(len(k) + len(v) for k, v in headers(artifact, execution_id, correlation_id))
    return artifact.size_bytes + len(key) + head + RECORD_OVERHEAD


async def read_artifact(
    settings: Settings, execution_id: str, artifact: Artifact, *, timeout: float = 10.0
) -> bytes | None:
    """The bytes of ``artifact`` of ``execution_id`` as a result lists it; None when they are
    not on the artifacts topic (any more) or not as listed.

    A positioned read when the listing has the partition and offset, else the last record of
    its key.  The key and the SHA-256 are checked: a compacted-away offset or a re-run that
    replaced the file under the same name never hands back other bytes than listed.
    """
    topic = settings.artifacts_topic
    key = artifact_key(execution_id, artifact.name)
    record: Record | None
    try:
        if artifact.partition is not None and artifact.offset is not None:
            tp = TopicPartition(topic, artifact.partition)
            record = await read_record(settings, tp, artifact.offset, timeout=timeout)
        else:
            async with asyncio.timeout(timeout):
                record = await latest(settings, topic, key.decode())
    except TimeoutError:
        record = None
    if record is None or record.key != key or record.value is None:
        return None
    value: bytes = record.value
    if hashlib.sha256(value).hexdigest() != artifact.sha256:
        return None
    return value
