"""CPU per job by process: the engine's ceiling container against a job of ours through Kafka.

    scripts/bench-profile [--count N] [--rounds N] [--concurrency N] [--runtime runsc] [--warm]

Saturation is CPU per job (both cores busy), so where a throughput target is missed this says
where the CPU goes.  Each round runs ``count`` of the ceiling's containers (``bench_engine``:
create, start, wait, delete, ``concurrency`` at a time) and then a burst of ``count`` trivial
jobs through the embedded broker and one worker (cold by default: every job starts its own
container, as a saturated worker's do), and reads, before and after each phase:

- ``dockerd`` and ``containerd``: their own ``/proc/PID/stat`` times;
- the shims and the runtime (``containerd-shim-runc-v2``, ``runc``, ``runsc``): the CPU of a
  cgroup (cpuacct) the engine's two daemons are moved into for the run, which every process
  they start inherits until the runtime moves the container's own processes out, less the two
  daemons (moved back when the run ends);
- the containers (init, supervisor, job; the gVisor sandbox): Docker's cpuacct cgroup, which
  keeps what its removed children used;
- the worker, the broker, and this client (the ceiling's Engine API calls, or the burst's
  producer and result reader): their own times;
- the kernel and everything else: the machine's busy time (``/proc/stat``) less all the above.

A phase's last reading waits until as many containers are left as before it, so removals our
worker makes after answering are counted in its phase.  The worker's and the broker's rows
include their idle polls, which the ceiling's phase pays too.

Process accounting (``acct``) was not used: it rounds each process down to 10 ms, and a
container's runc runs take less.  Needs root, a cgroup v1 cpuacct hierarchy and Docker's
cgroupfs driver (it says so and stops otherwise).  The daemons' own cgroups are written to
``/run/tako-bench-profile.json`` before they are moved: a run killed before moving them back
(SIGKILL; SIGTERM moves them back) is undone by the next run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiodocker
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import burst  # noqa: E402
from bench_engine import GVISOR, churn_ceiling, gvisor_job_types  # noqa: E402

from tako_stream.kafka import broker as embedded  # noqa: E402
from tests.integration.stack import Stack, free_port  # noqa: E402

#: Where the daemons' own cgroups are written before they are moved, so that a run killed
#: before moving them back is undone by the next run (and by nothing else: see ``restore``).
STATE = Path("/run/tako-bench-profile.json")
TICK_MS = 1000 / os.sysconf("SC_CLK_TCK")
BUCKETS = (
    "dockerd",
    "containerd",
    "shims and runtime",
    "containers",
    "worker",
    "broker",
    "client",
    "kernel and other",
)


def pid_of(name: str) -> int:
    out = subprocess.run(["pgrep", "-xo", name], capture_output=True, text=True, check=False)
    if not out.stdout.strip():
        raise RuntimeError(f"no {name} process: is the Docker engine up?")
    return int(out.stdout.split()[0])


def proc_ms(pid: int) -> float:
    """A process's user and system CPU so far (its own threads, not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * TICK_MS


def cgroup_ms(group: Path) -> float:
    return int((group / "cpuacct.usage").read_text()) / 1e6


