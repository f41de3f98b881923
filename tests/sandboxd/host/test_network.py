"""Egress on request: a sandbox reaches the allowed destinations and nothing else.

The outside world here is two network namespaces the test makes: ``uplink``, where the
daemon's egress leaves (as the host's own namespace would in production), and beyond
it ``outside``, with servers on an allowed and a refused address. Neither routes
anywhere else, so no packet can reach a real network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import httpx
import pytest
from click.testing import CliRunner
from pyroute2 import Conntrack, netns
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

from sandboxctl import cli
from sandboxd.errors import InvalidParams, SandboxError
from sandboxd.host.netns import in_netns
from tests.conftest import IS_ROOT
from tests.daemon_process import Daemon, start_daemon, start_gateway
from tests.host_state import wait_for
from tests.network_world import (
    ALLOWED,
    METADATA,
    NAMED_PRIVATE,
    OUTSIDE_ADDRESS,
    PRIVATE,
    PROBE,
    REFUSED,
    UPLINK_ADDRESS,
    nft_ruleset,
    outside_world,
    probe,
    sandbox_connections,
    uplink_links,
)

pytestmark = [
    pytest.mark.skipif(not IS_ROOT, reason="needs root: network namespaces"),
    pytest.mark.skipif(shutil.which("nft") is None, reason="needs nftables"),
]


@pytest.fixture
def world() -> Iterator[str]:
    with outside_world() as uplink:
        yield uplink


@pytest.fixture
def net_daemon(tmp_path, world) -> Iterator[Daemon]:
    daemon = start_daemon(
        tmp_path, pool={"size": 1}, network={"allow": [f"{ALLOWED}/32"], "uplink_netns": world}
    )
    yield daemon
    assert daemon.stop() == 0, daemon.log()


def test_a_sandbox_reaches_the_allowed_destination_and_nothing_else(net_daemon, world):
    seen = probe(net_daemon, ALLOWED, REFUSED, OUTSIDE_ADDRESS, UPLINK_ADDRESS, METADATA)
    assert seen == {
        ALLOWED: f"hello from {ALLOWED}",
        REFUSED: "TimeoutError",  # not listed
        OUTSIDE_ADDRESS: "TimeoutError",
        UPLINK_ADDRESS: "TimeoutError",  # the uplink host itself
        METADATA: "TimeoutError",  # link-local
    }

    # The job's link went with it (just after its answer), and so did its connections:
    # nothing of them reaches the next job given the address.
    assert wait_for(lambda: uplink_links(world) == ["lo", "wan"], timeout=5), uplink_links(world)
    assert wait_for(lambda: not sandbox_connections(world), timeout=5)


def test_allowing_everything_still_refuses_private_ranges_the_host_and_metadata(tmp_path, world):
    allow = ["0.0.0.0/0", "10.77.0.0/24"]
    daemon = start_daemon(
        tmp_path, pool={"size": 1}, network={"allow": allow, "uplink_netns": world}
    )
    try:
        seen = probe(daemon, REFUSED, NAMED_PRIVATE, PRIVATE, UPLINK_ADDRESS, METADATA)
    finally:
        assert daemon.stop() == 0
    assert seen == {
        REFUSED: f"hello from {REFUSED}",  # anywhere public
        NAMED_PRIVATE: f"hello from {NAMED_PRIVATE}",  # a private range allowed by name
        PRIVATE: "TimeoutError",
        UPLINK_ADDRESS: "TimeoutError",
        METADATA: "TimeoutError",
    }


HOLD = """
import socket
held, seen = [], []
for _ in range({count}):
    try:
        held.append(socket.create_connection(("{address}", 8081), timeout=1))
        seen.append("open")
    except OSError as exc:
        seen.append(type(exc).__name__)
