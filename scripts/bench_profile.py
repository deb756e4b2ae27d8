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

Process accounting (``acct``) was not used: it rounds each process down to 10 ms, and a
container's runc runs take less.  Needs root (cgroups) and the Docker engine of this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import burst  # noqa: E402
from bench_engine import GVISOR, churn_ceiling, gvisor_job_types  # noqa: E402

from tako_stream.kafka import broker as embedded  # noqa: E402
from tests.integration.stack import Stack, free_port  # noqa: E402

CPUACCT = Path("/sys/fs/cgroup/cpuacct")
ENGINE_GROUP = CPUACCT / "tako-profile-engine"
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


@contextmanager
def engine_group(pids: list[int]) -> Iterator[Path]:
    """The engine's daemons in a cgroup of their own (cpuacct only), moved back on the way out;
    what they start from now on is counted there."""
    origins = {}
    for pid in pids:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        line = next(entry for entry in lines if ":cpuacct:" in entry)
        origins[pid] = CPUACCT / line.split(":", 2)[2].lstrip("/")
    ENGINE_GROUP.mkdir(exist_ok=True)
    try:
        for pid in pids:
            (ENGINE_GROUP / "cgroup.procs").write_text(str(pid))
        yield ENGINE_GROUP
    finally:
        for pid, origin in origins.items():
            (origin / "cgroup.procs").write_text(str(pid))
        # Shims of containers still alive keep the group busy; it goes once they have ended.
        for _ in range(50):
            try:
                ENGINE_GROUP.rmdir()
                break
            except OSError:
                time.sleep(0.1)


class Meter:
    def __init__(self, dockerd: int, containerd: int, worker: int, broker: int) -> None:
        self.pids = {"dockerd": dockerd, "containerd": containerd, "worker": worker}
        self.pids["broker"] = broker
        docker_group = CPUACCT / "docker"
        docker_group.mkdir(exist_ok=True)  # Docker makes it with its first container
        self.docker_group = docker_group

    def read(self) -> dict[str, float]:
        times = os.times()
        reading = {name: proc_ms(pid) for name, pid in self.pids.items()}
        reading.update(
            engine=cgroup_ms(ENGINE_GROUP),
            containers=cgroup_ms(self.docker_group),
            client=(times.user + times.system) * 1000,
            machine=machine_ms(),
        )
        return reading

    async def measure(self, jobs: int, phase: Callable[[], Awaitable[Any]]) -> dict[str, float]:
        """CPU ms per job by bucket while ``phase`` ran, and its jobs a second."""
        await asyncio.sleep(2)  # removals of the phase before end first
        before = self.read()
        started = time.perf_counter()
        await phase()
        elapsed = time.perf_counter() - started
        # This phase's own background removals counted in it (a few hundred ms at most),
        # without much of the idle polls of the worker and the broker.
        await asyncio.sleep(0.5)
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
        meter = Meter(pid_of("dockerd"), pid_of("containerd"), worker.proc.pid, broker.pid)
        with engine_group([meter.pids["dockerd"], meter.pids["containerd"]]):
            for i in range(args.rounds):
                print(f"bench-profile: round {i + 1} of {args.rounds}", flush=True)
                rows["ceiling"].append(
                    await meter.measure(
                        args.count,
                        lambda: churn_ceiling(args.count, args.concurrency, runtime=args.runtime),
                    )
                )
                rows["ours"].append(
                    await meter.measure(args.count, lambda: burst(stack, args.count, valid=True))
                )
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
    sys.exit(asyncio.run(main()))
