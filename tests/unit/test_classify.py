"""verdict.classify and JobTypes.limits on hand-built values: no Docker involved."""

from __future__ import annotations

import textwrap

import pytest

from tako_stream.core.classify import classify_failure
from tako_stream.core.errors import ErrorType, InvalidRequestError, Status
from tako_stream.core.jobtypes import JobTypes, Limits
from tako_stream.core.models import ExecutionRequest, JobType
from tako_stream.sandbox.base import SandboxRun
from tako_stream.sandbox.protocol import Collected, Report
from tako_stream.worker.verdict import Verdict, classify

MiB = 1024 * 1024
LIMITS = Limits(image="img", memory=256 * MiB, cpus=1.0, pids_limit=128, timeout=5)

TRACEBACK = textwrap.dedent(
    """\
    Traceback (most recent call last):
      File "/code/main.py", line 3, in <module>
        print(1 / 0)
              ~~^~~
    ZeroDivisionError: division by zero
    """
)


def run(
    report: Report | None = None,
    *,
    result: bytes | None = None,
    oom_killed: bool = False,
    container_exit: int | None = 0,
    outer_timeout: bool = False,
    diagnostics: bytes = b"",
) -> SandboxRun:
    return SandboxRun(
        collected=Collected(result=result, report=report, diagnostics=bytearray(diagnostics)),
        oom_killed=oom_killed,
        container_exit=container_exit,
        outer_timeout=outer_timeout,
        seconds=0.5,
    )


def error_type(verdict: Verdict) -> ErrorType | None:
    return verdict.error.type if verdict.error else None


# --- Exit 0 -------------------------------------------------------------------------------------


def test_success_with_output() -> None:
    verdict = classify(run(Report(exit_code=0), result=b'{"answer": 42}'), LIMITS)
    assert verdict == Verdict(
        status=Status.SUCCEEDED, error=None, exit_code=0, output={"answer": 42}
    )


def test_success_without_result_file() -> None:
    verdict = classify(run(Report(exit_code=0)), LIMITS)
    assert verdict == Verdict(status=Status.SUCCEEDED, error=None, exit_code=0, output=None)


@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff", b'{"a": 1} trailing'])
def test_invalid_json_output(raw: bytes) -> None:
    verdict = classify(run(Report(exit_code=0), result=raw), LIMITS)
    assert verdict.status is Status.FAILED
    assert error_type(verdict) is ErrorType.INVALID_OUTPUT
    assert verdict.output is None
    assert verdict.exit_code == 0
    assert verdict.error is not None and "result.json" in verdict.error.message


def test_result_error_is_invalid_output() -> None:
    report = Report(exit_code=0, result_error="result.json is larger than 1024 bytes")
    verdict = classify(run(report, result=b'{"ok": true}'), LIMITS)
    assert verdict.status is Status.FAILED
    assert error_type(verdict) is ErrorType.INVALID_OUTPUT
    assert verdict.error is not None
    assert verdict.error.message == "result.json is larger than 1024 bytes"
    assert verdict.output is None


def test_non_object_output_is_invalid_output() -> None:
    verdict = classify(run(Report(exit_code=0), result=b"[1, 2]"), LIMITS)
    assert error_type(verdict) is ErrorType.INVALID_OUTPUT


# --- Exceptions ---------------------------------------------------------------------------------


def test_exception_mro_with_traceback() -> None:
    report = Report(
        exit_code=1,
        stderr_tail=TRACEBACK,
        exception=["ZeroDivisionError", "ArithmeticError", "Exception", "BaseException"],
    )
    verdict = classify(run(report), LIMITS)
    assert verdict.status is Status.FAILED
    assert error_type(verdict) is ErrorType.DIVISION_ERROR
    assert verdict.error is not None
    assert verdict.error.message == "ZeroDivisionError: division by zero"
    assert verdict.exit_code == 1
    assert verdict.output is None


