"""A VM's own network namespace: the TAP its VMM is given, and the router between that
TAP and the egress link of a job that asks for the network.

Every VM sees one and the same network (the constants below), so a snapshot taken with
its NIC restores in any clone unchanged. What is a sandbox's own is on the host side: a
network namespace made for its VM only, holding the TAP (the gateway's address) and,
for a job that asks, the veth that sandboxd.host.network moves in (``eth0``, with the
sandbox's /30 of ``[network] subnet``, routed to the uplink). Inside, the guest's
address is masqueraded behind the veth's, so the uplink's rules see a VM as they see a
namespaces sandbox, and the namespace forwards only from the TAP to the veth, and
replies back. A VM whose job did not ask has its TAP and nothing behind it: no route
out, whatever it holds. There is no bridge that VMs share, so no VM can reach another's
link, and each namespace has its own connection tracking, gone with the VM.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import struct

from pyroute2 import IPRoute, netns

from sandboxd.errors import LaunchError
from sandboxd.host.netns import create_netns, in_netns, run_in_netns
from sandboxd.host.network import GUEST_INTERFACE

GUEST = ipaddress.IPv4Interface("10.0.2.2/30")  # the guest's eth0 in every VM
GATEWAY = ipaddress.IPv4Interface("10.0.2.1/30")  # the TAP's end, in every VM's namespace
GUEST_MAC = "02:73:62:00:00:02"  # locally administered; the same in every clone
TAP_MAC = "02:73:62:00:00:01"  # what the guest's neighbour cache holds for its gateway
TAP = "tap0"
TUNSETIFF = 0x400454CA
TUNSETOWNER = 0x400454CC
TUNSETPERSIST = 0x400454CB
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000


def router_rules(max_connections: int, vmm_uid: int | None) -> str:
    """The VM's namespace's nftables rules: forwarding from the guest's address only,
    replies back, masqueraded out; its connections capped here already (each is tracked
    here before the uplink refuses or lets it through); nothing of the namespace's own
    for the guest, nor for a VMM that runs in it (Firecracker, as ``vmm_uid``)."""
    vmm = f'meta skuid {vmm_uid} drop comment "a VMM a guest broke into"' if vmm_uid else ""
    return f"""
table inet sandboxd_vm {{
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "{TAP}" drop comment "the guest reaches nothing of its router"
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state invalid drop
        iifname "{TAP}" oifname "{GUEST_INTERFACE}" ct state new ct count over {max_connections} \
            drop comment "the guest's connections at once"
        iifname "{TAP}" oifname "{GUEST_INTERFACE}" ip saddr {GUEST.ip} accept
        iifname "{GUEST_INTERFACE}" oifname "{TAP}" ct state established,related accept
    }}
    chain output {{
        type filter hook output priority filter; policy accept;
        {vmm}
    }}
}}
table ip sandboxd_vm_nat {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "{GUEST_INTERFACE}" masquerade
    }}
}}
"""


def guest_cmdline() -> str:
    """The kernel argument that tells the VM's init its network (guest/init.sh)."""
    return f"sandboxd.net={GUEST},{GATEWAY.ip}"


def namespace_prefix(instance: str) -> str:
    # A dot, which no instance's name holds: no other instance's namespace starts so.
    return f"sandboxd-{instance}.vm"


class VmNetwork:
    """The network namespace of the VM in ``slot``, made by :meth:`open`, removed by
    :meth:`close` (with the TAP, the veth and every connection in it)."""

    def __init__(self, instance: str, slot: int, max_connections: int) -> None:
        self.name = f"{namespace_prefix(instance)}{slot}"
        self.path = f"{netns.NETNS_RUN_DIR}/{self.name}"  # for Egress.attached
        self.max_connections = max_connections  # the guest's at once ([network])

    def open(self, owner: int | None = None) -> int | None:
        """Make the namespace with its TAP and router. Without ``owner``, the TAP's file
        descriptor for the VMM to be given (the TAP lives while a process holds it);
        with it, a TAP that stays and that ``owner``'s VMM opens by name itself."""
        self.close()  # what a crashed daemon left in this slot
        create_netns(self.name)
        fd = None
        try:
            fd = in_netns(self.path, lambda: _furnish(owner))
            run_in_netns(self.path, ["nft", "-f", "-"], router_rules(self.max_connections, owner))
        except BaseException:
            if fd is not None:
                os.close(fd)
            self.close()
            raise
        return fd

    def close(self) -> None:
        if self.name in netns.listnetns():
            netns.remove(self.name)


def remove_leftovers(instance: str) -> list[str]:
    """Remove the VM network namespaces a dead daemon of ``instance`` left; what was."""
    found = [name for name in netns.listnetns() if name.startswith(namespace_prefix(instance))]
    for name in found:
        netns.remove(name)
    return [f"the VM network namespace {name}" for name in found]


def _furnish(owner: int | None) -> int | None:
    """In the VM's namespace: its TAP made and up with the gateway's address, lo up, and
    forwarding on (a namespace's own); the TAP's file descriptor, or None if it stays
    for ``owner`` (see VmNetwork.open)."""
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise LaunchError(f"cannot make the VM's TAP: {exc}") from exc
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", TAP.encode(), IFF_TAP | IFF_NO_PI))
        if owner is not None:
            fcntl.ioctl(fd, TUNSETOWNER, owner)
            fcntl.ioctl(fd, TUNSETPERSIST, 1)
        with IPRoute() as ns:
            for name in ("lo", TAP):
                link = ns.link_lookup(ifname=name)[0]
                if name == TAP:
                    ns.link("set", index=link, address=TAP_MAC)
                    ns.addr(
                        "add",
                        index=link,
                        address=str(GATEWAY.ip),
                        prefixlen=GATEWAY.network.prefixlen,
                    )
                ns.link("set", index=link, state="up")
        with open("/proc/sys/net/ipv4/ip_forward", "w") as forwarding:
            forwarding.write("1")
    except BaseException:
        os.close(fd)
        raise
    if owner is None:
        return fd
    os.close(fd)
    return None
