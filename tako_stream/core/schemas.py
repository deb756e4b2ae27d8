"""JSON Schemas of the messages, generated from ``models.MESSAGE_MODELS``.

``schemas/*.schema.json`` are checked in for producers and consumers in other languages; they
are regenerated with ``scripts/gen-schemas`` and a unit test keeps them equal to ``generate()``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

from tako_stream.core.models import MESSAGE_MODELS

DIALECT = "https://json-schema.org/draft/2020-12/schema"
BASE_ID = "https://tako-stream.dev/schemas/"

#: Requests are validated on the way in; results and DLQ records are what we serialise.
_MODES: dict[str, Literal["validation", "serialization"]] = {
    "execution-request": "validation",
    "execution-result": "serialization",
    "dlq-record": "serialization",
    "cancel-request": "validation",
    "job-status": "serialization",
}


def file_name(key: str) -> str:
    return f"{key}.schema.json"


def schema(key: str) -> dict[str, Any]:
    """The JSON Schema of one message, with ``$schema`` and ``$id`` set."""
    model = MESSAGE_MODELS[key]
    result = model.model_json_schema(mode=_MODES.get(key, "serialization"))
    result["$schema"] = DIALECT
    result["$id"] = BASE_ID + file_name(key)
    return result


def generate() -> dict[str, str]:
    """File name → JSON text, for every message model."""
    return {
        file_name(key): json.dumps(schema(key), indent=2, sort_keys=True) + "\n"
        for key in MESSAGE_MODELS
    }


def write(directory: Path) -> list[Path]:
    """Write every schema into ``directory`` (created if needed); the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in generate().items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    for path in write(Path(args[0] if args else "schemas")):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
