"""Egress for sandboxes that ask for it: a veth into the sandbox, routed out through the
uplink namespace under nftables rules that let through only the allowed destinations.

A sandbox has no network interface but loopback. A job that asks for the network (and
only where ``[network] allow`` lists destinations) gets ``eth0``, one end of a veth pair
whose other end is in the uplink namespace — the host's own, or a named one — with a
/30 of ``[network] subnet`` and a default route through it. There, this daemon's
nftables tables forward the sandbox's packets only to the allowed networks (masqueraded
behind the uplink's address), refuse everything else — the uplink host itself,
link-local and metadata addresses, every network not listed — and let in only replies.
The veth goes with the job. pyroute2 makes every link, address and route; ``nft``
loads the rules.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import subprocess
from collections.abc import Iterator, Sequence

from pyroute2 import IPRoute, NetNS, netns

from sandboxd.errors import LaunchError

log = logging.getLogger(__name__)

GUEST_INTERFACE = "eth0"


class Egress:
    def __init__(self, instance: str, allow: Sequence[str], uplink_netns: str, subnet: str) -> None:
        self.allow = [ipaddress.ip_network(net) for net in allow]
        self.uplink_netns = uplink_netns  # "" = the host's own namespace
        self.subnet = ipaddress.ip_network(subnet)
        tag = hashlib.sha256(instance.encode()).hexdigest()[:5]
        self.prefix = f"sx{tag}"  # every host-side link of this instance; nft matches it
        self.table = f"sandboxd_{tag}"
        self._links = list(self.subnet.subnets(new_prefix=30))
        self._busy: set[int] = set()

    def describe(self) -> str:
        where = f"namespace {self.uplink_netns}" if self.uplink_netns else "the host"
        nets = ", ".join(str(net) for net in self.allow)
        return f"on request, through {where}, to {nets} only"

    # -- the uplink namespace ------------------------------------------------------------

    def _uplink(self) -> IPRoute | NetNS:
        if self.uplink_netns and self.uplink_netns not in netns.listnetns():
            raise LaunchError(f"network.uplink_netns: no network namespace {self.uplink_netns!r}")
        return NetNS(self.uplink_netns) if self.uplink_netns else IPRoute()

    def _in_uplink(self, argv: list[str], stdin: str = "") -> None:
        if self.uplink_netns:
            argv = ["nsenter", f"--net={netns.NETNS_RUN_DIR}/{self.uplink_netns}", *argv]
        try:
            done = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
        except OSError as exc:
            raise LaunchError(f"cannot run {argv[0]} (apt install nftables): {exc}") from exc
        if done.returncode != 0:
            raise LaunchError(f"{argv[0]} failed: {done.stderr.strip()}", argv=argv)

    def _ruleset(self) -> str:
        allowed = ", ".join(str(net) for net in self.allow)
        links = f'"{self.prefix}*"'
        return f"""
table inet {self.table} {{
    set allowed {{ type ipv4_addr; flags interval; elements = {{ {allowed} }} }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname {links} drop comment "the uplink host itself"
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname {links} ip daddr 169.254.0.0/16 drop comment "link-local, metadata"
        iifname {links} ip daddr @allowed accept
        iifname {links} drop
        oifname {links} ct state established,related accept
        oifname {links} drop
    }}
}}
table ip {self.table}_nat {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {self.subnet} oifname != {links} masquerade
    }}
}}
"""

    def start(self) -> None:
        """Forwarding on in the uplink namespace, and this daemon's rules (anew)."""
        self.stop()
        self._in_uplink(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        self._in_uplink(["nft", "-f", "-"], self._ruleset())
        log.info("network: %s", self.describe())

    def stop(self) -> None:
        """Remove this daemon's rules and links from the uplink (also a crashed one's)."""
        with self._uplink() as ip:
            for link in ip.get_links():
                if (link.get_attr("IFLA_IFNAME") or "").startswith(self.prefix):
                    ip.link("del", index=link["index"])
        for table in (f"inet {self.table}", f"ip {self.table}_nat"):
            with contextlib.suppress(LaunchError):  # not there
                self._in_uplink(["nft", "delete", "table", *table.split()])

    # -- one sandbox ---------------------------------------------------------------------

    @contextlib.contextmanager
    def attached(self, pid: int) -> Iterator[str]:
        """``eth0`` in the network namespace of process ``pid`` (in the sandbox) for the
        duration; the sandbox's address."""
        index = next((i for i in range(len(self._links)) if i not in self._busy), None)
        if index is None:
            raise LaunchError(f"network.subnet {self.subnet} has no free /30 left")
        self._busy.add(index)
        gateway, address = list(self._links[index].hosts())
        host_side, guest_side = f"{self.prefix}{index}", f"{self.prefix}{index}g"
        try:
            with self._uplink() as ip:
                ip.link("add", ifname=host_side, kind="veth", peer={"ifname": guest_side})
                host_index = ip.link_lookup(ifname=host_side)[0]
                guest_index = ip.link_lookup(ifname=guest_side)[0]
                ip.link("set", index=guest_index, net_ns_pid=pid)
                ip.addr("add", index=host_index, address=str(gateway), prefixlen=30)
                ip.link("set", index=host_index, state="up")
            with NetNS(f"/proc/{pid}/ns/net") as sandbox:
                link = sandbox.link_lookup(ifname=guest_side)[0]
                sandbox.link("set", index=link, ifname=GUEST_INTERFACE)
                sandbox.addr("add", index=link, address=str(address), prefixlen=30)
                sandbox.link("set", index=link, state="up")
                sandbox.route("add", dst="0.0.0.0/0", gateway=str(gateway))
            yield str(address)
        finally:
            with contextlib.suppress(Exception), self._uplink() as ip:  # gone with its netns
                for found in ip.link_lookup(ifname=host_side):
                    ip.link("del", index=found)
            self._busy.discard(index)
