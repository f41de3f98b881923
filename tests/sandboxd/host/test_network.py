"""Egress on request: a sandbox reaches the allowed destinations and nothing else.

The outside world here is two network namespaces the test makes: ``uplink``, where the
daemon's egress leaves (as the host's own namespace would in production), and beyond
it ``outside``, with servers on an allowed and a refused address. Neither routes
anywhere else, so no packet can reach a real network.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
from click.testing import CliRunner
from pyroute2 import Conntrack, NetNS, netns

from sandboxctl import cli
from sandboxd.errors import InvalidParams
from tests.conftest import IS_ROOT
from tests.daemon_process import Daemon, start_daemon, start_gateway
from tests.host_state import wait_for

pytestmark = [
    pytest.mark.skipif(not IS_ROOT, reason="needs root: network namespaces"),
    pytest.mark.skipif(shutil.which("nft") is None, reason="needs nftables"),
]

ALLOWED, REFUSED = "198.51.100.1", "198.51.100.2"
PRIVATE, NAMED_PRIVATE = "10.88.0.1", "10.77.0.1"  # refused unless allowed by name
UPLINK_ADDRESS, OUTSIDE_ADDRESS = "192.0.2.1", "192.0.2.2"
SUBNET = ipaddress.ip_network("10.213.0.0/16")  # the sandboxes' addresses (the default)
SERVER = """
import socket, sys, threading
listener = socket.create_server(("0.0.0.0", 8080))
while True:
    conn, _ = listener.accept()
    conn.sendall(b"hello from " + conn.getsockname()[0].encode() + b"\\n")
    conn.close()
"""
PROBE = """
import socket
for address in {addresses!r}:
    try:
        with socket.create_connection((address, 8080), timeout=2) as conn:
            print(address, conn.recv(100).decode().strip())
    except OSError as exc:
        print(address, type(exc).__name__)
"""


def _link(ns: NetNS, name: str, *addresses: str) -> None:
    index = ns.link_lookup(ifname=name)[0]
    for address in addresses:
        ns.addr(
            "add", index=index, address=address.split("/")[0], prefixlen=int(address.split("/")[1])
        )
    ns.link("set", index=index, state="up")


@pytest.fixture
def world() -> Iterator[str]:
    """The uplink namespace's name, with the outside behind it and servers in both."""
    tag = os.getpid() % 100000
    uplink, outside = f"sbxup{tag}", f"sbxout{tag}"
    for name in (uplink, outside):
        netns.create(name)
    servers = []
    try:
        with NetNS(uplink) as up:
            up.link("add", ifname="wan", kind="veth", peer={"ifname": "lan"})
            up.link("set", index=up.link_lookup(ifname="lan")[0], net_ns_fd=outside)
            _link(up, "lo")
            _link(up, "wan", f"{UPLINK_ADDRESS}/24")
            up.route("add", dst="0.0.0.0/0", gateway=OUTSIDE_ADDRESS)  # all goes outside
        with NetNS(outside) as out:
            _link(out, "lo")
            addresses = (OUTSIDE_ADDRESS, ALLOWED, REFUSED, PRIVATE, NAMED_PRIVATE)
            _link(out, "lan", *(f"{a}/{24 if a == OUTSIDE_ADDRESS else 32}" for a in addresses))
        for name in (uplink, outside):
            servers.append(
                subprocess.Popen(
                    ["nsenter", f"--net={netns.NETNS_RUN_DIR}/{name}", sys.executable, "-c", SERVER]
                )
            )
        yield uplink
    finally:
        for server in servers:
            server.kill()
            server.wait()
        for name in (uplink, outside):
            netns.remove(name)


@pytest.fixture
def net_daemon(tmp_path, world) -> Iterator[Daemon]:
    daemon = start_daemon(
        tmp_path, pool={"size": 1}, network={"allow": [f"{ALLOWED}/32"], "uplink_netns": world}
    )
    yield daemon
    assert daemon.stop() == 0, daemon.log()


def probe(daemon: Daemon, *addresses: str, network: bool = True) -> dict[str, str]:
    code = PROBE.format(addresses=list(addresses))
    result = daemon.client.execute("python", code, network=network)
    assert result.status == "ok", result.stderr
    return dict(line.split(" ", 1) for line in result.stdout.splitlines())


def test_a_sandbox_reaches_the_allowed_destination_and_nothing_else(net_daemon, world):
    seen = probe(net_daemon, ALLOWED, REFUSED, OUTSIDE_ADDRESS, UPLINK_ADDRESS, "169.254.169.254")
    assert seen == {
        ALLOWED: f"hello from {ALLOWED}",
        REFUSED: "TimeoutError",  # not listed
        OUTSIDE_ADDRESS: "TimeoutError",
        UPLINK_ADDRESS: "TimeoutError",  # the uplink host itself
        "169.254.169.254": "TimeoutError",  # metadata
    }

    # The job's link went with it (just after its answer), and so did its connections:
    # nothing of them reaches the next job given the address.
    def links() -> list[str]:
        with NetNS(world) as up:
            return sorted(link.get_attr("IFLA_IFNAME") for link in up.get_links())

    def sandbox_connections() -> set[str]:
        with Conntrack(netns=world) as table:
            sources = {entry.tuple_orig.saddr for entry in table.dump_entries()}
        return {a for a in sources if a and ipaddress.ip_address(a) in SUBNET}

    assert wait_for(lambda: links() == ["lo", "wan"], timeout=5), links()
    assert wait_for(lambda: not sandbox_connections(), timeout=5), sandbox_connections()


def test_allowing_everything_still_refuses_private_ranges_the_host_and_metadata(tmp_path, world):
    allow = ["0.0.0.0/0", "10.77.0.0/24"]
    daemon = start_daemon(
        tmp_path, pool={"size": 1}, network={"allow": allow, "uplink_netns": world}
    )
    try:
        seen = probe(daemon, REFUSED, NAMED_PRIVATE, PRIVATE, UPLINK_ADDRESS, "169.254.169.254")
    finally:
        assert daemon.stop() == 0
    assert seen == {
        REFUSED: f"hello from {REFUSED}",  # anywhere public
        NAMED_PRIVATE: f"hello from {NAMED_PRIVATE}",  # a private range allowed by name
        PRIVATE: "TimeoutError",
        UPLINK_ADDRESS: "TimeoutError",
        "169.254.169.254": "TimeoutError",
    }


def test_without_asking_a_sandbox_has_no_network(net_daemon):
    result = net_daemon.client.execute("python", "import socket; print(socket.if_nameindex())")
    assert result.stdout == "[(1, 'lo')]\n"
    assert probe(net_daemon, ALLOWED, network=False) == {ALLOWED: "OSError"}


def test_network_is_refused_where_the_server_allows_none(client):
    with pytest.raises(InvalidParams, match=r"network.*\[network\] allow is empty"):
        client.execute("python", "print(1)", network=True)


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
    ruleset = subprocess.run(
        ["nsenter", f"--net={netns.NETNS_RUN_DIR}/{world}", "nft", "list", "ruleset"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "sandboxd_" not in ruleset.stdout


def test_the_cli_and_the_http_api_ask_for_the_network_too(net_daemon, tmp_path):
    code = PROBE.format(addresses=[ALLOWED])
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
