"""Submit the example jobs to a running worker and show their results (used by scripts/run)."""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path

import orjson

from tako_stream.client import Producer, ResultReader
from tako_stream.settings import Settings

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ROWS = {"rows": [{"x": 1, "y": 2.5}, {"x": 3, "y": 4.5}, {"x": 5, "y": 8.0}]}


def jobs() -> list[tuple[str, dict[str, object]]]:
    read = lambda name: (EXAMPLES / name).read_text()  # noqa: E731
    return [
        (
            "word count",
            {
                "code": read("word_count.py"),
                "input_data": {"text": "the cat and the hat and the bat"},
            },
        ),
        (
            "pandas in data-processing",
            {"code": read("pandas_stats.py"), "input_data": ROWS, "job_type": "data-processing"},
        ),
        ("pandas in default", {"code": read("pandas_stats.py"), "input_data": ROWS}),
        ("division by zero", {"code": read("divide.py"), "input_data": {"value": 0}}),
        ("syntax error", {"code": "def broken("}),
        ("timeout (5 s)", {"code": "import time; time.sleep(60)", "timeout": 5}),
        (
            "memory bomb (64m)",
            {"code": "x = []\nwhile True: x.append(bytearray(8 << 20))", "memory_limit": "64m"},
        ),
        ("invalid request", {"code": "   ", "timeout": 900}),
    ]


async def main() -> int:
    settings = Settings()
    named = [(name, {"execution_id": str(uuid.uuid4()), **body}) for name, body in jobs()]
    async with ResultReader(settings) as reader, Producer(settings) as producer:
        for name, body in named:
            await producer.submit(body, correlation_id=f"demo-{name.split()[0]}")
        found = await reader.wait_for({str(b["execution_id"]) for _, b in named}, 180)
    print(f"\n{'job':28} {'status':10} {'error':16} {'time':>7}  output / message")
    print("-" * 100)
    for name, body in named:
        r = found.get(str(body["execution_id"]))
        if r is None:
            print(f"{name:28} (no result)")
            continue
        message = r.error.message if r.error else ""
        detail = orjson.dumps(r.output).decode() if r.success else message
        error = r.error.type.value if r.error else "-"
        print(f"{name:28} {r.status.value:10} {error:16} {r.execution_time:6.2f}s  {detail[:60]}")
    first = found.get(str(named[0][1]["execution_id"]))
    if first is not None:
        print("\nOne result as it appears on the results topic:")
        print(orjson.dumps(first.model_dump(mode="json"), option=orjson.OPT_INDENT_2).decode())
    return 0 if len(found) == len(named) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
