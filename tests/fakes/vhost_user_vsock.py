"""A vhost-user back-end for QEMU's ``vhost-user-vsock-device``, in Python, for tests.

This host has no kernel vhost-vsock (no /dev/vhost-vsock), so QEMU's ``vhost-vsock-device``
cannot run here; ``vhost-user-vsock-device`` can, given a back-end on a Unix socket. This module
is that back-end: it implements the virtio-vsock device (split virtqueues rx=0 and tx=1; QEMU
keeps the event queue to itself) and exposes it on the host as Firecracker's "hybrid vsock":

- a host program connects to ``uds_path`` and writes ``CONNECT <port>\\n``; once the guest
  accepts, it reads ``OK <hostport>\\n`` and then raw bytes flow both ways. Without a guest
  listener the connection is closed without text; requests unanswered after 2 s are closed too;
- a guest connection to CID 2, port P is forwarded to the Unix socket ``<uds_path>_<P>``; the
  guest gets a reset if nothing listens there.

Use ``VhostUserVsock`` as a context manager (a background thread serves QEMU and the host
sockets), or run ``python -m tests.fakes.vhost_user_vsock --socket S --uds U --guest-cid N``.
QEMU connects as the vhost-user front-end, e.g.
``-chardev socket,id=vu,path=S -device vhost-user-vsock-device,chardev=vu``, with guest RAM
in a shared memfd (``-object memory-backend-memfd,id=mem,size=...,share=on``).
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import functools
import logging
import mmap
import os
import selectors
import signal
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)


class _Req(enum.IntEnum):
    """The vhost-user front-end requests served (QEMU docs/interop/vhost-user.rst)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    GET_CONFIG = 24
    SET_CONFIG = 25


# vhost-user message header: request, flags, payload size.
_MSG = struct.Struct("<III")
_VERSION = 0x1
_FLAG_REPLY = 1 << 2
_FLAG_NEED_REPLY = 1 << 3
_MAX_FDS = 8  # SET_MEM_TABLE carries one fd per region, at most 8 regions
_FRONTEND_TIMEOUT = 10.0  # a front-end that stalls mid-message is treated as gone
_U64 = struct.Struct("<Q")
_STATE = struct.Struct("<II")  # vring index, number
_ADDR = struct.Struct("<IIQQQQ")  # index, flags, desc, used, avail, log (QEMU addresses)
_MEM_TABLE = struct.Struct("<II")  # region count, padding
_MEM_REGION = struct.Struct("<QQQQ")  # guest address, size, QEMU address, mmap offset
_CONFIG = struct.Struct("<III")  # offset, size, flags; the config bytes follow
_VRING_INDEX = 0xFF
_VRING_NOFD = 1 << 8

_F_PROTOCOL_FEATURES = 1 << 30
_F_VERSION_1 = 1 << 32
_FEATURES = _F_VERSION_1 | _F_PROTOCOL_FEATURES
_PROTO_REPLY_ACK = 1 << 3
_PROTO_CONFIG = 1 << 9  # QEMU's vhost-user-vsock reads the guest CID with GET_CONFIG
_PROTOCOL_FEATURES = _PROTO_REPLY_ACK | _PROTO_CONFIG

# Split virtqueues (virtio spec, "Split Virtqueues").
_DESC = struct.Struct("<QIHH")  # address, length, flags, next
_DESC_F_NEXT = 1
_DESC_F_WRITE = 2
_USED_ELEM = struct.Struct("<II")  # id, length
_IDX = struct.Struct("<H")
_RX, _TX = 0, 1

# virtio-vsock (virtio spec, "Socket Device").
_HOST_CID = 2
_TYPE_STREAM = 1
_SHUTDOWN_RCV, _SHUTDOWN_SEND = 1, 2
_BUF_ALLOC = 256 * 1024  # what one connection may buffer towards its host socket
_U32 = 0xFFFFFFFF

# Firecracker's hybrid vsock conventions.
_CONNECT_TIMEOUT = 2.0
_LINE_MAX = 32
_HOST_PORT_FIRST, _HOST_PORT_END = 1 << 30, 1 << 31


class _Op(enum.IntEnum):
    """virtio-vsock packet operations."""

    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


class _Hdr(NamedTuple):
    """struct virtio_vsock_hdr: 44 bytes, little endian."""

    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    length: int
    kind: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int


_HDR = struct.Struct("<QQIIIHHIII")


