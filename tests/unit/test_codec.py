"""decode_request and correlation_id: the boundary where untrusted bytes enter the service."""

from __future__ import annotations

import json
import uuid
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tako_stream.core.errors import ErrorType, InvalidRequestError
from tako_stream.core.models import ExecutionRequest
from tako_stream.kafka.codec import correlation_id, decode_request, dumps, header, loads, new_id


def body(**fields: Any) -> bytes:
    return orjson.dumps({"code": "print(1)", **fields})


def is_uuid(text: str | None) -> bool:
    try:
        return str(uuid.UUID(str(text))) == text
    except ValueError:
        return False


def rejected(value: bytes | None, key: bytes | None = None) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        decode_request(value, key)
    exc = info.value
    assert exc.error_type is ErrorType.INVALID_REQUEST
    assert exc.errors and all(isinstance(e, str) and e for e in exc.errors)
    return exc


def names_field(exc: InvalidRequestError, field: str) -> bool:
    return any(e.startswith(field) for e in exc.errors)


# --- Valid requests -----------------------------------------------------------------------------


def test_minimal_request_takes_its_id_from_the_key() -> None:
    request = decode_request(b'{"code": "print(1)"}', b"job-7")
    assert isinstance(request, ExecutionRequest)
    assert request.execution_id == "job-7"
    assert request.code == "print(1)"
    assert request.input_data == {}
    assert request.timeout is None
    assert request.job_type == "default"
    assert request.memory_limit is None
    assert request.reply_to is None
    assert request.metadata is None


def test_minimal_request_without_key_gets_a_uuid() -> None:
    first = decode_request(b'{"code": "print(1)"}', None)
    second = decode_request(b'{"code": "print(1)"}', None)
    assert is_uuid(first.execution_id) and is_uuid(second.execution_id)
    assert first.execution_id != second.execution_id


def test_unusable_key_is_replaced_by_a_uuid() -> None:
    assert is_uuid(decode_request(body(), b"has space").execution_id)
    assert is_uuid(decode_request(body(), b"\xff\xfe").execution_id)
    assert is_uuid(decode_request(body(), b"x" * 129).execution_id)
    assert is_uuid(decode_request(body(), b"").execution_id)


def test_body_execution_id_wins_over_the_key() -> None:
    assert decode_request(body(execution_id="from-body"), b"from-key").execution_id == "from-body"


def test_full_request() -> None:
    request = decode_request(
        body(
            execution_id="a:b.c-d_e",
            input_data={"x": [1, 2, {"y": None}]},
            timeout=2.5,
            job_type="data-processing",
            memory_limit="1g",
            reply_to="replies.v1",
            metadata={"k": "v"},
        ),
        None,
    )
    assert request.execution_id == "a:b.c-d_e"
    assert request.input_data == {"x": [1, 2, {"y": None}]}
    assert request.timeout == 2.5
    assert request.memory_limit == "1g"
    assert request.reply_to == "replies.v1"
    assert request.metadata == {"k": "v"}


@pytest.mark.parametrize("memory", ["256m", "1g", "16m", "512MiB", "1G"])
def test_memory_limit_ok(memory: str) -> None:
    assert decode_request(body(memory_limit=memory), None).memory_limit == memory


@pytest.mark.parametrize("timeout", [1, 300, 1.5])
def test_timeout_bounds_inclusive(timeout: float) -> None:
    assert decode_request(body(timeout=timeout), None).timeout == timeout


def test_code_at_the_limit_is_accepted() -> None:
    assert len(decode_request(body(code="x" * 100_000), None).code) == 100_000


# --- Invalid requests ---------------------------------------------------------------------------


def test_value_none() -> None:
    exc = rejected(None, b"k1")
    assert exc.errors == ["request: message has no value"]
    assert exc.execution_id == "k1"
    assert rejected(None).execution_id is None


@pytest.mark.parametrize("value", [b"not json", b"{", b"", b"{'code': 1}", b"NaN"])
def test_not_json(value: bytes) -> None:
    exc = rejected(value, b"the-key")
    assert names_field(exc, "request: not valid JSON")
    assert exc.execution_id == "the-key"


@pytest.mark.parametrize(
    "value", [b"\xff\xfe\xfd", b'{"code": "\xff"}', b'{"code": "\xed\xa0\x80"}']
)
def test_invalid_utf8(value: bytes) -> None:
    exc = rejected(value, b"k")
    assert names_field(exc, "request: not valid JSON")
    assert exc.execution_id == "k"


@pytest.mark.parametrize(
    ("value", "kind"),
    [(b"[1, 2]", "list"), (b'"code"', "str"), (b"42", "int"), (b"4.5", "float"), (b"null", "")],
)
def test_not_an_object(value: bytes, kind: str) -> None:
    exc = rejected(value, b"k")
    assert names_field(exc, "request: expected a JSON object")
    assert exc.errors[0].endswith(kind)
    assert exc.execution_id == "k"


