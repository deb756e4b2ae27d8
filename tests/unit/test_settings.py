"""Settings come from TAKO_* environment variables and refuse bad values."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from tako_stream.settings import Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("TAKO_"):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    s = Settings()
    assert s.kafka_bootstrap_servers == "localhost:9092"
    assert (s.requests_topic, s.results_topic, s.dlq_topic) == (
        "tako.requests",
        "tako.results",
        "tako.dlq",
    )
    assert s.pool_size == 4
    assert s.kafka_idempotence is False
    assert s.kafka_fetch_wait_ms == 20
    assert s.job_types_file is None
    assert s.stdout_limit == s.stderr_limit == 64 * 1024
    assert s.output_limit == 1024 * 1024
    assert s.log_format == "text"
    assert s.worker_id.endswith(f"-{os.getpid()}")


def test_env_vars_are_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env = {
        "TAKO_KAFKA_BOOTSTRAP_SERVERS": "broker-1:9092,broker-2:9092",
        "TAKO_REQUESTS_TOPIC": "in",
        "TAKO_RESULTS_TOPIC": "out",
        "TAKO_DLQ_TOPIC": "dead",
        "TAKO_TOPIC_PARTITIONS": "16",
        "TAKO_TOPIC_REPLICATION": "3",
        "TAKO_CONSUMER_GROUP": "grp",
        "TAKO_KAFKA_IDEMPOTENCE": "true",
        "TAKO_KAFKA_FETCH_WAIT_MS": "500",
        "TAKO_POOL_SIZE": "12",
        "TAKO_JOB_TYPES_FILE": str(tmp_path / "types.toml"),
        "TAKO_STDOUT_LIMIT": "2048",
        "TAKO_STDERR_LIMIT": "4096",
        "TAKO_OUTPUT_LIMIT": "8192",
        "TAKO_TIMEOUT_GRACE": "2.5",
        "TAKO_WORKER_ID": "w-7",
        "TAKO_WEB_HOST": "127.0.0.1",
        "TAKO_WEB_PORT": "8080",
        "TAKO_SHUTDOWN_GRACE": "0",
        "TAKO_COMMIT_INTERVAL": "0.25",
        "TAKO_LOG_LEVEL": "DEBUG",
        "TAKO_LOG_FORMAT": "json",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s = Settings()
    assert s.kafka_bootstrap_servers == "broker-1:9092,broker-2:9092"
    assert (s.requests_topic, s.results_topic, s.dlq_topic) == ("in", "out", "dead")
    assert (s.topic_partitions, s.topic_replication) == (16, 3)
    assert s.consumer_group == "grp"
    assert s.kafka_idempotence is True
    assert s.kafka_fetch_wait_ms == 500
    assert s.pool_size == 12
    assert s.job_types_file == tmp_path / "types.toml"
    assert (s.stdout_limit, s.stderr_limit, s.output_limit) == (2048, 4096, 8192)
    assert s.timeout_grace == 2.5
    assert s.worker_id == "w-7"
    assert (s.web_host, s.web_port) == ("127.0.0.1", 8080)
    assert s.shutdown_grace == 0
    assert s.commit_interval == 0.25
    assert (s.log_level, s.log_format) == ("DEBUG", "json")


def test_env_var_names_are_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("tako_pool_size", "9")
    assert Settings().pool_size == 9


@pytest.mark.parametrize("value", ["1", "true", "yes", "on"])
def test_boolean_spellings(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("TAKO_KAFKA_IDEMPOTENCE", value)
    assert Settings().kafka_idempotence is True


def test_unrelated_and_unknown_vars_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POOL_SIZE", "99")
    monkeypatch.setenv("TAKO_NOT_A_SETTING", "x")
    assert Settings().pool_size == 4


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TAKO_POOL_SIZE", "0"),
        ("TAKO_POOL_SIZE", "257"),
        ("TAKO_POOL_SIZE", "many"),
        ("TAKO_TOPIC_PARTITIONS", "0"),
        ("TAKO_TOPIC_REPLICATION", "-1"),
        ("TAKO_STDOUT_LIMIT", "1023"),
        ("TAKO_STDERR_LIMIT", "10"),
        ("TAKO_OUTPUT_LIMIT", "big"),
        ("TAKO_TIMEOUT_GRACE", "0.1"),
        ("TAKO_WEB_PORT", "65536"),
        ("TAKO_WEB_PORT", "-1"),
        ("TAKO_SHUTDOWN_GRACE", "-1"),
        ("TAKO_COMMIT_INTERVAL", "0"),
        ("TAKO_LOG_FORMAT", "xml"),
        ("TAKO_KAFKA_IDEMPOTENCE", "maybe"),
        ("TAKO_KAFKA_FETCH_WAIT_MS", "0"),
        ("TAKO_KAFKA_FETCH_WAIT_MS", "60000"),
    ],
)
def test_bad_values_are_rejected(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as info:
        Settings()
    field = name.removeprefix("TAKO_").lower()
    assert any(err["loc"][0] == field for err in info.value.errors())


def test_constructor_arguments_win_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAKO_POOL_SIZE", "12")
    assert Settings(pool_size=2).pool_size == 2


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(ValidationError):
        s.pool_size = 5  # type: ignore[misc]


def test_api_keys_are_kept_as_digests_and_never_shown() -> None:
    settings = Settings(gateway_api_keys=" a-key , another ,, ")
    assert settings.api_key_digests == {
        hashlib.sha256(b"a-key").hexdigest(),
        hashlib.sha256(b"another").hexdigest(),
    }
    assert "a-key" not in repr(settings) and "another" not in str(settings.model_dump())
    assert Settings().api_key_digests == frozenset()  # off by default
