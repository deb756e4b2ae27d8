"""Executor over a fake sandbox: limits, retries, the breaker, cancellation, the verdict."""

from __future__ import annotations

import asyncio

import orjson

from tako_stream.core.errors import (
    ErrorType,
    SandboxSetupError,
    SandboxUnavailableError,
    Status,
)
from tako_stream.settings import BreakerConfig, RetryPolicy
from tako_stream.worker.breaker.handle import Outcome
from tako_stream.worker.breaker.state import State
from tests.fakes import (
    BreakerTable,
    FakeSandbox,
    RunCall,
    Step,
    blocking,
    bounded,
    limits_of,
    make_executor,
    raising,
    request,
    spin,
    succeed,
)

RETRY_ONCE = RetryPolicy(max_attempts=2, base_delay=0)


async def test_success_gives_the_output_and_stdout() -> None:
    sandbox = FakeSandbox()
    sandbox.then(succeed(stdout=b"hello\n", result=b'{"answer": 42}'))
    executor = make_executor(sandbox)
    req = request("print('hello')", execution_id="ok-1", input_data={"x": 1}, metadata={"m": 2})
    result = await bounded(executor.execute(req, "corr-1"), "execute")
    assert result.status is Status.SUCCEEDED and result.success is True
    assert result.output == {"answer": 42}
    assert result.stdout == "hello\n"
    assert result.exit_code == 0 and result.error is None
    assert result.attempts == 1
    assert (result.execution_id, result.correlation_id, result.worker_id) == (
        "ok-1",
        "corr-1",
        "worker-1",
    )
    assert result.metadata == {"m": 2} and result.job_type == "default"
    (call,) = sandbox.runs
    assert call.execution_id == "ok-1"
    assert call.code == "print('hello')" and call.input == {"x": 1}
    assert call.limits == limits_of("default")


async def test_the_request_limits_reach_the_sandbox() -> None:
    sandbox = FakeSandbox()
    executor = make_executor(sandbox)
    req = request(execution_id="lim", timeout=7, memory_limit="384m", job_type="data-processing")
    result = await bounded(executor.execute(req, "c"), "execute")
    assert result.status is Status.SUCCEEDED
    (call,) = sandbox.runs
    assert call.limits.memory == 384 * 1024 * 1024
    assert call.limits.timeout == 7
    assert call.limits.image == limits_of("data-processing").image
    assert call.header["timeout"] == "7.0"


async def test_a_transient_failure_then_success_is_retried() -> None:
    sandbox = FakeSandbox()
    sandbox.then(raising(SandboxUnavailableError("daemon restarting")), succeed(stdout=b"2nd"))
    executor = make_executor(sandbox, retry=RETRY_ONCE)
    result = await bounded(executor.execute(request(), "c"), "execute")
    assert result.status is Status.SUCCEEDED
    assert result.attempts == 2
    assert result.stdout == "2nd"
    assert [c.outcome for c in sandbox.runs] == ["raised", "returned"]


async def test_on_start_is_told_once_even_with_a_retry() -> None:
    sandbox = FakeSandbox()
    sandbox.then(raising(SandboxUnavailableError("blip")))
    executor = make_executor(sandbox, retry=RETRY_ONCE)
    started: list[str] = []
    result = await bounded(
        executor.execute(request(), "c", on_start=lambda: started.append("x")), "execute"
    )
    assert result.attempts == 2
    assert started == ["x"]


async def test_a_setup_error_is_never_retried() -> None:
    sandbox = FakeSandbox()
    sandbox.then(raising(SandboxSetupError("seccomp profile refused")), succeed())
    executor = make_executor(sandbox, retry=RetryPolicy(max_attempts=3, base_delay=0))
    result = await bounded(executor.execute(request(), "c"), "execute")
    assert result.status is Status.FAILED
    assert result.error is not None and result.error.type is ErrorType.INTERNAL_ERROR
    assert "seccomp profile refused" in result.error.message
    assert result.attempts == 1
    assert len(sandbox.runs) == 1