def test_exception_mro_without_traceback_uses_the_name() -> None:
    report = Report(exit_code=1, exception=["ZeroDivisionError", "ArithmeticError"])
    verdict = classify(run(report), LIMITS)
    assert error_type(verdict) is ErrorType.DIVISION_ERROR
    assert verdict.error is not None and verdict.error.message == "ZeroDivisionError"


def test_subclass_classified_by_its_mro() -> None:
    report = Report(
        exit_code=1,
        stderr_tail='Traceback (most recent call last):\n  File "/code/main.py", line 1\n'
        "__main__.Bad: nope\n",
        exception=["__main__.Bad", "ValueError", "Exception", "BaseException"],
    )
    verdict = classify(run(report), LIMITS)
    assert error_type(verdict) is ErrorType.VALUE_ERROR
    assert verdict.error is not None and verdict.error.message == "__main__.Bad: nope"


def test_empty_exception_list_falls_back_to_the_traceback() -> None:
    verdict = classify(run(Report(exit_code=1, stderr_tail=TRACEBACK, exception=[])), LIMITS)
    assert error_type(verdict) is ErrorType.DIVISION_ERROR
    assert verdict.error is not None
    assert verdict.error.message == "ZeroDivisionError: division by zero"
    assert verdict.status is Status.FAILED


@pytest.mark.parametrize(
    ("last_line", "mro", "expected"),
    [
        ("AssertionError: one item expected", ["AssertionError"], ErrorType.ASSERTION_ERROR),
        ("AssertionError", ["AssertionError"], ErrorType.ASSERTION_ERROR),
        (
            "OverflowError: (34, 'Numerical result out of range')",
            ["OverflowError", "ArithmeticError"],
            ErrorType.OVERFLOW_ERROR,
        ),
        (
            "IsADirectoryError: [Errno 21] Is a directory: '/tmp'",
            ["IsADirectoryError", "OSError"],
            ErrorType.FILE_ERROR,
        ),
        (
            "NotADirectoryError: [Errno 20] Not a directory: '/etc/passwd'",
            ["NotADirectoryError", "OSError"],
            ErrorType.FILE_ERROR,
        ),
        (
            "FileExistsError: [Errno 17] File exists: '/tmp'",
            ["FileExistsError", "OSError"],
            ErrorType.OS_ERROR,  # Tako VM's file_error names only the two above
        ),
    ],
)
@pytest.mark.parametrize("with_mro", [True, False])
def test_tako_vm_classifier_rows(
    last_line: str, mro: list[str], expected: ErrorType, with_mro: bool
) -> None:
    stderr = 'Traceback (most recent call last):\n  File "/code/main.py", line 2\n' + last_line
    report = Report(
        exit_code=1,
        stderr_tail=stderr + "\n",
        exception=[*mro, "Exception", "BaseException"] if with_mro else [],
    )
    verdict = classify(run(report), LIMITS)
    assert verdict.status is Status.FAILED
    assert error_type(verdict) is expected
    assert verdict.error is not None and verdict.error.message == last_line


def test_unknown_exception_is_runtime_error() -> None:
    report = Report(exit_code=1, exception=["mylib.Weird", "Exception", "BaseException"])
    assert error_type(classify(run(report), LIMITS)) is ErrorType.RUNTIME_ERROR


def test_memory_error_is_oom_status() -> None:
    report = Report(exit_code=1, exception=["MemoryError", "Exception", "BaseException"])
    verdict = classify(run(report), LIMITS)
    assert error_type(verdict) is ErrorType.OOM
    assert verdict.status is Status.OOM


def test_plain_nonzero_exit() -> None:
    verdict = classify(run(Report(exit_code=3)), LIMITS)
    assert verdict.status is Status.FAILED
    assert error_type(verdict) is ErrorType.NONZERO_EXIT
    assert verdict.exit_code == 3
    assert verdict.error is not None and verdict.error.message == "Process exited with code 3"


def test_nonzero_exit_with_garbage_stderr() -> None:
    verdict = classify(run(Report(exit_code=2, stderr_tail="usage: oops\n")), LIMITS)
    assert error_type(verdict) is ErrorType.NONZERO_EXIT


