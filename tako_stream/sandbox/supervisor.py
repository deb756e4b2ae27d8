"""The in-container supervisor: the first program of every sandbox container.

It runs *inside* the container (a small boot on the command line reads it from stdin, as
bytecode when the image's interpreter reads the worker's and as source otherwise:
``protocol.SUPERVISOR_BOOT``; so any
image with a Python 3 interpreter works, and a warm container can wait for a job it has not
seen yet), and it must stay stdlib-only and self-contained: nothing else of tako_stream exists
in the image.

Why a supervisor rather than running the user's file directly:

* code and input arrive on stdin (a read-only root filesystem refuses ``put_archive``, and bind
  mounts would tie workers to the host's paths); the supervisor, still root but holding only
  CAP_SETUID/CAP_SETGID, writes them into root-owned tmpfs mounts, so they are truly read-only
  for the job, which then runs as ``nobody`` with no capabilities at all;
* it enforces the timeout from inside, so a timed-out job still reports the output it produced;
  the host enforces a later deadline from outside in case the supervisor itself is starved;
* it reads ``/output/result.json`` only after every job process is dead, without following links
  and capped in size (Judge0 CVE-2024-28185/28189 were host writes through planted symlinks);
* it caps stdout/stderr while reading, so a 1 GB flood costs the job's CPU, not the host's memory;
* the same way it collects the job's artifacts: the other regular files at the top level of
  ``/output`` (subdirectories are not entered), each opened without following links and
  without blocking, at most ``artifact_files`` of them, each at most ``artifact_file_cap``
  bytes and all together at most ``artifact_total_cap``; a file over a cap is skipped whole
  (a truncated image or archive is useless) and every skipped entry is named in the report.

Protocol.  stdin: an 8-byte big-endian length, then the job: one ASCII header line of
``tako-job 1`` and ``name=value`` fields (the code's and the input's byte lengths among them),
then the code's bytes and the input's (see ``encode_job`` in ``tako_stream.sandbox.protocol``).
stdout: frames of a 1-byte kind, a 4-byte big-endian length and the data; kinds: 1 stdout
chunk, 2 stderr chunk, 3 result.json bytes, 4 an artifact (a 2-byte big-endian name length,
the name, then the file's bytes), 9 the final report (JSON).  The host treats all of
it as untrusted input.  After the job, stdin stays open for control: a ``C`` byte cancels it
(SIGTERM to every job process, SIGKILL ``cancel_grace`` seconds later), and the report then
says ``"cancelled": true``.

The job runs in the supervisor's forked child, made what ``python3 -I`` would start as
(``become_job_interpreter``): a second interpreter's start was a sixth of a container's cost.
Whatever the supervisor imports is therefore also already imported for the job.

Start-up is on every job's path (a warm pool only moves it earlier), so the supervisor imports
nothing that costs: no ``json`` (it pulls in ``re`` and ``enum``: 14 ms), no ``signal`` (``enum``:
7 ms) and no ``typing`` (6 ms), against 11 ms for the interpreter itself.  Hence the plain-text
job header, the small JSON writer for the report and the signal numbers below.
"""

import os
import select
import struct
import sys
import time

FRAME = struct.Struct(">BI")
SIGKILL, SIGTERM = 9, 15  # Linux's numbers, as signal.SIGKILL and signal.SIGTERM
STDOUT, STDERR, RESULT, ARTIFACT, REPORT = 1, 2, 3, 4, 9
CHUNK = 65536
#: An artifact's name: letters, digits, '.', '_' and '-', at most 128 of them, no leading dot.
NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
NAME_MAX = 128
#: Entries of /output looked at (a job may create thousands): the rest is reported, not read.
SCAN_MAX = 1024
#: Skipped entries named one by one in the report; more are counted in one last entry.
SKIPPED_MAX = 32
NAME_LEN = struct.Struct(">H")
TAIL = 8192  # bytes of stderr kept for classifying the final exception, even when truncated