async def test_every_attempt_unavailable_is_service_unavailable() -> None:
    sandbox = FakeSandbox(lambda call: raising(SandboxUnavailableError("no daemon")))
    executor = make_executor(sandbox, retry=RETRY_ONCE)
    result = await bounded(executor.execute(request(), "c"), "execute")
    assert result.status is Status.REJECTED and result.success is False
    assert result.error is not None
    assert result.error.type is ErrorType.SERVICE_UNAVAILABLE
    assert result.error.message == "no daemon"
    assert result.attempts == 2
    assert len(sandbox.runs) == 2
    assert result.exit_code is None


async def test_an_open_breaker_answers_without_the_sandbox() -> None:
    table = BreakerTable(BreakerConfig(failure_threshold=1, reset_timeout=3600))
    breaker = table.breaker()
    await breaker.record(Outcome.FAILURE, source="ping", detail="ping failed")
    assert breaker.view().state is State.OPEN
    sandbox = FakeSandbox()
    executor = make_executor(sandbox, breaker=breaker)
    result = await bounded(executor.execute(request(), "c"), "execute")
    assert result.status is Status.REJECTED
    assert result.error is not None
    assert result.error.type is ErrorType.SERVICE_UNAVAILABLE
    assert result.attempts == 0
    assert sandbox.runs == []


async def test_sandbox_failures_are_published_to_the_breaker() -> None:
    table = BreakerTable(BreakerConfig(failure_threshold=3, reset_timeout=3600))
    breaker = table.breaker()
    sandbox = FakeSandbox()
    sandbox.then(
        raising(SandboxUnavailableError("refused")),
        raising(SandboxUnavailableError("refused again")),
    )
    executor = make_executor(sandbox, breaker=breaker, retry=RETRY_ONCE)
    failed = await bounded(executor.execute(request(execution_id="a"), "c"), "execute")
    assert failed.error is not None
    assert failed.error.type is ErrorType.SERVICE_UNAVAILABLE
    assert [(e.outcome, e.source, e.detail) for e in table.published] == [
        (Outcome.FAILURE, "job", "refused"),
        (Outcome.FAILURE, "job", "refused again"),
    ]
    assert breaker.view().failure_count == 2
    # a success while failures are counted is published too, and resets the count
    ok = await bounded(executor.execute(request(execution_id="b"), "c"), "execute")
    assert ok.status is Status.SUCCEEDED
    assert table.published[-1].outcome is Outcome.SUCCESS
    assert breaker.view().failure_count == 0
    # and plain successes while all is well are not worth an event
    await bounded(executor.execute(request(execution_id="c"), "c"), "execute")
    assert len(table.published) == 3


async def test_failures_reaching_the_threshold_open_the_breaker_for_later_jobs() -> None:
    table = BreakerTable(BreakerConfig(failure_threshold=2, reset_timeout=3600))
    sandbox = FakeSandbox(lambda call: raising(SandboxUnavailableError("down")))
    executor = make_executor(sandbox, breaker=table.breaker(), retry=RETRY_ONCE)
    await bounded(executor.execute(request(execution_id="a"), "c"), "execute")
    assert len(sandbox.runs) == 2
    later = await bounded(executor.execute(request(execution_id="b"), "c"), "execute")
    assert later.error is not None
    assert later.error.type is ErrorType.SERVICE_UNAVAILABLE
    assert later.attempts == 0
    assert len(sandbox.runs) == 2  # no sandbox tried while open


async def test_a_user_code_failure_is_not_a_sandbox_failure() -> None:
    table = BreakerTable(BreakerConfig(failure_threshold=1, reset_timeout=3600))
    sandbox = FakeSandbox()
    sandbox.then(
        Step(
            exit_code=1,
            stderr=b"ZeroDivisionError: division by zero\n",
            exception=["ZeroDivisionError"],
        )
    )
    executor = make_executor(sandbox, breaker=table.breaker())
    result = await bounded(executor.execute(request(), "c"), "execute")
    assert result.status is Status.FAILED
    assert result.error is not None and result.error.type is ErrorType.DIVISION_ERROR
    assert result.attempts == 1
    assert table.published == []


