"""The host side of the supervisor protocol: untrusted frames in, capped buffers out."""

from __future__ import annotations

import itertools
import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tako_stream.sandbox.protocol import (
    ARTIFACT,
    FRAME,
    JOB_GID,
    JOB_PYTHON,
    JOB_UID,
    REPORT,
    RESULT,
    STDERR,
    STDOUT,
    Collected,
    FrameReader,
    Report,
    decode_text,
    encode_job,
    job_summary,
)
from tako_stream.sandbox.supervisor import Job, to_json
from tako_stream.settings import OutputCaps

REPORT_JSON = {
    "exit_code": 0,
    "timed_out": False,
    "elapsed": 0.25,
    "stdout_truncated": False,
    "stderr_truncated": False,
    "stderr_tail": "",
    "exception": [],
    "result_error": None,
}


def frame(kind: int, data: bytes) -> bytes:
    return FRAME.pack(kind, len(data)) + data


def report_frame(**fields: object) -> bytes:
    return frame(REPORT, json.dumps({**REPORT_JSON, **fields}).encode())


def reader(
    stdout_cap: int = 1 << 16, stderr_cap: int = 1 << 16, result_cap: int = 1 << 16
) -> FrameReader:
    return FrameReader(stdout_cap=stdout_cap, stderr_cap=stderr_cap, result_cap=result_cap)


def snapshot(r: FrameReader) -> tuple[object, ...]:
    c = r.collected
    return (
        bytes(c.stdout),
        bytes(c.stderr),
        c.stdout_truncated,
        c.stderr_truncated,
        c.result,
        c.report,
        r.broken,
        r.done,
    )


# --- Reassembly ---------------------------------------------------------------------------------


def test_whole_stream_in_one_chunk() -> None:
    r = reader()
    r.feed(
        frame(STDOUT, b"hello ")
        + frame(STDERR, b"warn\n")
        + frame(STDOUT, b"world\n")
        + frame(RESULT, b'{"x": 1}')
        + report_frame(exit_code=0)
    )
    c = r.collected
    assert bytes(c.stdout) == b"hello world\n"
    assert bytes(c.stderr) == b"warn\n"
    assert c.result == b'{"x": 1}'
    assert c.report == Report(exit_code=0, elapsed=0.25)
    assert r.done and not r.broken


def test_byte_by_byte() -> None:
    stream = frame(STDOUT, b"abc") + report_frame(exit_code=3)
    r = reader()
    for i in range(len(stream)):
        assert not r.done
        r.feed(stream[i : i + 1])
    assert bytes(r.collected.stdout) == b"abc"
    assert r.collected.report is not None and r.collected.report.exit_code == 3


def test_incomplete_stream_is_not_done() -> None:
    r = reader()
    stream = frame(STDOUT, b"abc") + report_frame()
    r.feed(stream[:-1])
    assert not r.done and not r.broken
    assert r.collected.report is None


def test_empty_frames_are_fine() -> None:
    r = reader()
    r.feed(frame(STDOUT, b"") + frame(RESULT, b"") + report_frame())
    assert r.collected.result == b""
    assert bytes(r.collected.stdout) == b""
    assert r.done and not r.broken


def test_data_after_the_report_is_ignored() -> None:
    r = reader()
    r.feed(report_frame() + frame(STDOUT, b"late"))
    r.feed(frame(STDOUT, b"later") + b"\xff\xff garbage")
    assert bytes(r.collected.stdout) == b""
    assert r.done and not r.broken