def test_lost_exit_status_is_internal_error() -> None:
    verdict = classify(run(Report(exit_code=None)), LIMITS)
    assert error_type(verdict) is ErrorType.INTERNAL_ERROR
    assert verdict.status is Status.FAILED


# --- Signals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "oom_killed", "expected_type", "expected_status"),
    [
        (137, True, ErrorType.OOM, Status.OOM),
        (137, False, ErrorType.KILLED, Status.FAILED),
        (143, False, ErrorType.CANCELLED, Status.CANCELLED),
        (139, False, ErrorType.SEGFAULT, Status.FAILED),
        (134, False, ErrorType.ABORT, Status.FAILED),
        (136, False, ErrorType.ARITHMETIC_ERROR, Status.FAILED),
        (135, False, ErrorType.BUS_ERROR, Status.FAILED),
        (141, False, ErrorType.PIPE_ERROR, Status.FAILED),
        (-9, False, ErrorType.KILLED, Status.FAILED),
        (-11, False, ErrorType.SEGFAULT, Status.FAILED),
    ],
)
def test_signal_rows(
    code: int, oom_killed: bool, expected_type: ErrorType, expected_status: Status
) -> None:
    # A traceback in stderr does not override what the signal proves.
    report = Report(exit_code=code, stderr_tail=TRACEBACK, exception=["ZeroDivisionError"])
    verdict = classify(run(report, oom_killed=oom_killed), LIMITS)
    assert error_type(verdict) is expected_type
    assert verdict.status is expected_status
    assert verdict.exit_code == code
    assert verdict.output is None


# --- Timeouts and missing reports ---------------------------------------------------------------


def test_report_timed_out() -> None:
    report = Report(exit_code=137, timed_out=True, stderr_tail=TRACEBACK)
    verdict = classify(run(report, result=b"{}"), LIMITS)
    assert verdict.status is Status.TIMEOUT
    assert error_type(verdict) is ErrorType.TIMEOUT
    assert verdict.error is not None
    assert verdict.error.message == "Execution timeout exceeded (5s)"
    assert verdict.exit_code is None
    assert verdict.output is None


def test_timeout_message_uses_the_limit() -> None:
    limits = Limits(image="i", memory=MiB, cpus=1, pids_limit=8, timeout=2.5)
    verdict = classify(run(Report(timed_out=True)), limits)
    assert verdict.error is not None
    assert verdict.error.message == "Execution timeout exceeded (2.5s)"


def test_no_report_outer_timeout() -> None:
    verdict = classify(run(None, outer_timeout=True, oom_killed=True, container_exit=None), LIMITS)
    assert verdict.status is Status.TIMEOUT
    assert error_type(verdict) is ErrorType.TIMEOUT
    assert verdict.error is not None
    assert verdict.error.message == "Execution timeout exceeded (5s)"


def test_no_report_oom_killed() -> None:
    verdict = classify(run(None, oom_killed=True, container_exit=137), LIMITS)
    assert verdict.status is Status.OOM
    assert error_type(verdict) is ErrorType.OOM
    assert verdict.exit_code == 137


def test_no_report_otherwise_internal_error() -> None:
    verdict = classify(
        run(None, container_exit=1, diagnostics=b"tako supervisor: cannot start job\n"), LIMITS
    )
    assert verdict.status is Status.FAILED
    assert error_type(verdict) is ErrorType.INTERNAL_ERROR
    assert verdict.exit_code == 1
    assert verdict.error is not None
    assert "without a report (exit 1)" in verdict.error.message
    assert "cannot start job" in verdict.error.message


def test_no_report_message_keeps_only_the_diagnostics_tail() -> None:
    verdict = classify(run(None, container_exit=None, diagnostics=b"x" * 2000 + b"END"), LIMITS)
    assert verdict.error is not None
    assert verdict.error.message.endswith("END")
    assert len(verdict.error.message) < 600


# --- JobTypes.limits ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def job_types() -> JobTypes:
    return JobTypes.load()


def request(**fields: object) -> ExecutionRequest:
    return ExecutionRequest.model_validate({"execution_id": "e-1", "code": "pass", **fields})


