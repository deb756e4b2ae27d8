"""Every answer says what its job used (resource usage) and what it was (job_ref, hashes,
idempotency key, lineage), whichever path built it."""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import orjson
import pytest

from tako_stream.core.errors import ErrorType, Status
from tako_stream.core.jobtypes import JobTypes
from tako_stream.core.models import ExecutionRequest, ExecutionResult, ResourceUsage
from tako_stream.sandbox.base import SandboxRun
from tako_stream.sandbox.protocol import (
    MAX_CPU_MS,
    MAX_ELAPSED,
    MAX_EXIT_CODE,
    MAX_RSS_KB,
    Collected,
    Report,
)
from tako_stream.sandbox.supervisor import late_reap, wait_job
from tako_stream.worker.publish import encode
from tako_stream.worker.verdict import Job, Verdict, answer, classify, code_hash, input_hash
from tests.fakes import (
    FakeSandbox,
    bounded,
    cancel_bytes,
    intake_rig,
    make_executor,
    request,
    request_bytes,
    succeed,
)

TYPES = JobTypes.load()
PARENT = "3f2b8c1e-0000-4000-8000-000000000001"
CODE = "print('héllo')"
INPUT = {"b": [1, 2], "a": {"z": None, "y": "é"}}
LINEAGE: dict[str, Any] = {
    "idempotency_key": "key_0123-abc",
    "parent_execution_id": PARENT,
    "relationship": "fork",
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def lineage_request(**fields: Any) -> ExecutionRequest:
    return request(CODE, input_data=INPUT, **{**LINEAGE, **fields})


def assert_provenance(result: ExecutionResult, job_ref: str | None = "default@1") -> None:
    assert result.job_ref == job_ref
    assert result.code_hash == sha256(CODE.encode())
    assert result.input_hash == sha256(b'{"a":{"y":"\xc3\xa9","z":null},"b":[1,2]}')
    assert result.idempotency_key == LINEAGE["idempotency_key"]
    assert result.parent_execution_id == PARENT and result.relationship == "fork"


def a_run(report: Report | None, seconds: float = 0.9) -> SandboxRun:
    return SandboxRun(
        collected=Collected(report=report),
        oom_killed=False,
        container_exit=0,
        outer_timeout=report is None,
        seconds=seconds,
    )


def job_for(req: ExecutionRequest) -> Job:
    return Job.for_request(
        req, execution_id="e", correlation_id="c", worker_id="w", job_types=TYPES, queued=0.5
    )


# --- the hashes ---------------------------------------------------------------------------------


def test_the_input_hash_is_of_canonical_json_whatever_the_key_order() -> None:
    assert input_hash({"b": 1, "a": 2}) == input_hash({"a": 2, "b": 1})
    assert input_hash({"a": 2, "b": 1}) == sha256(b'{"a":2,"b":1}')
    assert input_hash({}) == sha256(b"{}")
    assert input_hash({"a": 1}) != input_hash({"a": 2})
    assert input_hash({"n": 2**70}) is None  # no JSON form: no hash rather than a failure


def test_the_code_hash_is_of_its_utf8_bytes_lone_surrogates_kept() -> None:
    assert code_hash(CODE) == sha256("print('héllo')".encode())
    assert code_hash("x = '\ud800'") == sha256(b"x = '\xed\xa0\x80'")


# --- job_ref ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("job_type", "job_ref"),
    [
        ("default", "default@1"),  # the image's tag: the version that actually ran
        ("default@1", "default@1"),
        ("default@latest", "default@latest"),  # a pin is kept as asked
        ("data-processing", "data-processing@1"),
        ("default@2", None),
        ("nope", None),
        ("nope@1", None),
    ],
)
def test_job_ref_names_the_job_type_and_its_version(job_type: str, job_ref: str | None) -> None:
    assert TYPES.ref(request(job_type=job_type)) == job_ref


def test_job_ref_of_an_untagged_image_is_latest() -> None:
    untagged = TYPES["default"].model_copy(update={"image": "registry:5000/tako/default"})
    types = JobTypes({**TYPES, "default": untagged})
    assert types.ref(request()) == "default@latest"
    assert types.ref(request(job_type="default@latest")) == "default@latest"


# --- answer() and Job ---------------------------------------------------------------------------


def test_answer_fills_usage_and_provenance_from_a_run() -> None:
    report = Report(exit_code=0, elapsed=0.31249, max_rss_kb=66_000, cpu_ms=287)
    result = answer(job_for(lineage_request()), Verdict.success(), run=a_run(report))
    assert result.resource_usage == ResourceUsage(
        max_rss_mb=64.5, cpu_time_ms=287, wall_time_ms=312
    )  # 66000 KiB / 1024 = 64.45 MiB, rounded to 0.1
    assert result.execution_time == 0.31249
    assert_provenance(result)
    assert result.timing.queued == 0.5


def test_usage_figures_the_supervisor_lacked_stay_none() -> None:
    report = Report(exit_code=None, timed_out=True, elapsed=2.0)
    result = answer(job_for(lineage_request()), Verdict.success(), run=a_run(report))
    assert result.resource_usage == ResourceUsage(wall_time_ms=2000)


