"""Egress for sandboxes that ask for it: a veth into the sandbox, routed out through the
uplink namespace under nftables rules that let through only the allowed destinations.

A sandbox has no network interface but loopback. A job that asks for the network (and
only where ``[network] allow`` lists destinations) gets ``eth0``, one end of a veth pair
whose other end is in the uplink namespace — the host's own, or a named one — with a
/30 of ``[network] subnet`` and a default route through it. There, this daemon's
nftables tables forward the sandbox's packets only to the allowed networks (masqueraded
behind the uplink's address), refuse everything else — the uplink host itself (before
any port forwarding could send it on), private, link-local and metadata ranges unless
allowed by name, other sandboxes, every network not listed, a sandbox's connections
beyond ``[network] max_connections`` at once — and let in only replies.
The veth goes with the job. pyroute2 makes every link, address and route; ``nft``
loads the rules.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator, Sequence

import trio
from pyroute2 import Conntrack, IPRoute, netns
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

from sandboxd.errors import LaunchError
from sandboxd.host.netns import in_netns, run_in_netns

log = logging.getLogger(__name__)

GUEST_INTERFACE = "eth0"
FORWARDING_OURS = "forwarding is on for sandboxes only"  # and off again when we stop
# Refused even when an allowed network covers them (allow 0.0.0.0/0 for "the internet"),
# unless allowed explicitly: "this network", private and shared ranges, loopback,
# link-local and metadata (also Azure's and Alibaba's), benchmarking, multicast and
# reserved.
ALWAYS_REFUSED = [
    ipaddress.IPv4Network(net)
    for net in (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
        "172.16.0.0/12", "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/3",
        "168.63.129.16/32", "100.100.100.200/32",
    )
]  # fmt: skip


class Egress:
    def __init__(
        self,
        instance: str,
        allow: Sequence[str],
        uplink_netns: str,
        subnet: str,
        max_connections: int = 256,
    ) -> None:
        self.allow = [ipaddress.IPv4Network(net) for net in allow]  # checked as IPv4
        self.max_connections = max_connections  # per sandbox, open at once
        self.uplink_netns = uplink_netns  # "" = the host's own namespace
        self.subnet = ipaddress.IPv4Network(subnet)  # checked as IPv4
        tag = hashlib.sha256(instance.encode()).hexdigest()[:5]
        self.prefix = f"sx{tag}"  # every host-side link of this instance; nft matches it
        self.table = f"sandboxd_{tag}"
        self._link_count = self.subnet.num_addresses // 4  # a /30 each
        self._busy: set[int] = set()
        self._next = 0  # links are handed out in turn: an address is reused late
        self._releases: trio.Nursery | None = None  # while run() runs

    def describe(self) -> str:
        where = f"namespace {self.uplink_netns}" if self.uplink_netns else "the host"
        nets = ", ".join(str(net) for net in self.allow)
        return (
            f"on request, through {where}, to {nets} only, "
            f"{self.max_connections} connections at once per sandbox"
        )

    # -- the uplink namespace ------------------------------------------------------------

    def _uplink(self) -> str | None:
        """The uplink namespace's file (None: the daemon's own namespace)."""
        if not self.uplink_netns:
            return None
        if self.uplink_netns not in netns.listnetns():
            raise LaunchError(f"network.uplink_netns: no network namespace {self.uplink_netns!r}")
        return f"{netns.NETNS_RUN_DIR}/{self.uplink_netns}"

    def _in_uplink(self, argv: list[str], stdin: str = "") -> str:
        return run_in_netns(self._uplink(), argv, stdin)

    def _ruleset(self, forwarding_was_on: bool) -> str:
        links = f'"{self.prefix}*"'
        allowed = ", ".join(str(net) for net in self.allow)
        refused = ", ".join(str(net) for net in ALWAYS_REFUSED)
        # Allowed networks inside a refused range are meant: they pass that check.
        explicit = [n for n in self.allow if any(n.subnet_of(r) for r in ALWAYS_REFUSED)]
        explicit_elements = f"elements = {{ {', '.join(map(str, explicit))} }}" if explicit else ""
        # Forwarding was off: this daemon turned it on for its sandboxes only.
        others = (
            ""
            if forwarding_was_on
            else f'iifname != {links} oifname != {links} drop comment "{FORWARDING_OURS}"'
        )
        return f"""
