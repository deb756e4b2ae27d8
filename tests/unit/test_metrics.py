"""Metrics: what a requester sends never grows the number of series (each one is memory kept
for the process's life, and a line on every scrape)."""

from __future__ import annotations

from datetime import UTC, datetime

from prometheus_client.parser import text_string_to_metric_families

from tako_stream.core.errors import ErrorType, Status
from tako_stream.core.models import ErrorInfo, ExecutionResult
from tako_stream.metrics import Metrics


def result(job_type: str | None, status: Status = Status.REJECTED) -> ExecutionResult:
    error = None
    if status is not Status.SUCCEEDED:
        error = ErrorInfo(type=ErrorType.INVALID_REQUEST, message="unknown job type")
    return ExecutionResult(
        execution_id="e",
        correlation_id="c",
        status=status,
        success=status is Status.SUCCEEDED,
        error=error,
        job_type=job_type,
        worker_id="w",
        finished_at=datetime(2026, 11, 30, tzinfo=UTC),
    )


def series(metrics: Metrics, name: str) -> dict[frozenset[tuple[str, str]], float]:
    found = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name == name:
                found[frozenset(sample.labels.items())] = sample.value
    return found


def test_job_types_a_requester_made_up_share_one_series() -> None:
    metrics = Metrics(job_types=["default", "data"])
    for n in range(500):
        metrics.observe(result(f"made-up-{n}"), 0.01)
    jobs = series(metrics, "tako_jobs_total")
    rejected = {"status": "rejected", "error_type": "invalid_request"}
    assert jobs == {frozenset({**rejected, "job_type": "other"}.items()): 500.0}
    assert len(series(metrics, "tako_end_to_end_seconds_count")) == 1


def test_a_known_job_type_is_counted_under_its_name_pinned_or_not() -> None:
    metrics = Metrics(job_types=["default", "data"])
    for job_type in ("default", "default@1", "default@latest", "data", None):
        metrics.observe(result(job_type, Status.SUCCEEDED), 0.01)
    jobs = series(metrics, "tako_jobs_total")
    counted = {dict(labels)["job_type"]: n for labels, n in jobs.items()}
    assert counted == {"default": 3.0, "data": 1.0, "-": 1.0}


def test_http_methods_a_client_made_up_share_one_series() -> None:
    metrics = Metrics()
    for n in range(300):
        metrics.count_http(f"METHOD{n}", "unmatched", 405)
    metrics.count_http("GET", "/health", 200)
    requests = series(metrics, "tako_http_requests_total")
    assert {dict(labels)["method"] for labels in requests} == {"other", "GET"}
    other = {"method": "other", "route": "unmatched", "code": "405"}
    assert requests[frozenset(other.items())] == 300.0
