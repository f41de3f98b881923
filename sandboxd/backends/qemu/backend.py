"""The qemu backend: every sandbox a QEMU ``microvm`` with its own guest kernel.

KVM where the host runs ordinary guests under it, software emulation (TCG) otherwise.
QEMU itself is jailed like the namespaces backend's agent (bubblewrap as the sandbox's
own uid, its cgroup, only the files it needs, ``-sandbox on``), and gets everything from
the daemon as file descriptors: QMP's socket, and the agent's channel (vm_channel: a
virtio-serial port, or vhost-vsock where the host has it). Nothing of a VM is ever on the
host's disk but the image it reads.

Pool VMs start from a snapshot: one VM is booted to agent-ready and saved (QEMU
migration to a file), and each sandbox restores it, then syncs with its agent, which
reseeds its random pool from the host. If restoring fails, sandboxes cold-boot, and the
log and ``status`` say so.
"""

from __future__ import annotations

import grp
import logging
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from sandboxd.agent_link import AgentLink, WarmRuntime
from sandboxd.backends.qemu.qmp import QMPClient
from sandboxd.backends.vm.channel import open_channel
from sandboxd.backends.vm.disk import UNLIMITED, DiskRate
from sandboxd.backends.vm.kernel import GuestKernel, kernel_cmdline
from sandboxd.backends.vm.snapshots import SnapshotBackend, VmOptions, VmSandbox
from sandboxd.errors import LaunchError
from sandboxd.host.cgroups import Cgroup, CgroupLimits
from sandboxd.host.jail import BWRAP, data_fd
from sandboxd.host.process import ChildProcess
from sandboxd.host.vm_network import GUEST_MAC, VmNetwork, guest_cmdline
from sandboxd.host.vm_network import remove_leftovers as remove_vm_networks
from sandboxd.images import Image

if TYPE_CHECKING:
    from sandboxd.config import Config

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
# QEMU's own memory beside the guest's (device state, TCG's translation cache).
QEMU_OVERHEAD = 384 * 1024 * 1024
TCG_CACHE_MIB = 64
PROBE_TIMEOUT = 20.0


