"""Prometheus metrics for workers and gateways, served as text on ``/metrics``.

Counters and histograms are fed where results are published; gauges (in-flight jobs, warm
pool, breaker, DLQ size) are read from the live objects at scrape time, so they cannot drift.
Each process has its own registry: tests and embedders can build several without clashes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tako_stream.core.models import ExecutionResult
from tako_stream.worker.breaker.state import State

__all__ = ["BREAKER_VALUES", "CONTENT_TYPE", "Metric", "Metrics", "gauge"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Seconds: from a warm container's ~50 ms to the 300 s timeout ceiling.
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

BREAKER_VALUES = {State.CLOSED: 0, State.HALF_OPEN: 1, State.OPEN: 2}

#: The label of a job type or HTTP method that is not one of the known ones: every series is
#: memory kept for the process's life (about 4.5 KB a job type, measured) and lines on every
#: scrape, so a value a requester makes up must never name one.
OTHER = "other"

#: HTTP methods counted by name (aiohttp accepts any token as a method).
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class _Gauges(Collector):
    """Gauges computed by callbacks when scraped."""

    def __init__(self) -> None:
        self.sources: list[Callable[[], Iterable[Metric]]] = []

    def collect(self) -> Iterable[Metric]:
        for source in self.sources:
            yield from source()


def gauge(
    name: str, doc: str, values: Mapping[tuple[str, ...], float], labels: list[str]
) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for label_values, value in values.items():
        family.add_metric(list(label_values), value)
    return family


class Metrics:
    """One process's metrics: job outcomes and latencies, plus whatever gauges it registers.

    ``job_types`` are the names jobs are counted under (a pinned ``name@version`` under its
    name); jobs of any other type a request named are counted under ``other``."""

    def __init__(self, job_types: Iterable[str] = ()) -> None:
        self._job_types = frozenset(job_types)
        self._counted: dict[tuple[str, str, str], Counter] = {}
        self._timed: dict[str, Histogram] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        self.jobs = Counter(
            "tako_jobs",
            "Jobs answered, by status and error type (error_type 'none' when it succeeded).",
            ["status", "error_type", "job_type"],
            registry=self.registry,
        )
        self.end_to_end = Histogram(
            "tako_end_to_end_seconds",
            "From the request's produce timestamp to its result acknowledged by the broker.",
            ["job_type"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.execution = Histogram(
            "tako_execution_seconds",
            "Seconds the job's code ran in its sandbox.",
            ["job_type", "start"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.http = Counter(
            "tako_http_requests",
            "HTTP requests served, by route and status code.",
            ["method", "route", "code"],
            registry=self.registry,
        )
        self._gauges = _Gauges()
        self.registry.register(self._gauges)

    def _job_type(self, name: str | None) -> str:
        if name is None:
            return "-"  # a request that did not validate
        name = name.partition("@")[0]
        return name if name in self._job_types else OTHER

    def observe(self, result: ExecutionResult, end_to_end: float | None) -> None:
        job_type = self._job_type(result.job_type)
        error_type = result.error.type.value if result.error else "none"
        # Each series' child kept here: labels() checks and locks on every call, a few µs of
        # every answer on the Kafka path; the labels are bounded, so this is too.
        key = (result.status.value, error_type, job_type)
        counted = self._counted.get(key)
        if counted is None:
            counted = self._counted[key] = self.jobs.labels(*key)
        counted.inc()
        if end_to_end is not None:
            timed = self._timed.get(job_type)
            if timed is None:
                timed = self._timed[job_type] = self.end_to_end.labels(job_type)
            timed.observe(max(0.0, end_to_end))
        if result.timing.sandbox is not None:
            start = "warm" if result.timing.warm else "cold"
            self.execution.labels(job_type, start).observe(result.execution_time)

    def count_http(self, method: str, route: str, code: int) -> None:
        """One HTTP request served; ``route`` is the matched route's template (or "unmatched"),
        never the path a client sent."""
        method = method if method in HTTP_METHODS else OTHER
        self.http.labels(method, route, str(code)).inc()

    def add_gauges(self, source: Callable[[], Iterable[Metric]]) -> None:
        self._gauges.sources.append(source)

    def render(self) -> bytes:
        return generate_latest(self.registry)
