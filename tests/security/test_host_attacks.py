"""Attacks on the host through the sandbox, each run through the real pipeline.

Second part of issue 5's suite: reading host files and the Docker socket, other jobs' inputs,
secrets in the environment and ``/proc/*/environ``, hard links and symlinks planted in
``/output``, ptrace, writing outside the writable mounts, privilege escalation, and a sandbox
that cannot be set up failing closed.  Each runs warm, cold and under gVisor (see conftest.py);
each attack must get a classified result, leave the worker healthy and the next job a clean
sandbox.  Nothing here sends traffic off the machine.

Where gVisor differs, the tests say so:

* its ``/proc/<pid>/status`` has no ``NoNewPrivs`` line, and shows ``Seccomp: 0`` — the job's
  system calls go to gVisor's own kernel (the Sentry), which is itself confined by seccomp on
  the host; what the job can observe is that setuid binaries do not raise its privileges;
* its mount table lists 9p/gofer file systems where runc shows overlay and ext4 bind mounts;
* it has no ``process_vm_readv`` (ENOSYS, where runc refuses with EPERM) and no ``pidfd_open``
  (the supervisor then polls ``waitpid``).
"""

from __future__ import annotations

import base64
import json
import secrets
import textwrap
import uuid
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from tako_stream.core.models import DLQRecord, ExecutionResult
from tests.integration.stack import Stack
from tests.security.conftest import CANARY_VAR

pytestmark = [pytest.mark.integration]

REPO = str(Path(__file__).resolve().parents[2])


def job(code: str, **fields: object) -> dict[str, object]:
    return {"execution_id": str(uuid.uuid4()), "code": textwrap.dedent(code), **fields}


async def run_named(
    stack: Stack, requests: dict[str, dict[str, object]], timeout: float = 300
) -> dict[str, ExecutionResult]:
    found = await stack.run_jobs(list(requests.values()), timeout=timeout)
    return {name: found[str(req["execution_id"])] for name, req in requests.items()}


def explain(result: ExecutionResult) -> str:
    return f"{result.status} {result.error} exit={result.exit_code}\n{result.stderr[-3000:]}"


def facts_of(result: ExecutionResult) -> dict[str, object]:
    assert result.success, explain(result)
    assert isinstance(result.output, dict), result
    return result.output


def stdout_facts(result: ExecutionResult) -> dict[str, object]:
    line = result.stdout.strip().splitlines()[0]
    data: dict[str, object] = json.loads(line)
    return data


async def assert_healthy_and_clean(stack: Stack) -> None:
    """The worker is unaffected, and the next job sees a fresh sandbox."""
    probe = """
        import json, os
        procs = [p for p in os.listdir('/proc') if p.isdigit()]
        json.dump({'tmp': os.listdir('/tmp'), 'output': os.listdir('/output'),
                   'input': os.listdir('/input'), 'procs': len(procs)},
                  open('/output/result.json', 'w'))
    """
    after = facts_of(await stack.run_job(job(probe)))
    assert after["tmp"] == [] and after["output"] == [], after
    assert after["input"] == ["data.json"], after
    assert isinstance(after["procs"], int) and after["procs"] <= 4, after
    health = await stack.workers[0].health()
    assert health is not None and health["status"] == "healthy", health


# --- host files and the Docker socket -------------------------------------------------------

HOST_PATHS = [
    REPO,
    "/work",
    "/root/.calfkit",
    "/var/lib/docker",
    "/var/run/docker.sock",
    "/run/docker.sock",
    "/run/containerd",
    "/var/run/docker",
    "/etc/docker",
]