def test_missing_code() -> None:
    exc = rejected(b'{"execution_id": "e-1"}', b"k")
    assert names_field(exc, "code")
    assert exc.execution_id == "e-1"


@pytest.mark.parametrize("code", ["", "   ", "\n\t \n"])
def test_blank_code(code: str) -> None:
    exc = rejected(body(code=code), b"k")
    assert names_field(exc, "code")
    assert exc.execution_id == "k"


def test_code_too_long() -> None:
    exc = rejected(body(code="x" * 100_001, execution_id="big"))
    assert names_field(exc, "code")
    assert exc.execution_id == "big"


@pytest.mark.parametrize("code", [1, None, ["print(1)"]])
def test_code_wrong_type(code: object) -> None:
    assert names_field(rejected(body(code=code)), "code")


@pytest.mark.parametrize("data", [[1, 2], "text", 3, True])
def test_input_data_not_an_object(data: object) -> None:
    assert names_field(rejected(body(input_data=data)), "input_data")


def test_input_data_too_big() -> None:
    exc = rejected(body(input_data={"blob": "x" * (1024 * 1024)}, execution_id="e"))
    assert names_field(exc, "input_data")
    assert any("1 MiB" in e for e in exc.errors)
    assert exc.execution_id == "e"


def test_input_data_just_under_the_limit() -> None:
    blob = "x" * (1024 * 1024 - len('{"blob":""}'))
    assert len(dumps({"blob": blob})) == 1024 * 1024
    assert decode_request(body(input_data={"blob": blob}), None).input_data == {"blob": blob}


@pytest.mark.parametrize("timeout", [0, 301, -5, "abc", 0.5, [], {}])
def test_bad_timeout(timeout: object) -> None:
    exc = rejected(body(timeout=timeout), b"k")
    assert names_field(exc, "timeout")
    assert exc.execution_id == "k"


@pytest.mark.parametrize("memory", ["lots", "1k", "15m", "", "-1g", "256x", 256])
def test_bad_memory_limit(memory: object) -> None:
    assert names_field(rejected(body(memory_limit=memory)), "memory_limit")


def test_memory_limit_below_minimum_says_so() -> None:
    exc = rejected(body(memory_limit="1k"))
    assert any("at least 16m" in e for e in exc.errors)


def test_unknown_field_is_rejected() -> None:
    exc = rejected(body(execution_id="e", priority="high"), b"k")
    assert names_field(exc, "priority")
    assert exc.execution_id == "e"


@pytest.mark.parametrize("topic", ["has space", "", "a/b", "x" * 250, "ünïcode"])
def test_bad_reply_to(topic: str) -> None:
    assert names_field(rejected(body(reply_to=topic)), "reply_to")


@pytest.mark.parametrize("job_type", ["", "x" * 129, 3])
def test_bad_job_type(job_type: object) -> None:
    assert names_field(rejected(body(job_type=job_type)), "job_type")


def test_several_bad_fields_are_all_named() -> None:
    exc = rejected(body(code="", timeout=0, memory_limit="lots", extra=1))
    for field in ("code", "timeout", "memory_limit", "extra"):
        assert names_field(exc, field), field
    assert "timeout" in str(exc)


@pytest.mark.parametrize("bad_id", ["has space", "", "x" * 129, 42, "semi;colon"])
def test_bad_execution_id_falls_back_to_key(bad_id: object) -> None:
    exc = rejected(body(execution_id=bad_id), b"from-key")
    assert names_field(exc, "execution_id")
    assert exc.execution_id == "from-key"


def test_bad_execution_id_and_bad_key_recover_nothing() -> None:
    exc = rejected(body(execution_id="bad id", code=""), b"bad key")
    assert exc.execution_id is None


def test_execution_id_recovered_from_body_when_another_field_is_bad() -> None:
    exc = rejected(body(execution_id="good-id", timeout=301), b"other-key")
    assert exc.execution_id == "good-id"


def test_key_with_trailing_newline_is_not_used_as_id() -> None:
    request = decode_request(body(), b"abc\n")
    assert request.execution_id is not None
    assert "\n" not in request.execution_id


def test_deeply_nested_input_data_is_an_invalid_request() -> None:
    depth = 300
    value = b'{"code": "x", "input_data": {"a": ' + b"[" * depth + b"]" * depth + b"}}"
    try:
        decode_request(value, None)
    except InvalidRequestError as exc:
        assert names_field(exc, "input_data")