@dataclass(frozen=True)
class VmLayout:
    """What every VM of this daemon is made of; restores need the very same devices."""

    vm_dir: Path  # the image's VM artifacts: its root disk
    kernel: Path  # what -kernel boots (GuestKernel.path)
    memory: int
    cpus: int
    accel: str  # "kvm" or "tcg"
    hz: int
    agent_port: int  # where the agent listens when its VM has vsock
    vsock_privileged: bool = False  # vhost-vsock: the agent takes only root's connections
    network: bool = False  # a NIC on a TAP of the VM's own (sandboxd.host.vm_network)
    disk: DiskRate = UNLIMITED  # its root disk's throttling (none for a probe)

    def kernel_cmdline(self, extra: str = "") -> str:
        if self.vsock_privileged:
            extra += " sandboxd.vsock_privileged"
        if self.network:
            extra += f" {guest_cmdline()}"
        return kernel_cmdline(
            agent_port=self.agent_port, emulated=self.accel == "tcg", hz=self.hz, extra=extra
        )

    def jail_argv(self, initramfs_fd: int) -> list[str]:
        """bubblewrap around QEMU: the system's programs and the image, read-only; the
        initramfs copied in from a memfd."""
        argv = [
            *BWRAP,
            "--ro-bind", "/usr", "/usr",
            "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
            "--symlink", "usr/bin", "/bin",
            "--ro-bind", str(self.vm_dir), "/vm",
            "--ro-bind", str(self.kernel), "/kernel",
            "--ro-bind-data", str(initramfs_fd), "/initramfs.img",
            "--dev", "/dev", "--proc", "/proc",
        ]  # fmt: skip
        if self.accel == "kvm":
            argv += ["--dev-bind", "/dev/kvm", "/dev/kvm"]
        return argv

    def qemu_argv(
        self,
        channel: Sequence[str] = (),
        qmp_fd: int | None = None,
        *,
        tap_fd: int | None = None,
        incoming: bool = False,
        probe: bool = False,
    ) -> list[str]:
        """QEMU's command line (paths as in the jail), with the agent ``channel``'s
        devices and the NIC on ``tap_fd``; a probe needs neither."""
        machine = "microvm,pit=on,pic=on,rtc=on" if self.accel == "tcg" else "microvm"
        accel = f"tcg,tb-size={TCG_CACHE_MIB}" if self.accel == "tcg" else "kvm"
        argv = [
            QEMU, "-M", machine, "-accel", accel,
            "-cpu", "max" if self.accel == "tcg" else "host",
            "-m", f"{self.memory // 2**20}M", "-smp", str(self.cpus),
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-serial", "stdio", "-monitor", "none",
            "-kernel", "/kernel", "-initrd", "/initramfs.img",
            "-append", self.kernel_cmdline("sandboxd.probe" if probe else ""),
            "-drive", "id=root,file=/vm/rootfs.ext4,format=raw,if=none,readonly=on"
            + _throttling(self.disk),
            "-device", "virtio-blk-device,drive=root",
            "-object", "rng-random,id=rng,filename=/dev/urandom",
            "-device", "virtio-rng-device,rng=rng",
            "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        ]  # fmt: skip
        argv += channel
        if tap_fd is not None:
            argv += [
                "-netdev", f"tap,id=net,fd={tap_fd}",
                "-device", f"virtio-net-device,netdev=net,mac={GUEST_MAC}",
            ]  # fmt: skip
        if qmp_fd is not None:
            argv += ["-chardev", f"socket,id=qmp,fd={qmp_fd}", "-mon", "chardev=qmp,mode=control"]
        if incoming:
            argv += ["-incoming", "defer"]
        return argv


class QemuSandbox(VmSandbox):
    """A QEMU VM, controlled over QMP."""

    def __init__(
        self,
        sandbox_id: str,
        link: AgentLink,
        child: ChildProcess,
        cgroup: Cgroup,
        qmp: QMPClient,
    ) -> None:
        super().__init__(sandbox_id, link, child, cgroup, log)
        self.qmp = qmp


def _stream(sock: socket.socket) -> trio.SocketStream:
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


class QemuBackend(SnapshotBackend[QemuSandbox]):
    name = "qemu"

    def __init__(
        self, options: VmOptions, *, accel: str, run_dir: Path, channel: tuple[str, str]
    ) -> None:
        super().__init__(options)
        self.accel = accel
        self.run_dir = run_dir
        self.work_dir = work_dir(run_dir, options.instance)
        self.layout = VmLayout(
            vm_dir=options.vm_dir,
            kernel=options.kernel.path,
            memory=options.memory,
            cpus=options.cpus,
            accel=accel,
            hz=int(options.image.manifest["vm"].get("hz", 250)),
            agent_port=options.agent_port,
            vsock_privileged=channel[0] == "vsock",
            network=options.network,
            disk=options.disk,
        )
        self.channel_kind, self.channel_why = channel  # see vm_channel.choose_channel
        self.groups = [grp.getgrnam("kvm").gr_gid] if accel == "kvm" and _has_group("kvm") else []

    @property
    def isolation(self) -> str:  # type: ignore[override]  # the base's is a plain attribute
        how = "KVM" if self.accel == "kvm" else "software emulation (TCG), slow"
        return f"QEMU microVM ({how}); QEMU jailed (bubblewrap, own uid, cgroup, seccomp)"

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "accel": self.accel,
            "channel": f"{self.channel_kind} ({self.channel_why})",
        }

    @staticmethod
    def probe(why_not_kvm: Callable[[], str | None], allow_tcg: bool) -> tuple[str, str]:
        """(accel, why) if QEMU can run VMs here; LaunchError saying why not.

        ``why_not_kvm`` (see :func:`kvm_boots`) says whether KVM really boots a guest:
        /dev/kvm may exist and still not run an ordinary one.
        """
        if shutil.which(QEMU) is None:
            raise LaunchError(f"{QEMU} is not installed (apt install qemu-system-x86)")
        reason = why_not_kvm()
        if reason is None:
            return "kvm", "KVM boots the guest kernel here"
        if not allow_tcg:
            raise LaunchError(
                f"no usable KVM ({reason}) and software emulation "
                "is not allowed (backend.allow_tcg)"
            )
        return "tcg", f"no usable KVM ({reason}): software emulation (TCG)"

    async def start(self) -> None:
        await super().start()
        _remove_files(self.run_dir, self.instance)  # a crashed daemon's
        self.work_dir.mkdir(parents=True, mode=0o755)
        self.work_dir.parent.chmod(0o755)
        await self.make_snapshot()

    async def _save(self, vm: QemuSandbox) -> Path:
        """QEMU's migration of the paused VM, into a file."""
        path = self.work_dir / "snapshot.bin"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            await vm.qmp.execute("stop")
            await vm.qmp.send_fd("snapshot", fd)
            await _migrate(vm.qmp, "migrate", uri="fd:snapshot")
        finally:
            os.close(fd)
        return path

    @asynccontextmanager
    async def _vm(
        self,
        slot: int,
        start_timeout: float,
        *,
        restore: Path | None = None,
        warm: WarmRuntime | None = None,
    ) -> AsyncIterator[QemuSandbox]:
        """A running VM, cold-booted or restored from ``restore``, with a ready agent."""
        network = self.network_of(slot)
        # A VM's vsock CID, like its uid, is unique on the host.
        channel = open_channel(self.channel_kind, self.uid_base + slot, self.layout.agent_port)
        qmp_host, qmp_vm = socket.socketpair()
        with channel, qmp_host, _removed(network):
            tap_fd = await trio.to_thread.run_sync(network.open) if network else None
            # QEMU gets its ends (the initramfs, its TAP) as file descriptors; the jail
            # owns them (the TAP's, ours until then: an open TAP keeps its namespace).
            try:
                initramfs_fd = data_fd(self.ramdisk, "sandboxd-initramfs")
                qemu = self.layout.qemu_argv(
                    channel.qemu_args(), qmp_vm.fileno(), tap_fd=tap_fd, incoming=bool(restore)
                )
                fds = [*channel.hand_over(), qmp_vm.detach(), initramfs_fd]
            except BaseException:
                if tap_fd is not None:
                    os.close(tap_fd)
                raise
            argv = [*self.layout.jail_argv(initramfs_fd), "--", *qemu]
            fds += [tap_fd] if tap_fd is not None else []
            limits: CgroupLimits = {
                "memory_bytes": self.layout.memory + QEMU_OVERHEAD,
                "processes": 256,
                "cpus": self.layout.cpus,
            }
            jail = self.jail(
                slot,
                argv,
                limits=limits,
                pass_fds=fds,
                groups=self.groups,
                stdout=True,
                stderr=True,
            )
            async with jail as (child, cgroup):
                link = AgentLink()
                qmp = QMPClient(_stream(qmp_host))
                sandbox = QemuSandbox(cgroup.name, link, child, cgroup, qmp)
                sandbox.network = network

                async def start() -> None:
                    await qmp.start()
                    if restore is not None:
                        with restore.open("rb") as snapshot:
                            await qmp.send_fd("snapshot", snapshot.fileno())
                        await _migrate(qmp, "migrate-incoming", uri="fd:snapshot")
                        await qmp.execute("cont")
                    stream = await channel.connect(lambda: not child.exited())
                    link.attach(stream, stream)
                    await link.handshake(warm)

                async with sandbox.serving(start, argv, start_timeout):
                    yield sandbox

    async def aclose(self) -> None:
        await super().aclose()
        _remove_files(self.run_dir, self.instance)

    @classmethod
    def remove_leftovers(cls, config: Config) -> list[str]:
        return _remove_files(config.daemon.run_dir, config.daemon.name)