HOST_FILES_PROBE = """
    import json, os, socket, stat
    HOST_PATHS = %r
    facts = {'root': sorted(os.listdir('/')), 'hostname': socket.gethostname()}
    facts['present'] = [p for p in HOST_PATHS if os.path.lexists(p)]
    try:
        facts['proc1root'] = sorted(os.listdir('/proc/1/root'))
    except OSError as exc:
        facts['proc1root'] = type(exc).__name__
    try:
        open('/etc/shadow').read()
        facts['shadow'] = 'read'
    except OSError as exc:
        facts['shadow'] = type(exc).__name__
    mounts = []
    for line in open('/proc/self/mountinfo'):
        left, right = line.split(' - ', 1)
        f, r = left.split(), right.split()
        mounts.append({'root': f[3], 'point': f[4], 'opts': f[5], 'fstype': r[0]})
    facts['mounts'] = mounts
    # Any socket file on the whole file system (outside /proc and /sys), and the docker
    # socket's usual addresses tried directly.
    sockets = []
    for top, dirs, files in os.walk('/'):
        if top in ('/proc', '/sys'):
            dirs[:] = []
            continue
        for name in files + dirs:
            try:
                if stat.S_ISSOCK(os.lstat(os.path.join(top, name)).st_mode):
                    sockets.append(os.path.join(top, name))
            except OSError:
                pass
    facts['sockets'] = sockets
    connects = {}
    for path in ('/var/run/docker.sock', '/run/docker.sock', '/run/containerd/containerd.sock'):
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            connects[path] = 'connected'
        except OSError as exc:
            connects[path] = type(exc).__name__
        finally:
            s.close()
    # The engine's TCP port, on the container's own loopback: nothing leaves the machine.
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect(('127.0.0.1', 2375))
        connects['tcp:2375'] = 'connected'
    except OSError as exc:
        connects['tcp:2375'] = type(exc).__name__
    finally:
        s.close()
    facts['connects'] = connects
    try:
        facts['unix'] = [l.split()[-1] for l in open('/proc/net/unix').read().splitlines()[1:]
                         if len(l.split()) > 7]
    except OSError as exc:
        facts['unix'] = type(exc).__name__
    json.dump(facts, open('/output/result.json', 'w'))
"""

#: Mount points a sandbox may have besides the virtual file systems under /proc, /dev, /sys:
#: its root, its four tmpfs, and the files Docker itself bind-mounts read-only.
ALLOWED_MOUNTS = {
    "/",
    "/code",
    "/input",
    "/output",
    "/tmp",
    "/etc/resolv.conf",
    "/etc/hostname",
    "/etc/hosts",
    "/sbin/docker-init",
    "/usr/sbin/docker-init",
    "/dev/init",
}
VIRTUAL_TOPS = ("/proc", "/dev", "/sys")


async def test_no_host_files_and_no_docker_socket(stack: Stack) -> None:
    request = job(HOST_FILES_PROBE % (HOST_PATHS,))
    facts = facts_of(await stack.run_job(request))
    assert facts["present"] == [], facts["present"]
    assert facts["hostname"] == "sandbox"
    assert facts["shadow"] == "PermissionError"
    root = facts["root"]
    assert isinstance(root, list) and {"code", "input", "output", "tmp", "usr"} <= set(root)
    assert "work" not in root
    # pid 1 is the container's init (root-owned, so usually unreadable); if readable, it shows
    # the container's root, never the host's.
    assert facts["proc1root"] in ("PermissionError", root), facts["proc1root"]

    mounts = facts["mounts"]
    assert isinstance(mounts, list)
    by_point = {m["point"]: m for m in mounts}
    for m in mounts:
        point = m["point"]
        assert point in ALLOWED_MOUNTS or point.startswith(VIRTUAL_TOPS), m
        assert not m["root"].startswith(("/work", "/root", "/home", "/var/run", "/run/docker")), m
        assert "docker.sock" not in m["root"] + point, m
        # Everything but the job's tmpfs and the kernel's virtual file systems is read-only.
        if point in ("/", "/etc/resolv.conf", "/etc/hostname", "/etc/hosts"):
            assert m["opts"].split(",")[0] == "ro", m
    for point in ("/code", "/input", "/output", "/tmp"):
        assert point in by_point, (point, mounts)
        if stack.mode != "gvisor":
            assert by_point[point]["fstype"] == "tmpfs", by_point[point]
            assert {"nosuid", "nodev", "noexec"} <= set(by_point[point]["opts"].split(","))

    assert facts["sockets"] == [], facts["sockets"]
    connects = facts["connects"]
    assert isinstance(connects, dict)
    for path in ("/var/run/docker.sock", "/run/docker.sock", "/run/containerd/containerd.sock"):
        assert connects[path] == "FileNotFoundError", connects
    assert connects["tcp:2375"] in ("ConnectionRefusedError", "OSError", "TimeoutError"), connects
    if isinstance(facts["unix"], list):  # the container's network namespace: no host sockets
        assert not [p for p in facts["unix"] if "docker" in p or "containerd" in p], facts["unix"]


