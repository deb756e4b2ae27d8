"""A job's artifacts, from what the sandbox collected to the result that lists them.

``attach`` (called by ``verdict.answer``) lists what the sandbox brought back (names, sizes and
SHA-256 computed here, on the host) and keeps the bytes on the result, unserialised, for the
publisher; ``Publisher`` sends each to the artifacts topic before the result and keeps in the
listing only those the broker acknowledged (the others move to ``artifacts_skipped``, with why).
"""

from __future__ import annotations

from tako_stream.core.models import ExecutionResult, SkippedArtifact
from tako_stream.kafka.artifacts import describe
from tako_stream.sandbox.protocol import Collected


def attach(result: ExecutionResult, collected: Collected) -> None:
    """List ``collected``'s artifacts on ``result`` and keep their bytes for publishing."""
    result.artifacts = [describe(name, data) for name, data in collected.artifacts]
    skipped = collected.report.artifacts_skipped if collected.report else []
    result.artifacts_skipped = [
        SkippedArtifact(name=name, reason=reason)
        for name, reason in [*skipped, *collected.artifacts_refused]
    ]
    result.hold_artifact_bytes(dict(collected.artifacts))


def pending(result: ExecutionResult) -> dict[str, bytes]:
    """The bytes of ``result``'s artifacts not yet published (empty once they were)."""
    return result.artifact_bytes()
