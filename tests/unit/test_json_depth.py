"""How deep a JSON value nests, asked of orjson in C (a walk in Python took seconds for a
hostile 4 MB value, on the event loop), and the decoder's garbage collector pause."""

from __future__ import annotations

import gc
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tako_stream.core.models import MAX_INPUT_BYTES, MAX_JSON_DEPTH, ExecutionRequest, too_deep
from tako_stream.kafka import codec


def depth(value: Any) -> int:
    """The reference: containers nested (a scalar is 0, ``{}`` is 1)."""
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    return 0


def nest(levels: int, kinds: str = "l") -> Any:
    value: Any = "x"
    for n in range(levels):
        value = [value] if kinds[n % len(kinds)] == "l" else {"k": value}
    return value


@pytest.mark.parametrize("kinds", ["l", "d", "ld", "dl"])
@pytest.mark.parametrize("levels", [0, 1, 127, 128, 129, 130, 254, 255, 400])
def test_the_limit_is_exact(kinds: str, levels: int) -> None:
    assert too_deep(nest(levels, kinds)) is (levels > MAX_JSON_DEPTH)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from("ld"), min_size=100, max_size=160).map("".join),
    st.integers(0, 5),
)
def test_it_agrees_with_a_walk(kinds: str, siblings: int) -> None:
    value = nest(len(kinds), kinds)
    wide = {"a": [nest(3)] * siblings, "deep": value, "z": list(range(siblings))}
    assert too_deep(wide) is (depth(wide) > MAX_JSON_DEPTH)


def test_input_data_at_the_limit_is_taken_and_past_it_refused() -> None:
    ExecutionRequest(code="x", input_data={"a": nest(MAX_JSON_DEPTH - 1)})
    with pytest.raises(ValueError, match="nested deeper"):
        ExecutionRequest(code="x", input_data={"a": nest(MAX_JSON_DEPTH)})


def test_the_size_counted_is_the_values_own() -> None:
    # One encoding answers depth and size: the lists wrapped around it for the depth are not
    # counted, so a value of exactly the limit is taken.
    fits = {"a": "x" * (MAX_INPUT_BYTES - len(b'{"a":""}'))}
    assert len(orjson.dumps(fits)) == MAX_INPUT_BYTES
    ExecutionRequest(code="x", input_data=fits)
    with pytest.raises(ValueError, match="at most 1 MiB"):
        ExecutionRequest(code="x", input_data={"a": fits["a"] + "x"})


def test_decoding_pauses_the_collector_and_restores_it(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []
    real = orjson.loads

    def loads(data: bytes | str) -> Any:
        seen.append(gc.isenabled())
        return real(data)

    monkeypatch.setattr(codec.orjson, "loads", loads)
    assert codec.loads(b"[1]") == [1]
    assert gc.isenabled() and seen == [False]
    with pytest.raises(orjson.JSONDecodeError):
        codec.loads(b"[")
    assert gc.isenabled()
    gc.disable()  # someone else's pause is theirs to end
    try:
        codec.loads(b"[]")
        assert not gc.isenabled()
    finally:
        gc.enable()
