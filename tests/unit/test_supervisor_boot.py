"""How a sandbox container starts its supervisor: a small command that reads the supervisor from
stdin, as bytecode when the image's interpreter reads this worker's (no 8 ms compile in every
container), else from its source."""

from __future__ import annotations

import subprocess
import sys
import zlib

from tako_stream.core.jobtypes import JobTypes, default_limits
from tako_stream.sandbox.docker import container_config
from tako_stream.sandbox.protocol import BOOT_HEAD, supervisor_boot, supervisor_command

#: What read_job exits with when stdin ends before a job: the supervisor ran.
NO_JOB = 3


def run(stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        supervisor_command(sys.executable), input=stdin, capture_output=True, timeout=60
    )


def parts() -> tuple[bytes, bytes, bytes]:
    """The boot's bytecode magic, bytecode and compressed source."""
    boot = supervisor_boot()
    magic, code_size, _ = BOOT_HEAD.unpack_from(boot)
    body = boot[BOOT_HEAD.size :]
    return magic, body[:code_size], body[code_size:]


def boot(magic: bytes, code: bytes, packed_source: bytes) -> bytes:
    return BOOT_HEAD.pack(magic, len(code), len(packed_source)) + code + packed_source


def test_the_boot_runs_the_supervisor() -> None:
    done = run(supervisor_boot())
    assert done.returncode == NO_JOB, done.stderr


def test_the_container_command_is_small() -> None:
    """Docker writes and re-reads a container's configuration at every state change, and the
    runtime parses the spec holding its command: the supervisor itself comes on stdin."""
    config = container_config(default_limits(JobTypes.load()["default"]), {})
    assert sum(len(arg) for arg in config["Cmd"]) < 2048


def test_an_interpreter_of_this_bytecode_runs_it_not_the_source() -> None:
    magic, code, _ = parts()
    done = run(boot(magic, code, zlib.compress(b"\x00garbage")))
    assert done.returncode == NO_JOB, done.stderr


def test_another_interpreter_compiles_the_source() -> None:
    magic, _, source = parts()
    other = bytes(len(magic))  # another bytecode magic: another interpreter's
    done = run(boot(other, b"\x00garbage", source))
    assert done.returncode == NO_JOB, done.stderr


def test_the_boot_reads_exactly_its_own_bytes() -> None:
    """The job follows the boot on the same stdin: the boot must leave it all to read_job."""
    probe = b"import os, sys\nsys.exit(7 if os.read(0, 100) == b'the job' else 1)\n"
    done = run(boot(b"\0\0\0\0", b"", zlib.compress(probe)) + b"the job")
    assert done.returncode == 7, done.stderr


def test_stdin_ending_early_is_no_job() -> None:
    for cut in (0, 5, BOOT_HEAD.size, len(supervisor_boot()) - 1):
        done = run(supervisor_boot()[:cut])
        assert done.returncode == NO_JOB, (cut, done.stderr)


def test_the_supervisor_sees_argv_as_minus_c_leaves_it() -> None:
    probe = b"import sys\nsys.exit(7 if sys.argv == ['-c'] and __name__ == '__main__' else 1)\n"
    done = run(boot(b"\0\0\0\0", b"", zlib.compress(probe)))
    assert done.returncode == 7, done.stderr


def test_the_supervisor_inherits_nothing_of_the_boot() -> None:
    probe = (
        b"import sys\n"
        b"leftover = {'zlib'} & set(sys.modules)\n"
        b"names = {'_take', '_head', '_source', 'posix', 'marshal', 'zlib'} & set(globals())\n"
        b"sys.exit(1 if leftover or names else 7)\n"
    )
    done = run(boot(b"\0\0\0\0", b"", zlib.compress(probe)))
    assert done.returncode == 7, done.stderr


def test_the_boot_fits_the_buffers_between_the_worker_and_the_container() -> None:
    """``_start`` writes the boot before the container's interpreter reads it: within the
    pipe's 64 KiB (and the socket's buffers before it) nothing waits for that interpreter."""
    assert len(supervisor_boot()) < 64 * 1024
