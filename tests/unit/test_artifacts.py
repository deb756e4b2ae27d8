"""Artifacts: the supervisor's collection, the host's checks of its frames, the publisher.

The supervisor's collection runs here on a temporary directory (its ``directory`` argument), as
root or not, with the same links, FIFOs and oversized files a hostile job would leave.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from tako_stream.core.errors import Status
from tako_stream.core.models import Artifact, ExecutionResult
from tako_stream.kafka import artifacts as kafka_artifacts
from tako_stream.kafka.message import Incoming
from tako_stream.sandbox import supervisor
from tako_stream.sandbox.protocol import (
    ARTIFACT,
    ARTIFACT_NAME,
    FRAME,
    REPORT,
    Collected,
    FrameReader,
    Report,
    encode_job,
)
from tako_stream.settings import OutputCaps
from tako_stream.worker.artifacts import attach, pending
from tako_stream.worker.publish import Publisher
from tako_stream.worker.verdict import Job, Verdict, answer
from tests.fakes import TOPICS, FakeSink


def job(files: int = 4, file_cap: int = 100, total_cap: int = 250) -> supervisor.Job:
    payload = encode_job(
        code="pass",
        input_json=b"{}",
        timeout=5,
        caps=OutputCaps(
            stdout=1024,
            stderr=1024,
            result=1024,
            artifact_files=files,
            artifact_file=file_cap,
            artifact_total=total_cap,
        ),
    )
    return supervisor.Job(payload[8:])


def collect(directory: Path, tmp_path: Path, **caps: int) -> supervisor.Collected:
    """Run the supervisor's collection on ``directory``."""
    collected = supervisor.Collected()
    supervisor.collect_artifacts(job(**caps), collected, str(directory))
    return collected


def reasons(collected: supervisor.Collected) -> dict[str, str]:
    return {item["name"]: item["reason"] for item in collected.skipped}


@pytest.fixture
def output(tmp_path: Path) -> Path:
    directory = tmp_path / "output"
    directory.mkdir()
    return directory


# --- Collection in the sandbox ------------------------------------------------------------------


def test_job_header_carries_the_caps() -> None:
    j = job(files=7, file_cap=11, total_cap=13)
    assert (j.artifact_files, j.artifact_file_cap, j.artifact_total_cap) == (7, 11, 13)


def test_regular_files_are_collected_in_name_order_without_result_json(
    output: Path, tmp_path: Path
) -> None:
    (output / "b.csv").write_bytes(b"x,y\n1,2\n")
    (output / "a.txt").write_bytes(b"hello")
    (output / "empty").write_bytes(b"")
    (output / "result.json").write_bytes(b"{}")
    got = collect(output, tmp_path)
    assert got.artifacts == [(b"a.txt", b"hello"), (b"b.csv", b"x,y\n1,2\n"), (b"empty", b"")]
    assert got.skipped == []


def test_links_fifos_and_directories_are_skipped_never_followed(
    output: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"host secret")
    (output / "link").symlink_to(secret)
    (output / "dangling").symlink_to(tmp_path / "nowhere")
    os.mkfifo(output / "fifo")  # opened O_NONBLOCK: no writer, yet no hang
    (output / "sub").mkdir()
    (output / "sub" / "inner.txt").write_bytes(b"not collected")
    (output / "ok.txt").write_bytes(b"ok")
    got = collect(output, tmp_path)
    assert got.artifacts == [(b"ok.txt", b"ok")]
    assert reasons(got) == {
        "dangling": "a symbolic link: not followed",
        "fifo": "not a regular file",
        "link": "a symbolic link: not followed",
        "sub": "not a regular file",
    }
    assert all(b"host secret" not in data for _, data in got.artifacts)


