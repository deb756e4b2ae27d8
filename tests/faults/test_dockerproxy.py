"""The fault-injecting Docker proxy, exercised against the real daemon with aiodocker."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import pytest
from aiodocker.exceptions import DockerError

from tests.faults.dockerproxy import DockerProxy, ProxyControl

pytestmark = pytest.mark.integration

IMAGE = "tako-stream/default:1"
NAME_PREFIX = "tako-proxytest-"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def sock_dir() -> Iterator[str]:
    # AF_UNIX paths are limited to ~107 bytes: pytest's tmp_path can be too long.
    d = tempfile.mkdtemp(prefix="tkp-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(params=["loop", "thread"])
async def proxy(request: pytest.FixtureRequest, sock_dir: str) -> AsyncIterator[DockerProxy]:
    """The proxy on the test's event loop, or on its own loop in a thread."""
    p = DockerProxy(os.path.join(sock_dir, "docker.sock"))
    if request.param == "loop":
        async with p:
            yield p
    else:
        p.start_in_thread()
        try:
            yield p
        finally:
            p.stop_thread()
    assert not path_exists(p.listen_path)


@pytest.fixture
async def client(proxy: DockerProxy) -> AsyncIterator[aiodocker.Docker]:
    docker = aiodocker.Docker(url=proxy.docker_host)
    yield docker
    await docker.close()


@pytest.fixture
async def direct() -> AsyncIterator[aiodocker.Docker]:
    """Straight to the daemon: for clean-up that must work while the proxy is down."""
    docker = aiodocker.Docker(url="unix:///var/run/docker.sock")
    yield docker
    await docker.close()


@pytest.fixture
async def names(direct: aiodocker.Docker) -> AsyncIterator[list[str]]:
    """Container names handed out to a test; whatever exists afterwards is force-deleted."""
    created: list[str] = []
    yield created
    for name in created:
        try:
            await direct.containers.container(name).delete(force=True)
        except DockerError as exc:
            if exc.status != 404:
                raise


def path_exists(path: str) -> bool:
    return os.path.exists(path)


def new_name(names: list[str]) -> str:
    name = f"{NAME_PREFIX}{uuid.uuid4().hex[:12]}"
    names.append(name)
    return name


def config(cmd: list[str], **extra: Any) -> dict[str, Any]:
    return {"Image": IMAGE, "Cmd": cmd, "HostConfig": {"NetworkMode": "none"}, **extra}


async def exists(docker: aiodocker.Docker, name: str) -> bool:
    try:
        await docker.containers.get(name)
    except DockerError as exc:
        if exc.status == 404:
            return False
        raise
    return True


async def test_info_through_proxy(proxy: DockerProxy, client: aiodocker.Docker) -> None:
    info = await client.system.info()
    assert info["ID"]
    assert (await client.version())["ApiVersion"]
    stats = proxy.stats()
    assert stats.forwarded == stats.requests >= 2
    assert stats.failed == 0
    assert any(m == "GET" and t.split("?")[0].endswith("/info") for m, t in stats.seen)