# Runs in the job's own interpreter before its code: installs an excepthook that reports the
# exception's MRO on fd 3 (so a subclass of ValueError classifies as value_error) and prints the
# traceback without this prelude's frames, so users see a plain traceback of their own file.
PRELUDE = r"""
import os, sys
def _hook(t, v, tb):
    import traceback  # ~15 ms of imports: paid only when there is a traceback to print
    try:
        names = [c.__name__ if c.__module__ == "builtins" else c.__module__ + "." + c.__qualname__
                 for c in t.__mro__]
        os.write(3, ("\n".join(names) + "\n").encode())
    except Exception:
        pass
    while tb is not None and tb.tb_frame.f_code.co_filename != "/code/main.py":
        tb = tb.tb_next
    traceback.print_exception(t, v, tb)
sys.excepthook = _hook
sys.argv = ["/code/main.py"]
sys.path.insert(0, "/code")
del _hook
with open("/code/main.py", "rb") as _f:
    _code = compile(_f.read(), "/code/main.py", "exec")
del _f
exec(_code, {"__name__": "__main__", "__file__": "/code/main.py", "__builtins__": __builtins__})
"""


def emit(kind: int, data: bytes) -> None:
    view = memoryview(FRAME.pack(kind, len(data)) + data)
    while view:
        written = os.write(1, view)
        view = view[written:]


class Job:
    """One job, as ``encode_job`` on the host wrote it."""

    def __init__(self, payload: bytes) -> None:
        header, _, body = payload.partition(b"\n")
        words = header.decode("ascii").split(" ")
        if words[:2] != ["tako-job", "1"]:
            raise ValueError("not a version 1 job")
        fields: dict[str, str] = {}
        for word in words[2:]:
            name, _, value = word.partition("=")
            fields[name] = value
        code_size, input_size = int(fields["code"]), int(fields["input"])
        if len(body) != code_size + input_size:
            raise ValueError("job body length does not match its header")
        self.code = body[:code_size]
        self.input = body[code_size:]
        self.timeout = float(fields["timeout"])
        self.cancel_grace = float(fields["cancel_grace"])
        self.stdout_cap = int(fields["stdout_cap"])
        self.stderr_cap = int(fields["stderr_cap"])
        self.result_cap = int(fields["result_cap"])
        self.uid = int(fields["uid"])
        self.gid = int(fields["gid"])
        self.python = fields["python"]
        self.artifact_files = int(fields.get("artifact_files", "0"))
        self.artifact_file_cap = int(fields.get("artifact_file_cap", "0"))
        self.artifact_total_cap = int(fields.get("artifact_total_cap", "0"))


def read_job() -> Job:
    header = b""
    while len(header) < 8:
        part = os.read(0, 8 - len(header))
        if not part:
            sys.exit(3)  # the host went away before sending a job: nothing to run
        header += part
    (size,) = struct.unpack(">Q", header)
    chunks, left = [], size
    while left:
        part = os.read(0, min(left, 1 << 20))
        if not part:
            sys.exit(3)
        chunks.append(part)
        left -= len(part)
    return Job(b"".join(chunks))


#: JSON string escapes: quote, backslash and the control characters.
_ESCAPES = {i: f"\\u{i:04x}" for i in range(32)}
_ESCAPES.update({ord('"'): '\\"', ord("\\"): "\\\\"})


def to_json(value: object) -> str:
    """JSON for the report's values: None, bools, ints, finite floats, strings and lists."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if value - value == 0 else "null"  # NaN and infinities are not JSON
    if isinstance(value, str):
        return '"' + value.translate(_ESCAPES) + '"'
    if isinstance(value, list):
        return "[" + ",".join(to_json(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(to_json(str(k)) + ":" + to_json(v) for k, v in value.items()) + "}"
    raise TypeError(f"no JSON for {type(value).__name__}")


def write_readonly(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o444)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def drop_privileges(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


class RunJobHere(BaseException):
    """Raised in the job's forked child once it is the job's process: it unwinds the
    supervisor's frames to the top level, which runs ``PRELUDE`` (see the end of this file)."""