@pytest.mark.parametrize(
    "name", [".hidden", "sp ace", "new\nline", "quo'te", "ünï", "x" * 129, "a\x1bb", "semi;colon"]
)
def test_names_outside_the_safe_set_are_skipped(output: Path, tmp_path: Path, name: str) -> None:
    (output / name).write_bytes(b"data")
    got = collect(output, tmp_path)
    assert got.artifacts == []
    [skipped] = got.skipped
    assert skipped["reason"].startswith("invalid name")
    assert len(skipped["name"]) <= supervisor.NAME_MAX


def test_a_name_of_128_safe_characters_is_fine(output: Path, tmp_path: Path) -> None:
    name = "A-z_0." + "x" * 122
    (output / name).write_bytes(b"d")
    assert collect(output, tmp_path).artifacts == [(name.encode(), b"d")]


def test_file_cap_skips_a_file_whole_and_later_files_still_count(
    output: Path, tmp_path: Path
) -> None:
    (output / "a-big.bin").write_bytes(b"x" * 101)
    (output / "b-exact.bin").write_bytes(b"y" * 100)
    got = collect(output, tmp_path, file_cap=100)
    assert got.artifacts == [(b"b-exact.bin", b"y" * 100)]
    assert reasons(got) == {"a-big.bin": "larger than 100 bytes"}


