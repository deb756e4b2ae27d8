"""gVisor in the Docker tiers: one rule for whether a test may run without it.

scripts/setup registers ``runsc`` with Docker (CI does), so a missing runtime fails the test and
names the command that installs it; only ``TAKO_TEST_NO_GVISOR=1``, for machines that cannot run
gVisor at all, turns those runs into skips.
"""

from __future__ import annotations

import os

import aiodocker
import pytest

GVISOR_RUNTIME = "runsc"
GVISOR_MISSING = "runsc not registered (scripts/setup-docker --with-gvisor)"


async def registered_runtimes(docker: aiodocker.Docker) -> set[str]:
    info = await docker.system.info()
    return set(info.get("Runtimes") or {})


async def require_gvisor(docker: aiodocker.Docker) -> None:
    """Return when runsc is registered; otherwise fail (or skip, when opted out)."""
    if GVISOR_RUNTIME in await registered_runtimes(docker):
        return
    if os.environ.get("TAKO_TEST_NO_GVISOR") == "1":
        pytest.skip(GVISOR_MISSING)
    pytest.fail(GVISOR_MISSING + "; or set TAKO_TEST_NO_GVISOR=1 to skip these runs")
