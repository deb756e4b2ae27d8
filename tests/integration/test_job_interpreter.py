"""The job's interpreter: the supervisor's forked child must be what ``python3 -I`` starts as.

Every job runs in the supervisor's forked child, made into the job's interpreter without
starting a second one (``become_job_interpreter``).  The supervisor still starts a separate
interpreter when a job names another Python (``encode_job(python=...)``); the real file behind
the image's ``/usr/bin/python3`` link does that here, so each case runs both ways in real
containers (runc and gVisor) and compares what the job saw, printed, returned and exited with.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import aiodocker
import pytest

from tako_stream.kafka.codec import dumps
from tako_stream.sandbox.protocol import JOB_PYTHON, Collected
from tako_stream.settings import OutputCaps
from tests.integration.sandboxrun import run_in_sandbox
from tests.runtimes import GVISOR_RUNTIME, require_gvisor

pytestmark = [pytest.mark.integration]

CAPS = OutputCaps()
#: The file the image's ``/usr/bin/python3`` links to: naming it starts a second interpreter.
SEPARATE_PYTHON = "/usr/bin/python3.11"

#: What a job can see of its interpreter and process, written to result.json.
PROBE = r"""
import builtins, gc, json, os, signal, sys, threading, resource
import __main__

def attempt(f):
    try:
        return f()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"

def stream(s):
    return {"repr": repr(s), "encoding": s.encoding, "errors": s.errors,
            "line_buffering": s.line_buffering, "write_through": s.write_through,
            "fileno": s.fileno(), "buffer": repr(type(s.buffer)), "raw": repr(s.buffer.raw),
            "dunder": s is getattr(sys, "__" + s.name.strip("<>") + "__")}

fds = {}
for fd in range(256):
    try:
        fds[fd] = oct(os.fstat(fd).st_mode)
    except OSError:
        pass
status = {}
with open("/proc/self/status") as f:
    for line in f:
        key, _, value = line.partition(":")
        if key.startswith(("Uid", "Gid", "Groups", "Cap", "NoNewPrivs", "Seccomp")):
            status[key] = value.strip()
umask = os.umask(0o22)
os.umask(umask)
probe = {
    "streams": [stream(sys.stdin), stream(sys.stdout), stream(sys.stderr)],
    "path": sys.path, "argv": sys.argv, "prefix": [sys.prefix, sys.base_prefix],
    "flags": {k: getattr(sys.flags, k) for k in dir(sys.flags)
              if not k.startswith("_") and k not in ("count", "index", "no_site")},
    "dont_write_bytecode": sys.dont_write_bytecode, "environ": dict(os.environ),
    "cwd": os.getcwd(), "umask": umask,
    "ids": [os.getuid(), os.geteuid(), os.getgid(), os.getegid(), os.getgroups()],
    "session_leader": [os.getsid(0) == os.getpid(), os.getpgid(0) == os.getpid()],
    "fds": fds, "status": status,
    "signals": {s.name: repr(signal.getsignal(s)) for s in signal.Signals
                if s not in (signal.SIGKILL, signal.SIGSTOP)},
    "blocked": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
    "rlimits": {n: resource.getrlimit(getattr(resource, n)) for n in dir(resource)
                if n.startswith("RLIMIT_")},
    "main": [sorted(dir(__main__)), __main__.__doc__, repr(__main__.__spec__),
             repr(__main__.__loader__), __main__.__package__],
    "globals": sorted(globals()), "name": __name__, "file": __file__,
    "builtins": sorted(dir(builtins)), "exit": repr(getattr(builtins, "exit", None)),
    "gc": [gc.isenabled(), gc.get_threshold()],
    "limits": [sys.getrecursionlimit(), sys.getswitchinterval(), sys.get_int_max_str_digits()],
    "threads": threading.active_count(), "hooks": [sys.excepthook.__name__, repr(sys.displayhook)],
    "modules": sorted(m for m in sys.modules if m not in ("select", "struct", "_struct")),
    "meta_path": [repr(m) for m in sys.meta_path],
    "proc_fd": attempt(lambda: sorted(os.listdir("/proc/self/fd"))),
    "proc_maps": attempt(lambda: len(open("/proc/self/maps").read()) > 0),
    "nice": os.nice(0), "affinity": sorted(os.sched_getaffinity(0)),
    "input": attempt(input), "stdin": attempt(sys.stdin.read),
    "options": [sys.warnoptions, sys._xoptions],
    "no_site": sys.flags.no_site,
    "proc_environ": attempt(lambda: sorted(
        item.split(b"=")[0].decode()
        for item in open("/proc/self/environ", "rb").read().split(b"\0") if item
    )),
}
print("out: h\u00e9llo \udcff", end="")
print("err: \udcff", file=sys.stderr)
with open("/output/result.json", "w") as f:
    json.dump(probe, f)
