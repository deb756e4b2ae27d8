"""Job types: the environments requests can ask for (read from one TOML file), and the limits
of the container a request gets from its job type."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from tako_stream.core.errors import InvalidRequestError
from tako_stream.core.models import ExecutionRequest, JobType, parse_size

_MiB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """What one container may use; resolved from the job type and the request."""

    image: str
    memory: int
    cpus: float
    pids_limit: int
    timeout: float
    runtime: str | None = None
    tmp_size: int = 64 * _MiB
    output_size: int = 16 * _MiB
    file_size: int = 64 * _MiB
    open_files: int = 256
    #: Seconds creating and starting a cold container may take (the request's
    #: ``startup_timeout``); None: only each Engine API call's own bound, as before.
    startup_timeout: float | None = None


class JobTypes(Mapping[str, JobType]):
    """The configured job types by name; the packaged file unless one is given."""

    def __init__(self, types: Mapping[str, JobType]) -> None:
        if "default" not in types:
            raise ValueError("the job types file must define a 'default' job type")
        self._types = dict(types)

    @classmethod
    def load(cls, path: Path | None = None) -> JobTypes:
        if path is None:
            text = resources.files("tako_stream.core").joinpath("job_types.toml").read_text()
        else:
            text = path.read_text()
        raw = tomllib.loads(text)
        return cls({name: JobType(name=name, **fields) for name, fields in raw.items()})

    def __getitem__(self, name: str) -> JobType:
        return self._types[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._types)

    def __len__(self) -> int:
        return len(self._types)

    def limits(self, request: ExecutionRequest) -> Limits:
        """The container's limits, or ``InvalidRequestError`` naming what the job type forbids.

        ``job_type`` may pin a version as Tako VM's ``name@version`` does: ``latest`` or the
        tag of the job type's image (``default@1``); a job is never run on another version
        than the one it asked for."""
        name, pinned, version = request.job_type.partition("@")
        job_type = self.get(name)
        if job_type is None:
            known = ", ".join(sorted(self))
            raise InvalidRequestError(
                [f"job_type: unknown job type {name!r} (known: {known})"],
                request.execution_id,
            )
        if pinned and version not in versions(job_type):
            have = " or ".join(versions(job_type))
            raise InvalidRequestError(
                [f"job_type: {name!r} has no version {version!r} here (only {have})"],
                request.execution_id,
            )
        problems = []
        timeout = request.timeout if request.timeout is not None else job_type.timeout
        if timeout > job_type.max_timeout:
            problems.append(
                f"timeout: {timeout:g}s exceeds the maximum of job type "
                f"{job_type.name!r} ({job_type.max_timeout:g}s)"
            )
        memory = parse_size(job_type.memory)
        if request.memory_limit is not None:
            memory = parse_size(request.memory_limit)
            if memory > parse_size(job_type.max_memory):
                problems.append(
                    f"memory_limit: {request.memory_limit} exceeds the maximum of job type "
                    f"{job_type.name!r} ({job_type.max_memory})"
                )
        if problems:
            raise InvalidRequestError(problems, request.execution_id)
        return replace(
            default_limits(job_type),
            memory=memory,
            timeout=timeout,
            startup_timeout=request.startup_timeout,
        )

    def ref(self, request: ExecutionRequest) -> str | None:
        """``name@version`` of the job type a request runs on (its result's ``job_ref``); None
        when it names no job type or version here.

        A pinned request keeps its pin, ``latest`` included: that is what it asked for.  An
        unpinned one gets its image's tag, not ``latest``: ``latest`` moves when the image is
        rebuilt under a new tag, and a result should say which image ran the job (a rerun can
        pin it).  An image without a tag is ``latest`` and has no other name to give.
        """
        name, pinned, version = request.job_type.partition("@")
        job_type = self.get(name)
        if job_type is None:
            return None
        have = versions(job_type)
        if pinned:
            return f"{name}@{version}" if version in have else None
        return f"{name}@{have[-1]}"


def versions(job_type: JobType) -> tuple[str, ...]:
    """The versions a request may pin a job type to: ``latest`` and its image's tag."""
    repository = job_type.image.rsplit("/", 1)[-1]
    tag = repository.partition(":")[2] or "latest"
    return ("latest",) if tag == "latest" else ("latest", tag)


def default_limits(job_type: JobType) -> Limits:
    """A job type's container when a request asks for nothing special (the warm pool's shape)."""
    return Limits(
        image=job_type.image,
        memory=parse_size(job_type.memory),
        cpus=job_type.cpus,
        pids_limit=job_type.pids_limit,
        timeout=job_type.timeout,
        runtime=job_type.runtime,
    )