def test_without_a_report_the_wall_time_is_the_sandbox_time_as_execution_time() -> None:
    result = answer(job_for(lineage_request()), Verdict.success(), run=a_run(None, seconds=1.5))
    assert result.resource_usage == ResourceUsage(wall_time_ms=1500)
    assert result.execution_time == 1.5


def test_an_answer_that_never_ran_has_no_usage_but_all_provenance() -> None:
    result = answer(job_for(lineage_request()), Verdict.rejected(["timeout: too long"]))
    assert result.resource_usage is None
    assert_provenance(result)


def test_a_job_without_a_request_has_no_provenance() -> None:
    result = answer(Job("e", "c", "w"), Verdict.rejected(["request: not valid JSON"]))
    assert result.resource_usage is None
    assert (result.job_ref, result.code_hash, result.input_hash) == (None, None, None)
    assert (result.idempotency_key, result.parent_execution_id, result.relationship) == (
        None,
        None,
        None,
    )


def test_job_of_a_result_keeps_its_provenance_and_usage() -> None:
    report = Report(exit_code=0, elapsed=0.2, max_rss_kb=10_240, cpu_ms=50)
    ran = answer(job_for(lineage_request()), Verdict.success(), run=a_run(report))
    for keep_metadata in (True, False):
        job = Job.of(ran, keep_metadata=keep_metadata)
        again = answer(job, Verdict.internal(RuntimeError("x")))
        assert_provenance(again)
        assert again.resource_usage == ResourceUsage(
            max_rss_mb=10.0, cpu_time_ms=50, wall_time_ms=200
        )


def test_an_output_that_cannot_be_carried_keeps_usage_and_provenance() -> None:
    report = Report(exit_code=0, elapsed=0.2, max_rss_kb=2048, cpu_ms=3)
    ran = answer(job_for(lineage_request()), Verdict.success({"n": 2**70}), run=a_run(report))
    replaced, raw = encode(ran)
    assert replaced.error is not None and replaced.error.type is ErrorType.INVALID_OUTPUT
    assert_provenance(replaced)
    assert replaced.resource_usage == ran.resource_usage
    assert orjson.loads(raw)["resource_usage"]["max_rss_mb"] == 2.0


# --- the executor and the intake: every path ------------------------------------------------


async def test_a_run_through_the_executor_carries_usage_and_provenance() -> None:
    sandbox = FakeSandbox()
    sandbox.then(succeed(max_rss_kb=30_720, cpu_ms=120, elapsed=0.25))
    result = await bounded(make_executor(sandbox).execute(lineage_request(), "c"), "execute")
    assert result.status is Status.SUCCEEDED
    assert result.resource_usage == ResourceUsage(
        max_rss_mb=30.0, cpu_time_ms=120, wall_time_ms=250
    )
    assert_provenance(result)


@pytest.mark.parametrize(
    ("fields", "job_ref"),
    [
        ({"memory_limit": "1g"}, "default@1"),  # the job type is known; its limits refuse it
        ({"job_type": "default@9"}, None),
        ({"job_type": "gpu"}, None),
    ],
)
async def test_a_request_the_executor_rejects_still_carries_its_provenance(
    fields: dict[str, Any], job_ref: str | None
) -> None:
    sandbox = FakeSandbox()
    result = await bounded(make_executor(sandbox).execute(lineage_request(**fields), "c"), "run")
    assert result.status is Status.REJECTED and sandbox.runs == []
    assert result.resource_usage is None
    assert_provenance(result, job_ref)


async def test_every_intake_path_carries_the_provenance(monkeypatch: pytest.MonkeyPatch) -> None:
    body = {"input_data": INPUT, **LINEAGE}
    async with intake_rig(partitions=(0,)) as rig:
        execute = rig.executor.execute

        async def explode_on_bug(req: ExecutionRequest, *args: Any, **kwargs: Any) -> Any:
            if req.execution_id == "bug":
                raise RuntimeError("boom")
            return await execute(req, *args, **kwargs)

        monkeypatch.setattr(rig.executor, "execute", explode_on_bug)
        rig.source.add(request_bytes(CODE, execution_id="ran", **body))
        rig.source.add(request_bytes(CODE, execution_id="bad-reply", reply_to="nowhere", **body))
        rig.cancellations.apply(b"early", cancel_bytes("early"))
        rig.source.add(request_bytes(CODE, execution_id="early", **body))
        rig.source.add(request_bytes(CODE, execution_id="bug", **body))
        rig.source.add(request_bytes(CODE, execution_id="broken", timeout="5", **body))
        await rig.source.wait_committed(0, 5)
        ran = rig.sink.result("ran")
        assert ran.success and ran.resource_usage is not None
        assert ran.resource_usage.max_rss_mb == 20.0 and ran.resource_usage.cpu_time_ms == 7
        assert_provenance(ran)
        for never_ran, error in [
            ("bad-reply", ErrorType.INVALID_REQUEST),
            ("early", ErrorType.CANCELLED),
            ("bug", ErrorType.INTERNAL_ERROR),
        ]:
            result = rig.sink.result(never_ran)
            assert result.error is not None and result.error.type is error, never_ran
            assert result.resource_usage is None
            assert_provenance(result)
        # a request that did not validate has nothing of the sort to carry
        broken = rig.sink.result("broken")
        assert broken.status is Status.REJECTED and broken.code_hash is None
        assert broken.idempotency_key is None


