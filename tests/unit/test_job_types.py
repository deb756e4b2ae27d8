"""Job types pinned to a version, as Tako VM's ``name@version``."""

from __future__ import annotations

import pytest

from tako_stream.core.errors import InvalidRequestError
from tako_stream.core.jobtypes import JobTypes, versions
from tako_stream.core.models import ExecutionRequest

TYPES = JobTypes.load()


def request(job_type: str) -> ExecutionRequest:
    return ExecutionRequest(execution_id="j", code="print(1)", job_type=job_type)


@pytest.mark.parametrize("job_type", ["default", "default@latest", "default@1"])
def test_a_job_type_may_be_pinned_to_latest_or_its_images_tag(job_type: str) -> None:
    assert TYPES.limits(request(job_type)).image == TYPES["default"].image


@pytest.mark.parametrize(
    ("job_type", "says"),
    [
        ("default@2", "has no version '2' here (only latest or 1)"),
        ("default@", "has no version ''"),
        ("nope@1", "unknown job type 'nope'"),
    ],
)
def test_another_version_is_refused_naming_what_there_is(job_type: str, says: str) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        TYPES.limits(request(job_type))
    assert says in str(refused.value)


def test_versions_come_from_the_image_tag() -> None:
    assert versions(TYPES["data-processing"]) == ("latest", "1")
    untagged = TYPES["default"].model_copy(update={"image": "registry:5000/tako/default"})
    assert versions(untagged) == ("latest",)