"""

#: How a job ends, each printed around: the interpreter's exit must treat them alike.
ENDINGS = {
    "probe": PROBE,
    "uncaught": "print('before')\ndef f():\n    raise KeyError('k')\nf()\n",
    "exception_subclass": "class Mine(ValueError):\n    pass\nraise Mine('m')\n",
    "exit_code": "import sys\nprint('partial', end='')\nsys.exit(3)\n",
    "exit_message": "import sys\nsys.exit('bye')\n",
    "os_exit_loses_buffer": "import os\nprint('lost', end='')\nos._exit(4)\n",
    "thread_and_atexit": (
        "import atexit, threading, time\n"
        "atexit.register(lambda: print('atexit ran'))\n"
        "def late():\n    time.sleep(0.2)\n    print('thread done')\n"
        "threading.Thread(target=late).start()\nprint('main done')\n"
    ),
    "killed_by_signal": (
        "import os, signal\nprint('x', flush=True)\nos.kill(os.getpid(), signal.SIGTERM)\n"
    ),
    "keyboard_interrupt": (
        "import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(5)\n"
    ),
    "import_main": "import __main__\nprint(sorted(vars(__main__)))\nprint(__name__, __file__)\n",
    "syntax_error": "def f(:\n    pass\n",
    "big_output": "import sys\nsys.stdout.write('y' * 200000)\nsys.stderr.write('z' * 5000)\n",
}


@pytest.fixture(params=["runc", GVISOR_RUNTIME])
async def runtime(request: pytest.FixtureRequest, docker: aiodocker.Docker) -> str | None:
    if request.param == GVISOR_RUNTIME:
        await require_gvisor(docker)
        return GVISOR_RUNTIME
    return None


async def run(docker: aiodocker.Docker, code: str, python: str, runtime: str | None) -> Collected:
    ran, _ = await run_in_sandbox(
        docker, code, caps=CAPS, runtime=runtime, input_json=dumps({"n": 1}), python=python
    )
    return ran.collected


def seen(collected: Collected) -> dict[str, Any]:
    """What the job left, less what differs from run to run (time, usage, addresses)."""
    assert collected.report is not None, bytes(collected.diagnostics)
    report = {
        k: v
        for k, v in dataclasses.asdict(collected.report).items()
        if k not in ("elapsed", "cpu_ms", "max_rss_kb")
    }
    result = json.loads(collected.result) if collected.result is not None else None
    return {
        "stdout": bytes(collected.stdout),
        "stderr": bytes(collected.stderr),
        "truncated": [collected.stdout_truncated, collected.stderr_truncated],
        "report": report,
        "result": result,
    }


@pytest.mark.parametrize("ending", sorted(ENDINGS))
async def test_the_forked_child_is_what_a_new_interpreter_would_be(
    docker: aiodocker.Docker, runtime: str | None, ending: str
) -> None:
    forked = seen(await run(docker, ENDINGS[ending], JOB_PYTHON, runtime))
    started = seen(await run(docker, ENDINGS[ending], SEPARATE_PYTHON, runtime))
    if ending == "probe":
        # The one difference a job can see: the supervisor's -S (it loads site itself).  It also
        # shows that each path ran: the forked child's flags are the supervisor's.
        assert (forked["result"].pop("no_site"), started["result"].pop("no_site")) == (1, 0)
        # The other: setuid without an exec leaves the job's process not dumpable, so its
        # /proc/self files are root's.  runc: its environ cannot be read (os.environ can);
        # gVisor shows it, as the process's initial environment: the container's.
        job_env = ["HOME", "LANG", "PATH", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED"]
        assert started["result"].pop("proc_environ") == job_env
        assert forked["result"].pop("proc_environ") == (
            ["HOME", "HOSTNAME", "LANG", "PATH"]
            if runtime == GVISOR_RUNTIME
            else "PermissionError: [Errno 13] Permission denied: '/proc/self/environ'"
        )
    assert forked == started