def become_job_interpreter(env: dict[str, str]) -> None:
    """Make this forked child what ``python3 -I -c PRELUDE`` would start as, without starting
    a second interpreter: that start is a sixth of what the engine's churn of a container
    costs (measured by ``scripts/bench_engine.py``), on every job's path.

    This interpreter already runs with ``-I`` (isolated: no ``PYTHON*`` variables, no user
    site, no script directory on ``sys.path``); what ``-S`` left out and the supervisor changed
    is redone here: the job's environment, standard streams on the new fds 0-2 built as the
    interpreter builds them (buffered, UTF-8, ``surrogateescape``; stderr line-buffered and
    ``backslashreplace``), the site directories, and a fresh ``__main__``.  The interpreter's
    own exit then handles ``SystemExit``, an uncaught exception, non-daemon threads and
    ``atexit`` as it does for any script.  ``sys.flags.no_site`` still says 1, and the
    supervisor's few modules (``select``, ``struct``, ``time``) stay imported.
    """
    from io import TextIOWrapper  # already imported: the interpreter's start-up needs it

    os.environ.clear()
    os.environ.update(env)
    streams = []
    for fd, name, mode, errors in (
        (0, "<stdin>", "r", "surrogateescape"),
        (1, "<stdout>", "w", "surrogateescape"),
        (2, "<stderr>", "w", "backslashreplace"),
    ):
        # open() sizes the buffer from the pipe's st_blksize, as the interpreter's start does
        buffered = open(fd, "rb" if fd == 0 else "wb", closefd=False)  # noqa: SIM115
        buffered.raw.name = name  # type: ignore[attr-defined]  # FileIO's, shown by repr()
        text = TextIOWrapper(
            buffered, encoding="utf-8", errors=errors, newline="\n", line_buffering=fd == 2
        )
        setattr(text, "mode", mode)  # noqa: B010  # typeshed's IO says read-only; it is not
        streams.append(text)
    sys.stdin, sys.stdout, sys.stderr = streams
    for name, text in zip(("__stdin__", "__stdout__", "__stderr__"), streams, strict=True):
        setattr(sys, name, text)  # as at start-up: the originals are the same objects
    import site

    site.main()
    # A fresh __main__ with what ``-c`` gives it; the supervisor's own (this file) stays alive
    # only through the frame that runs PRELUDE.
    fresh = type(sys)("__main__")
    loader = getattr(sys.modules["__main__"], "__loader__", None)
    fresh.__dict__.update(
        {"__builtins__": __builtins__, "__loader__": loader, "__annotations__": {}}
    )
    sys.modules["__main__"] = fresh


#: The job's uid and gid as the host sends them (``protocol.JOB_UID``): the job's process is
#: forked as these before its job arrives (``prepare_job``); a job naming others is started
#: the slow way.
JOB_UID = JOB_GID = 65534
#: The environment a job starts with.
JOB_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/tmp",
    "LANG": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUNBUFFERED": "1",
}
#: The fd the job's prepared process waits on for the go (closed before the job's code runs).
GO_FD = 4