table inet {self.table} {{
    set allowed {{ type ipv4_addr; flags interval; auto-merge; elements = {{ {allowed} }} }}
    set refused {{ type ipv4_addr; flags interval; auto-merge; elements = {{ {refused} }} }}
    set explicit {{ type ipv4_addr; flags interval; auto-merge; {explicit_elements} }}
    set connections {{ type ipv4_addr; size 65535; flags dynamic; }}
    chain prerouting {{
        type filter hook prerouting priority raw; policy accept;
        iifname {links} fib daddr type {{ local, broadcast, multicast, anycast }} drop \
            comment "the uplink host itself, before any NAT could forward it elsewhere"
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname {links} drop
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname {links} oifname {links} drop comment "sandbox to sandbox"
        iifname {links} ct state invalid drop
        iifname {links} ip saddr != {self.subnet} drop
        iifname {links} ip daddr @refused ip daddr != @explicit drop
        iifname {links} ct state new add @connections {{ ip saddr ct count over \
            {self.max_connections} }} drop comment "a sandbox's connections at once"
        iifname {links} ip daddr @allowed accept
        iifname {links} drop
        oifname {links} ct state established,related accept
        oifname {links} drop
        {others}
    }}
}}
table ip {self.table}_nat {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {self.subnet} oifname != {links} masquerade
    }}
}}
"""

    def _check_subnet_is_free(self) -> None:
        """Another daemon's or the host's addresses in our subnet would take its traffic."""
        in_netns(self._uplink(), self._check_addresses)

    def _check_addresses(self) -> None:
        with IPRoute() as ip:
            for address in ip.get_addr(family=socket.AF_INET):
                name = address.get_attr("IFA_LABEL") or ""
                network = ipaddress.ip_interface(
                    f"{address.get_attr('IFA_ADDRESS')}/{address['prefixlen']}"
                ).network
                if network.overlaps(self.subnet) and not name.startswith(self.prefix):
                    raise LaunchError(
                        f"network.subnet {self.subnet} overlaps {network} on {name} in the "
                        "uplink namespace: give this daemon a subnet of its own"
                    )

    def _forwarding(self) -> bool:
        return self._in_uplink(["sysctl", "-n", "net.ipv4.ip_forward"]).strip() == "1"

    def start(self) -> None:
        """This daemon's rules (anew) and forwarding on in the uplink namespace, and no
        connection of a crashed daemon's sandboxes tracked there any more."""
        self.stop()
        self._check_subnet_is_free()
        was_on = self._forwarding()
        self._in_uplink(["nft", "-f", "-"], self._ruleset(forwarding_was_on=was_on))
        if not was_on:
            self._in_uplink(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        log.info("network: %s", self.describe())

    def stop(self) -> None:
        """Remove this daemon's rules and links from the uplink (also a crashed one's),
        and turn forwarding off again if it was this daemon that turned it on."""
        try:
            uplink = self._uplink()
        except LaunchError as exc:  # and with it, all this daemon had put there
            log.warning("%s: nothing of this daemon's to remove there", exc)
            return
        in_netns(uplink, lambda: _remove_links(self.prefix))
        # A crashed daemon's sandboxes' connections: replies to them must not reach the
        # next sandboxes given their addresses.
        in_netns(uplink, lambda: _forget_connections(self.subnet))
        with contextlib.suppress(LaunchError):  # no rules loaded
            rules = self._in_uplink(["nft", "list", "chain", "inet", self.table, "forward"])
            if FORWARDING_OURS in rules:
                self._in_uplink(["sysctl", "-q", "-w", "net.ipv4.ip_forward=0"])
        for table in (f"inet {self.table}", f"ip {self.table}_nat"):
            with contextlib.suppress(LaunchError):  # not there
                self._in_uplink(["nft", "delete", "table", *table.split()])

    # -- one sandbox ---------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def attached(self, namespace: str) -> AsyncIterator[str]:
        """``eth0`` in the sandbox's network namespace (the path of its file: a jail's
        ``/proc/<pid>/ns/net``, a VM's router, sandboxd.host.vm_network) for the
        duration; the sandbox's address. Netlink and namespace work runs in a thread:
        the daemon serves others meanwhile."""
        count = self._link_count
        order = ((self._next + i) % count for i in range(count))
        index = next((i for i in order if i not in self._busy), None)
        if index is None:
            raise LaunchError(f"network.subnet {self.subnet} has no free /30 left")
        self._busy.add(index)
        self._next = index + 1
        try:
            yield await trio.to_thread.run_sync(self._attach, index, namespace)
        finally:
            if self._releases is not None:
                self._releases.start_soon(self._release, index)  # off the job's path
            else:
                await self._release(index)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Remove finished jobs' links in the background (it takes tens of milliseconds
        that the job's answer need not wait for), until cancelled."""
        async with trio.open_nursery() as self._releases:
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._releases = None  # what is already started still finishes

    async def _release(self, index: int) -> None:
        with trio.CancelScope(shield=True):
            forgotten = await trio.to_thread.run_sync(self._detach, index)
        if forgotten:
            self._busy.discard(index)  # only now may another job get the address

    def _addresses(self, index: int) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
        """The uplink's and the sandbox's address on the ``index``-th /30 of the subnet
        (counted, not listed: a /8 holds four million)."""
        first = self.subnet.network_address + 4 * index
        return first + 1, first + 2

    def _attach(self, index: int, namespace: str) -> str:
        gateway, address = self._addresses(index)
        host_side, guest_side = f"{self.prefix}{index}", f"{self.prefix}{index}g"

        def in_uplink() -> None:
            with IPRoute() as ip:
                ip.link("add", ifname=host_side, kind="veth", peer={"ifname": guest_side})
                host_index = ip.link_lookup(ifname=host_side)[0]
                guest_index = ip.link_lookup(ifname=guest_side)[0]
                ip.link("set", index=guest_index, net_ns_fd=namespace)
                ip.addr("add", index=host_index, address=str(gateway), prefixlen=30)
                ip.link("set", index=host_index, state="up")

        def in_sandbox() -> None:
            with IPRoute() as sandbox:
                link = sandbox.link_lookup(ifname=guest_side)[0]
                sandbox.link("set", index=link, ifname=GUEST_INTERFACE)
                sandbox.addr("add", index=link, address=str(address), prefixlen=30)
                sandbox.link("set", index=link, state="up")
                sandbox.route("add", dst="0.0.0.0/0", gateway=str(gateway))

        in_netns(self._uplink(), in_uplink)
        in_netns(namespace, in_sandbox)
        return str(address)

    def _detach(self, index: int) -> bool:
        """The host side goes (the guest side too, with it or with its namespace), and
        so do the address's connection-tracking entries: replies to a connection of
        this job must never reach the next job given the address. Whether they did
        (else the address is not given out again)."""
        address = ipaddress.IPv4Network(self._addresses(index)[1])

        def in_uplink() -> None:
            with contextlib.suppress(Exception), IPRoute() as ip:  # gone with its namespace
                for found in ip.link_lookup(ifname=f"{self.prefix}{index}"):
                    ip.link("del", index=found)
            _forget_connections(address)

        try:
            in_netns(self._uplink(), in_uplink)
        except Exception as exc:
            log.warning(
                "cannot forget the connections of %s (not given out again): %s", address, exc
            )
            return False
        return True


def _forget_connections(sources: ipaddress.IPv4Network) -> None:
    """Drop the tracked connections from addresses in ``sources``, here (from one
    address, a job's: only its own are read)."""
    only = sources.num_addresses == 1
    mine = {"tuple_orig": NFCTAttrTuple(saddr=str(sources.network_address))} if only else {}
    with Conntrack() as table:
        for entry in list(table.dump_entries(**mine)):
            source = entry.tuple_orig.saddr
            if source and ipaddress.ip_address(source) in sources:
                table.entry("del", tuple_orig=entry.tuple_orig)


def _remove_links(prefix: str) -> None:
    with IPRoute() as ip:
        for link in ip.get_links():
            if (link.get_attr("IFLA_IFNAME") or "").startswith(prefix):
                ip.link("del", index=link["index"])