def _gather(segments: list[memoryview], size: int) -> bytes:
    """The first ``size`` bytes of a descriptor chain."""
    data = b"".join(bytes(segment[:size]) for segment in segments)[:size]
    if len(data) < size:
        raise ValueError(f"buffer of {len(data)} bytes, expected at least {size}")
    return data


def _cut(segments: list[memoryview], start: int, size: int) -> list[memoryview]:
    """The views covering bytes [start, start + size) of a descriptor chain."""
    out = []
    for segment in segments:
        if start >= len(segment):
            start -= len(segment)
            continue
        piece = segment[start : start + size]
        out.append(piece)
        size -= len(piece)
        start = 0
        if not size:
            return out
    if size:
        raise ValueError(f"buffer is {size} bytes too short")
    return out


def _scatter(segments: list[memoryview], data: bytes) -> None:
    """Write ``data`` at the start of a descriptor chain."""
    done = 0
    for segment in _cut(segments, 0, len(data)):
        segment[:] = data[done : done + len(segment)]
        done += len(segment)


@dataclass
class _Region:
    guest: int
    user: int  # the address of this memory in QEMU, which SET_VRING_ADDR uses
    size: int
    mm: mmap.mmap
    view: memoryview


class _Memory:
    """The guest's RAM, shared by QEMU as memfds in SET_MEM_TABLE."""

    def __init__(self, table: bytes, fds: list[int]) -> None:
        (count, _) = _MEM_TABLE.unpack_from(table)
        if count != len(fds):
            raise ValueError(f"memory table of {count} regions came with {len(fds)} fds")
        self.regions: list[_Region] = []
        for i, fd in enumerate(fds):
            guest, size, user, offset = _MEM_REGION.unpack_from(
                table, _MEM_TABLE.size + i * _MEM_REGION.size
            )
            # Mapped from 0: Python wants offsets aligned to the page size of the fd.
            mm = mmap.mmap(fd, offset + size)
            self.regions.append(_Region(guest, user, size, mm, memoryview(mm)[offset:]))
        log.debug("guest memory: %s", [(hex(r.guest), r.size) for r in self.regions])

    def guest(self, address: int, size: int) -> memoryview:
        """A guest-physical buffer, as in descriptors."""
        for region in self.regions:
            if region.guest <= address and address + size <= region.guest + region.size:
                return region.view[address - region.guest : address - region.guest + size]
        raise ValueError(f"guest buffer {address:#x}+{size} is outside guest memory")

    def user(self, address: int, size: int) -> memoryview:
        """A buffer by its address in QEMU, as in SET_VRING_ADDR."""
        for region in self.regions:
            if region.user <= address and address + size <= region.user + region.size:
                return region.view[address - region.user : address - region.user + size]
        raise ValueError(f"QEMU address {address:#x}+{size} is outside guest memory")

    def close(self) -> None:
        for region in self.regions:
            region.view.release()
            region.mm.close()
        self.regions.clear()