def test_total_cap_skips_what_no_longer_fits(output: Path, tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        (output / name).write_bytes(name.encode() * 100)
    (output / "d").write_bytes(b"d" * 50)
    got = collect(output, tmp_path, file_cap=100, total_cap=250)
    assert [name for name, _ in got.artifacts] == [b"a", b"b", b"d"]
    assert reasons(got) == {"c": "the job's artifacts would exceed 250 bytes"}


def test_file_count_cap(output: Path, tmp_path: Path) -> None:
    for i in range(6):
        (output / f"f{i}").write_bytes(b"1")
    got = collect(output, tmp_path, files=4)
    assert [name for name, _ in got.artifacts] == [b"f0", b"f1", b"f2", b"f3"]
    assert reasons(got) == {"f4": "more than 4 files", "f5": "more than 4 files"}


def test_skipped_entries_are_named_up_to_a_cap_then_counted(output: Path, tmp_path: Path) -> None:
    for i in range(supervisor.SKIPPED_MAX + 5):
        (output / f".h{i:03}").write_bytes(b"")
    got = collect(output, tmp_path)
    assert len(got.skipped) == supervisor.SKIPPED_MAX + 1
    assert got.skipped[-1] == {"name": "*", "reason": "5 more skipped"}


def test_scan_is_bounded(output: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor, "SCAN_MAX", 3)
    for i in range(5):
        (output / f"f{i}").write_bytes(b"1")
    got = collect(output, tmp_path, files=10)
    assert len(got.artifacts) == 3
    assert got.skipped[-1]["name"] == "*" and "more than 3 entries" in got.skipped[-1]["reason"]


def test_an_unlistable_output_is_reported(tmp_path: Path) -> None:
    got = collect(tmp_path / "missing", tmp_path)
    assert got.artifacts == []
    assert got.skipped[0]["reason"].startswith("cannot list it")


def test_report_lists_skipped_entries_as_json() -> None:
    text = supervisor.to_json({"artifacts_skipped": [{"name": 'a"\n', "reason": "r"}]})
    assert json.loads(text) == {"artifacts_skipped": [{"name": 'a"\n', "reason": "r"}]}


# --- The host's checks of the frames ------------------------------------------------------------


def frame(kind: int, data: bytes) -> bytes:
    return FRAME.pack(kind, len(data)) + data


def artifact_frame(name: bytes, data: bytes, declared: int | None = None) -> bytes:
    length = len(name) if declared is None else declared
    return frame(ARTIFACT, struct.pack(">H", length) + name + data)


def report(**fields: object) -> bytes:
    return frame(REPORT, json.dumps({"exit_code": 0, **fields}).encode())


def reader(files: int = 3, file_cap: int = 10, total_cap: int = 25) -> FrameReader:
    return FrameReader.for_caps(
        OutputCaps(
            stdout=100,
            stderr=100,
            result=100,
            artifact_files=files,
            artifact_file=file_cap,
            artifact_total=total_cap,
        )
    )


def test_artifact_frames_are_collected() -> None:
    r = reader()
    r.feed(artifact_frame(b"a.txt", b"hello") + artifact_frame(b"b", b"") + report())
    assert r.collected.artifacts == [("a.txt", b"hello"), ("b", b"")]
    assert r.collected.artifacts_refused == [] and not r.broken


@pytest.mark.parametrize(
    ("frames", "refusal"),
    [
        (artifact_frame(b"../etc/passwd", b"x"), "invalid name"),
        (artifact_frame(b".hidden", b"x"), "invalid name"),
        (artifact_frame(b"a/b", b"x"), "invalid name"),
        (artifact_frame(b"", b"x"), "invalid name"),
        (artifact_frame(b"\xff\xfe", b"x"), "invalid name"),
        (artifact_frame(b"abc", b"", declared=200), "invalid name"),
        (frame(ARTIFACT, b"\x00"), "invalid name"),
        (artifact_frame(b"result.json", b"{}"), "sent twice"),
        (artifact_frame(b"a", b"1") + artifact_frame(b"a", b"2"), "sent twice"),
        (artifact_frame(b"big", b"x" * 11), "larger than 10 bytes"),
        (
            artifact_frame(b"a", b"x" * 10)
            + artifact_frame(b"b", b"x" * 10)
            + artifact_frame(b"c", b"x" * 10),
            "the job's artifacts would exceed 25 bytes",
        ),
        (
            b"".join(artifact_frame(f"f{i}".encode(), b"") for i in range(4)),
            "more than 3 files",
        ),
    ],
)
def test_hostile_artifact_frames_are_refused_not_fatal(frames: bytes, refusal: str) -> None:
    r = reader()
    r.feed(frames + report())
    assert not r.broken and r.collected.report is not None
    assert [why for _, why in r.collected.artifacts_refused] == [refusal]
    assert sum(len(d) for _, d in r.collected.artifacts) <= 25


def test_an_artifact_frame_over_the_frame_limit_breaks_the_stream() -> None:
    r = reader(file_cap=10, total_cap=25)
    r.feed(frame(ARTIFACT, b"\x00\x01a" + b"x" * 200) + report())
    assert r.broken and r.collected.artifacts == []


def test_artifacts_are_refused_when_collection_is_off() -> None:
    r = FrameReader(stdout_cap=10, stderr_cap=10, result_cap=10)
    r.feed(artifact_frame(b"a", b"") + report())
    assert r.collected.artifacts == [] and r.collected.artifacts_refused == [
        ("a", "more than 0 files")
    ]


def test_report_skipped_list_is_validated() -> None:
    raw = {
        "exit_code": 0,
        "artifacts_skipped": [
            {"name": "ok", "reason": "why"},
            {"name": 1, "reason": "x"},
            ["a", "b"],
            {"name": "n" * 1000, "reason": "r" * 1000},
        ]
        + [{"name": "x", "reason": "y"}] * 100,
    }
    parsed = Report.parse(json.dumps(raw).encode())
    assert parsed is not None
    assert parsed.artifacts_skipped[0] == ("ok", "why")
    assert parsed.artifacts_skipped[1] == ("n" * 160, "r" * 256)
    assert len(parsed.artifacts_skipped) <= 64
    assert Report.parse(b'{"artifacts_skipped": "no"}') is not None


# --- Listing and publishing -----------------------------------------------------------------


def test_content_type_is_guessed_from_the_name() -> None:
    assert kafka_artifacts.content_type("plot.png") == "image/png"
    assert kafka_artifacts.content_type("data.csv") == "text/csv"
    assert kafka_artifacts.content_type("blob") == "application/octet-stream"


def listed_result(
    files: dict[str, bytes], skipped: list[tuple[str, str]] | None = None
) -> ExecutionResult:
    """A result with ``files`` attached as the sandbox would have brought them."""
    result = answer(Job("exec-1", "corr-1", "w1"), Verdict.success({"ok": True}))
    collected = Collected(report=Report(artifacts_skipped=list(skipped or [])))
    collected.artifacts = list(files.items())
    attach(result, collected)
    return result


def test_attach_lists_sizes_and_digests_computed_on_the_host() -> None:
    result = listed_result({"a.txt": b"hello"}, [("link", "a symbolic link: not followed")])
    [a] = result.artifacts
    assert (a.name, a.size_bytes, a.content_type) == ("a.txt", 5, "text/plain")
    assert a.sha256 == hashlib.sha256(b"hello").hexdigest()
    assert result.artifacts_skipped[0].reason == "a symbolic link: not followed"
    assert pending(result) == {"a.txt": b"hello"}
    assert "_artifact_bytes" not in result.model_dump_json()


def test_results_of_jobs_that_never_ran_list_no_artifacts() -> None:
    result = answer(Job("e", "c", "w"), Verdict.rejected(["bad"]))
    assert result.artifacts == [] and result.artifacts_skipped == []
    assert json.loads(result.model_dump_json())["artifacts"] == []


def incoming() -> Incoming:
    return Incoming(topic=TOPICS.requests, partition=0, offset=7, key=b"exec-1", value=b"{}")


async def test_artifacts_are_published_before_the_result_and_listed() -> None:
    sink = FakeSink()
    publisher = Publisher(sink.send, TOPICS, reply_to_timeout=1, publish_timeout=5)
    result = listed_result({"a.png": b"\x89PNG", "b.txt": b"b"})
    final = await publisher.publish(incoming(), result)
    assert final is not None and final.status is Status.SUCCEEDED
    topics = [s.topic for s in sink.sent]
    assert topics == [TOPICS.artifacts, TOPICS.artifacts, TOPICS.results]
    first = sink.sent[0]
    assert first.key == b"exec-1/a.png" and first.value == b"\x89PNG"
    assert first.header("content-type") == b"image/png"
    assert first.header("x-tako-sha256") == hashlib.sha256(b"\x89PNG").hexdigest().encode()
    assert first.header("x-correlation-id") == b"corr-1"
    published = sink.result("exec-1")
    assert [a.name for a in published.artifacts] == ["a.png", "b.txt"]
    assert pending(final) == {}


async def test_a_refused_artifact_never_loses_the_result() -> None:
    sink = FakeSink()
    sink.refuse(TOPICS.artifacts, larger_than=10)
    publisher = Publisher(sink.send, TOPICS, reply_to_timeout=1, publish_timeout=5)
    final = await publisher.publish(incoming(), listed_result({"big": b"x" * 11, "small": b"s"}))
    assert final is not None and final.success
    published = sink.result("exec-1")
    assert [a.name for a in published.artifacts] == ["small"]
    [skipped] = published.artifacts_skipped
    assert skipped.name == "big" and skipped.reason.startswith("refused by the artifacts topic")


async def test_an_artifact_not_acknowledged_in_time_is_skipped_and_the_result_goes_out() -> None:
    sink = FakeSink()
    sink.fail(TOPICS.artifacts, times=1000)  # the broker never acknowledges
    publisher = Publisher(
        sink.send, TOPICS, reply_to_timeout=1, publish_timeout=5, artifacts_timeout=0.3
    )
    final = await publisher.publish(incoming(), listed_result({"a": b"1", "b": b"2"}))
    assert final is not None and final.success and final.artifacts == []
    assert [s.reason for s in final.artifacts_skipped] == ["not acknowledged within 0.3s"] * 2
    assert sink.result("exec-1").artifacts_skipped == final.artifacts_skipped


async def test_an_artifact_larger_than_a_message_is_not_sent() -> None:
    sink = FakeSink()
    publisher = Publisher(
        sink.send, TOPICS, reply_to_timeout=1, publish_timeout=5, max_message_bytes=2048
    )
    final = await publisher.publish(incoming(), listed_result({"big": b"x" * 2000}))
    assert final is not None and final.artifacts == []
    assert "TAKO_KAFKA_MAX_MESSAGE_BYTES=2048" in final.artifacts_skipped[0].reason
    assert sink.on(TOPICS.artifacts) == []


def test_the_artifacts_topic_is_created_compacted_and_is_no_reply_to() -> None:
    from tako_stream.kafka.topics import topic_specs
    from tako_stream.settings import Settings

    settings = Settings(artifacts_topic="x.artifacts", kafka_max_message_bytes=65536)
    [spec] = [t for t in topic_specs(settings) if t.name == "x.artifacts"]
    assert spec.topic_configs["cleanup.policy"] == "compact"
    assert spec.topic_configs["max.message.bytes"] == "65536"
    assert settings.topics.artifacts == "x.artifacts"
    assert settings.reply_to.problem("x.artifacts") is not None
    caps = Settings(artifact_max_files=5, artifact_file_limit=6, artifact_total_limit=7).output_caps
    assert (caps.artifact_files, caps.artifact_file, caps.artifact_total) == (5, 6, 7)


async def test_a_result_replaced_for_its_output_still_lists_its_artifacts() -> None:
    sink = FakeSink()
    publisher = Publisher(sink.send, TOPICS, reply_to_timeout=1, publish_timeout=5)
    result = listed_result({"a.txt": b"a"})
    result.output = {"n": 2**70}  # orjson cannot encode it: the answer is replaced
    final = await publisher.publish(incoming(), result)
    assert final is not None and final.error is not None
    assert final.error.type.value == "invalid_output"
    assert [a.name for a in sink.result("exec-1").artifacts] == ["a.txt"]
    assert [s.key for s in sink.on(TOPICS.artifacts)] == [b"exec-1/a.txt"]


# The artifact name rule lives in three places that cannot share code: the supervisor (stdlib
# only, inside the container), the host's frame check (protocol.ARTIFACT_NAME) and the published
# model (models.Artifact). These pin the three to one rule.
NAME_EDGES = [
    "",
    ".",
    "..",
    ".hidden",
    "a",
    "-",
    "_",
    "a.b",
    "report.csv",
    "a" * 128,
    "a" * 129,
    "a/b",
    "a\\b",
    "a b",
    "a\n",
    "\na",
    "a\x00",
    "é",
    "\uff41",  # a fullwidth letter: alphanumeric to str.isalnum, not to the rule
    "٣",  # an Arabic-Indic digit: the same
    "a:b",
    "CON",
]


def model_accepts(name: str) -> bool:
    try:
        Artifact(name=name, size_bytes=0, sha256="0" * 64, content_type="text/plain")
    except ValidationError:
        return False
    return True


def accepted(name: str) -> tuple[bool, bool, bool]:
    return (
        supervisor.valid_name(name),
        ARTIFACT_NAME.fullmatch(name) is not None,
        model_accepts(name),
    )


@pytest.mark.parametrize("name", NAME_EDGES)
def test_the_three_name_checks_agree_on_the_edges(name: str) -> None:
    verdicts = accepted(name)
    assert len(set(verdicts)) == 1, (name, verdicts)


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=140))
def test_the_three_name_checks_agree_on_any_text(name: str) -> None:
    verdicts = accepted(name)
    assert len(set(verdicts)) == 1, (name, verdicts)


@given(st.text(alphabet="abcXYZ019._-", min_size=0, max_size=140))
def test_the_three_name_checks_agree_on_names_near_the_rule(name: str) -> None:
    verdicts = accepted(name)
    assert len(set(verdicts)) == 1, (name, verdicts)