# --- other jobs' inputs, and the worker's environment ---------------------------------------

SECRET_HOLDER = """
    import json, time
    data = json.load(open('/input/data.json'))
    time.sleep(8)  # stay alive while the searcher looks
    print('held', len(data['secret']))
"""

SEARCHER = """
    import itertools, json, os, subprocess, sys, time
    # The needles come reversed through the input, so neither /code/main.py nor
    # /input/data.json holds them as they are searched for.
    data = json.load(open('/input/data.json'))
    EVERYWHERE = [n[::-1] for n in data['everywhere']]
    ENV_ONLY = [n[::-1] for n in data['env_only']]
    found = {}
    scanned = {'files': 0, 'environ': 0, 'cmdline': 0}

    def look(where, blob, needles):
        for needle in needles:
            if needle.encode() in blob:
                found.setdefault(needle, []).append(where)

    time.sleep(1)  # let the other jobs start
    # The control: a program the job starts has an environ the job may read (the job's own
    # process, the supervisor's forked child after setuid, is not dumpable: root's to read).
    child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])
    time.sleep(0.2)
    deadline = time.monotonic() + 6
    for pid in os.listdir('/proc'):
        if not pid.isdigit():
            continue
        for part in ('environ', 'cmdline'):
            try:
                with open('/proc/' + pid + '/' + part, 'rb') as f:
                    look('/proc/' + pid + '/' + part, f.read(), EVERYWHERE + ENV_ONLY)
                scanned[part] += 1
            except OSError:
                pass
    look('os.environ', repr(dict(os.environ)).encode(), EVERYWHERE + ENV_ONLY)
    # The mounts jobs write to first, whole, so what the test checks there does not depend on
    # how far the walk of the rest gets before its deadline on a slow machine.
    first = ('/input', '/code', '/tmp', '/output')
    walks = itertools.chain(*(os.walk(root) for root in first), os.walk('/'))
    seen = set()
    for top, dirs, files in walks:
        mine = top.startswith(first)
        if top in seen or top in ('/proc', '/sys', '/dev') or (
            not mine and time.monotonic() > deadline
        ):
            dirs[:] = []
            continue
        seen.add(top)
        for name in files:
            path = os.path.join(top, name)
            try:
                if os.path.islink(path) or os.path.getsize(path) > (4 << 20):
                    continue
                with open(path, 'rb') as f:
                    look(path, f.read(), EVERYWHERE)
                scanned['files'] += 1
            except OSError:
                pass
    child.kill()
    print(json.dumps({'found': found, 'scanned': scanned}))
"""


async def test_no_other_jobs_input_and_no_worker_secrets(stack: Stack) -> None:
    secret = "SECRET-" + secrets.token_hex(16)
    own = "OWN-" + secrets.token_hex(16)
    worker = stack.workers[0]
    canary = stack.extra_env[CANARY_VAR]
    everywhere = [secret, own, canary, worker.worker_id, stack.bootstrap]
    env_only = ["TAKO_", "KAFKA", "DOCKER"]  # too common to look for in the image's files
    holders = {f"holder{i}": job(SECRET_HOLDER, input_data={"secret": secret}) for i in range(2)}
    reverse = {
        "everywhere": [n[::-1] for n in everywhere],
        "env_only": [n[::-1] for n in env_only],
    }
    searcher = job(SEARCHER, input_data={"mine": own, **reverse}, timeout=30)
    r = await run_named(stack, {**holders, "searcher": searcher})
    for name in holders:
        assert r[name].success and r[name].stdout == f"held {len(secret)}\n", r[name]
    s = r["searcher"]
    assert s.success, s
    facts = stdout_facts(s)
    # The searcher ran while the secret holders did, and its search works: it finds its own
    # input, and reads its own /proc entries and the image's files.
    assert s.started_at is not None
    assert any(
        h.started_at is not None and h.started_at < s.finished_at and s.started_at < h.finished_at
        for h in (r[n] for n in holders)
    ), "the searcher never overlapped a secret holder"
    found = facts["found"]
    scanned = facts["scanned"]
    assert isinstance(found, dict) and isinstance(scanned, dict)
    assert "/input/data.json" in found.pop(own), found
    assert scanned["environ"] >= 1 and scanned["cmdline"] >= 1 and scanned["files"] > 100
    assert found == {}, found