def test_packaged_job_types(job_types: JobTypes) -> None:
    assert {"default", "data-processing"} <= set(job_types)


def test_defaults_from_the_job_type(job_types: JobTypes) -> None:
    limits = job_types.limits(request())
    default = job_types["default"]
    assert limits == Limits(
        image=default.image,
        memory=256 * MiB,
        cpus=default.cpus,
        pids_limit=default.pids_limit,
        timeout=default.timeout,
        runtime=default.runtime,
    )
    assert limits.timeout == 30


def test_other_job_type_defaults(job_types: JobTypes) -> None:
    limits = job_types.limits(request(job_type="data-processing"))
    assert limits.image == job_types["data-processing"].image
    assert limits.memory == 512 * MiB
    assert limits.timeout == 60


def test_request_overrides_within_the_ceilings(job_types: JobTypes) -> None:
    limits = job_types.limits(request(timeout=12.5, memory_limit="512m"))
    assert limits.timeout == 12.5
    assert limits.memory == 512 * MiB
    big = job_types.limits(request(job_type="data-processing", memory_limit="2g"))
    assert big.memory == 2 * 1024 * MiB


def test_unknown_job_type(job_types: JobTypes) -> None:
    with pytest.raises(InvalidRequestError) as info:
        job_types.limits(request(job_type="gpu"))
    exc = info.value
    assert exc.execution_id == "e-1"
    assert len(exc.errors) == 1
    assert exc.errors[0].startswith("job_type")
    assert "'gpu'" in exc.errors[0]
    for name in job_types:
        assert name in exc.errors[0]


def test_memory_above_max(job_types: JobTypes) -> None:
    with pytest.raises(InvalidRequestError) as info:
        job_types.limits(request(memory_limit="1g"))
    assert [e.split(":")[0] for e in info.value.errors] == ["memory_limit"]
    assert "512m" in info.value.errors[0]


def test_timeout_above_max() -> None:
    types = JobTypes({"default": JobType(name="default", image="img", timeout=10, max_timeout=60)})
    assert types.limits(request(timeout=60)).timeout == 60
    with pytest.raises(InvalidRequestError) as info:
        types.limits(request(timeout=61))
    assert [e.split(":")[0] for e in info.value.errors] == ["timeout"]
    assert "60s" in info.value.errors[0]


def test_both_problems_are_reported() -> None:
    types = JobTypes(
        {
            "default": JobType(
                name="default", image="img", max_timeout=60, memory="32m", max_memory="64m"
            )
        }
    )
    with pytest.raises(InvalidRequestError) as info:
        types.limits(request(timeout=100, memory_limit="128m"))
    assert [e.split(":")[0] for e in info.value.errors] == ["timeout", "memory_limit"]


def test_runtime_is_passed_on() -> None:
    types = JobTypes({"default": JobType(name="default", image="img", runtime="runsc")})
    assert types.limits(request()).runtime == "runsc"


def test_job_type_defaults_must_fit_its_ceilings() -> None:
    with pytest.raises(ValueError, match="max_memory"):
        JobType(name="x", image="img", memory="1g", max_memory="512m")
    with pytest.raises(ValueError, match="max_timeout"):
        JobType(name="x", image="img", timeout=100, max_timeout=60)


@pytest.mark.parametrize(
    ("names", "message", "expected"),
    [
        (["OSError"], "OSError: [Errno 101] Network is unreachable", ErrorType.NETWORK_ERROR),
        (["OSError"], "OSError: [Errno 113] No route to host", ErrorType.NETWORK_ERROR),
        (["OSError"], "OSError: [Errno 28] No space left on device", ErrorType.OS_ERROR),
        (["ValueError"], "ValueError: Network is unreachable", ErrorType.VALUE_ERROR),
        (["ConnectionRefusedError", "OSError"], "refused", ErrorType.NETWORK_ERROR),
    ],
)
def test_an_unreachable_network_is_a_network_error(
    names: list[str], message: str, expected: ErrorType
) -> None:
    assert classify_failure(names, message) is expected
