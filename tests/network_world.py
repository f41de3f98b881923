"""The outside world of the egress tests: network namespaces the test makes and nothing
else, so that no packet of theirs can reach a real network.

``uplink`` is where the daemon's egress leaves (as the host's own namespace would in
production); beyond it, ``outside`` holds servers on an allowed address, on refused
ones and on private ones (a line on port 8080; on port 8081 a server that keeps every
connection open; on port 8000 an HTTP server whose ``/page.html`` is PAGE). Neither
routes anywhere else.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from pyroute2 import Conntrack, NetNS, netns

from tests.daemon_process import Daemon

ALLOWED, REFUSED = "198.51.100.1", "198.51.100.2"
PRIVATE, NAMED_PRIVATE = "10.88.0.1", "10.77.0.1"  # refused unless allowed by name
UPLINK_ADDRESS, OUTSIDE_ADDRESS = "192.0.2.1", "192.0.2.2"
METADATA = "169.254.169.254"  # link-local
SUBNET = ipaddress.ip_network("10.213.0.0/16")  # the sandboxes' addresses (the default)
PAGE = "<!doctype html><title>outside</title><p>a page from outside\n"
SERVER = """
import socket, sys, threading
listener = socket.create_server(("0.0.0.0", 8080))
while True:
    conn, _ = listener.accept()
    conn.sendall(b"hello from " + conn.getsockname()[0].encode() + b"\\n")
    conn.close()
"""
HOLDING = """
import socket
listener = socket.create_server(("0.0.0.0", 8081), backlog=64)
held = []
while True:
    held.append(listener.accept()[0])  # open until the world goes
"""
# Every address at once (a refused one costs its whole timeout): each line the address
# and what came back, or the error's name.
PROBE = """
import socket, threading
seen = {{}}
def visit(address):
    try:
        with socket.create_connection((address, 8080), timeout={timeout}) as conn:
            seen[address] = conn.recv(100).decode().strip()
    except OSError as exc:
        seen[address] = type(exc).__name__
threads = [threading.Thread(target=visit, args=(a,)) for a in {addresses!r}]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
for address in {addresses!r}:
    print(address, seen[address])
"""


def _link(ns: NetNS, name: str, *addresses: str) -> None:
    index = ns.link_lookup(ifname=name)[0]
    for address in addresses:
        ns.addr(
            "add", index=index, address=address.split("/")[0], prefixlen=int(address.split("/")[1])
        )
    ns.link("set", index=index, state="up")


@contextmanager
def outside_world() -> Iterator[str]:
    """The uplink namespace's name, with the outside behind it and servers in both."""
    tag = os.getpid() % 100000
    uplink, outside = f"sbxup{tag}", f"sbxout{tag}"
    for name in (uplink, outside):
        netns.create(name)
    servers = []
    pages = tempfile.TemporaryDirectory(prefix="sandboxd-test-pages-")
    with open(os.path.join(pages.name, "page.html"), "w") as page:
        page.write(PAGE)
    http = [sys.executable, "-m", "http.server", "8000", "--directory", pages.name]
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
        commands = [
            (uplink, [sys.executable, "-c", SERVER]),
            (outside, [sys.executable, "-c", SERVER]),
        ]
        holding = (outside, [sys.executable, "-c", HOLDING])
        for name, command in [*commands, holding, (outside, http)]:
            in_it = ["nsenter", f"--net={netns.NETNS_RUN_DIR}/{name}"]
            servers.append(subprocess.Popen([*in_it, *command], stderr=subprocess.DEVNULL))
        yield uplink
    finally:
        for server in servers:
            server.kill()
            server.wait()
        for name in (uplink, outside):
            netns.remove(name)
        pages.cleanup()


def probe(
    daemon: Daemon, *addresses: str, network: bool = True, connect: float = 2, **job: object
) -> dict[str, str]:
    """What a job (with the network, unless not) saw at each address's port 8080,
    waiting ``connect`` seconds for each."""
    code = PROBE.format(addresses=list(addresses), timeout=connect)
    result = daemon.client.execute("python", code, network=network, **job)  # type: ignore[arg-type]
    assert result.status == "ok", result.stderr
    return dict(line.split(" ", 1) for line in result.stdout.splitlines())


def uplink_links(uplink: str) -> list[str]:
    with NetNS(uplink) as up:
        return sorted(link.get_attr("IFLA_IFNAME") for link in up.get_links())


def sandbox_connections(uplink: str) -> set[str]:
    """The sandbox addresses that the uplink's connection tracking still holds."""
    with Conntrack(netns=uplink) as table:
        sources = {entry.tuple_orig.saddr for entry in table.dump_entries()}
    return {a for a in sources if a and ipaddress.ip_address(a) in SUBNET}


def sandbox_addresses(uplink: str) -> list[str]:
    """The addresses of the sandboxes attached now (their link's host end is the first
    of their /30, they have the next)."""
    with NetNS(uplink) as up:
        found = [
            ipaddress.ip_address(address.get_attr("IFA_ADDRESS"))
            for address in up.get_addr(family=2)
        ]
    return [str(a + 1) for a in found if a in SUBNET]


def nft_ruleset(namespace: str) -> str:
    in_it = ["nsenter", f"--net={netns.NETNS_RUN_DIR}/{namespace}"]
    return subprocess.run(
        [*in_it, "nft", "list", "ruleset"], capture_output=True, text=True, check=True
    ).stdout