def job_process(out_w: int, err_w: int, exc_w: int, go_r: int | None, uid: int, gid: int) -> None:
    """In a just-forked child: become the job's process (its session, fds 0-3, OOM score, uid,
    gid and cwd), with ``go_r`` (when given) moved to ``GO_FD`` and every other fd closed."""
    os.setsid()
    devnull = os.open("/dev/null", os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    os.dup2(exc_w, 3)
    if go_r is not None:
        os.dup2(go_r, GO_FD)
    os.closerange(GO_FD + (go_r is not None), 1024)
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")  # under memory pressure, the job dies, not the supervisor
    except OSError:
        pass
    drop_privileges(uid, gid)
    os.chdir("/tmp")


def prepare_job(out_w: int, err_w: int, exc_w: int, go_r: int) -> int | None:
    """Fork the job's process before the job arrives (None when no fork could be made): made
    the job's interpreter (``become_job_interpreter``), it waits for a byte on ``GO_FD`` and
    then runs the job the supervisor has written to /code and /input meanwhile; at EOF it
    exits (the job was for another interpreter or user).

    The fork and the interpreter's set-up were on every job's path, after the job arrived:
    ~3 ms under runc, 20-30 ms under gVisor (a fork, and the site's directory reads, cost far
    more under ptrace).  Now a warm container has done them before its job comes, and a cold
    one does them while the supervisor reads the job.  Nothing of the job's runs before the go,
    and it runs as ``nobody`` from the start, as before."""
    try:
        pid = os.fork()
    except OSError:
        return None
    if pid:
        return pid
    try:
        job_process(out_w, err_w, exc_w, go_r, JOB_UID, JOB_GID)
        become_job_interpreter(JOB_ENV)
        if os.read(GO_FD, 1) == b"g":
            os.close(GO_FD)
            raise RunJobHere()
    except RunJobHere:
        raise
    except BaseException as exc:
        os.write(2, f"tako supervisor: cannot start job: {exc!r}\n".encode())
        os._exit(127)
    os._exit(0)


def start_job(job: Job, out_w: int, err_w: int, exc_w: int) -> int:
    """Fork the job's process now: for a job whose interpreter or user is not the prepared
    one's (a second interpreter when ``job.python`` is another one)."""
    pid = os.fork()
    if pid:
        return pid
    try:
        job_process(out_w, err_w, exc_w, None, job.uid, job.gid)
        if job.python == sys.executable:
            become_job_interpreter(JOB_ENV)
            raise RunJobHere()
        os.execve(job.python, [job.python, "-I", "-c", PRELUDE], JOB_ENV)
    except RunJobHere:
        raise
    except BaseException as exc:
        os.write(2, f"tako supervisor: cannot start job: {exc!r}\n".encode())
    os._exit(127)


def go(job: Job, prepared: int | None, go_w: int, out_w: int, err_w: int, exc_w: int) -> int:
    """The job's process, running: the prepared one told to go, or (a job it was not prepared
    for, or none could be forked) one started now, the prepared one sent away and reaped."""
    usable = job.python == sys.executable and (job.uid, job.gid) == (JOB_UID, JOB_GID)
    if prepared is not None and usable:
        try:  # noqa: SIM105  # contextlib is an import (see the docstring: start-up cost)
            os.write(go_w, b"g")
        except OSError:
            pass  # it died meanwhile: its end is the job's, reported as any other
        os.close(go_w)
        return prepared
    os.close(go_w)  # EOF: the prepared process exits
    if prepared is not None:
        os.waitpid(prepared, 0)
    return start_job(job, out_w, err_w, exc_w)


class AsJob:
    """This process with the job's uid and gid as its effective ones (its real and saved uid
    stay root's), for signalling the job's processes and reading the files it left: root here
    has neither CAP_KILL nor CAP_DAC_OVERRIDE, so it could do neither as itself.

    Not a forked helper: a fork cost ~13 ms per job under gVisor (ptrace), and none can be
    made once a fork bomb has used up the pids.  The real uid staying root's is what keeps the
    job away meanwhile: a signal needs the sender's real or effective uid to match the
    target's real or saved one, and the change of credentials made this process undumpable,
    so nothing of the job's may signal or trace it.  Supplementary groups are dropped for good
    first (the supervisor needs none), so only the job's own permissions open its files.

    With the real uid root's, ``kill(-1)`` as the job would also reach a root process other
    than init and this one: there is none in the container (nothing is ever ``docker exec``'d
    into it).  And the job may not change this process's scheduling either: the kernel refuses
    it because this process's permitted capabilities (SETUID, SETGID) are not the job's (none),
    a reason to keep them.
    """

    def __init__(self, job: Job) -> None:
        self.uid, self.gid = job.uid, job.gid
        self.saved = (os.geteuid(), os.getegid())

    def __enter__(self) -> None:
        os.setgroups([])
        os.setegid(self.gid)
        try:
            os.seteuid(self.uid)  # last: it clears the effective capabilities setegid needs
        except BaseException:
            os.setegid(self.saved[1])
            raise

    def __exit__(self, *exc: object) -> None:
        uid, gid = self.saved
        os.seteuid(uid)  # first: it restores the effective capabilities setegid needs
        os.setegid(gid)


def terminate_job(job: Job) -> bool:
    """SIGTERM every job process; False when that could not be done (the job's ids could not
    be taken), so SIGKILL must follow now."""
    try:
        with AsJob(job):
            try:  # noqa: SIM105  # contextlib is an import (see the docstring: start-up cost)
                os.kill(-1, SIGTERM)
            except ProcessLookupError:
                pass  # none left
    except Exception:
        return False
    return True


def read_capped(fd: int, cap: int) -> bytes:
    """At most ``cap + 1`` bytes of ``fd``: one more than the cap says that it is over."""
    data = os.read(fd, cap + 1)
    while len(data) <= cap:
        more = os.read(fd, cap + 1 - len(data))
        if not more:
            break
        data += more
    return data


def valid_name(name: str) -> bool:
    return 0 < len(name) <= NAME_MAX and name[0] != "." and all(c in NAME_CHARS for c in name)


class Collected:
    """What the reaper read: result.json (or why not) and the artifacts."""

    def __init__(self) -> None:
        self.result: bytes | None = None
        self.result_error: str | None = None
        self.artifacts: list[tuple[bytes, bytes]] = []
        self.skipped: list[dict[str, str]] = []


def collect_artifacts(job: Job, collected: Collected, directory: str = "/output") -> None:
    """The artifacts of /output (see the module docstring) into ``collected``, and each
    entry skipped with the reason.

    Runs as the job's user after every job process is dead, so nothing changes under it; still
    every entry is opened with O_NOFOLLOW (a link is never followed: ELOOP) and O_NONBLOCK (a
    FIFO cannot hang it) and checked with fstat to be a regular file before a byte is read.
    """
    skipped = 0

    def skip(name: str, reason: str) -> None:
        nonlocal skipped
        skipped += 1
        if skipped <= SKIPPED_MAX:
            # a hostile name, shown capped
            collected.skipped.append({"name": name[:NAME_MAX], "reason": reason})

    names: list[str] = []
    unseen = False
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if len(names) == SCAN_MAX:
                    unseen = True
                    break
                names.append(entry.name)
    except OSError as exc:
        skip(directory, f"cannot list it: {exc.strerror}")
        return
    names.sort()
    count = total = 0
    for name in names:
        if name == "result.json":
            continue
        if not valid_name(name):
            skip(name, "invalid name (letters, digits, '.', '_', '-'; at most 128; no leading dot)")
            continue
        if count >= job.artifact_files:
            skip(name, f"more than {job.artifact_files} files")
            continue
        try:
            fd = os.open(directory + "/" + name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            skip(name, "a symbolic link: not followed" if exc.errno == 40 else exc.strerror or "")
            continue
        try:
            st = os.fstat(fd)
            if st.st_mode & 0o170000 != 0o100000:  # S_ISREG, without importing stat
                skip(name, "not a regular file")
                continue
            room = job.artifact_total_cap - total
            cap = min(job.artifact_file_cap, room)
            data = read_capped(fd, cap) if st.st_size <= cap else b""
            if st.st_size > cap or len(data) > cap:
                if st.st_size > job.artifact_file_cap or len(data) > job.artifact_file_cap:
                    skip(name, f"larger than {job.artifact_file_cap} bytes")
                else:
                    skip(name, f"the job's artifacts would exceed {job.artifact_total_cap} bytes")
                continue
        except OSError as exc:
            skip(name, f"cannot read it: {exc.strerror}")
            continue
        finally:
            os.close(fd)
        collected.artifacts.append((name.encode("ascii"), data))
        count += 1
        total += len(data)
    if unseen:
        skip("*", f"more than {SCAN_MAX} entries in {directory}: the others were not looked at")
    if skipped > SKIPPED_MAX:
        more = f"{skipped - SKIPPED_MAX} more skipped"
        collected.skipped.append({"name": "*", "reason": more})


def kill_job_processes(uid: int) -> None:
    """SIGKILL every process of the job's (``uid``) but this one (``kill(-1)`` spares the
    caller), again while one is still alive (forked as the signal went out, or still dying), at
    most three rounds.  Called as the job (``AsJob``).

    ``kill(-1)`` alone cannot tell: under runc it succeeds whenever a process other than the
    caller and init exists that it may not signal, so going by it every job waited out all
    three rounds (15 ms, a third of a warm job's time in its container).  gVisor answers
    ESRCH when nothing was there."""
    for _ in range(3):
        try:
            os.kill(-1, SIGKILL)
        except ProcessLookupError:
            return
        if alive_as(uid) is False:
            return
        time.sleep(0.005)


def alive_as(uid: int, proc: str = "/proc") -> bool | None:
    """Whether a process other than this one runs as ``uid`` (real, effective, saved or
    filesystem) and has not exited (a zombie has); None when ``proc`` cannot be read.  Read
    from each process's status file, readable by all even when the process is not dumpable
    (its directory is root's then)."""
    me, wanted = str(os.getpid()), str(uid).encode()
    try:
        names = os.listdir(proc)
    except OSError:
        return None
    for name in names:
        if not name.isdigit() or name == me:
            continue
        try:
            with open(f"{proc}/{name}/status", "rb") as status:
                lines = status.read(8192).split(b"\n")
        except OSError:
            continue  # gone meanwhile
        state = next((line[7:8] for line in lines if line.startswith(b"State:\t")), b"")
        uids = next((line[5:].split() for line in lines if line.startswith(b"Uid:\t")), [])
        if wanted in uids and state not in (b"Z", b"X"):
            return True
    return False


def reap_and_read_result(job: Job) -> Collected:
    """Kill every job process, then read result.json and the artifacts as the job's user
    (``AsJob``), never following links, each capped while read."""
    collected = Collected()
    try:
        with AsJob(job):
            kill_job_processes(job.uid)
            try:
                read_result(job, collected)
            except Exception as exc:  # the report must go out whatever happened here
                collected.result = None
                collected.result_error = f"could not read result.json: {exc!r}"
            if job.artifact_files > 0:
                try:
                    collect_artifacts(job, collected)
                except Exception as exc:  # the artifacts', not the result's: it stands
                    reason = f"the artifacts could not be collected: {exc!r}"[:200]
                    collected.skipped.append({"name": "*", "reason": reason})
    except Exception as exc:  # the job's ids could not be taken, or given back
        collected.result_error = collected.result_error or f"could not read result.json: {exc!r}"
    return collected


def read_result(job: Job, collected: Collected) -> None:
    try:
        fd = os.open("/output/result.json", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return
    except OSError as exc:
        collected.result_error = f"cannot open result.json: {exc.strerror}"
        return
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o170000 != 0o100000:  # S_ISREG, without importing stat
            collected.result_error = "result.json is not a regular file"
            return
        data = read_capped(fd, job.result_cap)
    finally:
        os.close(fd)
    if len(data) > job.result_cap:
        collected.result_error = f"result.json is larger than {job.result_cap} bytes"
    else:
        collected.result = data


Usage = tuple[int, int]  # peak RSS in KiB, user + system CPU time in ms


def wait_job(pid: int, options: int) -> tuple[int, int, Usage]:
    """``os.waitpid`` that also says what the job used: its process's struct rusage, which
    includes the descendants it reaped (orphans go to the container's init, uncounted).
    ``wait4`` imports ``resource`` for its result: 1 ms (5 ms under gVisor), paid once the
    job has ended, not at start-up."""
    reaped, status, rusage = os.wait4(pid, options)
    return reaped, status, (rusage.ru_maxrss, round((rusage.ru_utime + rusage.ru_stime) * 1000))


def late_reap(pid: int, status: int | None, usage: Usage | None) -> tuple[int | None, Usage | None]:
    """Reap the job's process now if it has ended and was not reaped yet (timed out, or
    cancelled and killed): its status and usage, else what was known."""
    if status is None:
        try:
            reaped, wstatus, rusage = wait_job(pid, os.WNOHANG)
        except ChildProcessError:
            return status, usage
        if reaped:
            return wstatus, rusage
    return status, usage


def main() -> None:
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    exc_r, exc_w = os.pipe()
    go_r, go_w = os.pipe()
    prepared = prepare_job(out_w, err_w, exc_w, go_r)
    os.close(go_r)
    job = read_job()
    write_readonly("/code/main.py", job.code)
    write_readonly("/input/data.json", job.input)
    started = time.monotonic()
    pid = go(job, prepared, go_w, out_w, err_w, exc_w)
    for fd in (out_w, err_w, exc_w):
        os.close(fd)
    try:
        pidfd: int | None = os.pidfd_open(pid)
    except OSError:
        pidfd = None  # ENOSYS under gVisor: poll waitpid instead
    deadline = started + job.timeout
    caps = {out_r: job.stdout_cap, err_r: job.stderr_cap}
    kinds = {out_r: STDOUT, err_r: STDERR}
    sent = {out_r: 0, err_r: 0}
    truncated = {out_r: False, err_r: False}
    tail = b""
    exc_names = b""
    open_fds = {out_r, err_r, exc_r}
    status = None
    usage: Usage | None = None  # once reaped
    timed_out = False
    poller = select.poll()
    for fd in open_fds:
        poller.register(fd, select.POLLIN)
    poller.register(0, select.POLLIN)  # the host's control channel: a cancel
    cancelled = False
    kill_at: float | None = None  # a cancel's SIGKILL time
    if pidfd is not None:
        poller.register(pidfd, select.POLLIN)
    wait_step = 1.0 if pidfd is not None else 0.02

    def pump(fd: int) -> None:
        nonlocal tail, exc_names
        data = os.read(fd, CHUNK)
        if not data:
            poller.unregister(fd)
            open_fds.discard(fd)
            return
        if fd == exc_r:
            exc_names = (exc_names + data)[:4096]
            return
        if fd == err_r:
            tail = (tail + data)[-TAIL:]
        room = caps[fd] - sent[fd]
        if len(data) > room:
            truncated[fd] = True
            data = data[: max(room, 0)]
        if data:
            sent[fd] += len(data)
            emit(kinds[fd], data)

    control_open = True

    def control() -> None:
        nonlocal cancelled, kill_at, control_open
        data = os.read(0, 64)
        if not data:
            poller.unregister(0)
            control_open = False
            return
        if status is not None:
            return  # the job has ended: a cancel arriving now must not change its result
        if b"C" in data and not cancelled:
            cancelled = True
            graceful = terminate_job(job)
            kill_at = time.monotonic() + (job.cancel_grace if graceful else 0.0)

    while status is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        if kill_at is not None:
            if time.monotonic() >= kill_at:
                break  # cancelled and still running: the reaper below SIGKILLs it
            remaining = min(remaining, kill_at - time.monotonic())
        events = poller.poll(max(0.0, min(remaining, wait_step)) * 1000)
        # The job's end first: a cancel read in the same round must see that it has ended.
        events.sort(key=lambda event: event[0] != pidfd)
        for fd, _ in events:
            if fd == pidfd:
                _, status, usage = wait_job(pid, 0)
                poller.unregister(pidfd)
            elif fd == 0:
                control()
            else:
                pump(fd)
        if pidfd is None and status is None:
            reaped, wstatus, rusage = wait_job(pid, os.WNOHANG)
            if reaped:
                status, usage = wstatus, rusage
    elapsed = time.monotonic() - started
    if status is None and pidfd is not None:
        poller.unregister(pidfd)
    # The main process is gone (or timed out): kill whatever it left behind, then read what is
    # still buffered in the pipes; with every writer dead, they end quickly.
    collected = reap_and_read_result(job)
    result, result_error = collected.result, collected.result_error
    status, usage = late_reap(pid, status, usage)
    if control_open:  # from here on only the job's pipes are read: a late cancel is moot
        poller.unregister(0)
    drain_until = time.monotonic() + 1.0
    while open_fds and time.monotonic() < drain_until:
        for fd, _ in poller.poll(100):
            pump(fd)
    # Killed a moment ago, it may have become a zombie only while its pipes drained.
    status, usage = late_reap(pid, status, usage)
    if result is not None:
        emit(RESULT, result)
    for name, data in collected.artifacts:
        emit(ARTIFACT, NAME_LEN.pack(len(name)) + name + data)
    exit_code = None
    if status is not None:
        exit_code = os.waitstatus_to_exitcode(status)
        if exit_code < 0:
            exit_code = 128 - exit_code  # killed by signal N: report 128+N, as a shell does
    report: dict[str, object] = {
        "exit_code": exit_code,
        "timed_out": timed_out,
        "elapsed": elapsed,
        "stdout_truncated": truncated[out_r],
        "stderr_truncated": truncated[err_r],
        "stderr_tail": tail.decode("utf-8", "replace"),
        "exception": exc_names.decode("utf-8", "replace").split(),
        "result_error": result_error,
        # A cancel whose SIGTERM raced the job's own exit did not end it: the job's own exit
        # code stands.  Only a job ended by a signal (or still running at the deadline) was.
        "cancelled": cancelled and (status is None or os.WIFSIGNALED(status)),
        # None when the job's process was never reaped (see wait_job)
        "max_rss_kb": usage[0] if usage is not None else None,
        "cpu_ms": usage[1] if usage is not None else None,
    }
    report["artifacts_skipped"] = collected.skipped
    emit(REPORT, to_json(report).encode("utf-8", "replace"))


if __name__ == "__main__":
    run_job_here = False
    try:
        main()
    except RunJobHere:
        run_job_here = True  # the job's child: run it outside the except, with no context
    else:
        # Its report is out (written with os.write: nothing buffered): the interpreter's
        # teardown would only cost the container's CPU before the host may remove it.
        os._exit(0)
    if run_job_here:
        exec(compile(PRELUDE, "<string>", "exec"), sys.modules["__main__"].__dict__)
