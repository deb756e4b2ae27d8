"""The Engine API create body: the lock-down settings every container gets."""

from __future__ import annotations

from tako_stream.sandbox.docker import GVISOR_BASE_PIDS, Limits, container_config

MiB = 1024 * 1024


def limits(**fields: object) -> Limits:
    base: dict[str, object] = {
        "image": "img",
        "memory": 256 * MiB,
        "cpus": 1.0,
        "pids_limit": 128,
        "timeout": 5.0,
    }
    return Limits(**{**base, **fields})  # type: ignore[arg-type]


def test_locked_down() -> None:
    host = container_config(limits(), {"tako-stream.pool": "x"})["HostConfig"]
    assert host["NetworkMode"] == "none"
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"]
    assert host["SecurityOpt"] == ["no-new-privileges:true"]
    assert host["Memory"] == host["MemorySwap"] == 256 * MiB
    assert host["PidsLimit"] == 128
    assert host["Privileged"] is False
    assert "Runtime" not in host


def test_gvisor_pids_limit_leaves_room_for_the_sandbox_kernel() -> None:
    host = container_config(limits(runtime="runsc"), {})["HostConfig"]
    assert host["Runtime"] == "runsc"
    assert host["PidsLimit"] == GVISOR_BASE_PIDS + 2 * 128
