"""Without API keys, the gateway admits exactly the local users who may use the daemon's
socket: the kernel tells which uid holds the other end of a loopback TCP connection
(sock_diag, through pyroute2), and the socket file's owner, group and mode tell whether
that uid may connect to the daemon itself.

The check reads the user database (``/etc/group``), not the caller's process: a user
just added to the group is admitted here before a new login would let them use the
socket directly.
"""

from __future__ import annotations

import grp
import ipaddress
import os
import pwd
import socket
import stat
import time
from pathlib import Path

from pyroute2 import DiagSocket
from pyroute2.netlink.diag import SS_ESTABLISHED

CACHE_SECONDS = 5.0  # how long a uid's answer is reused (the group file rarely changes)


def tcp_peer_uid(client: tuple[str, int], server: tuple[str, int]) -> int | None:
    """The uid that owns the client end of the TCP connection ``client`` → ``server``
    on this host, or None if no such socket is here (it is remote, or already gone)."""
    address = ipaddress.ip_address(client[0])
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with DiagSocket() as diag:
        diag.bind()
        found = diag.get_sock_stats(
            family=family,
            states=1 << SS_ESTABLISHED,
            sport=client[1],
            dport=server[1],
        )
    for entry in found:
        if ipaddress.ip_address(entry["idiag_src"]) == address and ipaddress.ip_address(
            entry["idiag_dst"]
        ) == ipaddress.ip_address(server[0]):
            return int(entry["idiag_uid"])
    return None


class SocketUsers:
    """Who may connect to the daemon's socket at ``path``, by its owner, group and mode."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._answers: dict[int, tuple[float, bool]] = {}

    def group_name(self) -> str:
        try:
            return grp.getgrgid(self.path.stat().st_gid).gr_name
        except (OSError, KeyError):
            return "the socket's group"

    def allows(self, uid: int) -> bool:
        now = time.monotonic()
        cached = self._answers.get(uid)
        if cached is not None and now - cached[0] < CACHE_SECONDS:
            return cached[1]
        answer = self._allows(uid)
        self._answers[uid] = (now, answer)
        return answer

    def _allows(self, uid: int) -> bool:
        if uid == 0:
            return True
        try:
            info = self.path.stat()
        except OSError:
            return False  # no daemon: nobody could use it
        if uid == info.st_uid:
            needed = stat.S_IRUSR | stat.S_IWUSR
        elif info.st_gid in _groups(uid):
            needed = stat.S_IRGRP | stat.S_IWGRP
        else:
            needed = stat.S_IROTH | stat.S_IWOTH
        return info.st_mode & needed == needed


def _groups(uid: int) -> list[int]:
    """The groups of the user ``uid`` in the user database (primary and supplementary)."""
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return []
    return os.getgrouplist(user.pw_name, user.pw_gid)
