"""Requirements (issue 15): parsing, comparison with an image's distributions, the executor's
check before a job runs, and the request's startup timeout on the cold path."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from pydantic import ValidationError

from tako_stream.core.errors import (
    ErrorType,
    ImageMissingError,
    SandboxSetupError,
    SandboxUnavailableError,
    StartupTimeoutError,
    Status,
    is_user_error,
)
from tako_stream.core.jobtypes import JobTypes
from tako_stream.core.models import ExecutionRequest, JobType
from tako_stream.core.requirements import normalize, parse_requirement, unsatisfied
from tako_stream.sandbox.docker import DockerSandbox, listing_config, parse_listing
from tako_stream.sandbox.pool import warm_key
from tests.fakes import (
    FakeSandbox,
    bounded,
    limits_of,
    make_executor,
    make_warm,
    raising,
    request,
    succeed,
)

DP_IMAGE = limits_of("data-processing").image
DEFAULT_IMAGE = limits_of("default").image

# --- Parsing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "name", "spec"),
    [
        ("numpy", "numpy", ""),
        ("NumPy>=1.20", "numpy", ">=1.20"),
        ("  pandas == 1.5.3 ", "pandas", "==1.5.3"),
        ("python_dateutil>=2,<3", "python-dateutil", "<3,>=2"),
        ("Zope.Interface~=5.0", "zope-interface", "~=5.0"),
        ("requests[security,socks]!=2.0", "requests", "!=2.0"),
        ("numpy==1.24.*", "numpy", "==1.24.*"),
        ("numpy (>=1.0)", "numpy", ">=1.0"),
    ],
)
def test_requirements_parse(text: str, name: str, spec: str) -> None:
    wanted = parse_requirement(text)
    assert wanted.name == name
    assert str(wanted.specifier) == spec


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("numpy; python_version > '3'", "markers"),
        ("numpy @ https://example.org/numpy.whl", "URL"),
        ("my package", "not a requirement"),
        (">=1.0", "not a requirement"),
        ("numpy>=", "not a requirement"),
        ("numpy=>1", "not a requirement"),
        ("numpy && rm -rf /", "not a requirement"),
        ("-e .", "not a requirement"),
        ("git+https://x/y", "not a requirement"),
    ],
)
def test_malformed_requirements_are_refused_naming_them(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as caught:
        parse_requirement(text)
    assert repr(text) in str(caught.value)
    with pytest.raises(ValidationError) as invalid:
        ExecutionRequest(code="print(1)", requirements=["numpy", text])
    assert "requirements.1" in str(invalid.value) and repr(text) in str(invalid.value)


@pytest.mark.parametrize(
    ("a", "b"), [("Foo_Bar", "foo-bar"), ("foo.bar", "FOO--BAR"), ("a-_.b", "A_B")]
)
def test_names_compare_as_pep_503_says(a: str, b: str) -> None:
    assert normalize(a) == normalize(b)
    assert unsatisfied([a], {normalize(b): "1.0"}) == []


INSTALLED = {"numpy": "1.24.2", "pandas": "1.5.3", "pytz": "2022.7.1", "odd": "not-a-version"}


@pytest.mark.parametrize(
    ("requirement", "ok"),
    [
        ("numpy", True),
        ("numpy>=1.20", True),
        ("numpy>1.24.2", False),
        ("numpy>=1.24.2", True),
        ("numpy<1.24.2", False),
        ("numpy<=1.24.2", True),
        ("numpy==1.24.2", True),
        ("numpy==1.24", False),
        ("numpy==1.24.*", True),
        ("numpy!=1.24.*", False),
        ("numpy!=1.24.3", True),
        ("numpy~=1.24.0", True),
        ("numpy~=1.25", False),
        ("numpy>=1.20,<2", True),
        ("numpy>=1.20,<1.24", False),
        ("PANDAS[performance]>=1.5", True),
        ("pytz>=2022", True),
        ("odd", True),  # no version asked: any installed version does
        ("odd>=1", False),  # an installed version that cannot be compared does not satisfy
        ("scipy", False),
    ],
)
def test_versions_compare(requirement: str, ok: bool) -> None:
    assert (unsatisfied([requirement], INSTALLED) == []) is ok


def test_unsatisfied_names_each_and_why() -> None:
    assert unsatisfied(["numpy>=2", "pandas", "scipy", "odd>=1"], INSTALLED) == [
        "numpy>=2 (installed 1.24.2)",
        "scipy (not installed)",
        "odd>=1 (installed not-a-version, not a comparable version)",
    ]


def test_at_most_fifty_requirements() -> None:
    ExecutionRequest(code="x", requirements=["numpy"] * 50)
    with pytest.raises(ValidationError):
        ExecutionRequest(code="x", requirements=["numpy"] * 51)


def test_job_types_may_list_their_requirements() -> None:
    assert JobTypes.load()["data-processing"].requirements == (
        "numpy==1.24.2",
        "pandas==1.5.3",
        "tabulate==0.8.9",
    )
    assert JobTypes.load()["default"].requirements == ()
    with pytest.raises(ValidationError, match="markers"):
        JobType(name="x", image="i", requirements=("numpy; os_name == 'nt'",))


def test_new_error_types_and_their_statuses_policy() -> None:
    assert is_user_error(ErrorType.DEPENDENCY_ERROR)
    assert is_user_error(ErrorType.ASSERTION_ERROR)
    assert not is_user_error(ErrorType.DOCKER_ERROR)
    assert not is_user_error(ErrorType.STARTUP_TIMEOUT)
    assert ImageMissingError.error_type is ErrorType.DOCKER_ERROR
    assert StartupTimeoutError.error_type is ErrorType.STARTUP_TIMEOUT


# --- The image's listing ------------------------------------------------------------------------


def test_listing_is_parsed_normalised_and_bounded() -> None:
    listing = parse_listing(b'{"NumPy": "1.24.2", "python_dateutil": "2.8.2", "numpy": "9"}')
    assert dict(listing) == {"numpy": "1.24.2", "python-dateutil": "2.8.2"}
    for bad in [b"", b"[]", b'{"x": 1}', b'{"": "1"}', b"{" + b'"a":' * 3, b"null"]:
        with pytest.raises(ValueError):
            parse_listing(bad)
    many = "{" + ",".join(f'"p{i}": "1"' for i in range(20_001)) + "}"
    with pytest.raises(ValueError, match="at most"):
        parse_listing(many.encode())


def test_the_listing_container_is_a_job_container_without_any_capability() -> None:
    config = listing_config(limits_of("default"), {"l": "1"})
    host = config["HostConfig"]
    assert "CapAdd" not in host and host["CapDrop"] == ["ALL"]
    assert host["NetworkMode"] == "none" and config["NetworkDisabled"] is True
    assert host["ReadonlyRootfs"] is True
    assert config["User"] == "65534:65534"
    assert config["Cmd"][:3] == ["/usr/bin/python3", "-I", "-c"]
    assert config["OpenStdin"] is False


# --- The executor's check -----------------------------------------------------------------------


async def test_a_satisfied_job_runs() -> None:
    sandbox = FakeSandbox()
    sandbox.installed[DP_IMAGE] = {"numpy": "1.24.2", "pandas": "1.5.3"}
    executor = make_executor(sandbox)
    req = request(job_type="data-processing", requirements=["NumPy>=1.20", "pandas"])
    result = await bounded(executor.execute(req, "c"), "execute")
    assert result.status is Status.SUCCEEDED
    assert sandbox.listings == [DP_IMAGE] and len(sandbox.runs) == 1


async def test_an_unsatisfied_job_never_runs_and_names_what_is_missing() -> None:
    sandbox = FakeSandbox()
    sandbox.installed[DP_IMAGE] = {"numpy": "1.24.2"}
    executor = make_executor(sandbox)
    req = request(
        execution_id="dep",
        job_type="data-processing",
        requirements=["numpy>=2", "numpy", "scikit-learn"],
    )
    result = await bounded(executor.execute(req, "c"), "execute")
    assert result.status is Status.FAILED and result.success is False
    assert result.error is not None and result.error.type is ErrorType.DEPENDENCY_ERROR
    # Each unsatisfied one named with why; the satisfied plain "numpy" is not.
    assert result.error.message.endswith(
        ": numpy>=2 (installed 1.24.2); scikit-learn (not installed)"
    )
    assert result.execution_id == "dep" and result.attempts == 0
    assert sandbox.runs == []


async def test_without_requirements_the_image_is_never_listed() -> None:
    sandbox = FakeSandbox()
    executor = make_executor(sandbox)
    for req in [request(), request(requirements=[])]:
        assert (await bounded(executor.execute(req, "c"), "execute")).success
    assert sandbox.listings == []


async def test_a_listing_the_engine_cannot_give_is_retried_then_service_unavailable() -> None:
    sandbox = FakeSandbox()
    sandbox.listing_errors.extend([SandboxUnavailableError("no daemon")] * 2)
    executor = make_executor(sandbox)
    result = await bounded(executor.execute(request(requirements=["x"]), "c"), "execute")
    assert result.status is Status.REJECTED
    assert result.error is not None and result.error.type is ErrorType.SERVICE_UNAVAILABLE
    assert "no daemon" in result.error.message
    assert sandbox.listings == [DEFAULT_IMAGE] * 2 and sandbox.runs == []


async def test_a_listing_that_recovers_is_used() -> None:
    sandbox = FakeSandbox()
    sandbox.installed[DEFAULT_IMAGE] = {"x": "1"}
    sandbox.listing_errors.append(SandboxUnavailableError("blip"))
    executor = make_executor(sandbox)
    result = await bounded(executor.execute(request(requirements=["x==1"]), "c"), "execute")
    assert result.status is Status.SUCCEEDED
    assert len(sandbox.listings) == 2


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (ImageMissingError("Docker image not found: no such image"), ErrorType.DOCKER_ERROR),
        (SandboxSetupError("listing is unusable"), ErrorType.INTERNAL_ERROR),
    ],
)
async def test_a_listing_that_cannot_be_had_fails_closed(
    error: SandboxSetupError, expected: ErrorType
) -> None:
    sandbox = FakeSandbox()
    sandbox.listing_errors.append(error)
    executor = make_executor(sandbox)
    result = await bounded(executor.execute(request(requirements=["x"]), "c"), "execute")
    assert result.error is not None and result.error.type is expected
    assert str(error) in result.error.message
    assert sandbox.listings == [DEFAULT_IMAGE] and sandbox.runs == []


# --- Startup timeout ----------------------------------------------------------------------------


async def test_the_startup_timeout_reaches_the_sandbox_and_warm_containers_still_serve() -> None:
    sandbox = FakeSandbox()
    executor = make_executor(sandbox)
    result = await bounded(executor.execute(request(startup_timeout=15), "c"), "execute")
    assert result.success
    assert sandbox.runs[0].limits.startup_timeout == 15
    assert warm_key(sandbox.runs[0].limits) == warm_key(limits_of("default"))
    # A warm container has started already: a request with a startup timeout may take it.
    warm = make_warm(sandbox, [(limits_of("default"), 1)])
    warm.start()
    await sandbox.changed.until(lambda: len(sandbox.prepared) == 1, "a warm container")
    executor = make_executor(sandbox, warm=warm)
    result = await bounded(executor.execute(request(startup_timeout=10), "c"), "execute")
    assert result.timing.warm is True
    await warm.drain()


async def test_a_startup_timeout_is_a_timeout_never_retried() -> None:
    sandbox = FakeSandbox()
    sandbox.then(raising(StartupTimeoutError("Container startup exceeded (10s)")), succeed())
    executor = make_executor(sandbox)
    result = await bounded(executor.execute(request(startup_timeout=10), "c"), "execute")
    assert result.status is Status.TIMEOUT and result.success is False
    assert result.error is not None and result.error.type is ErrorType.STARTUP_TIMEOUT
    assert len(sandbox.runs) == 1


class _Stub:
    """Just enough of ``aiodocker.Docker`` for ``DockerSandbox.prepare``: create takes
    ``create_delay`` seconds, the attach before start ``attach_delay``."""

    def __init__(self, create_delay: float, attach_delay: float) -> None:
        self.create_delay, self.attach_delay = create_delay, attach_delay
        self._timeout = aiohttp.ClientTimeout(total=5)
        self.created: list[str] = []
        self.deleted: list[str] = []
        self.containers = self

    def _resolve_long_running_timeout(self, value: object) -> None:
        return None

    async def create(self, config: dict[str, Any], name: str) -> _StubContainer:
        await asyncio.sleep(self.create_delay)
        self.created.append(name)
        return _StubContainer(self, name)

    async def _do_query(self, *args: object, **kwargs: object) -> object:
        await asyncio.sleep(self.attach_delay)
        raise AssertionError("the attach should have been cut short")


class _StubContainer:
    def __init__(self, stub: _Stub, name: str) -> None:
        self.stub, self.id = stub, name

    async def delete(self, **kwargs: object) -> None:
        self.stub.deleted.append(self.id)

    async def start(self) -> None:
        raise AssertionError("never reached")


@pytest.mark.parametrize(("create_delay", "attach_delay"), [(0.5, 0.0), (0.0, 30.0)])
async def test_docker_bounds_create_and_start_by_the_startup_timeout(
    create_delay: float, attach_delay: float
) -> None:
    stub = _Stub(create_delay, attach_delay)
    sandbox = DockerSandbox(stub, worker_id="w", timeout_grace=1)  # type: ignore[arg-type]
    limits = limits_of("default")
    limits = type(limits)(**{**limits.__dict__, "startup_timeout": 0.05})
    with pytest.raises(StartupTimeoutError, match=r"startup timeout \(0.05s\)"):
        await bounded(sandbox.prepare(limits), "prepare")
    # The container is removed, also when its creation finished after the deadline.
    await bounded(_until(lambda: stub.deleted == stub.created != []), "the removal")
    await sandbox.drain()


async def _until(predicate: Any) -> None:
    while not predicate():  # noqa: ASYNC110 - the stub signals nothing
        await asyncio.sleep(0.01)
