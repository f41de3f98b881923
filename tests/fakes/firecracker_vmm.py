"""The fake Firecracker's VMM: the configured microVM run as a QEMU ``microvm`` under TCG.

Faithful to Firecracker (as its users see it):

- the guest gets the kernel (an uncompressed ELF ``vmlinux``, booted through PVH), the initrd,
  the command line, the vCPUs and memory, one virtio-blk per drive (read-only when
  ``is_read_only``; the root drive first, so it is ``/dev/vda``), a virtio-rng for
  ``/entropy``, an i8042 (``reboot=k`` and Ctrl-Alt-Del work as on Firecracker's x86) and the
  serial console (ttyS0) on this process's stdout, with stdin as its input;
- vsock is Firecracker's hybrid vsock: ``CONNECT <port>\\n`` on ``uds_path``, ``OK <port>\\n``
  once the guest accepts, 2 s for pending requests, and guest connections to CID 2 port P go
  to ``<uds_path>_<P>`` (tests/fakes/vhost_user_vsock.py, served in a thread of this process);
- a guest reboot (reset) ends the process with exit code 0; a guest power-off does not: the
  VM stays halted until the process is killed;
- pause and resume stop and continue the vCPUs (QMP ``stop``/``cont``);
- the host's side of KVM: the VM is built as Firecracker builds it on x86_64, with an
  in-kernel irqchip and PIT (:func:`kvm_vm`), so the host has the VM's ``kvm-pit/<pid>``
  kernel thread as long as the process lives.

Deviations, all of them forced by running on QEMU without KVM:

- QEMU is a child process (killed with this process: PR_SET_PDEATHSIG), started from the
  VMM thread; guest memory is a shared memfd (vhost-user needs it). The KVM VM runs no
  vCPU and has no memory: the guest runs in QEMU;
- the kernel command line gets ``tsc_early_khz=`` and ``lpj=`` for the host's clock: TCG guests
  hang calibrating their clocks without them. Firecracker's users never pass these;
- snapshots cannot hold the guest's state (QEMU's vhost-user-vsock cannot migrate), so a
  "restore" boots the saved configuration afresh: see firecracker_api.py for the file format.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import logging
import os
import queue
import re
import signal
import socket
import struct
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.fakes.vhost_user_vsock import VhostUserVsock

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
QMP_TIMEOUT = 30.0
_PR_SET_PDEATHSIG = 1
_LINUX_HZ = 250  # the guest kernel's CONFIG_HZ, for lpj


# KVM's ioctls on /dev/kvm and on a VM (linux/kvm.h), and Firecracker's PIT flags.
KVM_CREATE_VM = 0xAE01
KVM_CREATE_IRQCHIP = 0xAE60
KVM_CREATE_PIT2 = 0x4040AE77  # _IOW(KVMIO, 0x77, struct kvm_pit_config): 64 bytes
KVM_PIT_SPEAKER_DUMMY = 1


def kvm_vm(kvm: int) -> int:
    """A KVM VM made through ``kvm`` (an fd of /dev/kvm) as Firecracker makes one on
    x86_64 (Vm::new, then setup_irqchip: the irqchip, and the PIT with a dummy speaker);
    its fd. KVM starts the PIT's kernel thread, ``kvm-pit/<our pid>``, at once."""
    vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
    try:
        fcntl.ioctl(vm, KVM_CREATE_IRQCHIP)
        fcntl.ioctl(vm, KVM_CREATE_PIT2, struct.pack("<I60x", KVM_PIT_SPEAKER_DUMMY))
    except OSError:
        os.close(vm)
        raise
    return vm


def tcg_clock_args() -> list[str]:
    """The kernel arguments a TCG guest needs to skip clock calibration."""
    with contextlib.suppress(OSError):
        cpuinfo = Path("/proc/cpuinfo").read_text()
        match = re.search(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo, re.MULTILINE)
        if match:
            khz = int(float(match.group(1)) * 1000)
            return [f"tsc_early_khz={khz}", f"lpj={khz * 1000 // _LINUX_HZ}"]
    return []


@dataclass(frozen=True)
class Drive:
    drive_id: str
    path: str  # for QEMU: /dev/fd/N of the file opened at PUT time, as Firecracker opens it
    read_only: bool
    cache_type: str  # "Unsafe" | "Writeback"
    bytes_per_second: int = 0  # its rate limiter's (0: none), as QEMU throttles
    ops_per_second: int = 0