ENVIRON_PROBE = """
    import json, os, subprocess, sys, time
    # A program the job starts: its environ the job may read (the job's own process is the
    # supervisor's forked child, made not dumpable by setuid: root's to read under runc).
    child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])
    time.sleep(0.2)
    readable = {}
    for pid in os.listdir('/proc'):
        if pid.isdigit():
            try:
                readable[pid] = open('/proc/%s/environ' % pid, 'rb').read().decode(errors='replace')
            except OSError as exc:
                pass
    child.kill()
    json.dump({'env': dict(os.environ), 'child': child.pid, 'environs': readable},
              open('/output/result.json', 'w'))
"""

JOB_ENV = {"PATH", "HOME", "LANG", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "LC_CTYPE"}


async def test_environment_holds_no_secrets(stack: Stack) -> None:
    canary = stack.extra_env[CANARY_VAR]
    facts = facts_of(await stack.run_job(job(ENVIRON_PROBE)))
    env = facts["env"]
    environs = facts["environs"]
    assert isinstance(env, dict) and isinstance(environs, dict)
    assert set(env) <= JOB_ENV, env
    assert str(facts["child"]) in environs  # the probe can read an environ: its child's
    for pid, text in environs.items():
        for needle in (canary, "TAKO_", "KAFKA", "DOCKER", stack.workers[0].worker_id):
            assert needle not in text, (pid, text)
        names = {item.split("=", 1)[0] for item in text.split("\0") if item}
        # the job's own environment, or the container's (the supervisor's: PATH, LANG, and
        # the HOSTNAME Docker adds), nothing else
        assert names <= JOB_ENV | {"HOSTNAME", "HOME"}, (pid, names)


# --- links and odd files in /output ---------------------------------------------------------

LINKS_PROBE = """
    import json, os
    tried = {}
    for target in ('/etc/passwd', '/etc/shadow', '/input/data.json', '/code/main.py',
                   '/proc/1/environ'):
        try:
            os.link(target, '/output/result.json')
            tried[target] = 'linked'
            os.unlink('/output/result.json')
        except OSError as exc:
            tried[target] = exc.__class__.__name__ + ':' + str(exc.errno)
    open('/tmp/mine', 'w').write('{"from": "tmp"}')
    try:
        os.link('/tmp/mine', '/output/result.json')
        tried['/tmp/mine'] = 'linked'
    except OSError as exc:
        tried['/tmp/mine'] = exc.__class__.__name__ + ':' + str(exc.errno)
    print(json.dumps(tried))
"""


async def test_links_and_odd_files_in_output(stack: Stack) -> None:
    requests = {
        "links": job(LINKS_PROBE),
        "hardlink_passwd": job("import os\nos.link('/etc/passwd', '/output/result.json')\n"),
        "symlink_dir": job("import os\nos.symlink('/etc', '/output/result.json')\n"),
        "symlink_input": job("import os\nos.symlink('/input/data.json', '/output/result.json')\n"),
        "relative_symlink": job("import os\nos.symlink('../etc/passwd', '/output/result.json')\n"),
        "result_dir": job("import os\nos.mkdir('/output/result.json')\n"),
        "result_dir_with_file": job(
            "import os\nos.mkdir('/output/result.json')\n"
            "open('/output/result.json/x', 'w').write('{}')\n"
        ),
    }
    r = await run_named(stack, requests)
    links = r["links"]
    assert links.success and links.output is None, links
    tried = stdout_facts(links)
    # Hard links cannot cross mounts (EXDEV=18); the kernel's protected_hardlinks may refuse
    # first (EPERM=1); either way nothing outside /output becomes result.json.
    assert tried, tried
    for target, outcome in tried.items():
        assert outcome in ("PermissionError:1", "OSError:18"), (target, outcome)

    h = r["hardlink_passwd"]
    assert h.status == "failed" and h.error is not None, h
    assert h.error.type in ("os_error", "permission"), h.error
    assert h.output is None

    for name in ("symlink_dir", "symlink_input", "relative_symlink", "result_dir"):
        res = r[name]
        assert res.output is None, (name, res)
        assert res.error is not None and res.error.type == "invalid_output", (name, res)
        assert "root:" not in res.error.message
    assert "not a regular file" in (r["result_dir"].error.message if r["result_dir"].error else "")
    d = r["result_dir_with_file"]
    assert d.output is None and d.error is not None and d.error.type == "invalid_output", d
    await assert_healthy_and_clean(stack)


