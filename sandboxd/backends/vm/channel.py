"""How the daemon reaches the agent inside a VM: a virtio-serial port or vsock.

The agent takes whichever its VM has (see guest/agent/vm.py ``host_connections``).

- virtio-serial works on every host: QEMU gets one end of a socket pair as the port's
  character device and the daemon keeps the other, so the link exists before the guest
  boots and bytes wait in it.
- vhost-vsock, where the host has ``/dev/vhost-vsock``: the host kernel carries the bytes
  (not QEMU's main loop) and the agent listens on a vsock port. The daemon opens the
  device for QEMU (the jail has no ``/dev`` entry for it) and connects to the VM's CID
  once the agent listens; until then the guest refuses, so it retries. A VM restored from
  a snapshot gets a transport reset and its new CID, and the agent accepts the daemon's
  new connection.
- Firecracker's hybrid vsock: the VMM serves the guest's vsock on a Unix socket of its
  own, where the daemon asks for the agent's port with ``CONNECT <port>``.
"""

from __future__ import annotations

import abc
import errno
import os
import socket
from collections.abc import Callable
from pathlib import Path

import trio

from sandboxd.backends.vm.initramfs import AGENT_PORT_NAME
from sandboxd.errors import LaunchError

VHOST_VSOCK = "/dev/vhost-vsock"
CONNECT_RETRY = 0.05  # seconds between connection attempts while the guest boots
HYBRID_ANSWER_MAX = 32  # "OK <port>\n"
PRIVILEGED_PORTS = range(1023, 511, -1)  # the daemon's side of vhost-vsock connections


class VmChannel(abc.ABC):
    """One VM's agent channel: QEMU's arguments and file descriptors, and the daemon's end.
    Use it as a context manager: the daemon's resources are released on exit."""

    def __init__(self) -> None:
        self.qemu_fds: list[int] = []  # for QEMU, until hand_over()

    @abc.abstractmethod
    def qemu_args(self) -> list[str]:
        """The devices QEMU needs for the channel."""

    @abc.abstractmethod
    async def connect(self, running: Callable[[], bool]) -> trio.SocketStream:
        """The daemon's end of the link to the agent; LaunchError if the VM stopped
        (``running`` says so) before the agent could be reached."""

    def hand_over(self) -> list[int]:
        """QEMU's file descriptors, for its jail, which closes them once QEMU has them."""
        fds, self.qemu_fds = self.qemu_fds, []
        return fds

    def close(self) -> None:
        for fd in self.hand_over():  # they never reached a jail
            os.close(fd)

    def __enter__(self) -> VmChannel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class SerialChannel(VmChannel):
    def __init__(self) -> None:
        super().__init__()
        self._host, vm = socket.socketpair()
        self._vm_fd = vm.detach()
        self.qemu_fds = [self._vm_fd]

    def qemu_args(self) -> list[str]:
        return [
            "-device", "virtio-serial-device",
            "-chardev", f"socket,id=agent,fd={self._vm_fd}",
            "-device", f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
        ]  # fmt: skip

    async def connect(self, running: Callable[[], bool]) -> trio.SocketStream:
        return trio.SocketStream(trio.socket.from_stdlib_socket(self._host))

    def close(self) -> None:
        super().close()
        self._host.close()


