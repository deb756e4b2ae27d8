"""One typed settings object, read from ``TAKO_*`` environment variables, and the small value
objects built from it once and passed down (as httpx's ``Timeout`` and ``Limits``).

Every knob of the service lives here so that the README can document them in one table and
so that tests build a ``Settings(...)`` instead of patching the environment.  The Docker
endpoint is deliberately *not* here: it comes from ``DOCKER_HOST``, as for Docker's own clients.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from tako_stream.core.models import MAX_POOL_SIZE, MAX_TIMEOUT, WorkerId


@dataclass(frozen=True)
class Topics:
    """The topics one deployment uses (``TAKO_*_TOPIC``)."""

    requests: str
    results: str
    dlq: str
    control: str
    status: str
    #: A job's artifacts (the files it leaves in /output), keyed ``execution_id/name``.
    artifacts: str = "tako.artifacts"


@dataclass(frozen=True)
class ReplyTo:
    """Which topics a request's ``reply_to`` may name, and how long a copy there may take."""

    pattern: re.Pattern[str]
    forbidden: frozenset[str]
    timeout: float

    def problem(self, topic: str) -> str | None:
        """Why ``topic`` may not be a ``reply_to`` (existence aside), or None."""
        if topic in self.forbidden:
            return f"reply_to: {topic!r} is one of the service's own topics"
        if self.pattern.fullmatch(topic) is None:
            return f"reply_to: {topic!r} is not an allowed topic (TAKO_REPLY_TO_PATTERN)"
        return None


@dataclass(frozen=True)
class OutputCaps:
    """Bytes of a job's output kept: each stream, ``/output/result.json``, and the artifacts
    (the other files of ``/output``): how many, each one's size and their total."""

    stdout: int = 64 * 1024
    stderr: int = 64 * 1024
    result: int = 1024 * 1024
    artifact_files: int = 32
    artifact_file: int = 2 * 1024 * 1024
    artifact_total: int = 8 * 1024 * 1024


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts at a job whose sandbox failed transiently, and the backoff between them.

    Only ``SandboxUnavailableError`` is retried (the daemon unreachable or erring); the user's
    code failing, timeouts and sandbox set-up refusals are final on the first attempt.
    """

    max_attempts: int = 2
    base_delay: float = 1.0
    max_delay: float = 30.0

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based).

        "Equal jitter": half the exponential step is kept, half is random, so workers that
        failed together do not retry together, yet never retry at once.
        """
        step = min(self.max_delay, self.base_delay * 2.0 ** (attempt - 1))
        return step / 2 + rand() * step / 2


