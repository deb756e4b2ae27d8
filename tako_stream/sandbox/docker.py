"""The aiodocker boundary: one fresh, locked-down container per job, always removed.

Docker's errors are mapped to ours in one place, ``engine_errors``: the daemon being
unreachable is ``SandboxUnavailableError`` (transient: counted by the breaker, retried), a
container that cannot be created or started with the required settings is ``SandboxSetupError``
(fail closed: never retried with weaker settings).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Coroutine, Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import aiodocker
import aiohttp
from aiodocker.stream import Stream
from aiodocker.types import SENTINEL
from yarl import URL

from tako_stream.core.errors import (
    ImageMissingError,
    SandboxSetupError,
    SandboxUnavailableError,
    StartupTimeoutError,
    TakoError,
)
from tako_stream.core.jobtypes import Limits
from tako_stream.core.requirements import normalize
from tako_stream.sandbox.base import Prepared, SandboxRun
from tako_stream.sandbox.protocol import (
    CANCEL,
    JOB_GID,
    JOB_PYTHON,
    JOB_UID,
    FrameReader,
    supervisor_boot,
    supervisor_command,
)
from tako_stream.settings import OutputCaps

log = logging.getLogger(__name__)

#: Label put on every container we create, so strays of a dead worker can be found and reaped.
LABEL = "io.tako-stream.sandbox"
LABEL_WORKER = "io.tako-stream.worker"
LABEL_EXECUTION = "io.tako-stream.execution-id"
LABEL_HOST = "io.tako-stream.host"
LABEL_PID = "io.tako-stream.pid"

_HOST = socket.gethostname()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class DockerPrepared:
    """A started container whose supervisor waits on stdin for its one job."""

    container: aiodocker.containers.DockerContainer
    stream: Stream
    created: float = field(default_factory=time.monotonic)

    def alive(self) -> bool:
        """Whether its attach stream is still open (a daemon restart or a cut connection
        leaves a waiting container unreachable)."""
        response = self.stream._resp
        connection = response.connection if response is not None else None
        transport = connection.transport if connection is not None else None
        return transport is not None and not transport.is_closing()


@dataclass
class DockerCreated:
    """A container created but not started, with what is left of its startup timeout."""

    container: aiodocker.containers.DockerContainer
    deadline: float | None  # loop time by which it must have started, or None
    timeout: float | None  # the startup timeout itself, for messages


#: Seconds a container whose supervisor has reported is given to exit before it is deleted
#: (and so killed): it exits within milliseconds; the bound is for a starved machine.
EXIT_WAIT = 2.0


def _startup_timeout(timeout: float | None) -> StartupTimeoutError:
    return StartupTimeoutError(
        f"Container startup exceeded the startup timeout ({timeout or 0:g}s)"
    )


#: Host processes a gVisor sandbox needs besides the job's own: measured here, an idle runsc
#: container (sentry, gofer, ptrace stubs) holds about 40 host pids and each guest process one or
#: two more, and the sentry starts threads under load.
GVISOR_BASE_PIDS = 96


def host_pids_limit(limits: Limits) -> int:
    """The pids cgroup limit on the host.

    Under runc the cgroup counts exactly the job's processes.  Under gVisor it also counts the
    sandbox kernel's own threads and one ptrace stub per guest process, so the same number would
    leave a job far fewer processes (a job forking 20 children failed under load); the limit is
    scaled so the guest gets at least ``pids_limit`` while a fork bomb is still bounded.
    """
    if limits.runtime and "runsc" in limits.runtime:
        return GVISOR_BASE_PIDS + 2 * limits.pids_limit
    return limits.pids_limit


def container_config(limits: Limits, labels: Mapping[str, str]) -> dict[str, Any]:
    """The Engine API create body: every lock-down setting in one reviewable place."""
    host: dict[str, Any] = {
        "NetworkMode": "none",
        "ReadonlyRootfs": True,
        # The supervisor starts as root holding only these two, to write root-owned read-only
        # copies of code and input before dropping to nobody; the job itself has no capability.
        "CapDrop": ["ALL"],
        "CapAdd": ["CAP_SETUID", "CAP_SETGID"],
        "SecurityOpt": ["no-new-privileges:true"],
        "Memory": limits.memory,
        "MemorySwap": limits.memory,  # equal: no swap, so a memory bomb is an OOM kill
        "NanoCpus": int(limits.cpus * 1e9),
        "PidsLimit": host_pids_limit(limits),
        "Ulimits": [
            {"Name": "nofile", "Soft": limits.open_files, "Hard": limits.open_files},
            {"Name": "fsize", "Soft": limits.file_size, "Hard": limits.file_size},
        ],
        "Tmpfs": {
            "/tmp": f"rw,nosuid,nodev,noexec,size={limits.tmp_size},mode=1777",
            "/output": (
                f"rw,nosuid,nodev,noexec,size={limits.output_size},"
                f"uid={JOB_UID},gid={JOB_GID},mode=0700"
            ),
            "/code": "rw,nosuid,nodev,noexec,size=1m,mode=0755",
            "/input": "rw,nosuid,nodev,noexec,size=4m,mode=0755",
        },
        "IpcMode": "private",
        "Init": True,  # an init reaps zombies and lets signals the job sends itself work
        "LogConfig": {"Type": "none", "Config": {}},  # output comes through attach, capped
        "Privileged": False,
        "AutoRemove": False,  # we remove it ourselves, after reading its state
    }
    if limits.runtime:
        host["Runtime"] = limits.runtime
    return {
        "Image": limits.image,
        "Cmd": list(supervisor_command(JOB_PYTHON)),
        "User": "0:0",
        "WorkingDir": "/",
        "Env": ["PATH=/usr/bin:/bin", "LANG=C.UTF-8"],
        "Hostname": "sandbox",
        "NetworkDisabled": True,
        "Tty": False,
        "OpenStdin": True,
        "StdinOnce": False,
        "AttachStdin": True,
        "AttachStdout": True,
        "AttachStderr": True,
        "Labels": dict(labels),
        "HostConfig": host,
    }


#: Run in a one-shot container of an image: its installed distributions as a JSON object
#: ``{name: version}``, as a job's interpreter (``python3 -I``, site on) finds them; the first
#: of a name on ``sys.path`` wins, as it would for an import.
LISTING_SOURCE = """\
import importlib.metadata as metadata, json, sys
found = {}
for dist in metadata.distributions():
    name, version = dist.metadata["Name"], dist.version
    if isinstance(name, str) and isinstance(version, str):
        found.setdefault(name, version)