# --- the report from the supervisor: untrusted ----------------------------------------------


def test_the_report_carries_the_usage_figures() -> None:
    report = Report.parse(b'{"exit_code": 0, "max_rss_kb": 70988, "cpu_ms": 48}')
    assert report is not None and (report.max_rss_kb, report.cpu_ms) == (70988, 48)
    assert Report.parse(b'{"max_rss_kb": null, "cpu_ms": null}') == Report()
    edges = Report.parse(json.dumps({"max_rss_kb": MAX_RSS_KB, "cpu_ms": 0}).encode())
    assert edges is not None and (edges.max_rss_kb, edges.cpu_ms) == (MAX_RSS_KB, 0)


@pytest.mark.parametrize(
    "value",
    ["70988", 1.5, 70988.0, True, False, -1, [1], {"kb": 1}, 10**30, "NaN"],
)
def test_hostile_usage_figures_are_dropped(value: object) -> None:
    report = Report.parse(
        json.dumps({"exit_code": 0, "max_rss_kb": value, "cpu_ms": value}).encode()
    )
    assert report is not None and report.exit_code == 0
    assert (report.max_rss_kb, report.cpu_ms) == (None, None)


def test_figures_past_the_ceilings_are_dropped() -> None:
    raw = json.dumps({"max_rss_kb": MAX_RSS_KB + 1, "cpu_ms": MAX_CPU_MS + 1}).encode()
    assert Report.parse(raw) == Report()
    assert Report.parse(b'{"max_rss_kb": 1e400, "cpu_ms": -0}') == Report(cpu_ms=0)


@pytest.mark.parametrize(
    "figures",
    [
        {"exit_code": 10**30},
        {"exit_code": 2**63},
        {"exit_code": -1},  # the supervisor reports 128+N for signal N
        {"exit_code": 256},
        {"elapsed": 1e300},  # its milliseconds are the result's wall_time_ms
        {"elapsed": MAX_ELAPSED + 1},
    ],
)
def test_a_report_no_result_could_carry_is_not_believed(figures: dict[str, Any]) -> None:
    """The supervisor's figures go into the result as integers, which must fit 64 bits: an exit
    code past that made an answer the publisher could not write (replaced by an internal_error),
    and an elapsed of 1e300 a wall_time_ms that even that replacement carried on."""
    report = Report.parse(json.dumps({"exit_code": 1, "elapsed": 0.5, **figures}).encode())
    assert report is not None
    run = a_run(report)
    req = lineage_request()
    ran = answer(job_for(req), classify(run, TYPES.limits(req)), run=run)
    assert encode(ran)[0] is ran  # written as built, not replaced
    assert (report.exit_code, report.elapsed) == (
        None if "exit_code" in figures else 1,
        None if "elapsed" in figures else 0.5,
    )


def test_the_figures_a_supervisor_reports_are_believed() -> None:
    for code in (0, 1, 128 + 9, MAX_EXIT_CODE):
        report = Report.parse(json.dumps({"exit_code": code, "elapsed": MAX_ELAPSED}).encode())
        assert report is not None and (report.exit_code, report.elapsed) == (code, MAX_ELAPSED)


# --- the supervisor's reaping, on this host -------------------------------------------------


def test_wait_job_measures_a_child_and_the_descendants_it_reaped() -> None:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            grandchild = os.fork()
            if grandchild == 0:
                block = bytearray(48 * 1024 * 1024)
                for page in range(0, len(block), 4096):  # touched, so resident
                    block[page] = 1
                os._exit(0)
            os.waitpid(grandchild, 0)
            deadline = time.process_time() + 0.2
            while time.process_time() < deadline:
                pass
        finally:
            os._exit(0)
    reaped, status, (rss_kb, cpu_ms) = wait_job(pid, 0)
    assert reaped == pid and os.waitstatus_to_exitcode(status) == 0
    assert rss_kb >= 48 * 1024  # the grandchild's peak, reaped by the child
    assert cpu_ms >= 150


def test_late_reap_takes_an_ended_job_once_and_keeps_what_it_knew() -> None:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os._exit(3)
    deadline = time.monotonic() + 10
    status, usage = late_reap(pid, None, None)
    while status is None and time.monotonic() < deadline:
        time.sleep(0.01)
        status, usage = late_reap(pid, None, None)
    assert status is not None and os.waitstatus_to_exitcode(status) == 3
    assert usage is not None and usage[0] > 0
    # already reaped: what was known stands, and a job never reaped stays None
    assert late_reap(pid, status, usage) == (status, usage)
    assert late_reap(pid, None, None) == (None, None)


def test_late_reap_leaves_a_running_job_alone() -> None:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        time.sleep(5)
        os._exit(0)
    try:
        assert late_reap(pid, None, None) == (None, None)
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