@dataclass(frozen=True)
class Nic:
    tap_fd: int  # the TAP Firecracker opened at PUT time
    mac: str | None  # else the guest's own


@dataclass
class Vsock:
    guest_cid: int
    uds_path: Path  # on the host
    listener: socket.socket  # bound at PUT /vsock time, as Firecracker does


@dataclass
class VmSpec:
    """Everything the guest is made of. Files are the ones Firecracker opened at PUT time,
    handed to QEMU as ``/dev/fd/N`` (``pass_fds``)."""

    kernel: str
    initrd: str | None
    cmdline: str
    vcpus: int
    mem_mib: int
    drives: list[Drive] = field(default_factory=list)
    vsock: Vsock | None = None
    entropy: bool = False
    serial_out: Path | None = None  # PUT /serial's file; else this process's stdout
    nics: list[Nic] = field(default_factory=list)
    pass_fds: list[int] = field(default_factory=list)


class _PreboundVsock(VhostUserVsock):
    """The vsock back-end, serving the host socket that PUT /vsock already bound, and QEMU
    on an abstract socket (nothing left on disk if this process is killed)."""

    def __init__(self, name: str, vsock: Vsock) -> None:
        # socket_path is only a name here: the socket is abstract, there is no such file.
        super().__init__(Path("/nonexistent", name), vsock.uds_path, vsock.guest_cid)
        self._prebound = vsock.listener

    def _listen(self, path: Path) -> socket.socket:  # type: ignore[override]
        if path == self.uds_path:
            self._prebound.setblocking(False)
            return self._prebound
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(f"\0{path.name}")
        sock.listen(1)
        sock.setblocking(False)
        return sock


