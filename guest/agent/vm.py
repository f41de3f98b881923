"""What the agent does only as PID 1 of a VM: take the host's entropy and time after a
restore, find its channel to the host, and end the VM after the job."""

from __future__ import annotations

import os
import time

from .common import JobError, from_base64
from .protocol import Channel

TYPE_CHECKING = False  # typing costs every sandbox its import
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

VMADDR_CID_HOST = 2
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207


def synchronise(message: dict[str, Any]) -> None:
    """A (new) host connection: in a VM, perhaps restored from a snapshot that other VMs
    share, take fresh entropy and the time from the host."""
    import fcntl
    import struct

    entropy = from_base64(str(message.get("entropy", "")))
    if entropy:
        with open("/dev/urandom", "wb") as pool:
            fcntl.ioctl(
                pool, RNDADDENTROPY, struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy
            )
            # Credited entropy only reaches the generator at its next reseed: force it now.
            fcntl.ioctl(pool, RNDRESEEDCRNG)
    if isinstance(message.get("time"), int | float):
        time.clock_settime(time.CLOCK_REALTIME, float(message["time"]))


def open_port(name: str) -> int | None:
    """The virtio-serial port called ``name`` (there is no udev to make its link)."""
    base = "/sys/class/virtio-ports"
    for port in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        with open(os.path.join(base, port, "name")) as label:
            if label.read().strip() == name:
                return os.open(f"/dev/{port}", os.O_RDWR | os.O_CLOEXEC)
    return None


def host_connections(
    port_name: str, vsock_port: int, privileged_peer: bool = False
) -> Iterator[Channel]:
    """A VM's links to the host: its virtio-serial port if it has one (one link for the
    VM's life), else every connection the host makes to our vsock port in turn.

    With ``privileged_peer`` only connections from a host port below 1024 count: with
    the host kernel's vhost-vsock any local user can connect to a VM, and only root
    (the daemon) can bind such a port. (Firecracker's vsock is a Unix socket in a jail
    that only the daemon reaches, and its host ports are high.)"""
    fd = open_port(port_name)
    if fd is not None:
        yield Channel(fd, os.fdopen(os.dup(fd), "wb"))
        return
    import socket

    try:
        listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        listener.bind((socket.VMADDR_CID_ANY, vsock_port))
        listener.listen(1)
    except OSError as exc:
        raise JobError(
            f"no virtio-serial port named {port_name!r} and no vsock port {vsock_port}: {exc}"
        ) from exc
    with listener:
        while True:
            connection, (cid, port) = listener.accept()
            if privileged_peer and (cid != VMADDR_CID_HOST or port >= 1024):
                connection.close()
                continue
            with connection:
                fd = connection.fileno()
                with os.fdopen(os.dup(fd), "wb") as writer:
                    yield Channel(fd, writer)


def end_vm() -> None:
    """The end of a VM's one job: nothing to keep, so no clean shutdown to wait for. A
    reboot, which ends the VMM (QEMU runs with -no-reboot, Firecracker's guests with
    reboot=k): a power-off would only halt a Firecracker VM."""
    import ctypes

    os.sync()
    ctypes.CDLL(None).reboot(0x01234567)  # RB_AUTOBOOT
