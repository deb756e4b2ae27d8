"""Every number and correlation id of a message is bounded where the message is read.

Anyone may write to the topics.  pydantic reads ``123456789012345678901234567890`` as a Python
int, which orjson then cannot write (TypeError): a record holding one must fail validation where
it is read, as other foreign records do, not fail whatever serves it later."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from pydantic import BaseModel, ValidationError

from tako_stream.client import _parse_result
from tako_stream.core.errors import ErrorType, Status
from tako_stream.core.models import (
    MAX_CORRELATION_CHARS,
    MESSAGE_MODELS,
    Artifact,
    DLQRecord,
    ErrorInfo,
    ExecutionResult,
    ResourceUsage,
    SourcePosition,
)
from tako_stream.kafka.codec import dumps

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
HUGE = 123456789012345678901234567890


def _integers(schema: Any, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every integer node of a JSON schema, with where it is."""
    if isinstance(schema, dict):
        if schema.get("type") == "integer":
            yield where, schema
        for key, value in schema.items():
            yield from _integers(value, f"{where}.{key}")
    elif isinstance(schema, list):
        for n, value in enumerate(schema):
            yield from _integers(value, f"{where}[{n}]")


@pytest.mark.parametrize("name", sorted(MESSAGE_MODELS))
def test_every_integer_of_every_message_fits_64_bits(name: str) -> None:
    schema = MESSAGE_MODELS[name].model_json_schema()
    unbounded = [
        where
        for where, node in _integers(schema, name)
        if not node.get("minimum", node.get("exclusiveMinimum", -(2**64))) >= INT64_MIN
        or not node.get("maximum", node.get("exclusiveMaximum", 2**64)) <= INT64_MAX
    ]
    assert unbounded == []


@pytest.mark.parametrize("name", sorted(MESSAGE_MODELS))
def test_correlation_ids_are_capped_as_requests_are(name: str) -> None:
    schema = MESSAGE_MODELS[name].model_json_schema()
    field = schema["properties"].get("correlation_id")
    if field is None:
        return
    texts = [node for node in field.get("anyOf", [field]) if node.get("type") == "string"]
    assert texts and all(node.get("maxLength", 10**9) <= MAX_CORRELATION_CHARS for node in texts)


def result() -> ExecutionResult:
    return ExecutionResult(
        execution_id="e",
        correlation_id="c" * MAX_CORRELATION_CHARS,
        status=Status.SUCCEEDED,
        success=True,
        exit_code=0,
        worker_id="w",
        finished_at=datetime(2026, 1, 1, tzinfo=UTC),
        resource_usage=ResourceUsage(cpu_time_ms=1, wall_time_ms=2),
        artifacts=[
            Artifact(
                name="a.txt",
                size_bytes=1,
                sha256="0" * 64,
                content_type="text/plain",
                partition=0,
                offset=0,
            )
        ],
    )


def dlq_record() -> DLQRecord:
    moment = datetime(2026, 1, 1, tzinfo=UTC)
    return DLQRecord(
        dlq_id="d",
        execution_id="e",
        correlation_id="c" * MAX_CORRELATION_CHARS,
        error=ErrorInfo(type=ErrorType.INVALID_REQUEST, message="m"),
        attempts=0,
        first_failure_at=moment,
        last_failure_at=moment,
        worker_id="w",
        source=SourcePosition(topic="t", partition=0, offset=0, timestamp_ms=0),
        original_value=None,
    )


def with_value(message: BaseModel, path: str, value: Any) -> bytes:
    """``message`` as JSON with the field at ``path`` (dotted, list indices too) set; written
    with json, since orjson refuses to write a number past 64 bits."""
    body = message.model_dump(mode="json")
    *parents, last = path.split(".")
    node: Any = body
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[last] = value
    return json.dumps(body).encode()


RESULT_NUMBERS = [
    "exit_code",
    "attempts",
    "resource_usage.cpu_time_ms",
    "resource_usage.wall_time_ms",
    "artifacts.0.size_bytes",
    "artifacts.0.partition",
    "artifacts.0.offset",
]
DLQ_NUMBERS = [
    "attempts",
    "replay_count",
    "original_size",
    "source.partition",
    "source.offset",
    "source.timestamp_ms",
]
CASES = [(ExecutionResult, result, path) for path in RESULT_NUMBERS] + [
    (DLQRecord, dlq_record, path) for path in DLQ_NUMBERS
]


@pytest.mark.parametrize(("model", "build", "path"), CASES)
@pytest.mark.parametrize("huge", [HUGE, -HUGE, 2**63])
def test_a_number_past_64_bits_fails_where_it_is_read(
    model: type[BaseModel], build: Any, path: str, huge: int
) -> None:
    raw = with_value(build(), path, huge)
    with pytest.raises(ValidationError):
        model.model_validate_json(raw)
    with pytest.raises(ValidationError):  # as clients read it (orjson: a float, then an int)
        model.model_validate(orjson.loads(raw))


def test_our_own_messages_still_read_and_write() -> None:
    for message in (result(), dlq_record()):
        assert type(message).model_validate_json(dumps(message)) == message
    biggest = with_value(result(), "exit_code", INT64_MAX)
    assert orjson.loads(dumps(ExecutionResult.model_validate_json(biggest)))["exit_code"] == (
        INT64_MAX
    )


@pytest.mark.parametrize(("model", "build"), [(ExecutionResult, result), (DLQRecord, dlq_record)])
def test_a_correlation_id_longer_than_a_requests_fails_where_it_is_read(
    model: type[BaseModel], build: Any
) -> None:
    raw = with_value(build(), "correlation_id", "c" * (MAX_CORRELATION_CHARS + 1))
    with pytest.raises(ValidationError):
        model.model_validate_json(raw)


@pytest.mark.parametrize("field", ["output", "metadata"])
def test_a_result_nested_deeper_than_orjson_writes_is_none_to_the_client(field: str) -> None:
    """The client reads results with orjson, which takes 1024 levels of nesting but writes 254:
    ``tako-stream results`` and ``submit --wait`` print what they read, and a foreign result
    nested deeper ended them with orjson's error.  No worker publishes one."""
    deep: Any = {}
    for _ in range(300):
        deep = {"x": deep}
    parsed = _parse_result(with_value(result(), field, deep))
    if parsed is not None:  # what the CLI did with it: "Recursion limit reached"
        orjson.dumps(parsed.model_dump(mode="json"))
    assert parsed is None
    fine = _parse_result(dumps(result()))
    assert fine is not None and orjson.dumps(fine.model_dump(mode="json"))