# --- ptrace ---------------------------------------------------------------------------------

PTRACE_PROBE = """
    import ctypes, json, os, subprocess, sys, time
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    PTRACE_ATTACH, PTRACE_DETACH, PTRACE_SEIZE = 16, 17, 0x4206

    def attempt(call):
        ctypes.set_errno(0)
        rc = call()
        return 0 if rc != -1 else ctypes.get_errno()

    class iovec(ctypes.Structure):
        _fields_ = [('base', ctypes.c_void_p), ('len', ctypes.c_size_t)]

    def vm_read(pid):
        buf = ctypes.create_string_buffer(64)
        local = iovec(ctypes.cast(buf, ctypes.c_void_p), 64)
        remote = iovec(0x400000, 64)
        return attempt(lambda: libc.process_vm_readv(pid, ctypes.byref(local), 1,
                                                     ctypes.byref(remote), 1, 0))

    def mem(pid):
        try:
            with open('/proc/%d/mem' % pid, 'rb') as f:
                f.read(1)
            return 'read'
        except OSError as exc:
            return type(exc).__name__

    ppid = os.getppid()
    facts = {'ppid': ppid}
    for label, pid in (('init', 1), ('supervisor', ppid)):
        facts[label] = {
            'attach': attempt(lambda: libc.ptrace(PTRACE_ATTACH, pid, None, None)),
            'seize': attempt(lambda: libc.ptrace(PTRACE_SEIZE, pid, None, None)),
            'vm_readv': vm_read(pid),
            'mem': mem(pid),
        }
    # Control: the job may trace a program it starts (same user, inside the sandbox), so the
    # calls above fail for lack of privilege, not because the probe is broken.  (Not a forked
    # child of its own: the job's process, and so its forks, are not dumpable; see
    # tests/integration/test_job_interpreter.py.)
    child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])
    time.sleep(0.2)
    facts['own_child'] = attempt(lambda: libc.ptrace(PTRACE_ATTACH, child.pid, None, None))
    child.kill()
    json.dump(facts, open('/output/result.json', 'w'))
"""

PTRACE_ATTACK = """
    import ctypes, os
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    if libc.ptrace(16, os.getppid(), None, None) == -1:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    print('attached to the supervisor')
"""

EPERM, ENOSYS = 1, 38


async def test_ptrace_of_supervisor_and_init_fails(stack: Stack) -> None:
    r = await run_named(stack, {"probe": job(PTRACE_PROBE), "attack": job(PTRACE_ATTACK)})
    facts = facts_of(r["probe"])
    assert facts["ppid"] != 1  # the job's parent is the supervisor, not init
    for label in ("init", "supervisor"):
        seen = facts[label]
        assert isinstance(seen, dict)
        assert seen["attach"] == EPERM and seen["seize"] == EPERM, (label, seen)
        # gVisor does not implement process_vm_readv at all (ENOSYS): refused either way
        vm_refusals = (EPERM, ENOSYS) if stack.mode == "gvisor" else (EPERM,)
        assert seen["vm_readv"] in vm_refusals, (label, seen)
        assert seen["mem"] == "PermissionError", (label, seen)
    assert facts["own_child"] == 0, facts
    attack = r["attack"]
    assert attack.status == "failed" and attack.error is not None, attack
    assert attack.error.type == "permission", attack.error
    assert "attached" not in attack.stdout
    await assert_healthy_and_clean(stack)


# --- writing outside the writable mounts ----------------------------------------------------

WRITE_TARGETS = [
    "/evil",
    "/etc/evil",
    "/etc/passwd",
    "/usr/evil",
    "/usr/bin/python3",
    "/input/evil",
    "/input/data.json",
    "/code/evil",
    "/code/main.py",
    "/proc/sys/kernel/hostname",
    "/proc/sysrq-trigger",
    "/sys/evil",
    "/sys/kernel/uevent_helper",
    "/sys/fs/cgroup/evil",
    "/dev/evil",
    "/var/evil",
    "/root/evil",
]

