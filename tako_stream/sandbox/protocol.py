"""Host side of the supervisor protocol: the job sent on stdin, the frames read from stdout.

Everything read here comes from inside a container that ran untrusted code, so the parser
caps every buffer and tolerates garbage (a broken frame ends the stream; it never raises).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import marshal
import math
import re
import struct
import zlib
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from tako_stream.settings import OutputCaps

FRAME = struct.Struct(">BI")
STDOUT, STDERR, RESULT, ARTIFACT, REPORT = 1, 2, 3, 4, 9
NAME_LEN = struct.Struct(">H")
#: An artifact's name, as the supervisor accepts it (checked again here: it names a Kafka key).
ARTIFACT_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}", re.ASCII)
#: Skipped entries kept from a report (the supervisor names at most 33).
SKIPPED_MAX = 64
#: Written to a running container's stdin to cancel its job.
CANCEL = b"C"
#: The job's uid/gid inside the container: ``nobody``, present in every Debian-based image.
JOB_UID = JOB_GID = 65534
JOB_PYTHON = "/usr/bin/python3"


def supervisor_source() -> str:
    """The supervisor's code, passed to ``python3 -c`` so images need nothing of ours."""
    return resources.files("tako_stream.sandbox").joinpath("supervisor.py").read_text()


#: The first code of every sandbox container (``python3 -I -S -c SUPERVISOR_BOOT``): it reads the
#: supervisor from stdin (``supervisor_boot``, which the host writes as the container starts,
#: before any job), as bytecode when the image's interpreter reads this worker's (the same
#: bytecode magic number, as for a ``.pyc``), else compiled from its source.  Compiling the
#: supervisor's 28 KB took 8 ms of CPU in every container; loading its bytecode takes 0.1 ms.
#: Not on the command line: Docker writes a container's whole configuration to disk and decodes
#: it again at each of its half a dozen state changes, and containerd, the shim and the runtime
#: each parse the OCI spec that holds the command; 39 KB of command cost the engine more CPU
#: per container than the compile it saved (profiled: dockerd's checkpoints alone 9 against 3
#: ms).  Only ``posix`` and ``marshal`` are used, both loaded by every interpreter's start (zlib,
#: for the source, only when it is needed, and forgotten again: the job's interpreter inherits
#: the supervisor's modules); ``sys.argv`` is left as ``-c`` leaves it, and the code runs in
#: ``__main__``, as it would from ``-c``.  Exit 3 (the supervisor's "no job") if stdin ends
#: before the supervisor has come.
SUPERVISOR_BOOT = """\
import sys, posix, marshal
def _take(size):
    data = b""
    while len(data) < size:
        part = posix.read(0, size - len(data))
        if not part:
            raise SystemExit(3)
        data += part
    return data
_head = _take(12)
_code = _take(int.from_bytes(_head[4:8], "big"))
_source = _take(int.from_bytes(_head[8:12], "big"))
if sys.modules["_frozen_importlib_external"].MAGIC_NUMBER == _head[:4]:
    _code = marshal.loads(_code)
else:
    import zlib
    _code = compile(zlib.decompress(_source), "<string>", "exec")
    del sys.modules["zlib"], zlib
del _take, _head, _source, posix, marshal
exec(_code)
"""
#: The boot's header: the bytecode's magic number (4 bytes), then the bytecode's and the
#: compressed source's lengths.
BOOT_HEAD = struct.Struct(">4sII")


def supervisor_command(python: str) -> tuple[str, ...]:
    """The sandbox container's command: ``python`` booting the supervisor (``SUPERVISOR_BOOT``),
    isolated (``-I``) and without site (``-S``: the job's interpreter does the site itself)."""
    return (python, "-I", "-S", "-c", SUPERVISOR_BOOT)


@functools.cache
def supervisor_boot() -> bytes:
    """What the host writes to a new container's stdin before anything else: the supervisor's
    bytecode (as this worker's interpreter compiles it) and its source (zlib), for
    ``SUPERVISOR_BOOT``."""
    source = supervisor_source().encode()
    # optimize=2 leaves the docstrings out (a fifth of the bytecode); it has no asserts
    code = marshal.dumps(compile(source, "<string>", "exec", optimize=2))
    packed = zlib.compress(source, 9)
    return BOOT_HEAD.pack(importlib.util.MAGIC_NUMBER, len(code), len(packed)) + code + packed


