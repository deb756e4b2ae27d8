"""The bad-input corpus (tests/integration/test_bad_input.py) checked against the decoder alone.

The integration test sends each message through a real broker and worker; here the same bytes
go through ``decode_request`` (and ``JobTypes.limits``, which refuses what the job type forbids),
so a wrong expectation or a decoder regression shows in milliseconds.
"""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tako_stream.core.errors import InvalidRequestError
from tako_stream.core.jobtypes import JobTypes
from tako_stream.kafka.codec import decode_request
from tests.integration.test_bad_input import Case, corpus, flood

CORPUS = corpus("unit")
JOB_TYPES = JobTypes.load()


def rejection(case: Case) -> InvalidRequestError:
    try:
        request = decode_request(case.value, case.key)
        JOB_TYPES.limits(request)
    except InvalidRequestError as exc:
        return exc
    raise AssertionError(f"{case.name}: accepted")


@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
def test_each_case_is_rejected_naming_the_problem(case: Case) -> None:
    exc = rejection(case)
    message = "; ".join(exc.errors)
    for word in case.names:
        assert word in message, (word, message)
    assert len(message) < 8000
    assert exc.execution_id == case.execution_id


def test_corpus_names_are_unique() -> None:
    assert len({c.name for c in CORPUS}) == len(CORPUS)


def test_every_flood_message_is_rejected() -> None:
    for case in flood(1, 400):
        rejection(case)


def test_many_unknown_fields_are_listed_up_to_a_bound() -> None:
    exc = rejection(Case("x", orjson.dumps({f"f{i}": i for i in range(5000)}), None, (), None))
    assert exc.errors[0] == "code: Field required"
    assert exc.errors[1] == "f0: Extra inputs are not permitted"
    assert len(exc.errors) == 21
    assert exc.errors[-1] == "request: 4981 more problem(s) not listed"


def test_unknown_fields_and_field_errors_are_both_named() -> None:
    exc = rejection(Case("x", orjson.dumps({"code": "", "bogus": 1}), None, (), None))
    assert [e.split(":")[0] for e in exc.errors] == ["code", "bogus"]


# --- Property: any JSON object at all is a request or an InvalidRequestError -------------------

json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    json_leaves,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=15,
)
FIELDS = ["execution_id", "code", "input_data", "timeout", "job_type", "memory_limit", "reply_to"]
field_names = st.sampled_from([*FIELDS, "metadata", "Code", "code ", "", "__proto__"]) | st.text(
    max_size=12
)


def decodes_or_rejects(value: bytes, key: bytes | None) -> None:
    try:
        request = decode_request(value, key)
    except InvalidRequestError as exc:
        assert exc.errors and len(exc.errors) <= 21
        assert all(isinstance(e, str) and 0 < len(e) <= 300 for e in exc.errors)
        assert exc.execution_id is None or isinstance(exc.execution_id, str)
    else:
        assert request.execution_id
        orjson.dumps(request.model_dump(mode="json"))  # what was accepted can be sent on


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(field_names, json_values, max_size=12), st.binary(max_size=20) | st.none())
def test_arbitrary_objects_decode_or_are_rejected(
    body: dict[str, object], key: bytes | None
) -> None:
    decodes_or_rejects(orjson.dumps(body), key)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([b"\xef\xbb\xbf", b"\xff", b"\x00", b" ", b"[", b"{", b"NaN", b""]),
    st.dictionaries(field_names, json_values, max_size=6),
    st.sampled_from([b"", b"\x00", b"}", b"\xff", b" x", b"NaN"]),
)
def test_objects_with_junk_around_them_are_rejected(
    prefix: bytes, body: dict[str, object], suffix: bytes
) -> None:
    value = prefix + orjson.dumps(body) + suffix
    decodes_or_rejects(value, b"key")
