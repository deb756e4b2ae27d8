"""Artifacts end to end: collected in real containers, published on Kafka, read back.

The sandbox tests run jobs straight in ``DockerSandbox`` (small caps, so caps are cheap to hit);
the Kafka tests go through a worker (``stack``): the result lists the artifacts that landed on
the artifacts topic, and ``read_artifact`` / ``read_record`` fetch their bytes back.
"""

from __future__ import annotations

import hashlib

import aiodocker
import pytest
from aiokafka import TopicPartition

from tako_stream.core.errors import Status
from tako_stream.core.models import ExecutionResult
from tako_stream.kafka.artifacts import read_artifact
from tako_stream.kafka.reader import read_record
from tako_stream.settings import OutputCaps
from tako_stream.worker.verdict import Job, answer, classify
from tests.faults.streamtools import topic_config
from tests.integration.sandboxrun import run_in_sandbox
from tests.integration.stack import Stack
from tests.runtimes import GVISOR_RUNTIME, require_gvisor

pytestmark = [pytest.mark.integration]

CAPS = OutputCaps(artifact_files=3, artifact_file=64 * 1024, artifact_total=100 * 1024)

TWO_FILES = """
import json
with open('/output/report.csv', 'w') as f:
    f.write('a,b\\n1,2\\n')
with open('/output/blob.bin', 'wb') as f:
    f.write(bytes(range(256)) * 4)
with open('/output/result.json', 'w') as f:
    json.dump({'ok': True}, f)
"""


#: Docker's default runtime, and gVisor's where it is registered (scripts/setup-docker).
RUNTIMES = [None, GVISOR_RUNTIME]


async def run_job(
    docker: aiodocker.Docker, code: str, timeout: float = 20, runtime: str | None = None
) -> ExecutionResult:
    if runtime == GVISOR_RUNTIME:
        await require_gvisor(docker)
    run, limits = await run_in_sandbox(docker, code, caps=CAPS, runtime=runtime, timeout=timeout)
    return answer(Job("art", "corr", "w"), classify(run, limits), run=run)


def skipped(result: ExecutionResult) -> dict[str, str]:
    return {s.name: s.reason for s in result.artifacts_skipped}


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_two_files_are_listed_with_their_size_and_digest(
    docker: aiodocker.Docker, runtime: str | None
) -> None:
    result = await run_job(docker, TWO_FILES, runtime=runtime)
    assert result.status is Status.SUCCEEDED, result
    assert result.output == {"ok": True}
    blob = bytes(range(256)) * 4
    listed = {a.name: a for a in result.artifacts}
    assert sorted(listed) == ["blob.bin", "report.csv"]
    assert listed["report.csv"].size_bytes == 8
    assert listed["report.csv"].sha256 == hashlib.sha256(b"a,b\n1,2\n").hexdigest()
    assert listed["report.csv"].content_type == "text/csv"
    assert listed["blob.bin"].size_bytes == len(blob)
    assert listed["blob.bin"].sha256 == hashlib.sha256(blob).hexdigest()
    assert result.artifacts_skipped == []


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_links_and_fifos_are_skipped_not_followed_not_hung(
    docker: aiodocker.Docker, runtime: str | None
) -> None:
    code = """
import os
os.symlink('/etc/passwd', '/output/passwd')
os.symlink('/proc/self/environ', '/output/environ')
os.mkfifo('/output/fifo')
os.mkdir('/output/dir')
with open('/output/dir/inner.txt', 'w') as f:
    f.write('inside')
with open('/output/.hidden', 'w') as f:
    f.write('x')
with open('/output/ok.txt', 'w') as f:
    f.write('fine')
"""
    result = await run_job(docker, code, runtime=runtime)
    assert result.status is Status.SUCCEEDED, result
    assert [a.name for a in result.artifacts] == ["ok.txt"]
    assert skipped(result) == {
        ".hidden": "invalid name (letters, digits, '.', '_', '-'; at most 128; no leading dot)",
        "dir": "not a regular file",
        "environ": "a symbolic link: not followed",
        "fifo": "not a regular file",
        "passwd": "a symbolic link: not followed",
    }


async def test_a_huge_file_is_skipped_whole_and_the_total_is_capped(
    docker: aiodocker.Docker,
) -> None:
    code = """
with open('/output/a-huge.bin', 'wb') as f:
    f.write(b'x' * (8 << 20))
for name in ('b1', 'b2'):
    with open('/output/' + name, 'wb') as f:
        f.write(b'y' * (60 * 1024))
"""
    result = await run_job(docker, code)
    assert result.status is Status.SUCCEEDED, result
    assert [(a.name, a.size_bytes) for a in result.artifacts] == [("b1", 60 * 1024)]
    assert skipped(result) == {
        "a-huge.bin": "larger than 65536 bytes",
        "b2": "the job's artifacts would exceed 102400 bytes",
    }