def encode_job(
    *,
    code: str,
    input_json: bytes,
    timeout: float,
    caps: OutputCaps,
    cancel_grace: float = 2.0,
    python: str = JOB_PYTHON,
) -> bytes:
    """The job for the supervisor's stdin: a length, a one-line ASCII header, code and input.

    Not JSON: decoding JSON would make the supervisor import ``json`` (and ``re``), a third of
    its start-up, which every job pays.  Code keeps lone surrogates (``surrogatepass``), as
    Python source read back from the file reports them.  ``caps.artifact_files`` 0 collects
    none.  The caps are named here and in ``FrameReader.for_caps`` only, so the supervisor
    keeps to the same caps the host checks its frames against.  A ``python`` other than the
    supervisor's own interpreter is started for the job (tests use it to compare that start
    with the supervisor's forked child, which every job uses).
    """
    code_bytes = code.encode("utf-8", "surrogatepass")
    fields = {
        "timeout": repr(float(timeout)),
        "cancel_grace": repr(float(cancel_grace)),
        "stdout_cap": int(caps.stdout),
        "stderr_cap": int(caps.stderr),
        "result_cap": int(caps.result),
        "artifact_files": max(0, int(caps.artifact_files)),
        "artifact_file_cap": max(0, int(caps.artifact_file)),
        "artifact_total_cap": max(0, int(caps.artifact_total)),
        "uid": JOB_UID,
        "gid": JOB_GID,
        "python": python,
        "code": len(code_bytes),
        "input": len(input_json),
    }
    header = " ".join(["tako-job", "1", *(f"{name}={value}" for name, value in fields.items())])
    payload = header.encode("ascii") + b"\n" + code_bytes + input_json
    return struct.pack(">Q", len(payload)) + payload


@dataclass
class Report:
    """What the supervisor said about the job's end, validated field by field."""

    exit_code: int | None = None
    timed_out: bool = False
    elapsed: float | None = None
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    stderr_tail: str = ""
    exception: list[str] = field(default_factory=list)
    result_error: str | None = None
    cancelled: bool = False
    #: Peak resident memory of the job's process (KiB) and its user + system CPU time (ms);
    #: None when the supervisor could not reap it or reported nonsense.
    max_rss_kb: int | None = None
    cpu_ms: int | None = None
    #: Entries of /output not collected: (name as shown, why).
    artifacts_skipped: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def parse(cls, data: bytes) -> Report | None:
        try:
            raw = json.loads(data)
        except (ValueError, RecursionError):
            return None
        if not isinstance(raw, dict):
            return None
        report = cls()
        report.exit_code = _count(raw.get("exit_code"), MAX_EXIT_CODE)
        elapsed = raw.get("elapsed")
        if (
            isinstance(elapsed, (int, float))
            and not isinstance(elapsed, bool)
            and math.isfinite(elapsed)
            and 0 <= elapsed <= MAX_ELAPSED  # its milliseconds are the result's wall_time_ms
        ):
            report.elapsed = float(elapsed)
        for name in ("timed_out", "stdout_truncated", "stderr_truncated", "cancelled"):
            setattr(report, name, raw.get(name) is True)
        if isinstance(raw.get("stderr_tail"), str):
            report.stderr_tail = raw["stderr_tail"][-16384:]
        names = raw.get("exception")
        if isinstance(names, list):
            report.exception = [n for n in names[:64] if isinstance(n, str) and len(n) < 256]
        if isinstance(raw.get("result_error"), str):
            report.result_error = raw["result_error"][:1024]
        report.max_rss_kb = _count(raw.get("max_rss_kb"), MAX_RSS_KB)
        report.cpu_ms = _count(raw.get("cpu_ms"), MAX_CPU_MS)
        skipped = raw.get("artifacts_skipped")
        if isinstance(skipped, list):
            for item in skipped[:SKIPPED_MAX]:
                if isinstance(item, dict):
                    shown, why = item.get("name"), item.get("reason")
                    if isinstance(shown, str) and isinstance(why, str):
                        report.artifacts_skipped.append((shown[:160], why[:256]))
        return report


#: Ceilings past which a reported figure is not believed: no container here has 1 TiB of memory,
#: and no job runs for a week of CPU time, nor of wall time (seconds).  Each figure goes into
#: the result as an integer, which must fit 64 bits to be written at all.
MAX_RSS_KB = 1 << 30
MAX_CPU_MS = 7 * 24 * 3600 * 1000
MAX_ELAPSED = 7 * 24 * 3600.0
#: The supervisor reports the job's exit status (0-255), or 128+N when signal N ended it.
MAX_EXIT_CODE = 255


def _count(value: object, ceiling: int) -> int | None:
    """A non-negative integer up to ``ceiling`` from untrusted JSON, else None."""
    if type(value) is not int or not 0 <= value <= ceiling:  # not bool, nor a float
        return None
    return value


@dataclass
class Collected:
    """Output gathered from the container, each stream capped on the host side too."""

    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    result: bytes | None = None
    report: Report | None = None
    diagnostics: bytearray = field(default_factory=bytearray)
    #: The artifacts accepted, in the order they came: (name, bytes).
    artifacts: list[tuple[str, bytes]] = field(default_factory=list)
    #: Artifacts the supervisor sent but the host refused (over a cap, a bad name): (name, why).
    artifacts_refused: list[tuple[str, str]] = field(default_factory=list)