WRITE_PROBE = """
    import json, os
    outcome = {}
    for path in %r:
        try:
            with open(path, 'a') as f:
                f.write('x')
            outcome[path] = 'written'
        except OSError as exc:
            outcome[path] = type(exc).__name__ + ':' + str(exc.errno)
        try:
            os.mkdir(path + '.d')
            outcome[path + '.d'] = 'made'
        except OSError as exc:
            outcome[path + '.d'] = type(exc).__name__ + ':' + str(exc.errno)
    json.dump(outcome, open('/output/result.json', 'w'))
"""

#: EPERM, ENOENT (a read-only /sys entry that does not exist), EACCES, EROFS
REFUSALS = {"PermissionError:1", "FileNotFoundError:2", "PermissionError:13", "OSError:30"}


async def test_writes_outside_the_writable_mounts_fail(stack: Stack) -> None:
    requests = {
        "probe": job(WRITE_PROBE % (WRITE_TARGETS,)),
        "etc_passwd": job("open('/etc/passwd', 'a').write('evil::0:0::/:/bin/sh\\n')\n"),
        "root_file": job("open('/evil', 'w').write('x')\n"),
        "proc_sys": job("open('/proc/sys/kernel/hostname', 'w').write('pwned')\n"),
    }
    r = await run_named(stack, requests)
    outcome = facts_of(r["probe"])
    assert len(outcome) == 2 * len(WRITE_TARGETS)
    bad = {path: how for path, how in outcome.items() if how not in REFUSALS}
    assert bad == {}, bad
    for name in ("etc_passwd", "root_file", "proc_sys"):
        res = r[name]
        assert res.status == "failed" and res.error is not None, (name, res)
        # EACCES is a PermissionError (permission); EROFS a plain OSError (os_error)
        assert res.error.type in ("permission", "os_error"), (name, res.error)
    await assert_healthy_and_clean(stack)


# --- privilege escalation -------------------------------------------------------------------

PRIVILEGE_PROBE = """
    import json, os, stat, subprocess, time
    status = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines()
                  if ':' in l)
    facts = {k: status[k].strip() for k in status
             if k.startswith('Cap') or k in ('NoNewPrivs', 'Seccomp', 'Uid', 'Gid', 'Groups')}
    setuid = []
    for top, dirs, files in os.walk('/'):
        if top in ('/proc', '/sys'):
            dirs[:] = []
            continue
        for name in files:
            path = os.path.join(top, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                setuid.append(path)
    facts['setuid_files'] = sorted(setuid)
    # Run each setuid-root program and read its credentials while it runs (su and passwd wait
    # for a password on stdin): the set-user-ID bit must not take effect.
    euids = {}
    for path in ('/usr/bin/su', '/usr/bin/passwd', '/usr/bin/newgrp', '/usr/bin/gpasswd',
                 '/usr/bin/mount', '/usr/bin/chfn'):
        if not os.path.exists(path):
            continue
        p = subprocess.Popen([path], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        seen = set()
        end = time.monotonic() + 1.5
        while time.monotonic() < end and p.poll() is None:
            try:
                uid_line = open('/proc/%d/status' % p.pid).read().split('Uid:')[1]
                seen.add(uid_line.split()[1])  # the effective uid
            except (OSError, IndexError):
                pass
            time.sleep(0.02)
        p.kill()
        p.wait()
        euids[path] = sorted(seen)
    facts['euids'] = euids
    def attempt(fn):
        try:
            fn()
            return 'allowed'
        except OSError as exc:
            return type(exc).__name__
    facts['setuid0'] = attempt(lambda: os.setuid(0))
    facts['setgroups'] = attempt(lambda: os.setgroups([0]))
    facts['chown'] = attempt(lambda: os.chown('/tmp', 0, 0))
    open('/tmp/s', 'w').close()
    facts['chmod_suid'] = attempt(lambda: os.chmod('/tmp/s', 0o4755))
    facts['suid_kept'] = bool(os.stat('/tmp/s').st_mode & stat.S_ISUID)
    json.dump(facts, open('/output/result.json', 'w'))
"""

ZERO_CAPS = "0000000000000000"


