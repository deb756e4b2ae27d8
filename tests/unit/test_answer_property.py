"""Property: whatever a record holds and whatever the job leaves behind, the record is answered.

Decode → run → encode → publish through the real intake, executor and publisher over the
fakes, with arbitrary values for every request field and for ``result.json``, stdout and
stderr: deep, wide, huge, odd Unicode, wrong types.  Every record gets exactly one answer on
the results topic and its offset is committed.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tako_stream.core.models import ExecutionResult
from tests.fakes import TOPICS, intake_rig, succeed

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
)
JSON = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


def nested_text(depth: int, leaf: str = "{}") -> str:
    """Objects nested ``depth`` deep, as text (deeper than a JSON library writes)."""
    return '{"a":' * depth + leaf + "}" * depth


DEEP = st.integers(0, 400).map(nested_text)
ODD_TEXT = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=()), max_size=50
) | st.sampled_from(["", " ", "\u0000", "\ufeff", "\U0001f600" * 50, "a" * 5000])


@st.composite
def request_value(draw: st.DrawFn) -> bytes:
    """A request as a hostile producer would send it: fields of any type, deep or huge."""
    kind = draw(st.sampled_from(["json", "raw", "deep-field"]))
    if kind == "raw":
        return draw(st.binary(max_size=300) | DEEP.map(str.encode))
    fields: dict[str, Any] = {}
    for name, values in {
        "execution_id": st.none() | ODD_TEXT | st.integers(-(2**63), 2**63),
        "code": ODD_TEXT | JSON,
        "input_data": JSON,
        "metadata": JSON,
        "timeout": JSON | st.floats(allow_nan=True, allow_infinity=True),
        "job_type": ODD_TEXT | JSON,
        "memory_limit": ODD_TEXT | JSON,
        "reply_to": ODD_TEXT | st.sampled_from([TOPICS.requests, TOPICS.results, "replies"]),
        "unknown_field": JSON,
    }.items():
        if draw(st.booleans()):
            fields[name] = draw(values)
    text = orjson.dumps(fields, option=orjson.OPT_NON_STR_KEYS).decode()
    if kind == "deep-field":  # a field nested deeper than orjson writes, spliced in as text
        name = draw(st.sampled_from(["input_data", "metadata", "code"]))
        body = text[1:-1]
        text = "{" + (body + "," if body else "") + f'"{name}":' + draw(DEEP) + "}"
    return text.encode()


RESULT_JSON = st.none() | st.binary(max_size=200) | DEEP.map(str.encode) | JSON.map(orjson.dumps)


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    value=request_value(),
    key=st.none() | st.binary(max_size=40),
    result=RESULT_JSON,
    stdout=st.binary(max_size=300),
    stderr=st.binary(max_size=300),
    exit_code=st.none() | st.integers(-20, 300),
    exception=st.lists(ODD_TEXT, max_size=3),
)
def test_every_record_is_answered_once_and_committed(
    value: bytes,
    key: bytes | None,
    result: bytes | None,
    stdout: bytes,
    stderr: bytes,
    exit_code: int | None,
    exception: list[str],
) -> None:
    async def scenario() -> None:
        async with intake_rig(partitions=(0,), existing_topics=["replies"]) as rig:
            rig.sandbox.default = succeed(
                stdout=stdout,
                stderr=stderr,
                result=result,
                exit_code=exit_code,
                exception=exception,
            )
            rig.source.add(value, key=key)
            await rig.source.wait_committed(0, 1)
            answers = rig.sink.on(TOPICS.results)
            assert len(answers) == 1, answers
            answer = ExecutionResult.model_validate_json(answers[0].value or b"")
            assert answers[0].key == answer.execution_id.encode()
            assert rig.intake.answered == 1

    asyncio.run(scenario())