class FrameReader:
    """Reassembles the supervisor's frames from the chunks Docker's attach stream delivers."""

    def __init__(
        self,
        *,
        stdout_cap: int,
        stderr_cap: int,
        result_cap: int,
        artifact_files: int = 0,
        artifact_file_cap: int = 0,
        artifact_total_cap: int = 0,
    ) -> None:
        self._buf = bytearray()
        self._caps = {STDOUT: stdout_cap, STDERR: stderr_cap}
        self._result_cap = result_cap
        self._artifact_files = artifact_files
        self._artifact_file_cap = artifact_file_cap
        self._artifact_total_cap = artifact_total_cap
        self._artifact_bytes = 0
        self.collected = Collected()
        self.broken = False

    @classmethod
    def for_caps(cls, caps: OutputCaps) -> FrameReader:
        """A reader holding a job's frames to ``caps``, the caps ``encode_job`` sent it."""
        return cls(
            stdout_cap=caps.stdout,
            stderr_cap=caps.stderr,
            result_cap=caps.result,
            artifact_files=caps.artifact_files,
            artifact_file_cap=caps.artifact_file,
            artifact_total_cap=caps.artifact_total,
        )

    @property
    def done(self) -> bool:
        return self.broken or self.collected.report is not None

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        self._buf += data
        while len(self._buf) >= FRAME.size:
            kind, size = FRAME.unpack_from(self._buf)
            if kind not in (STDOUT, STDERR, RESULT, ARTIFACT, REPORT) or size > self._limit(kind):
                self.broken = True
                return
            if len(self._buf) < FRAME.size + size:
                return
            chunk = bytes(self._buf[FRAME.size : FRAME.size + size])
            del self._buf[: FRAME.size + size]
            self._accept(kind, chunk)
            if self.done:
                return

    def _limit(self, kind: int) -> int:
        if kind == RESULT:
            return self._result_cap
        if kind == REPORT:
            return 1024 * 1024
        if kind == ARTIFACT:
            return NAME_LEN.size + 128 + min(self._artifact_file_cap, self._artifact_total_cap)
        return 1 << 20

    def _accept(self, kind: int, chunk: bytes) -> None:
        c = self.collected
        if kind == REPORT:
            c.report = Report.parse(chunk)
            if c.report is None:
                self.broken = True
        elif kind == RESULT:
            c.result = chunk
        elif kind == ARTIFACT:
            self._artifact(chunk)
        else:
            buf = c.stdout if kind == STDOUT else c.stderr
            room = self._caps[kind] - len(buf)
            if len(chunk) > room:
                chunk = chunk[: max(room, 0)]
                if kind == STDOUT:
                    c.stdout_truncated = True
                else:
                    c.stderr_truncated = True
            buf += chunk

    def _artifact(self, chunk: bytes) -> None:
        """Accept one artifact frame, re-checking every cap the supervisor should have kept."""
        c = self.collected
        (length,) = NAME_LEN.unpack_from(chunk) if len(chunk) >= NAME_LEN.size else (-1,)
        raw_name = chunk[NAME_LEN.size : NAME_LEN.size + length] if length >= 0 else b""
        data = chunk[NAME_LEN.size + length :] if length >= 0 else b""
        name = raw_name.decode("ascii", "replace")
        problem = None
        if length < 0 or len(raw_name) != length or ARTIFACT_NAME.fullmatch(name) is None:
            problem = "invalid name"
        elif name == "result.json" or any(name == seen for seen, _ in c.artifacts):
            problem = "sent twice"
        elif len(c.artifacts) >= self._artifact_files:
            problem = f"more than {self._artifact_files} files"
        elif len(data) > self._artifact_file_cap:
            problem = f"larger than {self._artifact_file_cap} bytes"
        elif self._artifact_bytes + len(data) > self._artifact_total_cap:
            problem = f"the job's artifacts would exceed {self._artifact_total_cap} bytes"
        if problem is not None:
            if len(c.artifacts_refused) < SKIPPED_MAX:
                c.artifacts_refused.append((name[:160], problem))
            return
        self._artifact_bytes += len(data)
        c.artifacts.append((name, data))

    def feed_diagnostics(self, data: bytes) -> None:
        """The supervisor's own stderr: kept short, for logs only."""
        room = 4096 - len(self.collected.diagnostics)
        if room > 0:
            self.collected.diagnostics += data[:room]


def decode_text(data: bytes | bytearray) -> str:
    """Output as text; bytes that are not UTF-8 are replaced, never fatal."""
    return bytes(data).decode("utf-8", "replace")


def job_summary(collected: Collected) -> dict[str, Any]:
    """A short, log-friendly view of what came back."""
    report = collected.report
    return {
        "stdout_bytes": len(collected.stdout),
        "stderr_bytes": len(collected.stderr),
        "exit_code": report.exit_code if report else None,
        "timed_out": report.timed_out if report else None,
    }