class VsockChannel(VmChannel):
    def __init__(self, cid: int, port: int) -> None:
        super().__init__()
        self.cid = cid
        self.port = port
        self._socket: trio.socket.SocketType | None = None  # once connected
        try:
            self._vhost_fd = os.open(VHOST_VSOCK, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise LaunchError(f"cannot open {VHOST_VSOCK}: {exc.strerror}") from exc
        self.qemu_fds = [self._vhost_fd]

    def qemu_args(self) -> list[str]:
        device = f"vhost-vsock-device,guest-cid={self.cid},vhostfd={self._vhost_fd}"
        return ["-device", device]

    async def connect(self, running: Callable[[], bool]) -> trio.SocketStream:
        while running():
            sock = trio.socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            try:
                await _bind_privileged(sock)
                await sock.connect((self.cid, self.port))
            except (ConnectionResetError, ConnectionRefusedError, TimeoutError):
                sock.close()  # the agent does not listen yet
                await trio.sleep(CONNECT_RETRY)
                continue
            except OSError as exc:
                sock.close()
                raise LaunchError(f"cannot connect to vsock {self.cid}:{self.port}: {exc}") from exc
            except BaseException:  # cancelled (a start timeout): nothing stays open
                sock.close()
                raise
            self._socket = sock
            return trio.SocketStream(sock)
        raise LaunchError(f"the VM stopped before its agent listened on vsock port {self.port}")

    def close(self) -> None:
        super().close()
        if self._socket is not None:
            self._socket.close()


async def _bind_privileged(sock: trio.socket.SocketType) -> None:
    """Bind to a free host port below 1024: any local user can connect to a VM over
    vhost-vsock, and the agent only takes connections from such ports, which only root
    can bind (guest/agent/vm.py ``host_connections``)."""
    for port in PRIVILEGED_PORTS:
        try:
            await sock.bind((socket.VMADDR_CID_ANY, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            continue
        return
    raise LaunchError("no free privileged vsock port to connect from (too many VMs)")


async def connect_hybrid_vsock(
    uds: Path, port: int, running: Callable[[], bool]
) -> trio.SocketStream:
    """The daemon's end of a link to the agent on vsock ``port`` of a VM whose VMM serves
    vsock on the Unix socket ``uds``: ``CONNECT <port>`` until the VMM answers ``OK`` (it
    closes the connection while nothing listens on the port)."""
    while running():
        try:
            stream = await trio.open_unix_socket(str(uds))
        except (FileNotFoundError, ConnectionRefusedError):
            await trio.sleep(CONNECT_RETRY)  # the VMM has not bound (or listened) yet
            continue
        except OSError as exc:
            raise LaunchError(f"cannot connect to the VM's vsock socket {uds}: {exc}") from exc
        try:
            await stream.send_all(f"CONNECT {port}\n".encode())
            answer = await _receive_line(stream, HYBRID_ANSWER_MAX)
        except trio.BrokenResourceError:
            answer = b""
        except BaseException:  # cancelled (a start timeout): nothing stays open
            await trio.aclose_forcefully(stream)
            raise
        if answer.startswith(b"OK "):
            return stream
        await stream.aclose()
        await trio.sleep(CONNECT_RETRY)
    raise LaunchError(f"the VM stopped before its agent listened on vsock port {port}")


async def _receive_line(stream: trio.SocketStream, limit: int) -> bytes:
    """One line, read a byte at a time: what follows it belongs to the agent."""
    line = b""
    while not line.endswith(b"\n") and len(line) < limit:
        byte = await stream.receive_some(1)
        if not byte:
            break
        line += byte
    return line


def choose_channel(wanted: str) -> tuple[str, str]:
    """(kind, why) for ``backend.vm_channel``; LaunchError if vsock is asked for and the
    host cannot give it."""
    if wanted == "virtio-serial":
        return "virtio-serial", "configured"
    usable = _vhost_vsock_usable()
    if usable is None:
        return "vsock", f"{VHOST_VSOCK} is usable"
    if wanted == "vsock":
        raise LaunchError(
            f"backend.vm_channel = vsock, but {usable} (modprobe vhost_vsock, or use virtio-serial)"
        )
    return "virtio-serial", usable


def _vhost_vsock_usable() -> str | None:
    """None if this process can open the host's vhost-vsock device; else why not."""
    try:
        os.close(os.open(VHOST_VSOCK, os.O_RDWR | os.O_CLOEXEC))
    except FileNotFoundError:
        return f"there is no {VHOST_VSOCK}"
    except OSError as exc:
        return f"{VHOST_VSOCK} cannot be opened: {exc.strerror}"
    return None


def open_channel(kind: str, cid: int, port: int) -> VmChannel:
    """A new channel of ``kind`` for the VM with vsock ``cid``, its agent on ``port``."""
    return VsockChannel(cid, port) if kind == "vsock" else SerialChannel()
