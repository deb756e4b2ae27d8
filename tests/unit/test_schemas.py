"""The checked-in JSON Schemas are exactly what the models generate, and they describe them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from tako_stream.core import schemas
from tako_stream.core.models import MESSAGE_MODELS, ExecutionRequest

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"

VALID_REQUEST: dict[str, Any] = {
    "execution_id": "job-42",
    "code": "import json\nprint(json.load(open('/input/data.json')))\n",
    "input_data": {"numbers": [1, 2, 3], "name": "tako"},
    "timeout": 10,
    "job_type": "default",
    "memory_limit": "256m",
    "reply_to": "my.replies",
    "metadata": {"trace": "abc"},
    "requirements": ["json5>=0.9"],
    "startup_timeout": 30,
    "idempotency_key": "order-42-attempt",
    "parent_execution_id": "job-41",
    "relationship": "rerun",
}


def test_file_names_follow_the_model_keys() -> None:
    assert set(schemas.generate()) == {f"{key}.schema.json" for key in MESSAGE_MODELS}


@pytest.mark.parametrize("name", sorted(schemas.generate()))
def test_checked_in_schema_is_up_to_date(name: str) -> None:
    path = SCHEMA_DIR / name
    assert path.is_file(), f"{path} is missing: run scripts/gen-schemas"
    assert path.read_text(encoding="utf-8") == schemas.generate()[name], (
        f"{path} is out of date with tako_stream/core/models.py: run scripts/gen-schemas"
    )


def test_no_stale_schema_files() -> None:
    present = {p.name for p in SCHEMA_DIR.glob("*.schema.json")}
    assert present == set(schemas.generate()), "stale schema files: run scripts/gen-schemas"


@pytest.mark.parametrize(("name", "text"), sorted(schemas.generate().items()))
def test_schema_is_json_with_title_dialect_and_id(name: str, text: str) -> None:
    schema = json.loads(text)
    assert isinstance(schema, dict)
    assert isinstance(schema.get("title"), str) and schema["title"]
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == f"https://tako-stream.dev/schemas/{name}"
    assert schema["type"] == "object"
    assert text.endswith("}\n")
    assert text == json.dumps(schema, indent=2, sort_keys=True) + "\n"


def test_titles_name_the_models() -> None:
    titles = {name: json.loads(text)["title"] for name, text in schemas.generate().items()}
    assert titles == {
        "execution-request.schema.json": "ExecutionRequest",
        "execution-result.schema.json": "ExecutionResult",
        "dlq-record.schema.json": "DLQRecord",
        "cancel-request.schema.json": "CancelRequest",
        "job-status.schema.json": "JobStatus",
        "worker-report.schema.json": "WorkerReport",
    }


def test_generate_is_deterministic() -> None:
    assert schemas.generate() == schemas.generate()


def test_write_creates_the_files(tmp_path: Path) -> None:
    target = tmp_path / "out"
    written = schemas.write(target)
    assert sorted(p.name for p in written) == sorted(schemas.generate())
    for path in written:
        assert path.parent == target
        assert path.read_text(encoding="utf-8") == schemas.generate()[path.name]


def test_main_writes_into_the_given_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert schemas.main([str(tmp_path / "x")]) == 0
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == sorted(schemas.generate())
    assert "execution-request.schema.json" in capsys.readouterr().out


def _types(prop: dict[str, Any]) -> set[str]:
    if "type" in prop:
        return {prop["type"]}
    return {t for option in prop.get("anyOf", []) for t in _types(option)}


_JSON_TYPE = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    dict: "object",
    list: "array",
    type(None): "null",
}


def test_valid_request_example_matches_model_and_schema() -> None:
    request = ExecutionRequest.model_validate(VALID_REQUEST)
    assert request.model_dump(mode="json") == {**VALID_REQUEST, "timeout": 10.0}

    schema = json.loads(schemas.generate()["execution-request.schema.json"])
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"code"}
    assert set(schema["required"]) <= set(VALID_REQUEST)
    assert set(schema["properties"]) == set(ExecutionRequest.model_fields)
    assert set(VALID_REQUEST) == set(schema["properties"])
    for name, value in VALID_REQUEST.items():
        allowed = _types(schema["properties"][name])
        actual = _JSON_TYPE[type(value)]
        assert actual in allowed or (actual == "integer" and "number" in allowed), name


def test_request_schema_carries_the_limits() -> None:
    props = json.loads(schemas.generate()["execution-request.schema.json"])["properties"]
    assert props["code"]["maxLength"] == 100_000
    timeout = next(o for o in props["timeout"]["anyOf"] if o.get("type") == "number")
    assert (timeout["minimum"], timeout["maximum"]) == (1, 300)


@pytest.mark.parametrize(
    ("name", "model_key"),
    [
        ("execution-result.schema.json", "execution-result"),
        ("dlq-record.schema.json", "dlq-record"),
    ],
)
def test_output_schemas_match_model_fields(name: str, model_key: str) -> None:
    schema = json.loads(schemas.generate()[name])
    model = MESSAGE_MODELS[model_key]
    assert set(schema["properties"]) == set(model.model_fields)
    no_default = {name for name, field in model.model_fields.items() if field.is_required()}
    assert set(schema["required"]) == no_default


@pytest.mark.parametrize(
    ("fields", "valid"),
    [
        ({"requirements": ["numpy>=1.20"] * 50}, True),
        ({"requirements": ["numpy"] * 51}, False),  # Tako VM: at most 50
        ({"requirements": [""]}, False),
        ({"startup_timeout": 10}, True),
        ({"startup_timeout": 600}, True),
        ({"startup_timeout": 9}, False),  # Tako VM: 10-600 s
        ({"startup_timeout": 601}, False),
        ({"parent_execution_id": "a", "relationship": "fork"}, True),
        ({"parent_execution_id": "a"}, False),  # lineage is both or neither
        ({"relationship": "rerun"}, False),
        ({"parent_execution_id": "a", "relationship": "clone"}, False),
        ({"idempotency_key": "short"}, False),
        ({"idempotency_key": "a-valid_key-123"}, True),
    ],
)
def test_tako_vm_request_fields(fields: dict[str, Any], valid: bool) -> None:
    body = {"code": "print(1)", **fields}
    if valid:
        ExecutionRequest.model_validate(body)
    else:
        with pytest.raises(ValidationError):
            ExecutionRequest.model_validate(body)