async def test_a_memory_limit_above_the_job_type_maximum_is_invalid() -> None:
    sandbox = FakeSandbox()
    executor = make_executor(sandbox)
    result = await bounded(executor.execute(request(memory_limit="1g"), "c"), "execute")
    assert result.status is Status.REJECTED
    assert result.error is not None and result.error.type is ErrorType.INVALID_REQUEST
    assert "memory_limit" in result.error.message and "512m" in result.error.message
    assert result.attempts == 0
    assert sandbox.runs == [] and sandbox.prepare_calls == []
    assert executor.pool.in_flight == 0


async def test_an_unknown_job_type_is_invalid() -> None:
    sandbox = FakeSandbox()
    executor = make_executor(sandbox)
    result = await bounded(executor.execute(request(job_type="gpu"), "c"), "execute")
    assert result.status is Status.REJECTED
    assert result.error is not None and result.error.type is ErrorType.INVALID_REQUEST
    assert "gpu" in result.error.message
    assert sandbox.runs == []


async def test_a_cancel_before_a_slot_frees_is_cancelled_before_it_ran() -> None:
    sandbox = FakeSandbox()
    executor = make_executor(sandbox, size=1)
    release = asyncio.Event()
    sandbox.script_job("holder", blocking(release))
    holder = asyncio.ensure_future(executor.execute(request(execution_id="holder"), "c"))
    await sandbox.wait_started("holder")
    cancel = asyncio.Event()
    waiting = asyncio.ensure_future(
        executor.execute(request(execution_id="queued"), "c", cancel=cancel)
    )
    await spin()
    assert not waiting.done()
    cancel.set()
    result = await bounded(waiting, "the cancelled job")
    assert result.status is Status.CANCELLED
    assert result.error is not None and result.error.type is ErrorType.CANCELLED
    assert "before it ran" in result.error.message
    assert sandbox.runs_of("queued") == []
    release.set()
    held = await bounded(holder, "the holder")
    assert held.status is Status.SUCCEEDED


async def test_a_cancel_while_running_stops_the_job() -> None:
    sandbox = FakeSandbox()
    sandbox.then(blocking(asyncio.Event()))  # never released: only the cancel ends it
    executor = make_executor(sandbox)
    cancel = asyncio.Event()
    task = asyncio.ensure_future(executor.execute(request(), "c", cancel=cancel))
    call = await sandbox.wait_started("job-1")
    assert call.cancel is cancel
    cancel.set()
    result = await bounded(task, "the cancelled job")
    assert result.status is Status.CANCELLED
    assert result.exit_code == 143
    assert result.error is not None and result.error.type is ErrorType.CANCELLED
    assert "before it ran" not in result.error.message
    assert call.outcome == "cancelled"


async def test_a_cancel_during_a_retry_backoff_is_cancelled_before_it_ran() -> None:
    sandbox = FakeSandbox()
    cancel = asyncio.Event()

    def fail_and_cancel(call: RunCall) -> None:
        cancel.set()

    sandbox.then(Step(raises=SandboxUnavailableError("blip"), effect=fail_and_cancel))
    executor = make_executor(sandbox, retry=RetryPolicy(max_attempts=3, base_delay=0))
    result = await bounded(executor.execute(request(), "c", cancel=cancel), "execute")
    assert result.status is Status.CANCELLED
    assert result.error is not None and "before it ran" in result.error.message
    assert len(sandbox.runs) == 1


async def test_result_json_that_is_not_an_object_is_invalid_output() -> None:
    sandbox = FakeSandbox()
    sandbox.then(succeed(result=orjson.dumps([1, 2])))
    executor = make_executor(sandbox)
    result = await bounded(executor.execute(request(), "c"), "execute")
    assert result.status is Status.FAILED
    assert result.error is not None and result.error.type is ErrorType.INVALID_OUTPUT
