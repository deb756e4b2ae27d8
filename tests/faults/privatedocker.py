"""A private Docker daemon for tests that stop, kill and restart "the Docker daemon".

The machine's own dockerd is shared (other test runs use it at the same time), so a test that
restarts Docker must restart one of its own.  ``PrivateDocker`` runs a second ``dockerd`` with
everything of its own under one short directory in /tmp: data root, exec root (and so its own
managed containerd, socket and state), pid file and API socket.  It has no bridge and touches
no iptables rules (sandboxes run with ``NetworkMode: none`` anyway), and its containers live
under their own cgroup parent.  Images come from the system daemon (``docker save | load``),
since no registry is used here.

Used as a context manager: started on enter, killed and its directory removed on exit, with
every container it still runs removed first.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path


class PrivateDocker:
    def __init__(self, images: list[str], *, prefix: str = "tkd-") -> None:
        self.images = images
        # Short: Unix socket paths are limited to about 107 bytes, and containerd nests its
        # own sockets below the exec root.
        self.root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        self.socket = self.root / "d.sock"
        self.host = f"unix://{self.socket}"
        self.log_path = self.root / "dockerd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._cgroup_parent = f"/{self.root.name}"
        self.restarts = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def command(self) -> list[str]:
        return [
            "dockerd",
            "--data-root",
            str(self.root / "data"),
            "--exec-root",
            str(self.root / "x"),
            "--pidfile",
            str(self.root / "d.pid"),
            "-H",
            self.host,
            "--bridge=none",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-forward=false",
            "--ip-masq=false",
            "--cgroup-parent",
            self._cgroup_parent,
            # Containers die with the daemon (the point of the fault): no live restore.
            "--live-restore=false",
        ]

    def start(self, timeout: float = 60.0) -> None:
        """Start the daemon (again) and wait until its API answers."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with contextlib.suppress(FileNotFoundError):
            (self.root / "d.pid").unlink()  # a killed daemon leaves it; the next one refuses
        out = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child from here on
        try:
            self.proc = subprocess.Popen(
                self.command(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"private dockerd exited:\n{self.log_tail()}")
            if self.docker("version", "--format", "{{.Server.Version}}", check=False)[0] == 0:
                return
            time.sleep(0.3)
        raise TimeoutError(f"private dockerd not answering in {timeout}s:\n{self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> None:
        """Stop the daemon with ``sig`` (SIGKILL: a crash) and wait until it has exited."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        if sig == signal.SIGKILL:
            self._kill_orphans()

    def restart(self, sig: int = signal.SIGTERM) -> float:
        """Stop with ``sig`` and start again; returns the seconds the API was away."""
        began = time.monotonic()
        self.stop(sig)
        self.start()
        self.restarts += 1
        return time.monotonic() - began

    def _kill_orphans(self) -> None:
        """A SIGKILLed dockerd leaves its managed containerd (and shims) behind: end those
        processes, found by our private exec root on their command line."""
        marker = str(self.root / "x")
        pids = _pids_with_arg(marker)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(_exists(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        # Container processes outlive their shims: end what is left in our cgroup parent.
        for procs in Path("/sys/fs/cgroup").glob(f"*/{self.root.name}/*/cgroup.procs"):
            with contextlib.suppress(OSError):
                for line in procs.read_text().split():
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(line), signal.SIGKILL)
        # The next dockerd would otherwise wait on the dead containerd named in it.
        with contextlib.suppress(FileNotFoundError):
            (self.root / "x" / "containerd" / "containerd.pid").unlink()

    # -- use ---------------------------------------------------------------------------------

    def docker(self, *args: str, check: bool = True, timeout: float = 120) -> tuple[int, str]:
        """Run the docker CLI against this daemon; (exit code, stdout + stderr)."""
        proc = subprocess.run(
            ["docker", "-H", self.host, *args],
            capture_output=True,
            timeout=timeout,
            env={k: v for k, v in os.environ.items() if k != "DOCKER_HOST"},
        )
        output = (proc.stdout + proc.stderr).decode(errors="replace")
        if check and proc.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} failed: {output}")
        return proc.returncode, output

    def load_images(self) -> None:
        """Copy the images from the system daemon (no registry involved)."""
        env = {k: v for k, v in os.environ.items() if k != "DOCKER_HOST"}
        save = subprocess.Popen(["docker", "save", *self.images], stdout=subprocess.PIPE, env=env)
        load = subprocess.run(
            ["docker", "-H", self.host, "load", "-q"],
            stdin=save.stdout,
            capture_output=True,
            timeout=300,
            env=env,
        )
        assert save.stdout is not None
        save.stdout.close()
        if save.wait(60) != 0 or load.returncode != 0:
            raise RuntimeError(f"loading images failed: {load.stderr.decode(errors='replace')}")

    def containers(self, *filters: str) -> list[str]:
        """Ids of all containers (running or not) matching ``--filter`` expressions."""
        args = ["ps", "-aq", "--no-trunc"]
        for f in filters:
            args += ["--filter", f]
        return self.docker(*args)[1].split()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                ids = self.containers()
                if ids:
                    self.docker("rm", "-f", *ids, check=False)
        self.stop(signal.SIGTERM, timeout=30)
        self._kill_orphans()
        _unmount_below(self.root)
        shutil.rmtree(self.root, ignore_errors=True)
        # Empty cgroups the daemon made under its own parent (rmdir removes only empty ones).
        parents = list(Path("/sys/fs/cgroup").glob(f"*/{self.root.name}"))
        for directory in [c for p in parents for c in p.glob("*") if c.is_dir()] + parents:
            with contextlib.suppress(OSError):
                directory.rmdir()

    def __enter__(self) -> PrivateDocker:
        try:
            self.start()
            self.load_images()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _pids_with_arg(marker: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(marker.encode() in part for part in cmdline):
            pids.append(int(entry))
    return pids


def _unmount_below(root: Path) -> None:
    """Mounts the daemon left under its directories (overlay, shm, netns) block removal."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return
    targets = [line.split()[1] for line in mounts if len(line.split()) > 1]
    for target in sorted((t for t in targets if t.startswith(str(root) + "/")), reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True, check=False)