def work_dir(run_dir: Path, instance: str) -> Path:
    """Where an instance keeps its VM snapshot (in memory: run_dir is a tmpfs)."""
    return run_dir / instance / "vm"


def _remove_files(run_dir: Path, instance: str) -> list[str]:
    """Remove the VM files and network namespaces of ``instance``; what was there."""
    found = remove_vm_networks(instance)
    path = work_dir(run_dir, instance)
    if not path.exists():
        return found
    shutil.rmtree(path, ignore_errors=True)
    if not any(path.parent.iterdir()):
        path.parent.rmdir()
    return [*found, f"the VM files {path}"]


@contextmanager
def _removed(network: VmNetwork | None) -> Iterator[None]:
    """The VM's network namespace removed on the way out (after its QEMU is gone)."""
    try:
        yield
    finally:
        if network is not None:
            network.close()


async def _migrate(qmp: QMPClient, command: str, uri: str) -> None:
    """Save (``migrate``) or restore (``migrate-incoming``) and wait until it is done."""
    await qmp.execute(
        "migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}]
    )
    await qmp.execute(command, uri=uri)
    event = await qmp.wait_event(
        "MIGRATION", lambda data: data.get("status") in ("completed", "failed", "cancelled")
    )
    if event["data"]["status"] != "completed":
        raise LaunchError(f"{command} ended {event['data']['status']}")


def _has_group(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def kvm_boots(image: Image, kernel: GuestKernel, ramdisk: bytes) -> str | None:
    """None if KVM boots the image's kernel to its initramfs (one that ends the VM at
    once) under QEMU; else why not."""
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not accessible"
    assert image.vm_dir is not None
    layout = VmLayout(image.vm_dir, kernel.path, 256 * 2**20, 1, "kvm", 250, agent_port=0)
    fd = data_fd(ramdisk, "sandboxd-probe-initramfs")
    argv = [*layout.jail_argv(fd), "--", *layout.qemu_argv(probe=True)]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=PROBE_TIMEOUT, pass_fds=[fd]
        )
    except subprocess.TimeoutExpired:
        return f"a KVM guest did not boot within {PROBE_TIMEOUT:g} s"
    finally:
        os.close(fd)
    if "sandboxd-probe-ok" in done.stdout:
        return None
    lines = (done.stderr or done.stdout).strip().splitlines()
    return f"a KVM guest failed: {lines[-1] if lines else f'exit code {done.returncode}'}"


def _throttling(disk: DiskRate) -> str:
    """QEMU's -drive options for ``disk`` (its block layer throttles the device)."""
    options = [
        f",throttling.bps-total={disk.bytes}" if disk.bytes else "",
        f",throttling.iops-total={disk.ops}" if disk.ops else "",
    ]
    return "".join(options)
