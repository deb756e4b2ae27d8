"""The Python snippets of Tako VM's error-handling guide (../shared/seed), copied as written.

The test runs them against the gateway on localhost:8000, the address they hard-code. Only the
imports and the two exception classes the guide leaves to the reader are added here.
"""
# ruff: noqa
# mypy: ignore-errors

import time

import requests


class ResourceError(Exception):
    pass


class RetryableError(Exception):
    pass


def execute_safely(code, input_data, **kwargs):
    """Execute code with error handling."""
    try:
        response = requests.post(
            "http://localhost:8000/execute",
            json={"code": code, "input_data": input_data, **kwargs},
            timeout=kwargs.get("timeout", 30) + 10  # HTTP timeout
        )
        response.raise_for_status()

    except requests.exceptions.Timeout:
        return {"success": False, "error": "HTTP request timed out"}
    except requests.exceptions.ConnectionError:
        return {"success": False, "error": "Cannot connect to Tako VM"}
    except requests.exceptions.HTTPError as e:
        return {"success": False, "error": f"HTTP error: {e}"}

    result = response.json()

    if not result["success"]:
        # Log or handle the error
        print(f"Execution failed: {result.get('error')}")
        print(f"Stderr: {result.get('stderr')}")

    return result


def handle_execution_result(result):
    """Handle execution result based on error type."""
    if result.get("success"):
        return result["output"]

    error = result.get("error", {})
    error_type = error.get("type") if isinstance(error, dict) else None

    # Permanent errors - don't retry
    if error_type in ["syntax_error", "import_error", "name_error"]:
        raise ValueError(f"Code error: {error}")

    # Resource errors - might need adjustment
    if error_type in ["oom", "timeout"]:
        raise ResourceError(f"Resource limit exceeded: {error}")

    # Transient errors - safe to retry
    if error_type in ["service_unavailable", "network_error"]:
        raise RetryableError(f"Temporary failure: {error}")

    # Unknown error
    raise RuntimeError(f"Execution failed: {error}")


def execute_with_retry(code, input_data, max_retries=3, **kwargs):
    """Execute with automatic retry on transient failures."""

    # Error types that are safe to retry
    RETRYABLE_ERRORS = {"service_unavailable", "network_error", "network_timeout"}
    # Error types that should not be retried
    PERMANENT_ERRORS = {"syntax_error", "import_error", "name_error", "type_error"}

    for attempt in range(max_retries):
        result = execute_safely(code, input_data, **kwargs)

        if result["success"]:
            return result

        # Check error type
        error = result.get("error", {})
        error_type = error.get("type") if isinstance(error, dict) else None

        # Don't retry permanent failures
        if error_type in PERMANENT_ERRORS:
            return result

        # Only retry transient failures
        if error_type not in RETRYABLE_ERRORS:
            return result

        # Retry with exponential backoff
        if attempt < max_retries - 1:
            wait = 2 ** attempt  # 1, 2, 4 seconds
            print(f"Retrying in {wait}s (attempt {attempt + 2}/{max_retries})...")
            time.sleep(wait)

    return result


def check_system_health():
    """Check Tako VM system health."""
    health = requests.get("http://localhost:8000/health").json()
    dlq = requests.get("http://localhost:8000/dlq/stats").json()

    issues = []

    if health["status"] != "healthy":
        issues.append(f"System degraded: {health['circuit_breaker']['state']}")

    if health["circuit_breaker"]["state"] == "open":
        issues.append("Circuit breaker open - Docker issues")

    if dlq["total"] > 10:
        issues.append(f"High DLQ count: {dlq['total']} failed jobs")

    return issues
