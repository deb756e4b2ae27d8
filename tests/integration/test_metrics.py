"""/metrics on a worker: scraped and parsed as Prometheus text after real jobs."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import aiodocker
import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.stack import Stack, WorkerProcess

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
async def one(
    bootstrap: str, docker: aiodocker.Docker, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    s = Stack(bootstrap=bootstrap, workdir=tmp_path_factory.mktemp("metrics"))
    await s.start_worker().wait_ready()
    try:
        yield s
    finally:
        s.stop_all()


async def scrape(worker: WorkerProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    url = f"http://127.0.0.1:{worker.web_port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await resp.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_worker_metrics_count_jobs_by_status_and_type(one: Stack) -> None:
    worker = one.workers[0]
    before = await scrape(worker)
    jobs = [
        {"execution_id": str(uuid.uuid4()), "code": "print('ok')"},
        {"execution_id": str(uuid.uuid4()), "code": "print('ok again')"},
        {"execution_id": str(uuid.uuid4()), "code": "1 / 0"},
        {"execution_id": str(uuid.uuid4()), "code": "print(1)", "timeout": 999},
        # a job type the requester made up: every such name a series would be memory kept
        {"execution_id": str(uuid.uuid4()), "code": "print(1)", "job_type": "made-up-1"},
        {"execution_id": str(uuid.uuid4()), "code": "print(1)", "job_type": "made-up-2"},
    ]
    await one.run_jobs(jobs, timeout=180)
    after = await scrape(worker)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    ok = {"status": "succeeded", "error_type": "none", "job_type": "default"}
    assert delta("tako_jobs_total", **ok) == 2
    failed = {"status": "failed", "error_type": "division_error", "job_type": "default"}
    assert delta("tako_jobs_total", **failed) == 1
    # a request that does not validate has no job type: labelled "-"
    rejected = {"status": "rejected", "error_type": "invalid_request", "job_type": "-"}
    assert delta("tako_jobs_total", **rejected) == 1
    assert delta("tako_end_to_end_seconds_count", job_type="default") == 3
    assert delta("tako_end_to_end_seconds_count", job_type="-") == 1
    made_up = {"status": "rejected", "error_type": "invalid_request", "job_type": "other"}
    assert delta("tako_jobs_total", **made_up) == 2
    assert not any("made-up" in str(labels) for _, labels in after)
    ran = sum(
        delta("tako_execution_seconds_count", job_type="default", start=start)
        for start in ("warm", "cold")
    )
    assert ran == 3  # the rejected request never reached a container
    assert value(after, "tako_in_flight") == 0
    assert value(after, "tako_docker_available") == 1
    breaker = [v for (name, _), v in after.items() if name == "tako_breaker_state"]
    assert breaker == [0.0]
    assert ("tako_dlq_size", frozenset()) in after
    pool = [v for (name, _), v in after.items() if name == "tako_warm_pool_ready"]
    assert pool and all(v >= 0 for v in pool)
