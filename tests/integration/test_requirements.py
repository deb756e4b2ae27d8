"""Requirements, startup timeouts and Tako VM's further error types, with real containers.

Through Kafka (the ``stack`` fixture: a worker process, warm and cold) and, for what the
sandbox does on its own (the image listing and its cache, the startup deadline, a missing
image), against the engine directly.  The satisfied path uses distributions really in the
data-processing image: the job type's requirements (numpy, pandas, tabulate), which
scripts/build-images installs from Debian's packages, and their dependencies.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from pathlib import Path

import aiodocker
import pytest

from tako_stream.core.errors import ImageMissingError, StartupTimeoutError
from tako_stream.core.jobtypes import JobTypes, default_limits
from tako_stream.sandbox.docker import LABEL_WORKER, DockerSandbox
from tako_stream.sandbox.protocol import encode_job
from tako_stream.settings import OutputCaps
from tests.integration.stack import Stack

pytestmark = pytest.mark.integration

TYPES = JobTypes.load()
DEFAULT = default_limits(TYPES["default"])
DATA = default_limits(TYPES["data-processing"])
ABSENT_IMAGE = "tako-stream/no-such-image-h2:1"


def job(code: str, **fields: object) -> dict[str, object]:
    return {"execution_id": str(uuid.uuid4()), "code": code, **fields}


async def test_requirements_through_kafka(stack: Stack) -> None:
    # tabulate is installed by scripts/build-images because the job type lists it; numpy and
    # pandas too, python-dateutil and six as their Debian dependencies.
    satisfied = job(
        "import numpy, pandas, tabulate\n"
        "print(numpy.__version__, pandas.__version__, tabulate.__version__)",
        job_type="data-processing",
        requirements=[
            "NumPy>=1.20,<3",
            "pandas",
            "Tabulate~=0.8.0",
            "python_dateutil>=2",
            "six==1.*",
        ],
    )
    too_old = job("print('never')", job_type="data-processing", requirements=["numpy>=99"])
    absent = job("print('never')", requirements=["numpy", "six"])
    malformed = job("print('never')", requirements=["six", "numpy; os_name == 'nt'"])
    found = await stack.run_jobs([satisfied, too_old, absent, malformed])

    ok = found[str(satisfied["execution_id"])]
    assert ok.status == "succeeded", ok
    assert ok.stdout.split() == ["1.24.2", "1.5.3", "0.8.9"]  # what Debian bookworm ships

    old = found[str(too_old["execution_id"])]
    assert old.status == "failed" and old.error is not None
    assert old.error.type == "dependency_error"
    assert old.error.message.endswith(": numpy>=99 (installed 1.24.2)")
    assert old.stdout == "" and old.exit_code is None  # never run

    none = found[str(absent["execution_id"])]
    assert none.status == "failed" and none.error is not None
    assert none.error.type == "dependency_error"
    assert none.error.message.endswith(": numpy (not installed); six (not installed)")

    bad = found[str(malformed["execution_id"])]
    assert bad.status == "rejected" and bad.error is not None
    assert bad.error.type == "invalid_request"
    assert "requirements.1" in bad.error.message and "numpy; os_name" in bad.error.message


async def test_assertion_overflow_and_file_errors_through_kafka(stack: Stack) -> None:
    asserting = job("items = []\nassert len(items) == 1, 'one item expected'\n")
    overflow = job("print(2.0 ** 5000)")
    directory = job("open('/tmp').read()")
    found = await stack.run_jobs([asserting, overflow, directory])
    failed = found[str(asserting["execution_id"])]
    assert failed.status == "failed" and failed.error is not None
    assert failed.error.type == "assertion_error"
    assert failed.error.message == "AssertionError: one item expected"
    assert failed.exit_code == 1
    over = found[str(overflow["execution_id"])]
    assert over.error is not None and over.error.type == "overflow_error"
    isdir = found[str(directory["execution_id"])]
    assert isdir.error is not None and isdir.error.type == "file_error"
    assert "IsADirectoryError" in isdir.error.message


async def test_a_job_type_whose_image_is_missing_is_a_docker_error(
    new_stack: Stack, tmp_path: Path
) -> None:
    types = tmp_path / "job_types.toml"
    types.write_text(
        (Path(__file__).parents[2] / "tako_stream/core/job_types.toml").read_text()
        + f'\n[absent]\nimage = "{ABSENT_IMAGE}"\n'
    )
    worker = new_stack.start_worker(TAKO_JOB_TYPES_FILE=str(types), TAKO_WARM_POOL_SIZE="0")
    await worker.wait_ready()
    plain = job("print(1)", job_type="absent")
    wanting = job("print(1)", job_type="absent", requirements=["six"])
    found = await new_stack.run_jobs([plain, wanting])
    for request in (plain, wanting):
        result = found[str(request["execution_id"])]
        assert result.status == "failed" and result.error is not None, result
        assert result.error.type == "docker_error"
        assert ABSENT_IMAGE in result.error.message


# --- The sandbox on its own ---------------------------------------------------------------------


async def leftovers(docker: aiodocker.Docker, worker_id: str) -> list[str]:
    found = await docker.containers.list(
        all=True, filters={"label": [f"{LABEL_WORKER}={worker_id}"]}
    )
    return [c.id for c in found]


async def test_the_image_listing_is_real_cached_and_leaves_nothing(
    docker: aiodocker.Docker,
) -> None:
    worker_id = f"h2-listing-{uuid.uuid4().hex[:8]}"
    sandbox = DockerSandbox(docker, worker_id=worker_id, timeout_grace=5)
    # Three jobs on a new image at once share one listing.
    first = await asyncio.gather(*(sandbox.distributions(DATA) for _ in range(3)))
    assert first[0] == first[1] == first[2]
    listing = first[0]
    assert listing["numpy"] == "1.24.2" and listing["pandas"] == "1.5.3"
    assert listing["tabulate"] == "0.8.9"
    assert "python-dateutil" in listing  # normalised as PEP 503 says
    assert len(sandbox._listings) == 1  # one image id listed
    assert dict(await sandbox.distributions(DEFAULT)) == {}  # the standard library only
    assert len(sandbox._listings) == 2
    again = await sandbox.distributions(DATA)  # from the cache: no container is started
    assert again is listing
    await sandbox.drain()
    assert await leftovers(docker, worker_id) == []


async def test_a_missing_image_is_image_missing_for_listing_and_run(
    docker: aiodocker.Docker,
) -> None:
    sandbox = DockerSandbox(docker, worker_id=f"h2-absent-{uuid.uuid4().hex[:8]}", timeout_grace=5)
    absent = replace(DEFAULT, image=ABSENT_IMAGE)
    with pytest.raises(ImageMissingError, match=ABSENT_IMAGE):
        await sandbox.distributions(absent)
    caps = OutputCaps()
    job_bytes = encode_job(code="print(1)", input_json=b"{}", timeout=5, caps=caps, cancel_grace=1)
    with pytest.raises(ImageMissingError, match="Docker image not found"):
        await sandbox.run(job_bytes, absent, execution_id="absent", caps=caps)
    await sandbox.drain()


async def test_a_real_start_past_its_startup_timeout_is_cut_and_removed(
    docker: aiodocker.Docker,
) -> None:
    """A request's startup_timeout is at least 10 s, which a healthy engine never takes; the
    deadline itself is exercised with one no engine meets (a millisecond), on the real engine:
    the create is left to finish and its container removed."""
    worker_id = f"h2-startup-{uuid.uuid4().hex[:8]}"
    sandbox = DockerSandbox(docker, worker_id=worker_id, timeout_grace=5)
    removed: list[str] = []
    remove = sandbox._remove

    async def recorded(container: aiodocker.containers.DockerContainer, **how: bool) -> None:
        removed.append(container.id)
        await remove(container, **how)

    sandbox._remove = recorded  # type: ignore[method-assign]
    with pytest.raises(StartupTimeoutError, match="startup timeout"):
        await sandbox.prepare(replace(DEFAULT, startup_timeout=0.001))
    # The container the daemon went on creating is removed once it exists.
    async with asyncio.timeout(60):
        while not removed:  # noqa: ASYNC110 - the removal is scheduled by a done callback
            await asyncio.sleep(0.05)
    await sandbox.drain()
    assert len(removed) == 1
    assert await leftovers(docker, worker_id) == []
    # With time enough, the same sandbox starts one as usual.
    prepared = await sandbox.prepare(replace(DEFAULT, startup_timeout=60))
    await sandbox.discard(prepared)
    await sandbox.drain()
    assert await leftovers(docker, worker_id) == []