@dataclass(frozen=True)
class BreakerConfig:
    """When the shared Docker circuit breaker opens, waits, and closes again."""

    failure_threshold: int = 5
    reset_timeout: float = 30.0
    success_threshold: int = 2


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    """Service configuration; each field maps to ``TAKO_<FIELD>`` in upper case."""

    model_config = SettingsConfigDict(env_prefix="TAKO_", extra="ignore", frozen=True)

    kafka_bootstrap_servers: str = "localhost:9092"
    requests_topic: str = "tako.requests"
    results_topic: str = "tako.results"
    dlq_topic: str = "tako.dlq"
    #: Cancel requests (keyed by execution_id), read whole by every worker.
    control_topic: str = "tako.control"
    #: "running" events (keyed by execution_id): with the results, what a job's state is now.
    status_topic: str = "tako.status"
    #: A job's artifacts (the files other than result.json it leaves in /output): one record
    #: each, keyed ``execution_id/name``, compacted; published before the job's result.
    artifacts_topic: str = "tako.artifacts"
    #: Each worker's report of its engine (keyed by worker_id, compacted), every
    #: ``worker_report_interval`` seconds: what the gateway says of engines and capacity.
    workers_topic: str = "tako.workers"
    worker_report_interval: float = Field(default=10.0, ge=1.0, le=300.0)
    #: Partitions given to topics the service creates itself; the most workers that can share
    #: the request stream, since Kafka gives each partition to one consumer of a group.
    topic_partitions: int = Field(default=8, ge=1)
    topic_replication: int = Field(default=1, ge=1)
    consumer_group: str = "tako-stream"
    #: Static group membership (``group.instance.id`` = the worker id): a worker restarting
    #: under the same id gets its partitions back without a rebalance.  Off by default: the
    #: embedded broker does not implement it; Apache Kafka 2.3+ and Redpanda do.
    kafka_static_membership: bool = False
    #: Idempotent producers (no duplicates on producer retries); off by default because the
    #: embedded broker does not implement InitProducerId. Turn on for Apache Kafka / Redpanda.
    kafka_idempotence: bool = False
    #: Longest a fetch of requests or results waits on the broker when there is nothing to read.
    #: Kafka and Redpanda answer a waiting fetch as soon as a record arrives, so 500 costs them no
    #: latency and idles at a fraction of the CPU; the embedded broker answers only when the wait
    #: is over, so its default is short.
    kafka_fetch_wait_ms: int = Field(default=20, ge=1, le=30_000)
    #: The same for the topics a process only follows into a view (cancels, the breaker's
    #: changelog, the answers a worker indexes, the DLQ's counts, the workers' heartbeats):
    #: none of them is on a request's path, so a fifth of a second costs no answer anything,
    #: and on the embedded broker a worker's four such readers polling every 20 ms doubled its
    #: idle CPU and the broker's.  Never shorter than ``kafka_fetch_wait_ms`` (``follow_wait_ms``).
    kafka_follow_wait_ms: int = Field(default=200, ge=1, le=30_000)
    #: Largest message the service produces (and topics it creates accept).  Requests carry up
    #: to 100k chars of code and 1 MiB of input, results up to 1 MiB of output and two 64 KiB
    #: streams: above Kafka's 1 MB default, hence 8 MiB.  Lower it to a cluster's own limit: an
    #: answer larger than it is then replaced by one saying so, never lost.
    kafka_max_message_bytes: int = Field(default=8 * 1024 * 1024, ge=16 * 1024)

    #: Containers one worker runs at once (the async pool's limit).
    pool_size: int = Field(default=4, ge=1, le=MAX_POOL_SIZE)
    #: Containers per job type started ahead of time, each waiting for one job (0: all cold).
    warm_pool_size: int = Field(default=2, ge=0, le=64)
    #: Seconds a warm container may wait before it is replaced by a fresh one.
    warm_max_idle: float = Field(default=300.0, gt=0)
    job_types_file: Path | None = None
    stdout_limit: int = Field(default=64 * 1024, ge=1024)
    stderr_limit: int = Field(default=64 * 1024, ge=1024)
    #: Largest /output/result.json accepted; larger is an ``invalid_output`` error.
    output_limit: int = Field(default=1024 * 1024, ge=1024)
    #: Artifacts collected per job (0: none); more files in /output are skipped and listed.
    artifact_max_files: int = Field(default=32, ge=0, le=1024)
    #: Largest artifact: a larger file is skipped whole (never truncated).  An artifact travels
    #: as one Kafka message, so it must also fit TAKO_KAFKA_MAX_MESSAGE_BYTES (less ~1 KiB).
    artifact_file_limit: int = Field(default=2 * 1024 * 1024, ge=0)
    #: Bytes of artifacts per job, all files together (what a job may make a worker hold).
    artifact_total_limit: int = Field(default=8 * 1024 * 1024, ge=0)
    #: Seconds a job's artifacts may take to be acknowledged by the broker before its result is
    #: published without the ones still missing (listed in ``artifacts_skipped``, with why).
    artifacts_timeout: float = Field(default=10.0, gt=0, le=300)
    #: Longest one Docker Engine API call may take: a daemon that accepts connections and never
    #: answers counts as unavailable after it (the breaker hears of it, the job is retried).
    docker_timeout: float = Field(default=20.0, gt=0, le=300)
    #: Extra seconds the host waits past a job's timeout before killing the container itself;
    #: covers container start-up and a supervisor starved by the job.
    timeout_grace: float = Field(default=5.0, ge=0.5)

    #: Attempts at a job when Docker fails transiently, and the first backoff (doubling, jittered).
    retry_max_attempts: int = Field(default=2, ge=1, le=10)
    retry_base_delay: float = Field(default=1.0, ge=0)

    #: Circuit breaker around Docker, shared by the workers of one Docker endpoint.
    breaker_failure_threshold: int = Field(default=5, ge=1)
    breaker_reset_timeout: float = Field(default=30.0, gt=0)
    breaker_success_threshold: int = Field(default=2, ge=1)
    #: Seconds between Docker pings, so a dead daemon is noticed with no traffic.
    breaker_ping_interval: float = Field(default=2.0, gt=0)
    #: Single-partition topic of breaker events, folded by one agent into a faust table.
    breaker_topic: str = "tako.breaker-events"

    #: Times a dead-lettered request may be replayed before replay refuses it (no loops).
    dlq_max_replays: int = Field(default=3, ge=0)

    #: Topics a request's ``reply_to`` may name (a regular expression the whole name must
    #: match); the topic must also exist.  The service's own topics other than the results
    #: topic are never allowed.
    reply_to_pattern: str = ".+"
    #: Seconds a copy of a result to ``reply_to`` may take before the result says it failed.
    reply_to_timeout: float = Field(default=10.0, gt=0, le=300)
    #: Seconds a result may wait for the broker's acknowledgement before the request is
    #: dead-lettered instead (a results topic that keeps failing must not stall a partition).
    publish_timeout: float = Field(default=300.0, ge=1)
    #: Memory invalid requests may take while their answers are published (each counts about
    #: five times its size: see ``worker.intake.rejection_cost``), so a flood of large bad
    #: messages costs at most about this much.
    rejection_budget: int = Field(default=32 * 1024 * 1024, ge=1024 * 1024)

    #: Bounded as the reports and breaker events that carry it are: a longer one is refused at
    #: start rather than making every report and breaker event of the worker unsendable.
    worker_id: WorkerId = Field(default_factory=_default_worker_id)
    web_host: str = "0.0.0.0"
    web_port: int = Field(default=6066, ge=0, le=65535)
    #: The HTTP gateway (``tako-stream gateway``): Tako VM's REST API over Kafka.
    gateway_host: str = "0.0.0.0"
    gateway_port: int = Field(default=8000, ge=0, le=65535)
    #: Where the gateway keeps its store (a SQLite file per cluster and results topic): the
    #: topics materialised, so a restart reads only what is new.  Each gateway needs its own.
    gateway_state_dir: Path = Field(
        default_factory=lambda: Path.home() / ".local" / "state" / "tako-stream"
    )
    #: Memory the store's page cache may use, in MiB (the file itself grows with the topics).
    gateway_cache_mb: int = Field(default=64, ge=4, le=4096)
    #: Requests per client address and window (Tako VM's API rate limit); 0: no limit.
    gateway_rate_limit: int = Field(default=0, ge=0)
    gateway_rate_window: float = Field(default=60.0, gt=0)
    #: The largest request body (Tako VM: 413 beyond it); a request is at most 100 KB of code
    #: and 1 MiB of input, so the default leaves room for JSON's escaping.
    gateway_max_payload_bytes: int = Field(default=4 * 1024 * 1024, ge=64 * 1024)
    #: API keys the gateway accepts, comma-separated (``X-API-Key`` or ``Authorization:
    #: Bearer``); empty: no key is asked for.  Secret: never logged or shown.
    gateway_api_keys: SecretStr = SecretStr("")
    #: Seconds a request that needs the store waits for it to catch up before answering 503.
    gateway_ready_wait: float = Field(default=10.0, ge=0)
    #: Seconds a sync ``POST /execute`` waits beyond the job's own timeout before answering 504.
    gateway_wait_margin: float = Field(default=60.0, ge=0)
    #: Seconds a cancelled job gets between SIGTERM and SIGKILL.
    cancel_grace: float = Field(default=2.0, ge=0, le=60)
    #: Seconds a stopping worker waits for running jobs before handing them back uncommitted.
    shutdown_grace: float = Field(default=30.0, ge=0)
    #: How often finished offsets are committed (they are also committed on revoke and stop).
    commit_interval: float = Field(default=1.0, gt=0)

    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"

    @property
    def api_key_digests(self) -> frozenset[str]:
        """SHA-256 (hex) of each configured API key: what a request's key is compared with."""
        keys = self.gateway_api_keys.get_secret_value().split(",")
        return frozenset(hashlib.sha256(k.strip().encode()).hexdigest() for k in keys if k.strip())

    @property
    def topics(self) -> Topics:
        return Topics(
            requests=self.requests_topic,
            results=self.results_topic,
            dlq=self.dlq_topic,
            control=self.control_topic,
            status=self.status_topic,
            artifacts=self.artifacts_topic,
        )

    @property
    def follow_wait_ms(self) -> int:
        """The fetch wait of a reader that only follows a topic: on Apache Kafka or Redpanda,
        set to 500 for the requests, it must not poll more often than they do."""
        return max(self.kafka_follow_wait_ms, self.kafka_fetch_wait_ms)

    @property
    def revoke_wait(self) -> float:
        """Seconds a rebalance waits for the jobs of the partitions it takes away: the longest
        a job can run (its timeout, the host's grace, the engine calls around it), so no job is
        stopped half-way and run again elsewhere."""
        return MAX_TIMEOUT + self.timeout_grace + 2 * self.docker_timeout

    @property
    def breaker_app_id(self) -> str:
        """The faust app's id, which names its tables' changelog topics."""
        return f"{self.consumer_group}-app"

    @property
    def breaker_table(self) -> str:
        return f"{self.consumer_group}-breaker"

    @property
    def breaker_changelog_topic(self) -> str:
        """The shared breaker table's changelog, named as faust names it:
        ``{app id}-{table}-changelog`` (the worker checks that faust agrees)."""
        return f"{self.breaker_app_id}-{self.breaker_table}-changelog"

    @property
    def reply_to(self) -> ReplyTo:
        forbidden = {
            self.requests_topic,
            self.dlq_topic,
            self.control_topic,
            self.status_topic,
            self.artifacts_topic,
            self.workers_topic,
            self.breaker_topic,
            self.breaker_changelog_topic,
        }
        return ReplyTo(
            re.compile(self.reply_to_pattern), frozenset(forbidden), self.reply_to_timeout
        )

    @property
    def output_caps(self) -> OutputCaps:
        return OutputCaps(
            stdout=self.stdout_limit,
            stderr=self.stderr_limit,
            result=self.output_limit,
            artifact_files=self.artifact_max_files,
            artifact_file=self.artifact_file_limit,
            artifact_total=self.artifact_total_limit,
        )

    @property
    def retry(self) -> RetryPolicy:
        return RetryPolicy(max_attempts=self.retry_max_attempts, base_delay=self.retry_base_delay)

    @property
    def breaker(self) -> BreakerConfig:
        return BreakerConfig(
            failure_threshold=self.breaker_failure_threshold,
            reset_timeout=self.breaker_reset_timeout,
            success_threshold=self.breaker_success_threshold,
        )
