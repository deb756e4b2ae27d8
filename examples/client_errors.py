"""The seed guide's error handling, with tako_stream.Client over Kafka instead of HTTP.

Run against a worker: ``.venv/bin/python examples/client_errors.py`` (TAKO_* settings apply).
Prints one JSON line per case: how each result was handled.
"""

from __future__ import annotations

import asyncio
import json
import random

from tako_stream import RETRYABLE, Client, ErrorType, ExecutionResult

PERMANENT = {ErrorType.SYNTAX_ERROR, ErrorType.IMPORT_ERROR, ErrorType.NAME_ERROR}
RESOURCE = {ErrorType.OOM, ErrorType.TIMEOUT}


class ResourceError(Exception):
    pass


class RetryableError(Exception):
    pass


def handle_execution_result(result: ExecutionResult) -> object:
    """As in the guide: the output, or an exception saying what kind of failure it was."""
    if result.success:
        return result.output
    error_type = result.error.type if result.error else None
    message = result.error.message if result.error else result.status.value
    if error_type in PERMANENT:
        raise ValueError(f"Code error: {message}")
    if error_type in RESOURCE:
        raise ResourceError(f"Resource limit exceeded: {message}")
    if error_type in RETRYABLE:
        raise RetryableError(f"Temporary failure: {message}")
    raise RuntimeError(f"Execution failed: {message}")


async def execute_with_retry(
    client: Client, code: str, input_data: dict[str, object], max_retries: int = 3, **fields: object
) -> tuple[ExecutionResult, int]:
    """Retry only the error types worth retrying, with exponential backoff and jitter."""
    for attempt in range(1, max_retries + 1):
        result = await client.run(code, input_data, wait=120, **fields)
        error_type = result.error.type if result.error else None
        if result.success or error_type not in RETRYABLE or attempt == max_retries:
            return result, attempt
        await asyncio.sleep(2**attempt / 2 + random.uniform(0, 2**attempt / 2))
    raise AssertionError("unreachable")


CASES = {
    "ok": ("import json\njson.dump({'sum': 1 + 2}, open('/output/result.json', 'w'))", {}),
    "name_error": ("print(undefined_name)", {}),
    "timeout": ("import time\ntime.sleep(30)", {"timeout": 2}),
    "value_error": ("raise ValueError('bad value')", {}),
}


async def main() -> None:
    async with Client() as client:
        for name, (code, fields) in CASES.items():
            result, attempts = await execute_with_retry(client, code, {}, **fields)
            try:
                handled: object = {"output": handle_execution_result(result)}
            except Exception as exc:
                handled = {"raised": type(exc).__name__, "message": str(exc)}
            print(json.dumps({"case": name, "attempts": attempts, **handled}), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
