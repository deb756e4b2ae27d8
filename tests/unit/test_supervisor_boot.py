"""How a sandbox container starts its supervisor: from bytecode when the image's interpreter
reads this worker's (no 8 ms compile in every container), else from its source."""

from __future__ import annotations

import base64
import subprocess
import sys
import zlib

from tako_stream.sandbox.protocol import supervisor_command

#: What read_job exits with when stdin ends before a job: the supervisor ran.
NO_JOB = 3


def run(command: tuple[str, ...]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)


def broken(blob: str) -> str:
    """A packed blob that decodes to something no interpreter can run."""
    return base64.b64encode(zlib.compress(b"\x00garbage" + base64.b64decode(blob)[:10])).decode()


def test_the_command_runs_the_supervisor() -> None:
    done = run(supervisor_command(sys.executable))
    assert done.returncode == NO_JOB, done.stderr


def test_an_interpreter_of_this_bytecode_runs_it_not_the_source() -> None:
    *boot, magic, code, source = supervisor_command(sys.executable)
    done = run((*boot, magic, code, broken(source)))
    assert done.returncode == NO_JOB, done.stderr


def test_another_interpreter_compiles_the_source() -> None:
    *boot, magic, code, source = supervisor_command(sys.executable)
    other = "00" * (len(magic) // 2)  # another bytecode magic: another interpreter's
    done = run((*boot, other, broken(code), source))
    assert done.returncode == NO_JOB, done.stderr


def test_the_supervisor_sees_argv_as_minus_c_leaves_it() -> None:
    *boot, _magic, code, _source = supervisor_command(sys.executable)
    probe = "import sys\nsys.exit(7 if sys.argv == ['-c'] and __name__ == '__main__' else 1)\n"
    packed = base64.b64encode(zlib.compress(probe.encode())).decode()
    done = run((*boot, "00", code, packed))
    assert done.returncode == 7, done.stderr


def test_the_supervisor_inherits_no_module_of_the_boot() -> None:
    *boot, _magic, code, _source = supervisor_command(sys.executable)
    probe = "import sys\nsys.exit(1 if {'zlib', 'binascii'} & set(sys.modules) else 7)\n"
    packed = base64.b64encode(zlib.compress(probe.encode())).decode()
    done = run((*boot, "00", code, packed))
    assert done.returncode == 7, done.stderr