sys.stdout.write(json.dumps(found))
"""
#: Bounds on what a listing may be: an image holds hundreds of distributions, not thousands.
LISTING_CAP = 1024 * 1024
LISTING_MAX_ENTRIES = 20_000
LISTING_MAX_NAME = 200


def listing_config(limits: Limits, labels: Mapping[str, str]) -> dict[str, Any]:
    """A job container's lock-down, running ``LISTING_SOURCE`` as nobody with no capability at
    all (no job to copy in, so no set-up as root) and no stdin."""
    config = container_config(limits, labels)
    config["Cmd"] = [JOB_PYTHON, "-I", "-c", LISTING_SOURCE]
    config["User"] = f"{JOB_UID}:{JOB_GID}"
    config["OpenStdin"] = config["AttachStdin"] = False
    del config["HostConfig"]["CapAdd"]
    return config


def parse_listing(raw: bytes) -> Mapping[str, str]:
    """Normalised name → version from a listing's output, or ``ValueError`` saying what is
    wrong (the output is a container's: checked, never trusted)."""
    try:
        found = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(found, dict) or len(found) > LISTING_MAX_ENTRIES:
        raise ValueError(f"not an object of at most {LISTING_MAX_ENTRIES} names")
    listing: dict[str, str] = {}
    for name, version in found.items():
        if not (isinstance(version, str) and 0 < len(name) <= LISTING_MAX_NAME):
            raise ValueError(f"bad entry {name[:LISTING_MAX_NAME]!r}")
        listing.setdefault(normalize(name), version[:LISTING_MAX_NAME])
    return MappingProxyType(listing)


@contextlib.contextmanager
def engine_errors(step: str) -> Iterator[None]:
    """Map what the Engine API raises during ``step`` to our errors: the daemon unreachable or
    failing (a connection error, a timeout, aiodocker's 900, a 5xx) is transient; a refusal
    (4xx) or anything else is a set-up failure, never retried with weaker settings."""
    try:
        yield
    except TakoError:
        raise
    except aiodocker.DockerError as exc:
        if exc.status >= 500:
            raise SandboxUnavailableError(
                f"Docker daemon unreachable during {step}: {exc}"
            ) from exc
        if exc.status == 404 and "image" in str(exc.message).lower():
            # Tako VM's docker_error: the job type's image was never built (or was removed).
            raise ImageMissingError(f"Docker image not found: {exc.message}") from exc
        raise SandboxSetupError(f"Container {step} failed: {exc.message}") from exc
    except (aiohttp.ClientError, OSError) as exc:  # OSError covers TimeoutError
        raise SandboxUnavailableError(f"Docker daemon unreachable during {step}: {exc}") from exc
    except Exception as exc:
        raise SandboxSetupError(f"Container {step} failed: {exc!r}") from exc


def _attach(docker: aiodocker.Docker, container_id: str, *, stdin: bool = True) -> Stream:
    """An attach stream to stdin, stdout and stderr.  ``DockerContainer.attach`` inspects the
    container first only to learn whether it has a TTY; ours never do, and that inspect was one
    Engine API call in five of every job's."""

    async def setup() -> tuple[URL, bytes | None, bool]:
        query: dict[str, str | int] = {"detachKeys": "", "logs": 0, "stream": 1}
        query.update(stdin=int(stdin), stdout=1, stderr=1)
        return URL(f"containers/{container_id}/attach").with_query(query), None, False

    return Stream(docker, setup, docker._resolve_long_running_timeout(SENTINEL))


class DockerSandbox:
    """Runs one job per fresh container through the Engine API."""

    def __init__(
        self,
        docker: aiodocker.Docker,
        *,
        worker_id: str,
        timeout_grace: float,
        api_timeout: float = 20.0,
    ) -> None:
        """``docker`` should bound its API calls (``aiodocker.Docker(timeout=...)``) by
        ``api_timeout``; the calls aiodocker leaves unbounded (attach, wait) are bounded here."""
        self._docker = docker
        self._worker_id = worker_id
        self._grace = timeout_grace
        self._api_timeout = api_timeout
        self._removals: set[asyncio.Task[None]] = set()
        #: The containers this sandbox owns and has not handed to removal: by name while their
        #: create is under way, by id once made.  ``sweep`` removes the worker's others.
        self._creating: set[str] = set()
        self._live: set[str] = set()
        #: Containers whose removal is under way (``sweep`` leaves them to it), and set while
        #: ``drain`` runs: no removal waits for a container's own exit then.
        self._removing: set[str] = set()
        self._hurry = asyncio.Event()
        #: Each image's distributions by image id (a rebuilt tag is listed again), and the
        #: listings under way, so concurrent jobs on a new image start one container, not many.
        self._listings: dict[str, Mapping[str, str]] = {}
        self._listing: dict[str, asyncio.Future[Mapping[str, str]]] = {}

    async def ping(self) -> None:
        """Raise ``SandboxUnavailableError`` unless the daemon answers."""
        try:
            with engine_errors("ping"):
                await asyncio.wait_for(self._docker.system.info(), 5)
        except SandboxSetupError as exc:  # a refused ping still means the daemon is not usable
            raise SandboxUnavailableError(str(exc)) from exc

    async def engine_facts(self, images: list[str]) -> tuple[list[str], dict[str, bool]]:
        """The engine's OCI runtimes and, for each of ``images``, whether it has it;
        ``SandboxUnavailableError`` when it does not answer (each call bounded)."""
        with engine_errors("info"):
            info = await asyncio.wait_for(self._docker.system.info(), self._api_timeout)
        runtimes = sorted(info.get("Runtimes") or {}) if isinstance(info, dict) else []
        present: dict[str, bool] = {}
        for image in images:
            try:
                with engine_errors("inspect image"):
                    await asyncio.wait_for(self._docker.images.inspect(image), self._api_timeout)
            except SandboxUnavailableError:
                raise
            except SandboxSetupError:  # 404 (ImageMissingError) or refused: not usable there
                present[image] = False
            else:
                present[image] = True
        return runtimes, present

    async def prepare(self, limits: Limits, *, execution_id: str = "warm") -> DockerPrepared:
        """Create, attach and start a container; its supervisor then waits for one job.

        ``limits.startup_timeout`` bounds the whole of it (``StartupTimeoutError``); without
        it each Engine API call is bounded on its own, as before."""
        created = await self._create(limits, self._labels(execution_id))
        return await self._start(created)

    def _labels(self, execution_id: str) -> dict[str, str]:
        return {
            LABEL: "1",
            LABEL_WORKER: self._worker_id,
            LABEL_EXECUTION: execution_id,
            LABEL_HOST: _HOST,
            LABEL_PID: str(os.getpid()),
        }

    async def _create(
        self, limits: Limits, labels: Mapping[str, str], config: dict[str, Any] | None = None
    ) -> DockerCreated:
        """Create the container (``config``, else a job's); the clock of ``startup_timeout``
        starts here and goes on in the ``DockerCreated``."""
        loop = asyncio.get_running_loop()
        timeout = limits.startup_timeout
        deadline = None if timeout is None else loop.time() + timeout
        body = config if config is not None else container_config(limits, labels)
        name = f"tako-{uuid.uuid4().hex[:12]}"

        async def create() -> aiodocker.containers.DockerContainer:
            with engine_errors("create"):
                return await self._docker.containers.create(body, name=name)

        # Not cancelled when the deadline passes: the daemon would go on creating a container
        # nobody removes.  It is left to finish and removed then.
        self._creating.add(name)
        creating = asyncio.ensure_future(create())
        creating.add_done_callback(lambda done: self._made(name, done))
        try:
            async with asyncio.timeout_at(deadline):
                container = await asyncio.shield(creating)
        except BaseException as exc:
            # A removal task of its own from now on, so ``drain`` waits for the create to end
            # and its container to go (a warm pool's refill cancelled at shutdown lands here).
            self._in_background(self._remove_when_created(creating, name))
            if isinstance(exc, TimeoutError):
                raise _startup_timeout(timeout) from None
            raise
        return DockerCreated(container, deadline, timeout)

    def _made(
        self, name: str, creating: asyncio.Future[aiodocker.containers.DockerContainer]
    ) -> None:
        """The create has ended: its container, if the sandbox learnt of it, is known by id."""
        if not creating.cancelled() and creating.exception() is None:
            self._live.add(creating.result().id)
        self._creating.discard(name)

    async def _start(self, created: DockerCreated) -> DockerPrepared:
        container = created.container
        prepared = DockerPrepared(container, _attach(self._docker, container.id))
        try:
            async with asyncio.timeout_at(created.deadline):
                with engine_errors("start"):
                    async with asyncio.timeout(self._api_timeout):  # a hung daemon never answers
                        await prepared.stream._init()  # attach before start: no output missed
                        await container.start()
                        # its first code comes on stdin (see SUPERVISOR_BOOT: not in its command)
                        await prepared.stream.write_in(supervisor_boot())
        except BaseException as exc:
            await self.discard(prepared)
            # engine_errors maps every TimeoutError of its own: one here is the deadline's
            if isinstance(exc, TimeoutError):
                raise _startup_timeout(created.timeout) from None
            raise
        return prepared

    async def _remove_when_created(
        self, creating: asyncio.Future[aiodocker.containers.DockerContainer], name: str
    ) -> None:
        try:
            container = await creating
        except SandboxUnavailableError:
            # The engine may have made it and lost the answer (a daemon killed or restarted
            # mid-request, a 5xx, a timeout): removed by the name this sandbox chose, a 404
            # when it was never made.
            container = self._docker.containers.container(name)
        except Exception:  # refused: nothing was made (the create's own error is reported)
            return
        await self._remove(container)

    def _in_background(self, removal: Coroutine[None, None, None]) -> None:
        """Run ``removal`` as a task ``drain`` waits for."""
        task = asyncio.ensure_future(removal)
        self._removals.add(task)
        task.add_done_callback(self._removals.discard)

    async def distributions(self, limits: Limits) -> Mapping[str, str]:
        """The Python distributions in ``limits.image`` (normalised name → version), listed
        once per image id by a one-shot locked-down container.

        ``ImageMissingError`` when the image is not there; ``SandboxUnavailableError`` when
        the engine does not answer or the listing takes too long (transient: retried);
        ``SandboxSetupError`` when the image's listing makes no sense (never trusted)."""
        with engine_errors("image inspect"):
            async with asyncio.timeout(self._api_timeout):
                image_id = str((await self._docker.images.inspect(limits.image))["Id"])
        known = self._listings.get(image_id)
        if known is not None:
            return known
        pending = self._listing.get(image_id)
        if pending is None:
            pending = asyncio.ensure_future(self._list(limits))
            self._listing[image_id] = pending

            def settle(done: asyncio.Future[Mapping[str, str]]) -> None:
                self._listing.pop(image_id, None)
                if not done.cancelled() and done.exception() is None:
                    self._listings[image_id] = done.result()

            pending.add_done_callback(settle)
        # shielded: one waiter cancelled (its job cancelled) does not end the others' listing
        return await asyncio.shield(pending)

    async def _list(self, limits: Limits) -> Mapping[str, str]:
        """Run ``LISTING_SOURCE`` in ``limits.image``, whatever the request's startup timeout."""
        limits = replace(limits, startup_timeout=None)
        created = await self._create(
            limits, self._labels("listing"), listing_config(limits, self._labels("listing"))
        )
        container = created.container
        stream = _attach(self._docker, container.id, stdin=False)
        prepared = DockerPrepared(container, stream)
        out = bytearray()
        try:
            with engine_errors("listing"):
                # create is bounded by the client, this by one budget: a python3 start-up and
                # a scan of site-packages take well under a second.
                async with asyncio.timeout(self._api_timeout + 10):
                    await stream._init()
                    await container.start()
                    while (message := await stream.read_out()) is not None:
                        if message.stream == 1:
                            out += message.data
                            if len(out) > LISTING_CAP:
                                raise SandboxSetupError(
                                    f"the distribution listing of {limits.image} exceeds "
                                    f"{LISTING_CAP} bytes"
                                )
                    exit_code = (await container.wait()).get("StatusCode")
        finally:
            await self.discard(prepared)
        if exit_code != 0:
            raise SandboxSetupError(
                f"could not list the distributions of {limits.image} (exit {exit_code})"
            )
        try:
            listing = parse_listing(bytes(out))
        except ValueError as exc:
            raise SandboxSetupError(
                f"the distribution listing of {limits.image} is unusable: {exc}"
            ) from None
        log.info("image %s holds %d distributions", limits.image, len(listing))
        return listing

    async def run(
        self,
        job: bytes,
        limits: Limits,
        *,
        execution_id: str,
        caps: OutputCaps,
        prepared: Prepared | None = None,
        cancel: asyncio.Event | None = None,
    ) -> SandboxRun:
        """Run one job in a fresh container (``prepared`` ahead of time, or created now), then
        remove the container whatever happens."""
        warm = prepared is not None
        began = time.monotonic()
        if prepared is not None and not prepared.alive():
            await self.discard(prepared)
            raise SandboxUnavailableError("a warm container lost its connection to Docker")
        container = (
            _own(prepared)
            if prepared is not None
            else await self.prepare(limits, execution_id=execution_id)
        )
        reported = False
        try:
            run = await self._execute(
                container,
                job,
                limits,
                FrameReader.for_caps(caps),
                cancel,
            )
            reported = run.collected.report is not None
            run.warm = warm
            run.seconds = time.monotonic() - began
            return run
        finally:
            await self._discard(container, exiting=reported)

    async def discard(self, prepared: Prepared) -> None:
        """Close, and remove in the background: the job's answer need not wait for Docker to
        delete its container (~50-100 ms).  The removal is its own task, so a cancelled job
        (shutdown, revoke) still leaves nothing behind, and ``drain`` waits for all of them."""
        await self._discard(_own(prepared), exiting=False)

    async def _discard(self, container: DockerPrepared, *, exiting: bool) -> None:
        """``exiting``: its supervisor has sent its report, so it is stopping on its own."""
        await container.stream.close()
        self._in_background(self._remove(container.container, exiting=exiting))

    async def _execute(
        self,
        prepared: DockerPrepared,
        job: bytes,
        limits: Limits,
        reader: FrameReader,
        cancel: asyncio.Event | None = None,
    ) -> SandboxRun:
        container, stream = prepared.container, prepared.stream
        started = time.monotonic()
        outer_timeout = False
        cancel_sent = False

        async def forward_cancel(event: asyncio.Event) -> None:
            nonlocal cancel_sent
            await event.wait()
            with contextlib.suppress(Exception):  # the job may be ending anyway
                await stream.write_in(CANCEL)
                cancel_sent = True
                log.info("cancel sent to the running job")

        watcher: asyncio.Future[None] | None = None
        try:
            with engine_errors("start"):
                async with asyncio.timeout(self._api_timeout):
                    await stream.write_in(job)
            if cancel is not None:  # only now: a cancel byte must follow the whole job
                watcher = asyncio.ensure_future(forward_cancel(cancel))
            try:
                async with asyncio.timeout(limits.timeout + self._grace):
                    while not reader.done:
                        message = await stream.read_out()
                        if message is None:
                            break
                        if message.stream == 1:
                            reader.feed(message.data)
                        else:
                            reader.feed_diagnostics(message.data)
            except TimeoutError:
                outer_timeout = True
        finally:
            if watcher is not None:
                watcher.cancel()
            await stream.close()
        report = reader.collected.report
        oom_killed, container_exit = False, None
        # The container's own state matters when the job may have been SIGKILLed (Docker alone
        # knows whether the memory cgroup did it) and when the stream ended without a report:
        # a daemon that no longer answers then raises SandboxUnavailableError (the job is not
        # at fault: retried, counted by the breaker).
        if report is None or (report.exit_code == 137 and not report.timed_out):
            oom_killed, container_exit = await self._final_state(container, kill=outer_timeout)
        return SandboxRun(
            collected=reader.collected,
            oom_killed=oom_killed,
            container_exit=container_exit,
            outer_timeout=outer_timeout,
            seconds=time.monotonic() - started,
            cancel_sent=cancel_sent,
        )

    async def _final_state(
        self, container: aiodocker.containers.DockerContainer, *, kill: bool
    ) -> tuple[bool, int | None]:
        """(OOM-killed, exit code) of a container that has ended or is being killed;
        ``SandboxUnavailableError`` when the daemon does not answer."""
        try:
            with engine_errors("inspect"):
                async with asyncio.timeout(self._api_timeout):
                    if kill:
                        with contextlib.suppress(aiodocker.DockerError):
                            await container.kill()
                    await container.wait()
                    info = await container.show()
        except SandboxSetupError as exc:  # the daemon answered, but not with the state
            log.warning("could not read final container state: %s", exc)
            return False, None
        state = info.get("State", {})
        return bool(state.get("OOMKilled")), state.get("ExitCode")

    async def _remove(
        self, container: aiodocker.containers.DockerContainer, *, exiting: bool = False
    ) -> None:
        """``exiting``: it stops on its own, so it is given ``EXIT_WAIT`` seconds to exit before
        it is deleted.  Deleting a running container kills it first: a kill through containerd
        and the runtime (one more runsc process under gVisor) and one more state written to
        disk by the engine, for a supervisor that exits a moment after its report anyway."""
        # Retried for about 20 s: a daemon restart (which stops every container first) takes
        # more than a few seconds; one given up on is no longer live, so ``sweep`` finds it.
        self._live.discard(container.id)
        self._removing.add(container.id)
        try:
            if exiting:
                await self._exited(container)
            await self._delete(container)
        finally:
            self._removing.discard(container.id)

    async def _exited(self, container: aiodocker.containers.DockerContainer) -> None:
        """Return once ``container`` has exited, ``EXIT_WAIT`` seconds have passed or a drain
        has begun (a stopping worker's removals must fit its drain), whichever comes first;
        a failure (the engine away) leaves it to the forced delete."""
        exited = asyncio.ensure_future(container.wait())
        hurry = asyncio.ensure_future(self._hurry.wait())
        try:
            await asyncio.wait(
                {exited, hurry}, timeout=EXIT_WAIT, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for waiting in (exited, hurry):
                waiting.cancel()
            # retrieved, so a failed wait is not reported as an exception nobody saw
            await asyncio.gather(exited, hurry, return_exceptions=True)

    async def _delete(self, container: aiodocker.containers.DockerContainer) -> None:
        for attempt in range(8):
            if attempt:
                await asyncio.sleep(min(5.0, 0.5 * 2 ** (attempt - 1)))
            try:
                await container.delete(force=True, v=True)
                return
            except aiodocker.DockerError as exc:
                if exc.status == 404:
                    return
                log.warning("container %s removal failed: %s", container.id[:12], exc)
            except Exception as exc:  # daemon unreachable: try again shortly
                log.warning("container %s removal failed: %s", container.id[:12], exc)

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait for background removals (those that start meanwhile too), so a stopping worker
        leaves no container behind; at most ``timeout`` (with the daemon away, the next start
        on this host reaps the rest)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._hurry.set()  # removals waiting for a container's own exit delete it now
        try:
            while self._removals and loop.time() < deadline:
                await asyncio.wait(set(self._removals), timeout=deadline - loop.time())
            pending = set(self._removals)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        finally:
            self._hurry.clear()

    async def sweep(self) -> int:
        """Remove this worker's containers that it no longer owns: ones whose removal gave up
        while the engine was away, or that the engine made while the worker lost track of
        them.  Containers being created, prepared, run or removed are left alone.  Returns how many;
        the removals run in the background (``drain`` waits for them)."""
        with engine_errors("list"):
            async with asyncio.timeout(self._api_timeout):
                found = await self._docker.containers.list(
                    all=True, filters={"label": [f"{LABEL_WORKER}={self._worker_id}"]}
                )
        # Compared after the listing returns: a create ending meanwhile moved its container
        # from _creating to _live in one step, so it is in one or the other.
        strays = [
            container
            for container in found
            if container.id not in self._live
            and container.id not in self._removing
            and not any(n.lstrip("/") in self._creating for n in container["Names"] or [])
        ]
        for container in strays:
            self._in_background(self._remove(container))
        return len(strays)

    async def reap(self) -> int:
        """Remove sandboxes left behind by dead workers; returns how many.

        A container is a stray when it carries this worker's id (a restart under a static id),
        or was made on this host by a process that is gone.  Live workers' containers are left
        alone: their owners remove them.
        """
        with engine_errors("list"):
            found = await self._docker.containers.list(all=True, filters={"label": [LABEL]})
        strays = [c for c in found if self._is_stray(c["Labels"] or {})]
        for container in strays:
            await self._remove(container)
        return len(strays)

    def _is_stray(self, labels: Mapping[str, str]) -> bool:
        if labels.get(LABEL_WORKER) == self._worker_id:
            return True
        if labels.get(LABEL_HOST) != _HOST:
            return False
        try:
            pid = int(labels.get(LABEL_PID, ""))
        except ValueError:
            return False
        return pid != os.getpid() and not _alive(pid)


def _own(prepared: Prepared) -> DockerPrepared:
    """A prepared sandbox is only ever handed back to the sandbox that made it."""
    if not isinstance(prepared, DockerPrepared):
        raise TypeError(f"not a Docker container: {prepared!r}")
    return prepared