def test_deeply_nested_metadata_is_rejected_or_serialisable() -> None:
    depth = 300
    value = b'{"code": "x", "metadata": {"a": ' + b"[" * depth + b"]" * depth + b"}}"
    try:
        request = decode_request(value, None)
    except InvalidRequestError as exc:
        assert names_field(exc, "metadata")
    else:
        dumps(request)


def test_absurd_memory_limit_is_an_invalid_request() -> None:
    assert names_field(rejected(body(memory_limit="9" * 400 + "m")), "memory_limit")


# --- Property: nothing but a request or InvalidRequestError ------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)

#: Objects shaped like requests: every real field (and an unknown one) with arbitrary values.
request_like = st.fixed_dictionaries(
    {},
    optional={
        name: json_values
        | st.text(alphabet="0123456789.kmgbiKMGBI -abc:_", max_size=12)
        | st.floats(min_value=-10, max_value=400)
        for name in (
            "execution_id",
            "code",
            "input_data",
            "timeout",
            "job_type",
            "memory_limit",
            "reply_to",
            "metadata",
            "unknown",
        )
    },
)


def decodes_or_rejects(value: bytes | None, key: bytes | None) -> None:
    try:
        request = decode_request(value, key)
    except InvalidRequestError as exc:
        assert exc.errors
        assert exc.execution_id is None or isinstance(exc.execution_id, str)
    else:
        assert isinstance(request, ExecutionRequest)
        assert request.execution_id


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.none(), st.binary(max_size=40) | st.none())
def test_arbitrary_bytes_never_raise_anything_else(value: bytes | None, key: bytes | None) -> None:
    decodes_or_rejects(value, key)


@settings(max_examples=300, deadline=None)
@given(json_values | request_like, st.binary(max_size=40) | st.none())
def test_arbitrary_json_never_raises_anything_else(value: object, key: bytes | None) -> None:
    decodes_or_rejects(json.dumps(value).encode(), key)


# --- correlation_id -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["X-Correlation-ID", "x-correlation-id", "X-CORRELATION-ID", "x-Correlation-Id"]
)
def test_correlation_header_any_case(name: str) -> None:
    assert correlation_id([("other", b"x"), (name, b"corr-123")]) == "corr-123"


def test_correlation_last_header_wins() -> None:
    headers = [("x-correlation-id", b"first"), ("X-Correlation-ID", b"second")]
    assert correlation_id(headers) == "second"


def test_correlation_is_stripped() -> None:
    assert correlation_id([("x-correlation-id", b"  abc  ")]) == "abc"


@pytest.mark.parametrize(
    "headers",
    [
        None,
        [],
        [("other", b"x")],
        [("x-correlation-id", b"")],
        [("x-correlation-id", b"   ")],
        [("x-correlation-id", b"\xff\xfe")],
        [("x-correlation-id", b"a" * 1000)],
        [("x-correlation-id", b"a\nb")],
        [("x-correlation-id", b"a\x00b")],
        [("x-correlation-id", b"\x1b[31mred")],
    ],
)
def test_correlation_replaced_by_new_id(headers: list[tuple[str, bytes]] | None) -> None:
    first, second = correlation_id(headers), correlation_id(headers)
    assert is_uuid(first) and is_uuid(second)
    assert first != second


def test_correlation_at_the_length_limit() -> None:
    assert correlation_id([("x-correlation-id", b"a" * 256)]) == "a" * 256
    assert is_uuid(correlation_id([("x-correlation-id", b"a" * 257)]))


def test_correlation_unicode_is_kept() -> None:
    assert correlation_id([("x-correlation-id", "tâche-1".encode())]) == "tâche-1"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.text(max_size=20), st.binary(max_size=300)), max_size=5))
def test_correlation_is_always_a_short_printable_string(headers: list[tuple[str, bytes]]) -> None:
    value = correlation_id(headers)
    assert value and len(value) <= 256 and value.isprintable()


# --- Small helpers ------------------------------------------------------------------------------


def test_header_returns_none_when_missing() -> None:
    assert header(None, "x") is None
    assert header([("a", b"1")], "b") is None


def test_dumps_and_loads_round_trip_models() -> None:
    request = decode_request(body(execution_id="r"), None)
    assert loads(dumps(request)) == request.model_dump(mode="json")
    assert is_uuid(new_id())


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "padding", ["1" + " " * 100_000 + "x", " " * 100_000 + "1 x", "1" * 200_000]
)
def test_a_long_memory_limit_is_refused_at_once(padding: str) -> None:
    # A digit, spaces and a bad character made the size pattern backtrack: minutes of one
    # core for 100 KB, with the worker's event loop blocked (no heartbeat: evicted, and the
    # record went on to its next owner).  The test's timeout is a hang guard, not a target.
    exc = rejected(body(code="x", memory_limit=padding))
    assert names_field(exc, "memory_limit")