class _Qmp:
    """A QMP client: commands from any thread, events to a callback from a reader thread."""

    def __init__(self, sock: socket.socket, on_event: Callable[[dict[str, Any]], None]) -> None:
        self._sock = sock
        self._file = sock.makefile("rwb")
        self._on_event = on_event
        self._replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._lock = threading.Lock()
        json.loads(self._file.readline())  # the greeting
        self._thread = threading.Thread(target=self._read, name="fake-fc qmp", daemon=True)
        self._thread.start()
        self.execute("qmp_capabilities")

    def _read(self) -> None:
        for line in self._file:
            message = json.loads(line)
            if "event" in message:
                self._on_event(message)
            else:
                self._replies.put(message)
        self._replies.put(None)  # QEMU is gone

    def execute(self, command: str, **arguments: Any) -> Any:
        with self._lock:
            request: dict[str, Any] = {"execute": command}
            if arguments:
                request["arguments"] = arguments
            self._file.write(json.dumps(request).encode() + b"\n")
            self._file.flush()
            reply = self._replies.get(timeout=QMP_TIMEOUT)
        if reply is None:
            raise OSError("QEMU exited")
        if "error" in reply:
            raise OSError(reply["error"].get("desc", str(reply["error"])))
        return reply.get("return")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
            self._sock.close()


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Microvm:
    """One running guest. ``on_exit(code)`` is called (from another thread) when the VMM
    must end: 0 after a guest reboot, 1 if QEMU died by itself."""

    def __init__(self, spec: VmSpec, on_exit: Callable[[int], None]) -> None:
        self.spec = spec
        self._on_exit = on_exit
        self._qemu: subprocess.Popen[bytes] | None = None
        self._qmp: _Qmp | None = None
        self._vsock: _PreboundVsock | None = None
        self._stopping = False
        self.powered_off = False

    def start(self, paused: bool) -> None:
        """Start QEMU; with ``paused`` the vCPUs wait for ``resume``. Call it from a thread
        that lives as long as the VM: QEMU is killed when its parent thread ends."""
        spec = self.spec
        mem = f"{spec.mem_mib}M"
        cmdline = " ".join([spec.cmdline, *tcg_clock_args()]).strip()
        qmp_host, qmp_vm = socket.socketpair()
        serial = "stdio,id=serial,signal=off"
        if spec.serial_out is not None:
            serial = f"file,id=serial,path={spec.serial_out}"
        argv = [
            QEMU, "-M", "microvm,pit=on,pic=on,rtc=on", "-accel", "tcg,tb-size=64",
            "-cpu", "max", "-smp", str(spec.vcpus), "-m", mem,
            "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
            "-machine", "memory-backend=mem",
            "-nodefaults", "-no-user-config", "-display", "none",
            # A reset ends the VM (Firecracker exits), a power-off only halts it.
            "-action", "reboot=shutdown,shutdown=pause",
            "-kernel", spec.kernel, "-append", cmdline,
            "-chardev", serial, "-serial", "chardev:serial",
            "-device", "i8042",
            "-chardev", f"socket,id=qmp,fd={qmp_vm.fileno()}", "-mon", "chardev=qmp,mode=control",
        ]  # fmt: skip
        if paused:
            argv.append("-S")
        if spec.initrd is not None:
            argv += ["-initrd", spec.initrd]
        for index, drive in enumerate(spec.drives):
            options = [
                f"id=drive{index}",
                f"file={drive.path}",
                "format=raw",
                "if=none",
                f"readonly={'on' if drive.read_only else 'off'}",
                f"cache={'unsafe' if drive.cache_type == 'Unsafe' else 'writeback'}",
            ]
            if drive.bytes_per_second:
                options.append(f"throttling.bps-total={drive.bytes_per_second}")
            if drive.ops_per_second:
                options.append(f"throttling.iops-total={drive.ops_per_second}")
            argv += [
                "-drive",
                ",".join(options),
                "-device",
                f"virtio-blk-device,drive=drive{index}",
            ]
        for index, nic in enumerate(spec.nics):
            mac = f",mac={nic.mac}" if nic.mac else ""
            argv += ["-netdev", f"tap,id=net{index},fd={nic.tap_fd}"]
            argv += ["-device", f"virtio-net-device,netdev=net{index}{mac}"]
        if spec.entropy:
            argv += ["-object", "rng-random,id=rng,filename=/dev/urandom"]
            argv += ["-device", "virtio-rng-device,rng=rng"]
        if spec.vsock is not None:
            name = f"fake-firecracker-vu-{os.getpid()}-{id(self)}"
            self._vsock = _PreboundVsock(name, spec.vsock)
            self._vsock.start()
            argv += ["-chardev", f"socket,id=vu,path={name},abstract=on"]
            argv += ["-device", "vhost-user-vsock-device,chardev=vu"]
        log.debug("starting %s", argv)
        try:
            self._qemu = subprocess.Popen(
                argv, pass_fds=[qmp_vm.fileno(), *spec.pass_fds], preexec_fn=_die_with_parent
            )
        finally:
            qmp_vm.close()
        threading.Thread(target=self._watch, name="fake-fc qemu", daemon=True).start()
        self._qmp = _Qmp(qmp_host, self._on_event)

    def _on_event(self, message: dict[str, Any]) -> None:
        if message["event"] != "SHUTDOWN" or not message["data"].get("guest"):
            return
        if message["data"].get("reason") == "guest-shutdown":
            self.powered_off = True  # Firecracker keeps running with a halted guest
            return
        # A guest reboot: Firecracker exits (with reboot=k, as its users configure it).
        self._end(0)

    def _watch(self) -> None:
        assert self._qemu is not None
        code = self._qemu.wait()
        if not self._stopping:
            log.warning("QEMU exited with %s", code)
            self._end(1)

    def _end(self, code: int) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._on_exit(code)

    def pause(self) -> None:
        if not self.powered_off:
            self._command("stop")

    def resume(self) -> None:
        if not self.powered_off:
            self._command("cont")

    def send_ctrl_alt_del(self) -> None:
        keys = [{"type": "qcode", "data": key} for key in ("ctrl", "alt", "delete")]
        self._command("send-key", keys=keys)

    def _command(self, command: str, **arguments: Any) -> Any:
        assert self._qmp is not None
        return self._qmp.execute(command, **arguments)

    def stop(self) -> None:
        """Kill QEMU and the vsock back-end; idempotent."""
        self._stopping = True
        if self._qemu is not None and self._qemu.poll() is None:
            self._qemu.kill()
            self._qemu.wait()
        if self._qmp is not None:
            self._qmp.close()
        if self._vsock is not None:
            self._vsock.stop()


def close_listener(vsock: Vsock | None) -> None:
    """Release a vsock device that never ran: its socket and the socket's file."""
    if vsock is not None:
        vsock.listener.close()
        with contextlib.suppress(OSError):
            os.unlink(vsock.uds_path)