async def test_docker_host_env_is_honoured(
    proxy: DockerProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", proxy.docker_host)
    docker = aiodocker.Docker()
    try:
        await docker.system.info()
    finally:
        await docker.close()
    assert proxy.stats().requests >= 1


async def test_attach_stdin_stdout_through_upgrade(
    proxy: DockerProxy, client: aiodocker.Docker, names: list[str]
) -> None:
    script = "import sys; print(sys.stdin.readline().upper())"
    container = await client.containers.create(
        config(
            ["python3", "-c", script],
            OpenStdin=True,
            AttachStdin=True,
            AttachStdout=True,
            AttachStderr=True,
            StdinOnce=True,
            Tty=False,
        ),
        name=new_name(names),
    )
    try:
        out = b""
        async with asyncio.timeout(60):
            async with container.attach(stdin=True, stdout=True, stderr=True) as stream:
                await container.start()
                await stream.write_in(b"hello through the proxy\n")
                while (msg := await stream.read_out()) is not None:
                    assert msg.stream == 1, msg
                    out += msg.data
            result = await container.wait()
        assert out == b"HELLO THROUGH THE PROXY\n\n"
        assert result["StatusCode"] == 0
        assert proxy.stats().upgrades == 1
        # The pooled keep-alive connections still work after the hijacked one is gone.
        assert (await client.system.info())["ID"]
    finally:
        await container.delete(force=True)


async def test_stdin_eof_is_forwarded_as_half_close(
    proxy: DockerProxy, client: aiodocker.Docker, names: list[str]
) -> None:
    """Closing the attach stream's write side must reach the container as stdin EOF."""
    script = "import sys; data = sys.stdin.read(); print(len(data), data.count('x'))"
    container = await client.containers.create(
        config(
            ["python3", "-c", script],
            OpenStdin=True,
            AttachStdin=True,
            AttachStdout=True,
            StdinOnce=True,
        ),
        name=new_name(names),
    )
    try:
        async with asyncio.timeout(60):
            stream = container.attach(stdin=True, stdout=True)
            await stream._init()  # upgrade now, before start: no output may be missed
            await container.start()
            payload = b"x" * 300_000
            await stream.write_in(payload)
            conn = stream._resp.connection if stream._resp is not None else None
            assert conn is not None and conn.transport is not None
            conn.transport.write_eof()  # half-close: stdin EOF, stdout still open
            out = b""
            while (msg := await stream.read_out()) is not None:
                out += msg.data
            await stream.close()
            result = await container.wait()
        assert out == b"300000 300000\n"
        assert result["StatusCode"] == 0
    finally:
        await container.delete(force=True)


async def test_long_wait_and_chunked_logs(
    proxy: DockerProxy, client: aiodocker.Docker, names: list[str]
) -> None:
    script = "import time\nfor i in range(3):\n    print('line', i, flush=True); time.sleep(0.5)"
    container = await client.containers.create(
        config(["python3", "-c", script]), name=new_name(names)
    )
    try:
        await container.start()
        async with asyncio.timeout(60):
            wait_task = asyncio.create_task(container.wait())
            lines = [
                line async for line in container.log(stdout=True, follow=True)
            ]  # chunked, streamed while the container runs
            result = await wait_task
        assert "".join(lines).split("\n")[:3] == ["line 0", "line 1", "line 2"]
        assert result["StatusCode"] == 0
        assert proxy.stats().chunked_responses >= 1
    finally:
        await container.delete(force=True)


async def test_fail_next_fails_exactly_the_next_create(
    proxy: DockerProxy,
    client: aiodocker.Docker,
    direct: aiodocker.Docker,
    names: list[str],
) -> None:
    rule = proxy.fail_next(1)
    await client.system.info()  # does not match: forwarded
    first = new_name(names)
    with pytest.raises(DockerError) as err:
        await client.containers.create(config(["true"]), name=first)
    assert err.value.status == 500
    assert err.value.message == "injected fault"
    assert not await exists(direct, first)  # never reached the daemon

    second = new_name(names)
    container = await client.containers.create(config(["true"]), name=second)
    try:
        assert await exists(direct, second)
    finally:
        await container.delete(force=True)
    assert rule.matched == 1 and not rule.active
    stats = proxy.stats()
    assert stats.failed == 1
    assert stats.requests == stats.forwarded + 1


async def test_fail_always_and_clear_keep_the_connection_alive(
    proxy: DockerProxy, client: aiodocker.Docker
) -> None:
    await client.system.info()
    before = proxy.stats().connections
    proxy.fail_always("GET", r"/info$", status=503, message="daemon busy")
    for _ in range(5):
        with pytest.raises(DockerError) as err:
            await client.system.info()
        assert (err.value.status, err.value.message) == (503, "daemon busy")
    await client.version()  # other requests still pass
    proxy.clear()
    assert (await client.system.info())["ID"]
    # The injected errors were keep-alive safe: the same pooled connection served everything.
    assert proxy.stats().connections == before
    assert proxy.stats().failed == 5


async def test_fault_after_forwarding_leaves_the_container_behind(
    proxy: DockerProxy,
    client: aiodocker.Docker,
    direct: aiodocker.Docker,
    names: list[str],
) -> None:
    proxy.fail_next(1, when="after", status=502, message="lost reply")
    name = new_name(names)
    with pytest.raises(DockerError) as err:
        await client.containers.create(config(["true"]), name=name)
    assert (err.value.status, err.value.message) == (502, "lost reply")
    assert await exists(direct, name)  # the daemon did create it
    assert (await client.system.info())["ID"]


async def test_drop_closes_the_connection_without_answer(
    proxy: DockerProxy,
    client: aiodocker.Docker,
    direct: aiodocker.Docker,
    names: list[str],
) -> None:
    proxy.fail_next(1, action="drop")
    name = new_name(names)
    with pytest.raises(DockerError) as err:
        await client.containers.create(config(["true"]), name=name)
    assert err.value.status == 900
    assert not await exists(direct, name)
    assert (await client.system.info())["ID"]


@pytest.mark.parametrize("style", ["refuse", "missing"])
async def test_down_and_up(proxy: DockerProxy, client: aiodocker.Docker, style: str) -> None:
    await client.system.info()
    proxy.set_down(True, style=style)  # type: ignore[arg-type]
    assert proxy.down
    for _ in range(2):
        with pytest.raises(DockerError) as err:
            await client.system.info()
        assert err.value.status == 900
        expected = "Connection refused" if style == "refuse" else "No such file or directory"
        assert expected in err.value.message
    assert path_exists(proxy.listen_path) == (style == "refuse")
    proxy.set_down(False)
    assert (await client.system.info())["ID"]


async def test_down_hang_times_out(proxy: DockerProxy, client: aiodocker.Docker) -> None:
    await client.system.info()
    proxy.set_down(True, style="hang")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            await client.system.info()
    proxy.set_down(False)
    assert (await client.system.info())["ID"]


async def test_down_cuts_a_pending_wait(
    proxy: DockerProxy,
    client: aiodocker.Docker,
    direct: aiodocker.Docker,
    names: list[str],
) -> None:
    container = await client.containers.create(config(["sleep", "60"]), name=new_name(names))
    await container.start()
    wait_task = asyncio.create_task(container.wait())
    async with asyncio.timeout(10):
        for _ in range(500):
            if any(t.split("?")[0].endswith("/wait") for _, t in proxy.stats().seen):
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)  # let the daemon send the response head
    proxy.set_down(True)
    # Docker flushes the wait response's head at once: the cut lands in the body, which
    # aiodocker does not wrap, so this is aiohttp's payload error rather than DockerError(900).
    with pytest.raises(aiohttp.ClientPayloadError):
        async with asyncio.timeout(10):
            await wait_task
    assert proxy.stats().cut >= 1
    proxy.set_down(False)
    await direct.containers.container(container.id).kill()
    assert (await client.containers.get(container.id))["State"]["Running"] is False