async def test_too_many_files_are_capped(docker: aiodocker.Docker) -> None:
    code = """
for i in range(200):
    with open(f'/output/f{i:03}.txt', 'w') as f:
        f.write(str(i))
"""
    result = await run_job(docker, code)
    assert [a.name for a in result.artifacts] == ["f000.txt", "f001.txt", "f002.txt"]
    reasons = [s.reason for s in result.artifacts_skipped]
    assert reasons[:32] == ["more than 3 files"] * 32
    assert reasons[-1] == "165 more skipped"


async def test_a_failed_or_timed_out_job_still_leaves_its_artifacts(
    docker: aiodocker.Docker,
) -> None:
    code = """
import time
with open('/output/partial.log', 'w') as f:
    f.write('step 1')
time.sleep(60)
"""
    result = await run_job(docker, code, timeout=2)
    assert result.status is Status.TIMEOUT
    assert [a.name for a in result.artifacts] == ["partial.log"]


# --- Through Kafka ------------------------------------------------------------------------------


async def test_artifacts_land_on_their_topic_and_read_back(stack: Stack) -> None:
    result = await stack.run_job({"code": TWO_FILES})
    assert result.status is Status.SUCCEEDED, result
    listed = {a.name: a for a in result.artifacts}
    assert sorted(listed) == ["blob.bin", "report.csv"]
    settings = stack.settings
    for artifact in result.artifacts:
        assert artifact.partition is not None and artifact.offset is not None
        data = await read_artifact(settings, result.execution_id, artifact)
        assert data is not None
        assert hashlib.sha256(data).hexdigest() == artifact.sha256
        assert len(data) == artifact.size_bytes
    csv = listed["report.csv"]
    tp = TopicPartition(settings.artifacts_topic, csv.partition or 0)
    record = await read_record(settings, tp, csv.offset or 0, timeout=10)
    assert record is not None
    assert record.key == f"{result.execution_id}/report.csv".encode()
    assert record.value == b"a,b\n1,2\n"
    headers = dict(record.headers)
    assert headers["content-type"] == b"text/csv"
    assert headers["x-tako-sha256"] == csv.sha256.encode()
    assert headers["x-correlation-id"] == result.correlation_id.encode()
    # Without the position, the last record of the key is found.
    unpositioned = csv.model_copy(update={"partition": None, "offset": None})
    assert await read_artifact(settings, result.execution_id, unpositioned) == b"a,b\n1,2\n"
    # Listed bytes that do not match are never handed back.
    forged = csv.model_copy(update={"sha256": "0" * 64})
    assert await read_artifact(settings, result.execution_id, forged) is None


async def test_reading_an_offset_with_nothing_there_is_bounded(stack: Stack) -> None:
    settings = stack.settings
    tp = TopicPartition(settings.artifacts_topic, 0)
    with pytest.raises(TimeoutError):  # nothing there yet: the wait is bounded
        await read_record(settings, tp, 10**9, timeout=2)


async def test_the_artifacts_topic_is_compacted(stack: Stack) -> None:
    await stack.run_job({"code": "print(1)"})  # the worker has created its topics by now
    config = await topic_config(stack.settings, stack.settings.artifacts_topic)
    assert config.get("cleanup.policy") == "compact"


async def test_a_rejected_request_lists_no_artifacts(stack: Stack) -> None:
    result = await stack.run_job({"code": "print(1)", "job_type": "no-such-type"})
    assert result.status is Status.REJECTED
    assert result.artifacts == [] and result.artifacts_skipped == []


async def test_an_artifact_too_large_for_a_message_is_skipped_and_the_result_published(
    new_stack: Stack,
) -> None:
    """A file within the artifact caps but over the cluster's message limit: said in the
    result, which is published all the same, with the artifacts that did fit."""
    new_stack.start_worker(
        TAKO_KAFKA_MAX_MESSAGE_BYTES="32768",
        TAKO_ARTIFACT_FILE_LIMIT="1048576",
        TAKO_WARM_POOL_SIZE="0",
    )
    await new_stack.workers[0].wait_ready()
    code = """
with open('/output/big.bin', 'wb') as f:
    f.write(b'x' * 100_000)
with open('/output/small.txt', 'w') as f:
    f.write('fits')
"""
    result = await new_stack.run_job({"code": code})
    assert result.status is Status.SUCCEEDED, result
    assert [a.name for a in result.artifacts] == ["small.txt"]
    [skip] = result.artifacts_skipped
    assert skip.name == "big.bin" and "TAKO_KAFKA_MAX_MESSAGE_BYTES=32768" in skip.reason
    data = await read_artifact(new_stack.settings, result.execution_id, result.artifacts[0])
    assert data == b"fits"