frames = st.lists(
    st.one_of(
        st.tuples(st.just(STDOUT), st.binary(max_size=50)),
        st.tuples(st.just(STDERR), st.binary(max_size=50)),
        st.tuples(st.just(RESULT), st.binary(max_size=50)),
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(
    frames,
    st.booleans(),
    st.lists(st.integers(min_value=0, max_value=2000), max_size=20),
    st.integers(min_value=0, max_value=120),
)
def test_split_anywhere_equals_unsplit(
    parts: list[tuple[int, bytes]], with_report: bool, cuts: list[int], cap: int
) -> None:
    stream = b"".join(frame(kind, data) for kind, data in parts)
    if with_report:
        stream += report_frame(exit_code=1, stderr_tail="tail")
    whole = reader(stdout_cap=cap, stderr_cap=cap)
    whole.feed(stream)
    split = reader(stdout_cap=cap, stderr_cap=cap)
    bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    for start, end in itertools.pairwise(bounds):
        split.feed(stream[start:end])
    assert snapshot(split) == snapshot(whole)
    # and what the unsplit reader saw is what was sent, capped
    out = b"".join(d for k, d in parts if k == STDOUT)
    err = b"".join(d for k, d in parts if k == STDERR)
    assert bytes(whole.collected.stdout) == out[:cap]
    assert bytes(whole.collected.stderr) == err[:cap]
    assert whole.collected.stdout_truncated == (len(out) > cap)
    assert whole.collected.stderr_truncated == (len(err) > cap)
    results = [d for k, d in parts if k == RESULT]
    assert whole.collected.result == (results[-1] if results else None)
    assert whole.done == with_report
    assert not whole.broken


# --- Caps ---------------------------------------------------------------------------------------


def test_stdout_and_stderr_are_capped_and_flagged() -> None:
    r = reader(stdout_cap=10, stderr_cap=4)
    r.feed(frame(STDOUT, b"0123456") + frame(STDOUT, b"789abc") + frame(STDERR, b"wxyz"))
    c = r.collected
    assert bytes(c.stdout) == b"0123456789"
    assert c.stdout_truncated
    assert bytes(c.stderr) == b"wxyz"
    assert not c.stderr_truncated  # exactly at the cap is not truncated
    r.feed(frame(STDERR, b"!"))
    assert bytes(c.stderr) == b"wxyz"
    assert c.stderr_truncated
    assert not r.broken


def test_stream_frame_over_one_mib_is_broken() -> None:
    r = reader()
    r.feed(FRAME.pack(STDOUT, (1 << 20) + 1))
    assert r.broken and r.done


def test_result_over_its_cap_is_broken() -> None:
    r = reader(result_cap=8)
    r.feed(frame(RESULT, b"12345678"))
    assert r.collected.result == b"12345678" and not r.broken
    r = reader(result_cap=8)
    r.feed(frame(RESULT, b"123456789"))
    assert r.broken and r.collected.result is None


def test_for_caps_holds_each_frame_to_its_own_cap() -> None:
    """Every cap a different size, so a field read into the wrong one shows."""
    caps = OutputCaps(
        stdout=3, stderr=4, result=6, artifact_files=2, artifact_file=5, artifact_total=7
    )

    def artifact(name: bytes, data: bytes) -> bytes:
        return frame(ARTIFACT, struct.pack(">H", len(name)) + name + data)

    r = FrameReader.for_caps(caps)
    r.feed(frame(STDOUT, b"abcdefgh") + frame(STDERR, b"12345678") + frame(RESULT, b"{}{}{}"))
    r.feed(artifact(b"a", b"x" * 5) + artifact(b"b", b"x" * 6))  # one file's cap
    r.feed(artifact(b"c", b"x" * 3) + artifact(b"d", b"x" * 2))  # the total's: 5 + 3 > 7
    r.feed(artifact(b"e", b""))  # the count's: a and d taken
    c = r.collected
    assert (bytes(c.stdout), bytes(c.stderr), c.result) == (b"abc", b"1234", b"{}{}{}")
    assert [name for name, _ in c.artifacts] == ["a", "d"]
    assert c.artifacts_refused == [
        ("b", "larger than 5 bytes"),
        ("c", "the job's artifacts would exceed 7 bytes"),
        ("e", "more than 2 files"),
    ]
    assert not r.broken
    r = FrameReader.for_caps(caps)
    r.feed(frame(RESULT, b"1234567"))
    assert r.broken


def test_oversized_report_is_broken() -> None:
    r = reader()
    r.feed(FRAME.pack(REPORT, 1024 * 1024 + 1))
    assert r.broken


def test_huge_length_is_broken_without_waiting_for_the_data() -> None:
    r = reader()
    r.feed(struct.pack(">BI", STDOUT, 0xFFFFFFFF))
    assert r.broken


@pytest.mark.parametrize("kind", [0, 5, 8, 10, 255])
def test_unknown_frame_kind_is_broken(kind: int) -> None:
    r = reader()
    r.feed(frame(STDOUT, b"kept") + frame(kind, b"x") + frame(STDOUT, b"dropped"))
    assert r.broken and r.done
    assert bytes(r.collected.stdout) == b"kept"
    r.feed(frame(STDOUT, b"more"))  # a broken stream ignores everything after
    assert bytes(r.collected.stdout) == b"kept"


@pytest.mark.parametrize(
    "payload", [b"not json", b"[1, 2]", b'"str"', b"42", b"\xff\xfe", b"", b"null"]
)
def test_garbage_report_is_broken(payload: bytes) -> None:
    r = reader()
    r.feed(frame(REPORT, payload))
    assert r.broken
    assert r.collected.report is None


def test_deeply_nested_report_is_broken_not_raised() -> None:
    payload = b"[" * 100_000
    r = reader()
    r.feed(frame(REPORT, payload))
    assert r.broken


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_raise(data: bytes) -> None:
    r = reader(stdout_cap=16, stderr_cap=16, result_cap=64)
    r.feed(data)
    assert len(r.collected.stdout) <= 16 and len(r.collected.stderr) <= 16


def test_diagnostics_are_capped() -> None:
    r = reader()
    r.feed_diagnostics(b"x" * 3000)
    r.feed_diagnostics(b"y" * 3000)
    r.feed_diagnostics(b"z")
    assert len(r.collected.diagnostics) == 4096
    assert bytes(r.collected.diagnostics) == b"x" * 3000 + b"y" * 1096


# --- Report.parse -------------------------------------------------------------------------------


def test_report_parse_full() -> None:
    report = Report.parse(
        json.dumps(
            {
                "exit_code": 1,
                "timed_out": True,
                "elapsed": 3,
                "stdout_truncated": True,
                "stderr_truncated": True,
                "stderr_tail": "Traceback...",
                "exception": ["ZeroDivisionError", "ArithmeticError"],
                "result_error": "too big",
            }
        ).encode()
    )
    assert report == Report(
        exit_code=1,
        timed_out=True,
        elapsed=3.0,
        stdout_truncated=True,
        stderr_truncated=True,
        stderr_tail="Traceback...",
        exception=["ZeroDivisionError", "ArithmeticError"],
        result_error="too big",
    )


def test_report_parse_ignores_wrongly_typed_fields() -> None:
    report = Report.parse(
        json.dumps(
            {
                "exit_code": "0",
                "timed_out": "yes",
                "elapsed": "fast",
                "stdout_truncated": 1,
                "stderr_truncated": [],
                "stderr_tail": 42,
                "exception": "ZeroDivisionError",
                "result_error": {"a": 1},
                "extra": "ignored",
            }
        ).encode()
    )
    assert report == Report()


def test_report_parse_empty_object_is_defaults() -> None:
    assert Report.parse(b"{}") == Report()


def test_report_parse_filters_exception_names() -> None:
    names = ["ok", 3, None, "x" * 256, "y" * 255, *[f"n{i}" for i in range(100)]]
    report = Report.parse(json.dumps({"exception": names}).encode())
    assert report is not None
    assert report.exception[:2] == ["ok", "y" * 255]
    assert len(report.exception) == 2 + 64 - 5  # only the first 64 entries are looked at


def test_report_parse_caps_strings() -> None:
    report = Report.parse(
        json.dumps({"stderr_tail": "a" + "b" * 20000, "result_error": "c" * 5000}).encode()
    )
    assert report is not None
    assert report.stderr_tail == "b" * 16384
    assert report.result_error == "c" * 1024


def test_report_parse_rejects_boolean_exit_code() -> None:
    report = Report.parse(b'{"exit_code": true}')
    assert report is not None
    assert report.exit_code is None


def test_job_summary() -> None:
    c = Collected(stdout=bytearray(b"abc"), report=Report(exit_code=2, timed_out=True))
    assert job_summary(c) == {
        "stdout_bytes": 3,
        "stderr_bytes": 0,
        "exit_code": 2,
        "timed_out": True,
    }
    assert job_summary(Collected())["exit_code"] is None


def test_decode_text_replaces_bad_bytes() -> None:
    assert decode_text(bytearray(b"ok \xff")) == "ok \ufffd"


# --- encode_job ---------------------------------------------------------------------------------


def test_encode_job_length_prefix_and_payload() -> None:
    raw = encode_job(
        code="print('héllo')\n",
        input_json=b'{"a": "\xc3\xa9"}',
        timeout=5.0,
        caps=OutputCaps(
            stdout=100, stderr=200, result=300, artifact_files=0, artifact_file=0, artifact_total=0
        ),
    )
    (length,) = struct.unpack(">Q", raw[:8])
    assert length == len(raw) - 8
    assert raw[8:].startswith(b"tako-job 1 ")
    job = Job(raw[8:])  # decoded as the supervisor in the container decodes it
    assert job.code == "print('héllo')\n".encode()
    assert job.input == b'{"a": "\xc3\xa9"}'
    assert (job.timeout, job.cancel_grace) == (5.0, 2.0)
    assert (job.stdout_cap, job.stderr_cap, job.result_cap) == (100, 200, 300)
    assert (job.uid, job.gid, job.python) == (JOB_UID, JOB_GID, JOB_PYTHON)


def test_encode_job_sends_every_cap() -> None:
    """Every cap a different size, so a field sent under the wrong name shows."""
    caps = OutputCaps(
        stdout=1, stderr=2, result=3, artifact_files=4, artifact_file=5, artifact_total=6
    )
    job = Job(encode_job(code="", input_json=b"", timeout=1, caps=caps)[8:])
    assert (job.stdout_cap, job.stderr_cap, job.result_cap) == (1, 2, 3)
    assert (job.artifact_files, job.artifact_file_cap, job.artifact_total_cap) == (4, 5, 6)


@settings(max_examples=200, deadline=None)
@given(
    st.text(max_size=200),
    st.binary(max_size=200),
    st.floats(min_value=0.001, max_value=300, allow_nan=False),
    st.floats(min_value=0, max_value=60, allow_nan=False),
)
def test_encode_job_round_trips(code: str, data: bytes, timeout: float, grace: float) -> None:
    raw = encode_job(
        code=code,
        input_json=data,
        timeout=timeout,
        caps=OutputCaps(
            stdout=1, stderr=2, result=3, artifact_files=0, artifact_file=0, artifact_total=0
        ),
        cancel_grace=grace,
    )
    assert struct.unpack(">Q", raw[:8])[0] == len(raw) - 8
    job = Job(raw[8:])
    assert job.code == code.encode("utf-8", "surrogatepass")  # lone surrogates kept
    assert job.input == data
    assert (job.timeout, job.cancel_grace) == (timeout, grace)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"tako-job 2 code=0 input=0\n",
        b"tako-job 1 code=1 input=0\n",  # the body is shorter than announced
        b"tako-job 1 code=0 input=0\nextra",
        b"tako-job 1 code=0 input=0\n",  # fields missing
    ],
)
def test_supervisor_refuses_a_malformed_job(payload: bytes) -> None:
    with pytest.raises((ValueError, KeyError)):
        Job(payload)


# --- the supervisor's report writer ------------------------------------------------------------

_report_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(_report_values)
def test_supervisor_json_matches_json_module(value: object) -> None:
    """The supervisor writes its report without the json module; the host reads it with it."""
    text = to_json(value)
    assert json.loads(text.encode("utf-8", "surrogatepass")) == value


def test_supervisor_json_escapes_and_non_finite_floats() -> None:
    assert to_json('a"b\\c\n\x00é') == '"a\\"b\\\\c\\u000a\\u0000é"'
    assert to_json([float("nan"), float("inf"), 1.5]) == "[null,null,1.5]"
    written = to_json({"exit_code": 1, "stderr_tail": "x\ty", "exception": []})
    report = Report.parse(written.encode())
    assert report is not None and report.exit_code == 1 and report.stderr_tail == "x\ty"


def test_report_cancelled_flag() -> None:
    report = Report.parse(b'{"exit_code": 143, "cancelled": true}')
    assert report is not None and report.cancelled and report.exit_code == 143
    for raw in (b'{"cancelled": 1}', b'{"cancelled": "yes"}', b"{}"):
        parsed = Report.parse(raw)
        assert parsed is not None and not parsed.cancelled