def machine_ms() -> float:
    """Busy CPU of the whole machine: user, nice, system, irq, softirq (not idle, iowait or a
    hypervisor's steal)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    return sum(int(fields[i]) for i in (0, 1, 2, 5, 6)) * TICK_MS


def cpuacct_mount() -> Path:
    """The cgroup v1 hierarchy holding cpuacct (alone or with cpu: ``cpu,cpuacct``)."""
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mount, kind, options, *_ = line.split()
        if kind == "cgroup" and "cpuacct" in options.split(","):
            return Path(mount)
    raise SystemExit("bench-profile: needs a cgroup v1 cpuacct hierarchy (this host has none)")


def cgroup_of(pid: int, mount: Path) -> Path:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "cpuacct" in controllers.split(","):
            return mount / path.lstrip("/")
    raise SystemExit(f"bench-profile: process {pid} is in no cpuacct cgroup")


def move(pid: int, group: Path) -> None:
    (group / "cgroup.procs").write_text(str(pid))


def restore() -> None:
    """Put back the daemons a run killed before its end left in its cgroup."""
    if not STATE.exists():
        return
    for pid, origin in orjson.loads(STATE.read_bytes()).items():
        with contextlib.suppress(OSError):  # the daemon may have gone since
            move(int(pid), Path(origin))
            print(f"bench-profile: moved process {pid} back to {origin} (an earlier run's)")
    STATE.unlink()


@contextmanager
def engine_group(pids: list[int], mount: Path) -> Iterator[Path]:
    """The engine's daemons in a cgroup of their own (cpuacct only), moved back on the way out;
    what they start from now on is counted there."""
    group = mount / "tako-profile-engine"
    origins = {pid: cgroup_of(pid, mount) for pid in pids}
    if group in origins.values():
        raise SystemExit(f"bench-profile: the engine is in {group} already; move it back first")
    STATE.write_bytes(orjson.dumps({str(pid): str(path) for pid, path in origins.items()}))
    group.mkdir(exist_ok=True)
    try:
        for pid in pids:
            move(pid, group)
        yield group
    finally:
        failed = False
        for pid, origin in origins.items():  # each on its own: one failing leaves no other
            try:
                move(pid, origin)
            except OSError as exc:
                failed = True
                print(f"bench-profile: could not move {pid} back to {origin}: {exc}")
        if not failed:
            STATE.unlink()
        # Shims of containers still alive keep the group busy; it goes once they have ended.
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)
        else:
            print(f"bench-profile: {group} still has processes; left in place")


async def containers() -> int:
    async with aiodocker.Docker() as docker, asyncio.timeout(10):
        return len(await docker.containers.list(all=True))


class Meter:
    def __init__(
        self, engine: Path, docker: Path, dockerd: int, containerd: int, worker: int, broker: int
    ) -> None:
        self.pids = {"dockerd": dockerd, "containerd": containerd, "worker": worker}
        self.pids["broker"] = broker
        self.engine_group = engine
        self.docker_group = docker

    def read(self) -> dict[str, float]:
        times = os.times()
        reading = {name: proc_ms(pid) for name, pid in self.pids.items()}
        reading.update(
            engine=cgroup_ms(self.engine_group),
            containers=cgroup_ms(self.docker_group),
            client=(times.user + times.system) * 1000,
            machine=machine_ms(),
        )
        return reading

    async def measure(self, jobs: int, phase: Callable[[], Awaitable[Any]]) -> dict[str, float]:
        """CPU ms per job by bucket while ``phase`` ran, and its jobs a second."""
        await asyncio.sleep(2)  # removals of the phase before end first
        present = await containers()
        before = self.read()
        started = time.perf_counter()
        await phase()
        elapsed = time.perf_counter() - started
        # This phase's own background removals counted in it (our worker removes containers
        # after answering; the ceiling within its phase): until as many containers are left
        # as before, 10 s at most.
        for _ in range(100):
            if await containers() <= present:
                break
            await asyncio.sleep(0.1)
        after = self.read()
        d = {k: after[k] - before[k] for k in before}
        per = {
            "dockerd": d["dockerd"],
            "containerd": d["containerd"],
            "shims and runtime": d["engine"] - d["dockerd"] - d["containerd"],
            "containers": d["containers"],
            "worker": d["worker"],
            "broker": d["broker"],
            "client": d["client"],
        }
        per["kernel and other"] = d["machine"] - sum(per.values())
        out = {k: v / jobs for k, v in per.items()}
        out["total"] = d["machine"] / jobs
        out["jobs_per_s"] = jobs / elapsed
        return out


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--runtime", choices=[GVISOR], default=None)
    parser.add_argument("--warm", action="store_true", help="the worker keeps its warm pool")
    parser.add_argument("--out", default="bench-profile.json")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench-profile: needs root (it moves the engine's daemons into a cgroup)")
        return 2
    mount = cpuacct_mount()
    restore()
    # A SIGTERM ends the run through its finally blocks (the daemons moved back).
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)

    port = free_port()
    log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as the broker
        prefix="tako-profile-broker-", suffix=".log", delete=False
    )
    broker = subprocess.Popen(  # noqa: ASYNC220 - started once, before any measurement
        embedded.command("127.0.0.1", port), stdout=log, stderr=log
    )
    stack = Stack(
        bootstrap=f"localhost:{port}",
        workdir=Path(tempfile.mkdtemp(prefix="tako-profile-")),
        mode="warm" if args.warm else "cold",
    )
    rows: dict[str, list[dict[str, float]]] = {"ceiling": [], "ours": []}
    try:
        if not embedded.wait_until_listening("127.0.0.1", port, 30):
            raise RuntimeError("the embedded broker did not start")
        env = {
            "TAKO_LOG_LEVEL": "WARNING",
            "TAKO_POOL_SIZE": str(args.concurrency),
            "TAKO_WARM_POOL_SIZE": str(args.concurrency if args.warm else 0),
        }
        if args.runtime:
            env["TAKO_JOB_TYPES_FILE"] = str(gvisor_job_types())
        worker = stack.start_worker("profile", **env)
        print("bench-profile: starting the worker...", flush=True)
        await worker.wait_ready(300)
        await burst(stack, 4, valid=True)  # first uses out of the way
        await churn_ceiling(2, 2, runtime=args.runtime)
        docker_group = mount / "docker"
        if not docker_group.is_dir():  # the systemd driver puts containers elsewhere
            raise SystemExit(f"bench-profile: no {docker_group} (needs Docker's cgroupfs driver)")
        dockerd, containerd = pid_of("dockerd"), pid_of("containerd")
        with engine_group([dockerd, containerd], mount) as engine:
            meter = Meter(engine, docker_group, dockerd, containerd, worker.proc.pid, broker.pid)
            try:
                for i in range(args.rounds):
                    print(f"bench-profile: round {i + 1} of {args.rounds}", flush=True)
                    rows["ceiling"].append(
                        await meter.measure(
                            args.count,
                            lambda: churn_ceiling(
                                args.count, args.concurrency, runtime=args.runtime
                            ),
                        )
                    )
                    rows["ours"].append(
                        await meter.measure(
                            args.count, lambda: burst(stack, args.count, valid=True)
                        )
                    )
            finally:  # its warm containers' shims out of the group before it is removed
                stack.stop_all()
    finally:
        stack.stop_all()
        broker.terminate()
        broker.wait(10)
        log.close()

    def mean(side: str, key: str) -> float:
        return sum(r[key] for r in rows[side]) / len(rows[side])

    runtime = args.runtime or "runc"
    kind = "warm" if args.warm else "cold"
    print(
        f"\nCPU per job, ms ({args.count} jobs {args.concurrency} at a time, "
        f"{args.rounds} interleaved rounds, {runtime}; ours: {kind} worker through Kafka)"
    )
    print(f"  {'':22} {'ceiling':>9} {'ours':>9} {'ours - ceiling':>15}")
    for key in (*BUCKETS, "total"):
        c, o = mean("ceiling", key), mean("ours", key)
        print(f"  {key:22} {c:9.1f} {o:9.1f} {o - c:+15.1f}")
    c, o = mean("ceiling", "jobs_per_s"), mean("ours", "jobs_per_s")
    print(f"  {'jobs a second':22} {c:9.2f} {o:9.2f}   (ours / ceiling {o / c:.2f})")
    pairs = list(zip(rows["ceiling"], rows["ours"], strict=True))
    print(
        "  per round, ours / ceiling: jobs a second "
        + ", ".join(f"{o['jobs_per_s'] / c['jobs_per_s']:.2f}" for c, o in pairs)
        + "; CPU per job "
        + ", ".join(f"{o['total'] / c['total']:.2f}" for c, o in pairs)
    )
    Path(args.out).write_bytes(  # noqa: ASYNC240
        orjson.dumps({"runtime": runtime, "worker": kind, **vars(args), "measured": rows})
    )
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except asyncio.CancelledError:  # SIGTERM: the daemons are back where they were
        print("bench-profile: stopped", file=sys.stderr)
        sys.exit(143)
