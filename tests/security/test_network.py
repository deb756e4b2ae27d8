"""Network egress from the sandbox (Judge0's CVE-2024-29021: sandboxed code reached internal
services): public, private, link-local metadata and the host's own addresses, including the
broker's port, and DNS.  With no network at all every attempt fails before a packet is sent
(ENETUNREACH; loopback is the container's own, where nothing listens), so this sends nothing
off the machine, and it runs under runc (warm and cold) and gVisor."""

from __future__ import annotations

import socket
import subprocess
import uuid

import pytest

from tests.integration.stack import Stack

pytestmark = [pytest.mark.integration]

PROBE = """
import json, socket
data = json.load(open('/input/data.json'))
facts = {}
for host, port in data['targets']:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect((host, port))
        facts[f'{host}:{port}'] = 'connected'
    except OSError as exc:
        facts[f'{host}:{port}'] = type(exc).__name__ + ':' + str(exc.errno)
    finally:
        s.close()
try:
    socket.getaddrinfo('deb.debian.org', 80)
    facts['dns'] = 'resolved'
except OSError as exc:
    facts['dns'] = type(exc).__name__
json.dump(facts, open('/output/result.json', 'w'))
"""


def host_addresses() -> list[str]:
    """The machine's own IPv4 addresses (docker0's gateway among them)."""
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=False).stdout
    addresses = [a for a in out.split() if ":" not in a]
    return sorted(set(addresses) | {"172.17.0.1"})


async def test_no_egress_anywhere(stack: Stack) -> None:
    broker_port = int(stack.bootstrap.rsplit(":", 1)[1])
    targets = [
        ("1.1.1.1", 443),  # public
        ("10.0.0.1", 80),  # private
        ("192.168.1.1", 80),
        ("169.254.169.254", 80),  # cloud metadata, link-local
        ("127.0.0.1", broker_port),  # loopback: the container's own, not the host's
        *[(address, broker_port) for address in host_addresses()],  # the broker on the host
        *[(address, 6066) for address in host_addresses()],
    ]
    # the broker is really there on the host, so a refusal inside means isolation
    with socket.create_connection(("127.0.0.1", broker_port), timeout=2):
        pass
    result = await stack.run_job(
        {
            "execution_id": str(uuid.uuid4()),
            "code": PROBE,
            "input_data": {"targets": [list(t) for t in targets]},
            "timeout": 60,
        }
    )
    assert result.success, (result.error, result.stderr)
    facts = result.output
    assert isinstance(facts, dict)
    for (host, port), outcome in zip(targets, [facts[f"{h}:{p}"] for h, p in targets], strict=True):
        assert outcome != "connected", f"{host}:{port} reachable from the sandbox"
        if host != "127.0.0.1":
            # no route: refused before anything is sent (ENETUNREACH 101; gVisor says
            # EHOSTUNREACH 113)
            assert outcome.endswith((":101", ":113")), (host, port, outcome)
    assert facts["127.0.0.1:" + str(broker_port)].startswith("ConnectionRefusedError")
    assert facts["dns"] == "gaierror"
