"""The messages tako-stream reads and writes: the single source of truth for their shape.

``schemas/*.json`` are generated from these models (``scripts/gen-schemas``) and a test keeps
them in sync, so producers in other languages can validate against the same contract.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StringConstraints,
    field_validator,
    model_validator,
)

from tako_stream.core.errors import ErrorType, Status
from tako_stream.core.requirements import parse_requirement

#: Header carrying the correlation id on requests, results and DLQ records.
CORRELATION_HEADER = "x-correlation-id"
#: Longest correlation id kept, from a Kafka header or an HTTP one (a longer one is replaced).
MAX_CORRELATION_CHARS = 256
#: Header of an idempotent request (the gateway's ``idempotency_key``): the digest of the payload
#: it was submitted with.  Its execution id comes from the key, so repeats share the id.
PAYLOAD_HEADER = "x-tako-payload-sha256"

MAX_CODE_CHARS = 100_000
MAX_INPUT_BYTES = 1024 * 1024
MAX_METADATA_BYTES = 64 * 1024
#: Deepest nesting of a JSON value a request or a job's output may carry.  orjson encodes at
#: most 254 nested containers, and a value travels one or two levels down inside a result or a
#: DLQ record: checked where values enter, so no answer fails to encode later.
MAX_JSON_DEPTH = 128
MIN_TIMEOUT, MAX_TIMEOUT = 1, 300
#: Containers one worker may run at once (``TAKO_POOL_SIZE``): the gateway adds up the live
#: workers' figures as Tako VM's ``max_workers``.
MAX_POOL_SIZE = 256
#: Jobs a worker may report as taken and unanswered: its capacity is a little above its pool
#: size, plus the invalid requests whose answers it holds (a bytes budget); far above both.
MAX_IN_FLIGHT = 1_000_000

#: One run of spaces at most, between the number and its unit (the ends are stripped first):
#: two adjacent optional runs made a digit, 100 KB of spaces and a bad character backtrack
#: for minutes, with the worker's event loop blocked.
_SIZE = re.compile(r"(\d{1,12}(?:\.\d{1,6})?)\s*([bkmg]?)(?:i?b)?", re.IGNORECASE | re.ASCII)
#: Longer than any size spelled sensibly ("512 MiB", "0.500000 g").
MAX_SIZE_TEXT = 32
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_size(text: str) -> int:
    """Bytes in a Docker-style size string (``"256m"``, ``"1g"``, ``"512MiB"``)."""
    match = _SIZE.fullmatch(text.strip()) if len(text) <= MAX_SIZE_TEXT else None
    if match is None:
        raise ValueError(f"{text!r} is not a size such as '256m' or '1g'")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _check_size(text: str) -> str:
    if parse_size(text) < 16 * 1024**2:
        raise ValueError("memory_limit must be at least 16m")
    return text


def _not_blank(code: str) -> str:
    if not code.strip():
        raise ValueError("code must not be blank")
    return code


#: An integer as orjson writes it (signed 64 bits).  Anyone may write to the topics, and pydantic
#: reads ``123456789012345678901234567890`` as a Python int that orjson then refuses to write
#: (TypeError): every number of a message is bounded where it is read, so a record holding one
#: past 64 bits fails validation there (and is skipped as other foreign records are) instead of
#: failing whatever serves it later.
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
#: A count, size or Kafka offset: never negative.
Count = Annotated[int, Field(ge=0, le=2**63 - 1)]
#: A Kafka partition number (an int32 in Kafka's protocol).
Partition = Annotated[int, Field(ge=0, le=2**31 - 1)]
#: A correlation id as codec.clean_correlation_id keeps one (a result or DLQ record carries its
#: request's): a longer one is no record of ours, and would go into answers, logs and headers.
CorrelationId = Annotated[str, StringConstraints(max_length=MAX_CORRELATION_CHARS)]

ExecutionId = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")
]
#: A worker's id (``TAKO_WORKER_ID``, host name and pid by default), as its reports and breaker
#: events carry it: those topics are anyone's, and a longer one is no worker of ours.
WorkerId = Annotated[str, StringConstraints(min_length=1, max_length=256)]


def _usable_topic(name: str) -> str:
    # Kafka refuses "." and ".." as names, and "__"-prefixed topics are the broker's own
    # (__consumer_offsets, __transaction_state): a result must never be written there.
    if name in (".", ".."):
        raise ValueError(f"{name!r} is not a valid Kafka topic name")
    if name.startswith("__"):
        raise ValueError("topics starting with '__' are internal to Kafka")
    return name


TopicName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=249, pattern=r"^[A-Za-z0-9._-]+$"),
    AfterValidator(_usable_topic),
]
MemoryLimit = Annotated[
    str, StringConstraints(max_length=MAX_SIZE_TEXT), AfterValidator(_check_size)
]
#: Tako VM's rule: a key is an identifier, not free text (it names a job everywhere).
IdempotencyKey = Annotated[
    str, StringConstraints(min_length=8, max_length=255, pattern=r"^[A-Za-z0-9_-]+$")
]


def _requirement(text: str) -> str:
    parse_requirement(text)  # a malformed one is refused here, naming it
    return text


#: A requirement as pip writes one: a distribution name, optional extras and version specifiers
#: (no environment marker, no URL: nothing is installed, the image must already satisfy it).
Requirement = Annotated[
    str,
    StringConstraints(min_length=1, max_length=200, strip_whitespace=True),
    AfterValidator(_requirement),
]
Relationship = Literal["rerun", "fork"]
MAX_REQUIREMENTS = 50


def _utc_if_naive(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


#: A time read back from a topic anyone may write.  One without a zone is taken as UTC, as the
#: DLQ's filters (``dlq.parse_time``) and the gateway's store already read one: comparing a
#: naive time with an aware one raises TypeError, which once ended whatever read the record.
UtcDatetime = Annotated[datetime, AfterValidator(_utc_if_naive)]


class ExecutionRequest(BaseModel):
    """A job: Python code, its JSON input and limits, on the requests topic (key = id)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"title": "ExecutionRequest"})

    execution_id: ExecutionId | None = Field(
        default=None, description="Caller's id for this execution; a UUID is assigned if absent."
    )
    code: Annotated[str, AfterValidator(_not_blank)] = Field(
        min_length=1, max_length=MAX_CODE_CHARS, description="Python source run as /code/main.py."
    )
    input_data: dict[str, Any] = Field(
        default_factory=dict, description="Written to /input/data.json (at most 1 MiB as JSON)."
    )
    timeout: float | None = Field(
        default=None,
        strict=True,  # a number, not "5" or true
        ge=MIN_TIMEOUT,
        le=MAX_TIMEOUT,
        description="Wall-clock seconds; the job type's default when absent.",
    )
    job_type: str = Field(
        default="default",
        min_length=1,
        max_length=128,
        description="A job type's name, optionally pinned to a version: 'default@1', "
        "'default@latest' (Tako VM's 'name@version').",
    )
    memory_limit: MemoryLimit | None = Field(
        default=None, description="Docker-style size, e.g. '256m', up to the job type's maximum."
    )
    reply_to: TopicName | None = Field(
        default=None, description="An extra topic that also receives the result."
    )
    metadata: dict[str, Any] | None = Field(
        default=None, description="Passed through untouched to the result."
    )
    requirements: list[Requirement] | None = Field(
        default=None,
        max_length=MAX_REQUIREMENTS,
        description="Python distributions the job needs, e.g. ['numpy>=1.20'] (Tako VM's field). "
        "Nothing is installed at run time: the job type's image must already satisfy them, "
        "else the result is a dependency_error naming what is missing.",
    )
    startup_timeout: int | None = Field(
        default=None,
        ge=10,
        le=600,
        description="Seconds the container may take to start (Tako VM's 10-600); the job "
        "type's default when absent.",
    )
    idempotency_key: IdempotencyKey | None = Field(
        default=None,
        description="The key this job was submitted with through the gateway (8-255 letters, "
        "digits, '-' and '_'); its execution id derives from it. Carried to the result.",
    )
    parent_execution_id: ExecutionId | None = Field(
        default=None, description="The execution this one reruns or forks (lineage)."
    )
    relationship: Relationship | None = Field(
        default=None, description="'rerun' (same code and input) or 'fork' (new code)."
    )

    @model_validator(mode="after")
    def _lineage(self) -> ExecutionRequest:
        if (self.parent_execution_id is None) != (self.relationship is None):
            raise ValueError("parent_execution_id and relationship come together")
        return self

    @field_validator("input_data")
    @classmethod
    def _input_size(cls, value: dict[str, Any]) -> dict[str, Any]:
        if _serialised_size(value, "input_data") > MAX_INPUT_BYTES:
            raise ValueError("input_data must be at most 1 MiB once serialised")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_size(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and _serialised_size(value, "metadata") > MAX_METADATA_BYTES:
            raise ValueError("metadata must be at most 64 KiB once serialised")
        return value


#: orjson encodes at most this many nested containers, and raises past it.
_ORJSON_DEPTH = 254


def _encoded(value: Any, limit: int) -> bytes | None:
    """``value`` as JSON inside ``_ORJSON_DEPTH - limit`` lists; None when it nests deeper
    than ``limit`` (orjson then refuses the wrapped value)."""
    import orjson

    wrapped = value
    for _ in range(_ORJSON_DEPTH - limit):
        wrapped = [wrapped]
    try:
        return orjson.dumps(wrapped)
    except orjson.JSONEncodeError as exc:
        if "Recursion limit" in str(exc):
            return None
        raise


def too_deep(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether containers nest more than ``limit`` deep in a JSON value (a scalar is 0, ``{}``
    is 1).  Asked of orjson, in C: a walk in Python took seconds for a hostile 4 MB value, on
    the event loop (``TypeError`` for what JSON cannot hold, as ``orjson.dumps`` raises)."""
    return _encoded(value, limit) is None


def _serialised_size(value: Any, name: str) -> int:
    """Bytes as JSON; what an answer could not carry back out is refused here.  One encoding
    answers both the depth and the size."""
    try:
        encoded = _encoded(value, MAX_JSON_DEPTH)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} cannot be serialised ({exc})") from None
    if encoded is None:
        raise ValueError(f"{name} is nested deeper than {MAX_JSON_DEPTH} levels")
    return len(encoded) - 2 * (_ORJSON_DEPTH - MAX_JSON_DEPTH)  # less the wrapping brackets


class ErrorInfo(BaseModel):
    """Why a job did not succeed: a type from the taxonomy and a human message."""

    type: ErrorType
    message: str


class Timing(BaseModel):
    """Where the time went, for operators; not part of Tako VM's shape."""

    queued: float | None = Field(default=None, description="Seconds from produce to pick-up.")
    sandbox: float | None = Field(default=None, description="Seconds spent in the container.")
    warm: bool = Field(default=False, description="Ran in a container started ahead of time.")


class ResourceUsage(BaseModel):
    """What the job's processes used (Tako VM's ``resource_usage``; Judge0 and Piston report the
    same figures)."""

    max_rss_mb: float | None = Field(default=None, description="Peak resident memory, MiB.")
    cpu_time_ms: Count | None = Field(default=None, description="User + system CPU time, ms.")
    wall_time_ms: Count | None = Field(default=None, description="Wall-clock time of the job, ms.")


class Artifact(BaseModel):
    """A file the job left in /output, other than result.json: Tako VM's artifact (``name``,
    ``size_bytes``, ``sha256``, ``content_type``), plus where its bytes are on the artifacts
    topic (key ``execution_id/name``)."""

    # Constrained here too: a result on the topic is anyone's, and these go into HTTP headers.
    name: str = Field(
        pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$",
        description="The file's name: letters, digits, '.', '_', '-'.",
    )
    size_bytes: Count
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 (hex) of the file's bytes.")
    content_type: str = Field(
        max_length=255, description="Guessed from the name; application/octet-stream."
    )
    partition: Partition | None = Field(
        default=None, description="The artifacts topic's partition holding it (not Tako VM's)."
    )
    offset: Count | None = Field(
        default=None, description="Its offset in that partition (not Tako VM's)."
    )


class SkippedArtifact(BaseModel):
    """An entry of /output that is not among the artifacts, and why (not in Tako VM)."""

    name: str
    reason: str


class ExecutionResult(BaseModel):
    """The one terminal answer to a request, on the results topic (key = execution_id)."""

    model_config = ConfigDict(json_schema_extra={"title": "ExecutionResult"})

    execution_id: str
    correlation_id: CorrelationId
    status: Status
    success: bool
    output: Any = None
    stdout: str = ""
    stderr: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    exit_code: Int64 | None = None
    error: ErrorInfo | None = None
    execution_time: float = Field(default=0.0, description="Seconds the job's code ran.")
    job_type: str | None = None
    attempts: Count = 0
    worker_id: str
    started_at: datetime | None = None
    finished_at: datetime
    metadata: dict[str, Any] | None = None
    timing: Timing = Field(default_factory=Timing)
    reply_to_error: str | None = Field(
        default=None, description="Why the copy to the request's reply_to topic failed, if it did."
    )
    resource_usage: ResourceUsage | None = Field(
        default=None, description="What the job's processes used; absent when it never ran."
    )
    job_ref: str | None = Field(
        default=None, description="The job type and version that ran it: 'name@version'."
    )
    code_hash: str | None = Field(
        default=None, description="SHA-256 (hex) of the code's UTF-8 bytes."
    )
    input_hash: str | None = Field(
        default=None,
        description="SHA-256 (hex) of input_data as canonical JSON (sorted keys, no spaces).",
    )
    idempotency_key: str | None = None
    parent_execution_id: str | None = None
    relationship: Relationship | None = None
    artifacts: list[Artifact] = Field(
        default_factory=list,
        description="The files the job left in /output (besides result.json) whose bytes are on "
        "the artifacts topic, keyed 'execution_id/name'; empty when it never ran.",
    )
    artifacts_skipped: list[SkippedArtifact] = Field(
        default_factory=list,
        description="Entries of /output not among the artifacts (a link, over a cap, a bad name, "
        "refused by the broker), each with why.",
    )
    #: The artifacts' bytes by name, from the sandbox to the publisher; never serialised.
    _artifact_bytes: dict[str, bytes] = PrivateAttr(default_factory=dict)

    def hold_artifact_bytes(self, by_name: dict[str, bytes]) -> None:
        """Keep the listed artifacts' bytes with this result until they are published."""
        self._artifact_bytes = dict(by_name)

    def artifact_bytes(self) -> dict[str, bytes]:
        """The bytes of the artifacts not published yet (empty once they were)."""
        return self._artifact_bytes


class SourcePosition(BaseModel):
    """Where a dead-lettered message was read from."""

    topic: str
    partition: Partition
    offset: Count
    timestamp_ms: Int64 | None = None


class DLQRecord(BaseModel):
    """A request the system could not run, with everything needed to understand and replay it."""

    model_config = ConfigDict(json_schema_extra={"title": "DLQRecord"})

    dlq_id: str = Field(description="Unique id of this DLQ entry.")
    execution_id: str
    correlation_id: CorrelationId
    error: ErrorInfo
    attempts: Count
    first_failure_at: UtcDatetime
    last_failure_at: UtcDatetime
    worker_id: str
    source: SourcePosition
    replay_count: Count = 0
    original_key: str | None = Field(default=None, description="Base64 of the original key.")
    original_value: str | None = Field(
        description=(
            "Base64 of the original request bytes; null when the message had no value, or in "
            "the summaries served by workers and gateways (see original_omitted)."
        )
    )
    original_headers: list[tuple[str, str]] = Field(
        default_factory=list, description="Original headers, values in base64."
    )
    original_size: Count = Field(
        default=0, description="Bytes of the original value and headers, as consumed."
    )
    original_truncated: bool = Field(
        default=False,
        description=(
            "The original was too large to keep whole in a DLQ record: only its first bytes "
            "are kept (headers dropped), replay is refused, and the message itself is at "
            "`source` for as long as that topic retains it."
        ),
    )
    original_omitted: bool = Field(
        default=False,
        description="A summary: the original bytes were left out (read the DLQ topic for them).",
    )


class JobType(BaseModel):
    """An environment requests can ask for: its image, resource defaults and ceilings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    image: str
    memory: MemoryLimit = "256m"
    max_memory: MemoryLimit = "512m"
    cpus: float = Field(default=1.0, gt=0, le=64)
    timeout: float = Field(default=30, ge=MIN_TIMEOUT, le=MAX_TIMEOUT)
    max_timeout: float = Field(default=MAX_TIMEOUT, ge=MIN_TIMEOUT, le=MAX_TIMEOUT)
    pids_limit: int = Field(default=128, ge=8)
    runtime: str | None = Field(default=None, description="OCI runtime, e.g. 'runsc'.")
    python_version: str = Field(
        default="3", description="The image's Python, as scripts/build-images installs it."
    )
    requirements: tuple[Requirement, ...] = Field(
        default=(),
        description="Distributions its image is built with (scripts/build-images), as pip "
        "writes them; requests' requirements are checked against the image itself.",
    )
    warm_pool_size: int | None = Field(
        default=None,
        ge=0,
        le=64,
        description="Containers started ahead of time for this type; unset: TAKO_WARM_POOL_SIZE.",
    )

    @model_validator(mode="after")
    def _defaults_within_ceilings(self) -> JobType:
        if self.timeout > self.max_timeout:
            raise ValueError(f"timeout {self.timeout:g} exceeds max_timeout {self.max_timeout:g}")
        if parse_size(self.memory) > parse_size(self.max_memory):
            raise ValueError(f"memory {self.memory} exceeds max_memory {self.max_memory}")
        return self


class CancelRequest(BaseModel):
    """On the control topic (key = execution_id): stop this job, queued or running."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"title": "CancelRequest"})

    action: Literal["cancel"] = "cancel"
    execution_id: str = Field(min_length=1, max_length=128)
    requested_at: datetime
    reason: str | None = Field(default=None, max_length=1000)
    correlation_id: str | None = Field(default=None, max_length=MAX_CORRELATION_CHARS)


class JobStatus(BaseModel):
    """On the status topic (key = execution_id): a job was picked up and is running now.

    Terminal states are on the results topic only; a job with neither is queued.
    """

    model_config = ConfigDict(json_schema_extra={"title": "JobStatus"})

    execution_id: str
    status: Literal["running"] = "running"
    worker_id: str
    correlation_id: CorrelationId
    at: datetime


#: What a worker report may list: its engine's OCI runtimes (a few) and its job types' images
#: (one each), with names as long as Docker's (a reference's name is at most 255 characters,
#: its tag 128); anyone may write to the workers topic, and the gateway keeps what it reads.
MAX_RUNTIMES, MAX_RUNTIME_CHARS = 32, 128
MAX_IMAGES, MAX_IMAGE_CHARS = 256, 512


class WorkerReport(BaseModel):
    """A worker's view of its engine, on the workers topic (key = worker_id, compacted; a
    tombstone when it stops): what the gateway, which never talks to Docker, says of the
    engine, the runtimes and the images (Tako VM's ``docker_available``, ``gvisor_available``,
    ``image_exists``) and of the cluster's capacity (``max_workers``)."""

    model_config = ConfigDict(json_schema_extra={"title": "WorkerReport"})

    worker_id: WorkerId
    at: AwareDatetime
    interval: float = Field(gt=0, le=300, description="Seconds until its next report.")
    version: str = Field(max_length=64)
    pool_size: int = Field(ge=0, le=MAX_POOL_SIZE, description="Jobs it runs at once.")
    in_flight: int = Field(
        ge=0, le=MAX_IN_FLIGHT, description="Jobs it has taken and not answered yet."
    )
    docker_available: bool
    runtimes: list[Annotated[str, StringConstraints(max_length=MAX_RUNTIME_CHARS)]] = Field(
        default_factory=list, max_length=MAX_RUNTIMES, description="OCI runtimes its engine has."
    )
    images: dict[Annotated[str, StringConstraints(max_length=MAX_IMAGE_CHARS)], bool] = Field(
        default_factory=dict,
        max_length=MAX_IMAGES,
        description="Each job type's image: whether its engine has it.",
    )


MESSAGE_MODELS: dict[str, type[BaseModel]] = {
    "execution-request": ExecutionRequest,
    "execution-result": ExecutionResult,
    "dlq-record": DLQRecord,
    "cancel-request": CancelRequest,
    "job-status": JobStatus,
    "worker-report": WorkerReport,
}
