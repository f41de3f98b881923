"""Without API keys, the gateway admits exactly the local users who may use the daemon's
socket: the kernel tells which uid holds the other end of a loopback TCP connection
(sock_diag), and the socket file's owner, group and mode tell whether that uid may
connect to the daemon itself.

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
import struct
import time
from pathlib import Path

NETLINK_SOCK_DIAG = 4  # linux/netlink.h
SOCK_DIAG_BY_FAMILY = 20  # linux/sock_diag.h
INET_DIAG_NOCOOKIE = 0xFFFFFFFF  # linux/inet_diag.h
TCP_ESTABLISHED = 1
CACHE_SECONDS = 5.0  # how long a uid's answer is reused (the group file rarely changes)
# Answers kept at most: a user with subordinate uids can connect as 65536 of them.
CACHE_ENTRIES = 1024


def tcp_peer_uid(client: tuple[str, int], server: tuple[str, int]) -> int | None:
    """The uid that owns the client end of the TCP connection ``client`` → ``server``
    on this host, or None if no such socket is here (it is remote, or already gone).

    One sock_diag request for exactly that socket, answered by the kernel's lookup (not
    a dump of every socket): tens of microseconds, where pyroute2's sock_diag costs a
    request some 8 ms of CPU (it runs an asyncio loop per call)."""
    source, destination = ipaddress.ip_address(client[0]), ipaddress.ip_address(server[0])
    family = socket.AF_INET6 if source.version == 6 else socket.AF_INET
    sockid = (
        struct.pack("!HH", client[1], server[1])
        + source.packed.ljust(16, b"\0")
        + destination.packed.ljust(16, b"\0")
        + struct.pack("=III", 0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
    )
    request = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 1 << TCP_ESTABLISHED)
    header = struct.pack("=IHHII", 16 + len(request) + len(sockid), SOCK_DIAG_BY_FAMILY, 1, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as diag:
        diag.sendto(header + request + sockid, (0, 0))
        answer = diag.recv(8192)
    _, kind = struct.unpack_from("=IH", answer)
    if kind != SOCK_DIAG_BY_FAMILY:
        return None  # NLMSG_ERROR: no such socket (ENOENT), or not a local one
    # nlmsghdr, then inet_diag_msg: family, state, timer, retrans, the socket id
    # (48 bytes), expires, rqueue, wqueue, uid, inode.
    (uid,) = struct.unpack_from("=I", answer, 16 + 4 + 48 + 12)
    return int(uid)


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
        if len(self._answers) >= CACHE_ENTRIES:
            self._answers = {
                key: kept for key, kept in self._answers.items() if now - kept[0] < CACHE_SECONDS
            }
            if len(self._answers) >= CACHE_ENTRIES:
                self._answers.clear()  # all fresh: a flood of uids; answers are cheap to redo
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