async def test_many_concurrent_requests_over_keepalive(
    proxy: DockerProxy, client: aiodocker.Docker
) -> None:
    proxy.fail_next(10, "GET", r"/containers/json", status=500, message="flaky list")

    async def list_containers() -> str:
        try:
            await client.containers.list(all=True)
        except DockerError as exc:
            assert (exc.status, exc.message) == (500, "flaky list")
            return "failed"
        return "ok"

    async def info() -> str:
        assert (await client.system.info())["ID"]
        return "ok"

    async with asyncio.timeout(120):
        await client.version()
        proxy.reset_stats()
        results: list[str] = []
        for _ in range(4):
            results += await asyncio.gather(
                *(list_containers() for _ in range(25)), *(info() for _ in range(25))
            )
    assert results.count("failed") == 10
    assert len(results) == 200
    stats = proxy.stats()
    assert (stats.requests, stats.forwarded, stats.failed) == (200, 190, 10)
    # Connections were reused (aiohttp's pool is 100 wide; 4 rounds of 50 need at most 50
    # each unless keep-alive broke).
    assert stats.connections <= 100


async def test_standalone_process_with_control_port(
    sock_dir: str, direct: aiodocker.Docker, names: list[str]
) -> None:
    path = os.path.join(sock_dir, "proc.sock")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.faults.dockerproxy",
        path,
        "--control",
        "0",
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    port = 0
    try:
        async with asyncio.timeout(30):
            while (line := (await proc.stdout.readline()).decode().strip()) != "READY":
                assert line, "proxy process exited before READY"
                if line.startswith("CONTROL "):
                    port = int(line.rsplit(":", 1)[1])
        ctl = ProxyControl(port)
        await asyncio.to_thread(ctl.ping)
        docker = aiodocker.Docker(url=f"unix://{path}")
        try:
            assert (await docker.system.info())["ID"]

            await asyncio.to_thread(ctl.set_down, True)
            with pytest.raises(DockerError) as err:
                await docker.system.info()
            assert err.value.status == 900
            await asyncio.to_thread(ctl.set_down, False)
            assert (await docker.system.info())["ID"]

            await asyncio.to_thread(ctl.fail_next, 1, message="from afar")
            with pytest.raises(DockerError) as err:
                await docker.containers.create(config(["true"]), name=new_name(names))
            assert (err.value.status, err.value.message) == (500, "from afar")
            container = await docker.containers.create(config(["true"]), name=new_name(names))
            await container.delete(force=True)

            stats = await asyncio.to_thread(ctl.stats)
            assert stats["failed"] == 1
            creates = [t for m, t in stats["seen"] if m == "POST" and "/containers/create" in t]
            assert len(creates) == 2
            assert stats["seen"][-1][0] == "DELETE"
            with pytest.raises(RuntimeError, match="unknown command"):
                await asyncio.to_thread(ctl.command, "NOPE")
        finally:
            await docker.close()
        await asyncio.to_thread(ctl.shutdown)
        async with asyncio.timeout(15):
            assert await proc.wait() == 0
        assert not path_exists(path)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# ---- raw HTTP through the proxy: framings aiodocker does not exercise ----------------------