print(*seen)
"""


def test_a_sandbox_holds_no_more_connections_at_once_than_allowed(tmp_path, world):
    """Against a server that keeps them open. One that closes them is not a test of the
    limit: conntrack takes the server's retransmitted FIN, met before the sandbox's
    ACK, for the second FIN of the close, calls a connection the sandbox still holds
    TIME_WAIT, and the count leaves it out (one run in twelve let a fifth in)."""
    network = {"allow": [f"{ALLOWED}/32"], "uplink_netns": world, "max_connections": 4}
    daemon = start_daemon(tmp_path, pool={"size": 1}, network=network)
    try:
        assert "4 connections at once per sandbox" in daemon.client.status()["network"]
        code = HOLD.format(count=6, address=ALLOWED)
        for _ in range(2):  # the next job, with its own, may have as many again
            result = daemon.client.execute("python", code, network=True)
            assert result.stdout.split() == ["open"] * 4 + ["TimeoutError"] * 2, result.stderr
    finally:
        assert daemon.stop() == 0


def test_connections_a_crashed_daemon_s_sandboxes_left_are_forgotten_at_start(tmp_path, world):
    # As a daemon killed mid-job leaves them: tracked, with a sandbox address as source.
    def plant() -> None:
        with Conntrack() as table:
            orig = NFCTAttrTuple(
                saddr="10.213.0.2", daddr=ALLOWED, proto=17, sport=40000, dport=8080
            )
            reply = NFCTAttrTuple(
                saddr=ALLOWED, daddr="10.213.0.2", proto=17, sport=8080, dport=40000
            )
            table.entry("add", timeout=600, tuple_orig=orig, tuple_reply=reply)

    path = f"{netns.NETNS_RUN_DIR}/{world}"
    in_netns(path, plant)
    assert sandbox_connections(world) == {"10.213.0.2"}
    daemon = start_daemon(
        tmp_path, pool={"size": 1}, network={"allow": [f"{ALLOWED}/32"], "uplink_netns": world}
    )
    try:
        assert sandbox_connections(world) == set()
    finally:
        assert daemon.stop() == 0


def test_a_subnet_that_holds_the_vms_own_network_is_refused(tmp_path, world):
    network = {"allow": [f"{ALLOWED}/32"], "uplink_netns": world, "subnet": "10.0.0.0/16"}
    with pytest.raises(RuntimeError, match=r"network.subnet 10.0.0.0/16 holds 10.0.2.0/30"):
        start_daemon(tmp_path, pool={"size": 1}, network=network)


def test_without_asking_a_sandbox_has_no_network(net_daemon):
    result = net_daemon.client.execute("python", "import socket; print(socket.if_nameindex())")
    assert result.stdout == "[(1, 'lo')]\n"
    assert probe(net_daemon, ALLOWED, network=False) == {ALLOWED: "OSError"}


def test_network_is_refused_where_the_server_allows_none(client):
    with pytest.raises(InvalidParams, match=r"network.*\[network\] allow is empty"):
        client.execute("python", "print(1)", network=True)


def test_an_uplink_namespace_gone_fails_network_jobs_and_the_daemon_still_stops(tmp_path):
    # pyroute2's NetNS would make it again, from a fork of the daemon's threads that can
    # hang for ever: the daemon enters namespaces by a thread of its own, and only those
    # that exist.
    uplink = f"sbxgone{os.getpid() % 100000}"
    netns.create(uplink)
    network = {"allow": [f"{ALLOWED}/32"], "uplink_netns": uplink}
    daemon = start_daemon(tmp_path, pool={"size": 1}, network=network)
    try:
        netns.remove(uplink)
        with pytest.raises(SandboxError, match=f"no network namespace '{uplink}'"):
            daemon.client.execute("python", "print(1)", network=True)
        assert daemon.client.execute("python", "print(1)").stdout == "1\n"
    finally:
        assert daemon.stop(timeout=30) == 0, daemon.log()
    assert uplink not in netns.listnetns()


def test_stopping_removes_the_rules_and_links(tmp_path, world):
    daemon = start_daemon(
        tmp_path, pool={"size": 1}, network={"allow": [f"{ALLOWED}/32"], "uplink_netns": world}
    )
    assert "to 198.51.100.1/32 only" in daemon.client.status()["network"]
    in_uplink = ["nsenter", f"--net={netns.NETNS_RUN_DIR}/{world}"]
    assert subprocess.check_output([*in_uplink, "sysctl", "-n", "net.ipv4.ip_forward"]) == b"1\n"
    assert daemon.stop() == 0
    # Forwarding was off there: the daemon turns it off again.
    assert subprocess.check_output([*in_uplink, "sysctl", "-n", "net.ipv4.ip_forward"]) == b"0\n"
    assert "sandboxd_" not in nft_ruleset(world)


def test_the_cli_and_the_http_api_ask_for_the_network_too(net_daemon, tmp_path):
    code = PROBE.format(addresses=[ALLOWED], timeout=2)
    shown = CliRunner().invoke(
        cli.main,
        ["--socket", str(net_daemon.socket), "exec", "-l", "python", "--network", "-c", code],
    )
    assert shown.stdout == f"{ALLOWED} hello from {ALLOWED}\n", shown.output
    gateway = start_gateway(tmp_path, net_daemon.socket)
    try:
        answer = httpx.post(
            f"{gateway.url}/execute",
            json={"language": "python", "code": code, "network": True},
            timeout=60,
        ).json()
        assert answer["stdout"] == f"{ALLOWED} hello from {ALLOWED}\n", answer
    finally:
        gateway.stop()
