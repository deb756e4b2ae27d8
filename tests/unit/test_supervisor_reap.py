"""The supervisor's reaper: every process of the job's uid killed, with no wait when none is
left.

``kill(-1)`` cannot tell whether anything of the job's was left: under runc it succeeds
whenever a process other than the caller and init exists, the root supervisor included, so a
reaper going by it alone waited out all its rounds after every job (3 x 5 ms).  Whether one is
still alive is read from ``/proc``, here a directory laid out as it is.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tako_stream.sandbox import supervisor

OURS = os.getuid()
OTHER = OURS + 1000


def proc(tmp_path: Path, processes: dict[str, tuple[str, int]]) -> str:
    """A /proc with ``pid: (state, uid)``, status files as the kernel writes them."""
    for pid, (state, uid) in processes.items():
        directory = tmp_path / pid
        directory.mkdir()
        (directory / "status").write_text(
            f"Name:\tpython3\nUmask:\t0022\nState:\t{state}\nTgid:\t{pid}\nPid:\t{pid}\n"
            f"PPid:\t1\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\nGid:\t{uid}\t{uid}\t{uid}\t{uid}\n"
        )
    (tmp_path / "self").mkdir()  # and the rest of /proc: not processes
    (tmp_path / "meminfo").write_text("MemTotal: 1 kB\n")
    return str(tmp_path)


def test_only_the_root_supervisor_and_init_left_is_none_alive(tmp_path: Path) -> None:
    me = str(os.getpid())
    root = proc(
        tmp_path,
        {"1": ("S (sleeping)", OTHER), "7": ("S (sleeping)", OTHER), me: ("R (running)", OURS)},
    )
    assert supervisor.alive_as(OURS, root) is False


def test_a_zombie_of_the_job_is_not_alive(tmp_path: Path) -> None:
    root = proc(tmp_path, {"7": ("S (sleeping)", OTHER), "20": ("Z (zombie)", OURS)})
    assert supervisor.alive_as(OURS, root) is False


@pytest.mark.parametrize("state", ["R (running)", "S (sleeping)", "D (disk sleep)", "T (stopped)"])
def test_a_job_process_still_there_is_alive(tmp_path: Path, state: str) -> None:
    root = proc(tmp_path, {"7": ("S (sleeping)", OTHER), "21": (state, OURS)})
    assert supervisor.alive_as(OURS, root) is True


def test_no_proc_cannot_tell(tmp_path: Path) -> None:
    assert supervisor.alive_as(OURS, str(tmp_path / "missing")) is None


class Kills:
    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, *, alive: list[bool | None], esrch: bool = False
    ) -> None:
        self.sent: list[tuple[int, int]] = []
        self.slept = 0
        self.asked = 0
        self._alive = alive
        self._esrch = esrch
        monkeypatch.setattr(supervisor.os, "kill", self.kill)
        monkeypatch.setattr(supervisor.time, "sleep", self.sleep)
        monkeypatch.setattr(supervisor, "alive_as", self.alive_as)

    def kill(self, pid: int, sig: int) -> None:
        self.sent.append((pid, sig))
        if self._esrch:
            raise ProcessLookupError

    def sleep(self, seconds: float) -> None:
        self.slept += 1

    def alive_as(self, uid: int, proc: str = "/proc") -> bool | None:
        assert uid == OTHER
        self.asked += 1
        return self._alive.pop(0)


def test_nothing_left_after_the_kill_means_no_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    kills = Kills(monkeypatch, alive=[False])  # runc: kill(-1) succeeds, nothing of ours is left
    supervisor.kill_job_processes(OTHER)
    assert kills.sent == [(-1, supervisor.SIGKILL)]
    assert kills.slept == 0


def test_gvisors_esrch_means_nothing_was_there(monkeypatch: pytest.MonkeyPatch) -> None:
    kills = Kills(monkeypatch, alive=[], esrch=True)
    supervisor.kill_job_processes(OTHER)
    assert kills.sent == [(-1, supervisor.SIGKILL)] and kills.slept == 0 and kills.asked == 0


def test_a_process_still_alive_is_killed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    kills = Kills(monkeypatch, alive=[True, False])  # one forked as the signal went out
    supervisor.kill_job_processes(OTHER)
    assert len(kills.sent) == 2 and kills.slept == 1


@pytest.mark.parametrize("alive", [[True, True, True], [None, None, None]])
def test_at_most_three_rounds(monkeypatch: pytest.MonkeyPatch, alive: list[bool | None]) -> None:
    kills = Kills(monkeypatch, alive=list(alive))  # a fork bomb, or no /proc to tell
    supervisor.kill_job_processes(OTHER)
    assert len(kills.sent) == 3 and kills.slept == 3


class NoIds:
    """``AsJob`` for a test that is not root: takes no ids."""

    def __init__(self, job: object) -> None:
        pass

    def __enter__(self) -> None:
        pass

    def __exit__(self, *exc: object) -> None:
        pass


class CannotTakeIds(NoIds):
    def __enter__(self) -> None:
        raise PermissionError(1, "Operation not permitted")


def a_job() -> supervisor.Job:
    from tako_stream.sandbox.protocol import encode_job
    from tako_stream.settings import OutputCaps

    return supervisor.Job(
        encode_job(code="pass", input_json=b"{}", timeout=5, caps=OutputCaps())[8:]
    )


def test_artifacts_failing_leave_the_result_read(monkeypatch: pytest.MonkeyPatch) -> None:
    def result(job: supervisor.Job, collected: supervisor.Collected) -> None:
        collected.result = b'{"a": 1}'

    def artifacts(job: supervisor.Job, collected: supervisor.Collected) -> None:
        raise MemoryError

    monkeypatch.setattr(supervisor, "AsJob", NoIds)
    monkeypatch.setattr(supervisor, "kill_job_processes", lambda uid: None)
    monkeypatch.setattr(supervisor, "read_result", result)
    monkeypatch.setattr(supervisor, "collect_artifacts", artifacts)
    collected = supervisor.reap_and_read_result(a_job())
    assert collected.result == b'{"a": 1}' and collected.result_error is None
    assert [s["name"] for s in collected.skipped] == ["*"]
    assert "MemoryError" in collected.skipped[0]["reason"]


def test_a_cancel_that_cannot_take_the_jobs_ids_asks_for_sigkill_now(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(supervisor, "AsJob", CannotTakeIds)
    assert supervisor.terminate_job(a_job()) is False


def test_a_cancel_sends_sigterm_as_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(supervisor, "AsJob", NoIds)
    monkeypatch.setattr(supervisor.os, "kill", lambda pid, sig: sent.append((pid, sig)))
    assert supervisor.terminate_job(a_job()) is True
    assert sent == [(-1, supervisor.SIGTERM)]