async def read_response(
    reader: asyncio.StreamReader, *, head_only: bool = False
) -> tuple[int, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    lines = head.split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if line:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
    body = b""
    if head_only or status < 200 or status in (204, 304):
        return status, headers, body
    if headers.get("transfer-encoding") == "chunked":
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += await reader.readexactly(size)
            assert await reader.readexactly(2) == b"\r\n"
        assert await reader.readuntil(b"\r\n") == b"\r\n"
    elif "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    return status, headers, body


def chunked(data: bytes, size: int = 7) -> bytes:
    parts = [
        b"%x\r\n%s\r\n" % (len(data[i : i + size]), data[i : i + size])
        for i in range(0, len(data), size)
    ]
    return b"".join(parts) + b"0\r\n\r\n"


def create_request(name: str, *, framing: str, extra: str = "") -> tuple[bytes, bytes]:
    body = json.dumps(config(["true"])).encode()
    head = f"POST /v1.41/containers/create?name={name} HTTP/1.1\r\nHost: docker\r\n"
    head += "Content-Type: application/json\r\n" + extra
    if framing == "chunked":
        return (head + "Transfer-Encoding: chunked\r\n\r\n").encode(), chunked(body)
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode(), body


async def test_raw_pipelined_keepalive_with_chunked_bodies(
    proxy: DockerProxy, direct: aiodocker.Docker, names: list[str]
) -> None:
    proxy.fail_next(1, status=409, message="conflict!")
    failed_name, created_name = new_name(names), new_name(names)
    reader, writer = await asyncio.open_unix_connection(proxy.listen_path)
    try:
        ping = b"GET /_ping HTTP/1.1\r\nHost: docker\r\n\r\n"
        head_ping = b"HEAD /_ping HTTP/1.1\r\nHost: docker\r\n\r\n"
        last = b"GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n"
        # Everything in one write: the proxy must split the pipelined requests itself.
        writer.write(
            b"".join(create_request(failed_name, framing="chunked"))
            + ping
            + head_ping
            + b"".join(create_request(created_name, framing="chunked"))
            + last
        )
        await writer.drain()
        async with asyncio.timeout(30):
            status, headers, body = await read_response(reader)
            assert (status, json.loads(body)) == (409, {"message": "conflict!"})
            assert headers["content-type"] == "application/json"
            assert (await read_response(reader))[::2] == (200, b"OK")
            assert (await read_response(reader, head_only=True))[0] == 200
            status, _, body = await read_response(reader)
            assert status == 201 and json.loads(body)["Id"]
            assert (await read_response(reader))[::2] == (200, b"OK")
            assert await reader.read() == b""  # Connection: close honoured
    finally:
        writer.close()
    assert not await exists(direct, failed_name)
    assert await exists(direct, created_name)
    assert proxy.stats().connections == 1


async def test_raw_expect_100_continue(
    proxy: DockerProxy, direct: aiodocker.Docker, names: list[str]
) -> None:
    name = new_name(names)
    head, body = create_request(name, framing="length", extra="Expect: 100-continue\r\n")
    reader, writer = await asyncio.open_unix_connection(proxy.listen_path)
    try:
        async with asyncio.timeout(30):
            writer.write(head)
            assert (await read_response(reader))[0] == 100
            writer.write(body)
            assert (await read_response(reader))[0] == 201
    finally:
        writer.close()
    assert await exists(direct, name)


async def test_raw_attach_without_upgrade_header(
    proxy: DockerProxy, client: aiodocker.Docker, names: list[str]
) -> None:
    """Docker's old hijack: 200 OK with no framing, then raw bidirectional bytes."""
    script = "import sys; print(sys.stdin.read()[::-1])"
    container = await client.containers.create(
        config(["python3", "-c", script], OpenStdin=True, AttachStdin=True, StdinOnce=True),
        name=new_name(names),
    )
    reader, writer = await asyncio.open_unix_connection(proxy.listen_path)
    try:
        async with asyncio.timeout(60):
            writer.write(
                f"POST /v1.41/containers/{container.id}/attach?stream=1&stdin=1&stdout=1"
                " HTTP/1.1\r\nHost: docker\r\nContent-Length: 0\r\n\r\n".encode()
            )
            status, headers, _ = await read_response(reader, head_only=True)
            assert status == 200
            assert headers["content-type"] == "application/vnd.docker.raw-stream"
            await container.start()
            writer.write(b"abc")
            writer.write_eof()  # stdin EOF through the half-close
            raw = await reader.read()  # until the daemon closes
            out = b""
            while raw:
                size = int.from_bytes(raw[4:8], "big")
                out += raw[8 : 8 + size]
                raw = raw[8 + size :]
            assert out == b"cba\n"
            assert (await container.wait())["StatusCode"] == 0
        assert proxy.stats().upgrades == 1
    finally:
        writer.close()
        await container.delete(force=True)


async def test_exec_with_stdin_through_upgrade(
    proxy: DockerProxy, client: aiodocker.Docker, names: list[str]
) -> None:
    container = await client.containers.create(config(["sleep", "60"]), name=new_name(names))
    try:
        await container.start()
        exe = await container.exec(
            ["python3", "-c", "import sys; print(sys.stdin.readline().strip()[::-1])"],
            stdin=True,
        )
        async with asyncio.timeout(60):
            async with exe.start(detach=False) as stream:
                await stream.write_in(b"proxy\n")
                out = b""
                while (msg := await stream.read_out()) is not None:
                    out += msg.data
        assert out == b"yxorp\n"
        assert (await exe.inspect())["ExitCode"] == 0
    finally:
        await container.delete(force=True)