class _Queue:
    """One split virtqueue, as the device side sees it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.size = 0
        self.addresses: tuple[int, int, int] | None = None  # desc, avail, used in QEMU
        self.desc: memoryview | None = None
        self.avail: memoryview | None = None
        self.used: memoryview | None = None
        self.last_avail = 0
        self.used_idx = 0
        self.kick: int | None = None
        self.call: int | None = None
        self.enabled = False
        self.pending_call = False

    @property
    def ready(self) -> bool:
        return self.used is not None and self.kick is not None and self.enabled

    def map(self, memory: _Memory) -> None:
        assert self.addresses is not None
        desc, avail, used = self.addresses
        self.desc = memory.user(desc, _DESC.size * self.size)
        self.avail = memory.user(avail, 4 + 2 * self.size)
        self.used = memory.user(used, 4 + _USED_ELEM.size * self.size)
        # Resume where the ring is, as libvhost-user does.
        (self.used_idx,) = _IDX.unpack_from(self.used, 2)

    def unmap(self) -> None:
        for view in (self.desc, self.avail, self.used):
            if view is not None:
                view.release()
        self.desc = self.avail = self.used = None

    def pop(self) -> int | None:
        """The head of the next available chain, left available until ``push``."""
        assert self.avail is not None
        (avail_idx,) = _IDX.unpack_from(self.avail, 2)
        if avail_idx == self.last_avail:
            return None
        (head,) = _IDX.unpack_from(self.avail, 4 + 2 * (self.last_avail % self.size))
        return head

    def chain(self, memory: _Memory, head: int, writable: bool) -> list[memoryview]:
        """The buffers of a descriptor chain, all device-writable or all device-readable."""
        assert self.desc is not None
        segments = []
        index = head
        for _ in range(self.size):
            if index >= self.size:
                raise ValueError(f"descriptor {index} is outside the ring")
            address, size, flags, following = _DESC.unpack_from(self.desc, _DESC.size * index)
            if bool(flags & _DESC_F_WRITE) != writable:
                raise ValueError(f"descriptor {index} has the wrong direction")
            segments.append(memory.guest(address, size))
            if not flags & _DESC_F_NEXT:
                return segments
            index = following
        raise ValueError("descriptor chain loops")

    def push(self, head: int, size: int) -> None:
        """Give a chain back to the guest with ``size`` bytes written."""
        assert self.used is not None
        _USED_ELEM.pack_into(
            self.used, 4 + _USED_ELEM.size * (self.used_idx % self.size), head, size
        )
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        _IDX.pack_into(self.used, 2, self.used_idx)
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        self.pending_call = True

    def notify(self) -> None:
        # Always interrupt, ignoring VRING_AVAIL_F_NO_INTERRUPT: checking it safely needs a
        # memory barrier that Python cannot issue, and a spurious interrupt is harmless.
        if self.pending_call and self.call is not None:
            os.write(self.call, _U64.pack(1))
            self.pending_call = False

    def stop(self, selector: selectors.BaseSelector) -> None:
        """Stop processing the ring: forget its kick fd."""
        if self.kick is not None:
            selector.unregister(self.kick)
            os.close(self.kick)
            self.kick = None

    def close_fds(self, selector: selectors.BaseSelector) -> None:
        self.stop(selector)
        if self.call is not None:
            os.close(self.call)
            self.call = None


@dataclass(eq=False)
class _Conn:
    """A vsock stream between a guest port and a host Unix socket."""

    sock: socket.socket
    local_port: int  # the host side's vsock port
    peer_port: int  # the guest's
    established: bool
    deadline: float = 0.0  # when a host-initiated request is given up
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    tx_cnt: int = 0  # bytes sent to the guest
    fwd_cnt: int = 0  # guest bytes written to the host socket
    fwd_told: int = 0  # fwd_cnt as last told to the guest
    to_host: bytearray = field(default_factory=bytearray)
    host_eof: bool = False
    host_shut: bool = False
    guest_send_done: bool = False
    guest_rcv_done: bool = False
    credit_requested: bool = False
    events: int = 0  # as registered with the selector

    @property
    def key(self) -> tuple[int, int]:
        return (self.local_port, self.peer_port)

    def credit(self) -> int:
        """How many more bytes the guest can take."""
        return max(0, self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & _U32))

    def wants_to_read(self) -> bool:
        return self.established and not self.host_eof and not self.guest_rcv_done


class VhostUserVsock:
    """A virtio-vsock device for one QEMU at a time, served from a background thread."""

    def __init__(
        self,
        socket_path: Path,
        uds_path: Path,
        guest_cid: int,
        host_ports: range = range(_HOST_PORT_FIRST, _HOST_PORT_END),
    ) -> None:
        """``host_ports``: where host connections come from (Firecracker's range by
        default; a host with kernel vhost-vsock binds what it likes, e.g. a port < 1024)."""
        if guest_cid <= _HOST_CID or guest_cid >= _U32:
            raise ValueError(f"invalid guest CID {guest_cid}")
        self.socket_path = Path(socket_path)
        self.uds_path = Path(uds_path)
        self.guest_cid = guest_cid
        self._sel: selectors.BaseSelector
        self._thread: threading.Thread | None = None
        self._running = False
        self._vu_listener: socket.socket | None = None
        self._uds_listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._frontend: socket.socket | None = None
        self._features = 0
        self._protocol = 0
        self._memory: _Memory | None = None
        self._queues = [_Queue(_RX), _Queue(_TX)]
        self._conns: dict[tuple[int, int], _Conn] = {}
        self._handshakes: dict[socket.socket, bytearray] = {}
        self._ctl: deque[bytes] = deque()  # control packets for the guest, sent before data
        self._rx_starved = False  # the guest has no rx buffers until it kicks again
        self._host_ports = host_ports
        self._next_port = host_ports.start

    def __enter__(self) -> VhostUserVsock:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Listen on both sockets and serve them from a new thread."""
        if self._thread is not None:
            raise RuntimeError("already started")
        self._sel = selectors.DefaultSelector()
        try:
            self._vu_listener = self._listen(self.socket_path)
            self._uds_listener = self._listen(self.uds_path)
        except OSError:
            self._shutdown()
            raise
        self._wake_r, self._wake_w = socket.socketpair()
        self._sel.register(self._vu_listener, selectors.EVENT_READ, self._on_frontend_accept)
        self._sel.register(self._uds_listener, selectors.EVENT_READ, self._on_host_accept)
        self._sel.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        self._running = True
        self._thread = threading.Thread(
            target=self._run, name=f"vhost-user-vsock {self.socket_path.name}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread, close every socket and remove the sockets' files."""
        if self._thread is None:
            return
        assert self._wake_w is not None
        with contextlib.suppress(OSError):  # the thread may have ended and closed its side
            self._wake_w.send(b"\0")
        self._thread.join()
        self._thread = None
        self._wake_w.close()

    @staticmethod
    def _listen(path: Path) -> socket.socket:
        path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            sock.listen(16)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        return sock

    # The event loop.

    def _run(self) -> None:
        try:
            while self._running:
                for key, mask in self._sel.select(self._timeout()):
                    # An earlier handler in this batch may have closed this file.
                    if self._sel.get_map().get(key.fd) is key:
                        self._guarded(key.data, mask)
                self._guarded(self._after_events, 0)
        finally:
            self._shutdown()

    def _guarded(self, handler: Callable[[int], None], mask: int) -> None:
        # The device must outlive any front-end, so a bug or a front-end sending nonsense
        # costs that front-end its session, not the thread.
        try:
            handler(mask)
            return
        except Exception:
            log.exception("vhost-user-vsock: dropping the front-end after an error")
        # Outside the except block: the traceback's frames, which may hold views of guest
        # memory, are gone, so the memory can be unmapped.
        self._drop_frontend()

    def _timeout(self) -> float | None:
        deadlines = [c.deadline for c in self._conns.values() if not c.established]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _after_events(self, _mask: int) -> None:
        now = time.monotonic()
        for conn in [c for c in self._conns.values() if not c.established and c.deadline <= now]:
            log.debug("no answer from the guest for port %d", conn.peer_port)
            self._close(conn, reset=True)
        self._flush_ctl()
        for queue in self._queues:
            queue.notify()
        self._update_interest()

    def _update_interest(self) -> None:
        """Poll host sockets for what can be done: reading needs rx buffers and credit."""
        rx_open = self._queues[_RX].ready and not self._rx_starved and not self._ctl
        for conn in self._conns.values():
            events = 0
            if rx_open and conn.wants_to_read() and conn.credit():
                events |= selectors.EVENT_READ
            if conn.to_host:
                events |= selectors.EVENT_WRITE
            if events == conn.events:
                continue
            handler = functools.partial(self._on_conn, conn)
            if not conn.events:
                self._sel.register(conn.sock, events, handler)
            elif events:
                self._sel.modify(conn.sock, events, handler)
            else:
                self._sel.unregister(conn.sock)
            conn.events = events

    def _on_wake(self, _mask: int) -> None:
        self._running = False

    def _shutdown(self) -> None:
        self._drop_frontend(accept_another=False)
        for sock in self._handshakes:
            sock.close()
        self._handshakes.clear()
        for sock in (self._vu_listener, self._uds_listener, self._wake_r):
            if sock is not None:
                sock.close()
        self._vu_listener = self._uds_listener = self._wake_r = None
        self._sel.close()
        for path in (self.socket_path, self.uds_path):
            path.unlink(missing_ok=True)

    # The vhost-user front-end (QEMU).

    def _on_frontend_accept(self, _mask: int) -> None:
        assert self._vu_listener is not None
        try:
            sock, _ = self._vu_listener.accept()
        except BlockingIOError:
            return
        log.info("vhost-user front-end connected")
        sock.settimeout(_FRONTEND_TIMEOUT)
        # One front-end at a time: the next one waits in the backlog.
        self._sel.unregister(self._vu_listener)
        self._frontend = sock
        self._sel.register(sock, selectors.EVENT_READ, self._on_frontend)

    def _drop_frontend(self, accept_another: bool = True) -> None:
        self._reset_device()
        if self._frontend is None:
            return
        self._sel.unregister(self._frontend)
        self._frontend.close()
        self._frontend = None
        log.info("vhost-user front-end gone")
        if accept_another and self._vu_listener is not None:
            self._sel.register(self._vu_listener, selectors.EVENT_READ, self._on_frontend_accept)

    def _reset_device(self) -> None:
        self._drop_conns()
        for queue in self._queues:
            queue.close_fds(self._sel)
            queue.unmap()
        self._queues = [_Queue(_RX), _Queue(_TX)]
        if self._memory is not None:
            self._memory.close()
            self._memory = None
        self._features = self._protocol = 0
        self._rx_starved = False

    def _on_frontend(self, _mask: int) -> None:
        assert self._frontend is not None
        fds: list[int] = []
        try:
            header, fds, _, _ = socket.recv_fds(
                self._frontend, _MSG.size, _MAX_FDS, socket.MSG_CMSG_CLOEXEC
            )
            if not header:
                self._drop_frontend()
                return
            header += self._recv_exact(_MSG.size - len(header))
            request, flags, size = _MSG.unpack(header)
            payload = self._recv_exact(size)
            ack = bool(flags & _FLAG_NEED_REPLY and self._protocol & _PROTO_REPLY_ACK)
            reply = self._handle(request, payload, fds, ack)
            if reply is None and ack:
                reply = _U64.pack(0)
            if reply is not None:
                self._frontend.sendall(
                    _MSG.pack(request, _VERSION | _FLAG_REPLY, len(reply)) + reply
                )
        except OSError as error:
            log.info("vhost-user front-end connection failed: %s", error)
            self._drop_frontend()
        finally:
            for fd in fds:  # the handlers took (and emptied out) the fds they keep
                os.close(fd)

    def _recv_exact(self, size: int) -> bytes:
        assert self._frontend is not None
        data = b""
        while len(data) < size:
            chunk = self._frontend.recv(size - len(data))
            if not chunk:
                raise ConnectionResetError("front-end closed mid-message")
            data += chunk
        return data

    def _queue(self, index: int) -> _Queue:
        if index >= len(self._queues):
            raise ValueError(f"no virtqueue {index}: QEMU runs the event queue itself")
        return self._queues[index]

    def _handle(self, request: int, payload: bytes, fds: list[int], ack: bool) -> bytes | None:
        """Serve one front-end request; the reply payload, if it has one."""
        with contextlib.suppress(ValueError):
            request = _Req(request)  # for the log's sake
        log.debug("vhost-user request %r", request)
        match request:
            case _Req.GET_FEATURES:
                return _U64.pack(_FEATURES)
            case _Req.SET_FEATURES:
                (self._features,) = _U64.unpack_from(payload)
            case _Req.GET_PROTOCOL_FEATURES:
                return _U64.pack(_PROTOCOL_FEATURES)
            case _Req.SET_PROTOCOL_FEATURES:
                (features,) = _U64.unpack_from(payload)
                self._protocol = features & _PROTOCOL_FEATURES
            case _Req.SET_OWNER | _Req.SET_CONFIG:
                pass  # nothing to claim; the config (the guest CID) is read-only
            case _Req.RESET_OWNER:
                self._reset_device()
            case _Req.SET_MEM_TABLE:
                self._set_mem_table(payload, fds)
            case _Req.GET_QUEUE_NUM:
                return _U64.pack(len(self._queues))
            case _Req.GET_CONFIG:
                offset, size, flags = _CONFIG.unpack_from(payload)
                config = _U64.pack(self.guest_cid)  # struct virtio_vsock_config
                return _CONFIG.pack(offset, size, flags) + config[offset : offset + size].ljust(
                    size, b"\0"
                )
            case _Req.SET_VRING_NUM:
                index, number = _STATE.unpack_from(payload)
                if number & (number - 1) or not 0 < number <= 32768:
                    raise ValueError(f"invalid virtqueue size {number}")
                self._queue(index).size = number
            case _Req.SET_VRING_ADDR:
                index, _, desc, used, avail, _ = _ADDR.unpack_from(payload)
                queue = self._queue(index)
                queue.unmap()
                queue.addresses = (desc, avail, used)
                if self._memory is not None:
                    queue.map(self._memory)
            case _Req.SET_VRING_BASE:
                index, number = _STATE.unpack_from(payload)
                self._queue(index).last_avail = number
            case _Req.GET_VRING_BASE:
                index, _ = _STATE.unpack_from(payload)
                queue = self._queue(index)
                queue.stop(self._sel)
                # The device is stopping: the guest's sockets go with it.
                self._drop_conns()
                return _STATE.pack(index, queue.last_avail)
            case _Req.SET_VRING_KICK | _Req.SET_VRING_CALL | _Req.SET_VRING_ERR:
                (value,) = _U64.unpack_from(payload)
                fd = None if value & _VRING_NOFD or not fds else fds.pop(0)
                self._set_vring_fd(request, self._queue(value & _VRING_INDEX), fd)
            case _Req.SET_VRING_ENABLE:
                index, number = _STATE.unpack_from(payload)
                queue = self._queue(index)
                queue.enabled = bool(number)
                self._service(queue)  # buffers may have been queued while it was disabled
            case _:
                log.warning("unsupported vhost-user request %d", request)
                return _U64.pack(1) if ack else None  # a failure, where one is awaited
        return None

    def _set_mem_table(self, payload: bytes, fds: list[int]) -> None:
        try:
            memory = _Memory(payload, fds)
        finally:
            for fd in fds:  # mmap keeps its own duplicate
                os.close(fd)
            fds.clear()
        for queue in self._queues:
            queue.unmap()
        if self._memory is not None:
            self._memory.close()
        self._memory = memory
        for queue in self._queues:
            if queue.addresses is not None:
                queue.map(memory)

    def _set_vring_fd(self, request: int, queue: _Queue, fd: int | None) -> None:
        if request == _Req.SET_VRING_ERR:
            if fd is not None:
                os.close(fd)  # this device never reports errors
            return
        if request == _Req.SET_VRING_CALL:
            if queue.call is not None:
                os.close(queue.call)
            queue.call = fd
            return
        queue.stop(self._sel)
        queue.kick = fd
        if fd is None:
            return  # polling mode: not offered, so not expected
        self._sel.register(fd, selectors.EVENT_READ, functools.partial(self._on_kick, queue))
        if not self._features & _F_PROTOCOL_FEATURES:
            queue.enabled = True  # without protocol features rings start enabled
        # Buffers may have been queued before the kick fd existed.
        self._service(queue)

    def _on_kick(self, queue: _Queue, _mask: int) -> None:
        assert queue.kick is not None
        with contextlib.suppress(BlockingIOError):
            os.read(queue.kick, 8)
        self._service(queue)

    def _service(self, queue: _Queue) -> None:
        if queue.index == _RX:
            self._rx_starved = False  # new buffers, maybe: polling resumes after this batch
        else:
            self._process_tx()

    # Virtio-vsock, guest to host.

    def _process_tx(self) -> None:
        queue = self._queues[_TX]
        if not queue.ready or self._memory is None:
            return
        while (head := queue.pop()) is not None:
            try:
                segments = queue.chain(self._memory, head, writable=False)
                hdr = _Hdr(*_HDR.unpack(_gather(segments, _HDR.size)))
                payload = _cut(segments, _HDR.size, hdr.length) if hdr.op == _Op.RW else []
            except ValueError as error:
                log.warning("dropping a malformed tx buffer: %s", error)
            else:
                self._on_packet(hdr, payload)
            queue.push(head, 0)

    def _on_packet(self, hdr: _Hdr, payload: list[memoryview]) -> None:
        if hdr.src_cid != self.guest_cid or hdr.dst_cid != _HOST_CID:
            log.warning("dropping a packet from CID %d to CID %d", hdr.src_cid, hdr.dst_cid)
            return
        conn = self._conns.get((hdr.dst_port, hdr.src_port))
        if hdr.kind != _TYPE_STREAM or conn is None:
            if hdr.kind == _TYPE_STREAM and hdr.op == _Op.REQUEST:
                self._connect_host(hdr)
            elif hdr.op != _Op.RST:
                self._ctl.append(self._packet(hdr.dst_port, hdr.src_port, _Op.RST))
            return
        conn.peer_buf_alloc, conn.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
        if conn.credit():
            conn.credit_requested = False
        if not conn.established:
            if hdr.op == _Op.RESPONSE:
                self._established(conn)
            else:
                self._close(conn, reset=hdr.op != _Op.RST)  # no listener: close without text
            return
        match hdr.op:
            case _Op.RW:
                self._to_host(conn, payload)
            case _Op.CREDIT_REQUEST:
                self._ctl.append(self._conn_packet(conn, _Op.CREDIT_UPDATE))
            case _Op.CREDIT_UPDATE:
                pass  # the credit fields were taken above
            case _Op.SHUTDOWN:
                conn.guest_rcv_done |= bool(hdr.flags & _SHUTDOWN_RCV)
                conn.guest_send_done |= bool(hdr.flags & _SHUTDOWN_SEND)
                self._maybe_finish(conn)
            case _Op.RST:
                self._close(conn, reset=False)
            case _:
                self._close(conn, reset=True)

    def _connect_host(self, hdr: _Hdr) -> None:
        """A guest-initiated connection: forward it to ``<uds_path>_<port>``."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(f"{self.uds_path}_{hdr.dst_port}")
        except OSError as error:
            log.debug("guest connection to port %d refused: %s", hdr.dst_port, error)
            sock.close()
            self._ctl.append(self._packet(hdr.dst_port, hdr.src_port, _Op.RST))
            return
        conn = _Conn(sock, hdr.dst_port, hdr.src_port, established=True)
        conn.peer_buf_alloc, conn.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
        self._conns[conn.key] = conn
        self._ctl.append(self._conn_packet(conn, _Op.RESPONSE))

    def _established(self, conn: _Conn) -> None:
        conn.established = True
        try:
            # The socket is new and empty, so this short line fits in its buffer at once.
            conn.sock.sendall(b"OK %d\n" % conn.local_port)
        except OSError:
            self._close(conn, reset=True)

    def _to_host(self, conn: _Conn, payload: list[memoryview]) -> None:
        if conn.guest_send_done or not payload:
            return
        sent = 0
        if not conn.to_host:
            try:
                sent = conn.sock.sendmsg(payload)
            except BlockingIOError:
                pass
            except OSError:
                self._close(conn, reset=True)
                return
            self._forwarded(conn, sent)
        for segment in _cut(payload, sent, sum(len(s) for s in payload) - sent):
            conn.to_host += segment
        if len(conn.to_host) > _BUF_ALLOC:
            log.warning("guest port %d ignores its credit", conn.peer_port)
            self._close(conn, reset=True)

    def _forwarded(self, conn: _Conn, size: int) -> None:
        conn.fwd_cnt = (conn.fwd_cnt + size) & _U32
        # Tell the guest of freed space before it could run out of credit.
        if (conn.fwd_cnt - conn.fwd_told) & _U32 >= _BUF_ALLOC // 4:
            self._ctl.append(self._conn_packet(conn, _Op.CREDIT_UPDATE))

    def _maybe_finish(self, conn: _Conn) -> None:
        """Pass a finished direction on to the host, and end a finished connection."""
        if conn.to_host:
            return
        if conn.guest_send_done and not conn.host_shut:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)
            conn.host_shut = True
        if conn.guest_send_done and (conn.host_eof or conn.guest_rcv_done):
            self._close(conn, reset=True)  # the reset the guest waits for before it closes

    # Virtio-vsock, host to guest.

    def _on_host_accept(self, _mask: int) -> None:
        assert self._uds_listener is not None
        try:
            sock, _ = self._uds_listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        self._handshakes[sock] = bytearray()
        self._sel.register(sock, selectors.EVENT_READ, functools.partial(self._on_handshake, sock))

    def _on_handshake(self, sock: socket.socket, _mask: int) -> None:
        """Read ``CONNECT <port>\\n``, and not a byte more: the rest is the stream."""
        line = self._handshakes[sock]
        try:
            peeked = sock.recv(_LINE_MAX - len(line), socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            peeked = b""
        end = peeked.find(b"\n")
        if peeked:
            line += sock.recv(end + 1 if end >= 0 else len(peeked))
        if end < 0:
            if not peeked or len(line) >= _LINE_MAX:
                self._end_handshake(sock).close()
            return
        words = line.decode("ascii", "replace").split()
        sock = self._end_handshake(sock)
        if (
            len(words) != 2
            or words[0].upper() != "CONNECT"
            or not words[1].isdigit()
            or int(words[1]) > _U32
        ):
            log.debug("bad handshake %r", bytes(line))
            sock.close()
            return
        conn = _Conn(sock, self._allocate_port(), int(words[1]), established=False)
        conn.deadline = time.monotonic() + _CONNECT_TIMEOUT
        self._conns[conn.key] = conn
        self._ctl.append(self._conn_packet(conn, _Op.REQUEST))

    def _end_handshake(self, sock: socket.socket) -> socket.socket:
        del self._handshakes[sock]
        self._sel.unregister(sock)
        return sock

    def _allocate_port(self) -> int:
        taken = {conn.local_port for conn in self._conns.values()}
        while True:
            port = self._next_port
            self._next_port = (
                port + 1 if port + 1 < self._host_ports.stop else self._host_ports.start
            )
            if port not in taken:
                return port

    def _on_conn(self, conn: _Conn, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush_to_host(conn)
        if mask & selectors.EVENT_READ and self._conns.get(conn.key) is conn:
            self._to_guest(conn)

    def _flush_to_host(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.to_host)
        except BlockingIOError:
            return
        except OSError:
            self._close(conn, reset=True)
            return
        del conn.to_host[:sent]
        self._forwarded(conn, sent)
        self._maybe_finish(conn)

    def _to_guest(self, conn: _Conn) -> None:
        """Move what the host socket has into the guest's rx buffers, within credit."""
        queue = self._queues[_RX]
        self._flush_ctl()  # control packets (a RESPONSE, say) go first
        while not self._ctl and conn.wants_to_read() and self._memory is not None:
            credit = conn.credit()
            if not credit:
                if not conn.credit_requested:
                    conn.credit_requested = True
                    self._ctl.append(self._conn_packet(conn, _Op.CREDIT_REQUEST))
                return
            head = queue.pop()
            if head is None:
                self._rx_starved = True
                return
            try:
                segments = queue.chain(self._memory, head, writable=True)
                room = sum(len(s) for s in segments) - _HDR.size
                if room <= 0:
                    raise ValueError(f"rx buffer of {room + _HDR.size} bytes")
            except ValueError as error:
                log.warning("dropping a malformed rx buffer: %s", error)
                queue.push(head, 0)
                continue
            try:
                size = conn.sock.recvmsg_into(_cut(segments, _HDR.size, min(room, credit)))[0]
            except BlockingIOError:
                return
            except OSError:
                self._close(conn, reset=True)
                return
            if not size:
                conn.host_eof = True
                self._ctl.append(self._conn_packet(conn, _Op.SHUTDOWN, _SHUTDOWN_SEND))
                self._maybe_finish(conn)
                return
            _scatter(segments, self._conn_packet(conn, _Op.RW, length=size))
            queue.push(head, _HDR.size + size)
            conn.tx_cnt = (conn.tx_cnt + size) & _U32

    def _flush_ctl(self) -> None:
        queue = self._queues[_RX]
        if not queue.ready or self._memory is None:
            return
        while self._ctl:
            head = queue.pop()
            if head is None:
                self._rx_starved = True
                return
            try:
                _scatter(queue.chain(self._memory, head, writable=True), self._ctl[0])
            except ValueError as error:
                log.warning("dropping a malformed rx buffer: %s", error)
                queue.push(head, 0)
                continue
            self._ctl.popleft()
            queue.push(head, _HDR.size)

    def _packet(
        self,
        local_port: int,
        peer_port: int,
        op: int,
        flags: int = 0,
        length: int = 0,
        fwd_cnt: int = 0,
    ) -> bytes:
        return _HDR.pack(
            _HOST_CID,
            self.guest_cid,
            local_port,
            peer_port,
            length,
            _TYPE_STREAM,
            op,
            flags,
            _BUF_ALLOC,
            fwd_cnt,
        )

    def _conn_packet(self, conn: _Conn, op: int, flags: int = 0, length: int = 0) -> bytes:
        conn.fwd_told = conn.fwd_cnt  # every header carries the credit
        return self._packet(conn.local_port, conn.peer_port, op, flags, length, conn.fwd_cnt)

    def _close(self, conn: _Conn, reset: bool) -> None:
        log.debug("closing host port %d, guest port %d", conn.local_port, conn.peer_port)
        if reset:
            self._ctl.append(self._conn_packet(conn, _Op.RST))
        if conn.events:
            self._sel.unregister(conn.sock)
        conn.sock.close()
        del self._conns[conn.key]

    def _drop_conns(self) -> None:
        """Close every host connection: the guest side is gone."""
        for conn in list(self._conns.values()):
            self._close(conn, reset=False)
        self._ctl.clear()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fakes.vhost_user_vsock",
        description="Serve a vhost-user-vsock device with Firecracker's hybrid vsock model.",
    )
    parser.add_argument("--socket", type=Path, required=True, help="vhost-user socket for QEMU")
    parser.add_argument("--uds", type=Path, required=True, help="host-side Unix socket")
    parser.add_argument("--guest-cid", type=int, required=True)
    parser.add_argument("--verbose", "-v", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
    )
    signals = {signal.SIGINT, signal.SIGTERM}
    # Blocked before the thread starts, so it inherits the mask and only sigwait sees them.
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    with VhostUserVsock(args.socket, args.uds, args.guest_cid):
        signal.sigwait(signals)


if __name__ == "__main__":
    main()