async def test_no_privilege_escalation(stack: Stack) -> None:
    facts = facts_of(await stack.run_job(job(PRIVILEGE_PROBE, timeout=60)))
    assert facts["Uid"] and str(facts["Uid"]).split() == ["65534"] * 4, facts
    assert str(facts["Gid"]).split() == ["65534"] * 4 and facts["Groups"] == "", facts
    for cap in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert facts.get(cap, ZERO_CAPS) == ZERO_CAPS, (cap, facts)
    if stack.mode == "gvisor":
        # gVisor's /proc shows neither NoNewPrivs nor the host's seccomp filter (see the top).
        assert facts.get("Seccomp") in (None, "0"), facts
    else:
        assert facts["NoNewPrivs"] == "1", facts
        assert facts["Seccomp"] == "2", facts  # Docker's default seccomp profile applies
    # The images are built without set-user-ID or set-group-ID files (images/*/Dockerfile), and
    # the programs that had the bit (su, passwd, mount...) run with the job's own uid: even a
    # file that kept the bit would be inert under no-new-privileges.
    assert facts["setuid_files"] == [], facts["setuid_files"]
    euids = facts["euids"]
    assert isinstance(euids, dict) and euids, facts
    observed = {path: seen for path, seen in euids.items() if seen}
    assert observed, euids  # the probe saw at least one of them running
    for path, seen in observed.items():
        assert seen == ["65534"], (path, seen)
    assert facts["setuid0"] == "PermissionError"
    assert facts["setgroups"] == "PermissionError"
    assert facts["chown"] == "PermissionError"
    # /tmp is nosuid: a setuid bit may be set on one's own file but is ignored on exec.
    assert facts["chmod_suid"] in ("allowed", "PermissionError")
    await assert_healthy_and_clean(stack)


# --- set-up failure fails closed ------------------------------------------------------------

BROKEN_TYPES = """
[default]
image = "tako-stream/default:1"

[no-such-runtime]
description = "an OCI runtime Docker does not know: the container cannot be created"
image = "tako-stream/default:1"
runtime = "tako-no-such-runtime"

[no-such-image]
description = "an image that does not exist: the container cannot be created"
image = "tako-stream/no-such-image:0"
"""


async def test_sandbox_setup_failure_fails_closed(new_stack: Stack, tmp_path: Path) -> None:
    """A container that cannot get its settings is never run another way: internal_error, a
    DLQ record, no attempt without the runtime (which would print), no retry."""
    types = tmp_path / "broken_types.toml"
    types.write_text(BROKEN_TYPES)
    worker = new_stack.start_worker(TAKO_JOB_TYPES_FILE=str(types), TAKO_WARM_POOL_SIZE="0")
    await worker.wait_ready()
    code = "print('ran')\nopen('/output/result.json', 'w').write('{}')\n"
    requests = {
        "runtime": job(code, job_type="no-such-runtime"),
        "image": job(code, job_type="no-such-image"),
    }
    settings = new_stack.settings
    dlq = AIOKafkaConsumer(
        settings.dlq_topic,
        bootstrap_servers=settings.kafka_bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    r = await run_named(new_stack, requests, timeout=120)
    for name, res in r.items():
        assert res.status == "failed" and res.error is not None, (name, res)
        # a missing image is Tako VM's docker_error; a runtime the engine lacks, ours
        expected = "docker_error" if name == "image" else "internal_error"
        assert res.error.type == expected, (name, res.error)
        assert res.stdout == "" and res.output is None and res.exit_code is None, (name, res)
        assert res.attempts == 1, (name, res)  # never retried
    assert "runtime" in r["runtime"].error.message if r["runtime"].error else False

    expected = {str(req["execution_id"]) for req in requests.values()}
    records: dict[str, DLQRecord] = {}
    await dlq.start()
    try:
        for _ in range(60):
            batch = await dlq.getmany(timeout_ms=500)
            for msgs in batch.values():
                for m in msgs:
                    rec = DLQRecord.model_validate_json(m.value or b"")
                    records[rec.execution_id] = rec
            if expected <= set(records):
                break
    finally:
        await dlq.stop()
    assert expected <= set(records), records
    for name, req in requests.items():
        rec = records[str(req["execution_id"])]
        assert rec.error.type == ("docker_error" if name == "image" else "internal_error"), rec
        original = orjson.loads(base64.b64decode(rec.original_value))
        assert original["execution_id"] == req["execution_id"]
    # The worker keeps serving the job types it can run.
    ok = await new_stack.run_job(job("print('fine')"))
    assert ok.success and ok.stdout == "fine\n", ok
    health = await worker.health()
    assert health is not None and health["status"] == "healthy", health
