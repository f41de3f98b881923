"""The firecracker backend: every sandbox a Firecracker microVM, started by its jailer.

The jailer gives each Firecracker a chroot of its own, the sandbox's own uid, the
sandbox's cgroup (``<hierarchy>/<instance>/<sandbox id>``, the layout of every backend,
which a restarted daemon sweeps) and the instance's empty network namespace (VMs have no
network device; a VMM that a guest broke out into reaches no network either). The
daemon hard-links the guest's files into the chroot (the jails live beside the image
store, on its filesystem: the root disk is far too big to copy), configures the VM over
the API socket in the chroot, and reaches the agent over Firecracker's hybrid vsock.
Everything of a VM is in its jail directory, removed with the sandbox.

Pool VMs restore a snapshot: one VM is booted to agent-ready, paused and saved, and each
sandbox loads it into a fresh Firecracker; the agent then syncs with the daemon, taking
fresh entropy and the time (a restored guest's clock resumes at snapshot time). If a
restore fails, sandboxes cold-boot, and the log and ``status`` say so.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from pyroute2 import netns

from sandboxd.agent_link import AgentLink, WarmRuntime
from sandboxd.backends.base import SANDBOX_ID_LENGTH, new_sandbox_id
from sandboxd.backends.firecracker.api import FirecrackerApi
from sandboxd.backends.vm.channel import connect_hybrid_vsock
from sandboxd.backends.vm.disk import DiskRate
from sandboxd.backends.vm.kernel import kernel_cmdline
from sandboxd.backends.vm.snapshots import SnapshotBackend, VmOptions, VmSandbox
from sandboxd.errors import LaunchError
from sandboxd.host.cgroups import Cgroup
from sandboxd.host.kernel_threads import kvm_pit_threads
from sandboxd.host.netns import create_netns
from sandboxd.host.process import ChildProcess, spawn
from sandboxd.host.vm_network import GUEST_MAC, TAP, VmNetwork, guest_cmdline
from sandboxd.host.vm_network import remove_leftovers as remove_vm_networks

if TYPE_CHECKING:
    from sandboxd.config import Config

log = logging.getLogger(__name__)

API_SOCKET = "run/firecracker.socket"  # in the chroot: the jailer's default
# Firecracker's snapshots restore vsock and VMGenID as this backend needs from 1.16.
MIN_VERSION = (1, 16, 0)
MIN_HOST_KERNEL = (5, 10)  # the jailer calls close_range (5.9); 5.10 is the LTS
UNIX_PATH_MAX = 107  # bytes of a Unix socket's path (sun_path holds 108, the NUL too)
VSOCK_SOCKET = "v.sock"
GUEST_CID = 3  # every VM has a hybrid vsock of its own: CIDs need not differ
ROOT_DISK = "rootfs.ext4"
SNAPSHOT_FILES = ("snapshot", "memory")  # the VM state and its memory, as saved
# Firecracker's own memory beside the guest's (its threads, device state).
VMM_OVERHEAD = 64 * 1024 * 1024
VMM_PROCESSES = 64  # its threads, and the jailer's
SOCKET_POLL = 0.005  # seconds between looks for the API socket (it comes in ~12 ms)
# Of Firecracker's default kernel arguments (any boot_args replace them), those that fit:
# a guest reboot ends Firecracker (a power-off only halts it); no probing of the i8042's
# extra ports, no DMA bounced through swiotlb: both save boot time. (Its serial console
# stays: the log of a VM that fails to start; its modules too: the initramfs loads them.)
BOOT_ARGS = ("reboot=k", "i8042.noaux", "i8042.nomux", "i8042.dumbkbd", "swiotlb=noforce")


class FirecrackerSandbox(VmSandbox):
    """A Firecracker VM in its jail, controlled through its API."""

    def __init__(
        self,
        sandbox_id: str,
        link: AgentLink,
        child: ChildProcess,
        cgroup: Cgroup,
        chroot: Path,
    ) -> None:
        super().__init__(sandbox_id, link, child, cgroup, log)
        self.chroot = chroot
        self.api = FirecrackerApi(chroot / API_SOCKET)

    spares_its_process = False  # the jailer exec'd into Firecracker: nothing to reap for


class FirecrackerBackend(SnapshotBackend[FirecrackerSandbox]):
    name = "firecracker"
    isolation = "Firecracker microVM (KVM); jailer: chroot, own uid, cgroup"

    def __init__(
        self, options: VmOptions, *, state_dir: Path, firecracker: Path, jailer: Path
    ) -> None:
        super().__init__(options)
        self.firecracker = firecracker
        self.jailer = jailer
        self.state_dir = state_dir
        # The jailer's --chroot-base-dir: on the image store's filesystem, for hard links.
        self.jail_base = jail_base(state_dir, options.instance)
        self.netns = netns_name(options.instance)  # where VMs without a NIC run

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        if self.cgroups is not None and self.cgroups.version == 1:
            described["cgroups"] = "v1: restores are slower than under v2 (Firecracker's docs)"
        return described

    @staticmethod
    def probe(
        firecracker: str, jailer: str, state_dir: Path, instance: str, uid: int
    ) -> tuple[Path, Path, str]:
        """(firecracker, jailer, why) if both are installed, Firecracker can use KVM here,
        its jails can work under ``state_dir``, and it runs jailed as ``uid``, as every VM
        will; LaunchError saying why not."""
        paths = []
        for role, wanted in (("firecracker", firecracker), ("jailer", jailer)):
            found = shutil.which(wanted)
            if found is None:
                raise LaunchError(f"not installed ({role} {wanted!r} is not found)")
            paths.append(Path(found).resolve())
        _check_static(paths[0])
        version = _version(paths[0], "Firecracker")
        jailer_version = _version(paths[1], "Jailer")
        if jailer_version != version:
            raise LaunchError(
                f"the jailer is v{jailer_version} and Firecracker v{version}: they must come "
                "from one release"
            )
        if _release(version) < MIN_VERSION:
            raise LaunchError(
                f"Firecracker v{version} is older than v{'.'.join(map(str, MIN_VERSION))} "
                "(its snapshots' vsock and VMGenID fixes)"
            )
        kernel = os.uname().release
        if _release(kernel) < MIN_HOST_KERNEL:
            raise LaunchError(
                f"the host's kernel {kernel} is older than "
                f"{'.'.join(map(str, MIN_HOST_KERNEL))} (the jailer needs close_range)"
            )
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            raise LaunchError("Firecracker needs KVM, and /dev/kvm is missing or not usable")
        check_jail_base(jail_base(state_dir, instance), paths[0].name)
        jailed = _jailed_version(paths[1], paths[0], state_dir, uid)
        if jailed != version:
            raise LaunchError(f"Firecracker said v{version}, and v{jailed} in its jail")
        return paths[0], paths[1], f"Firecracker v{version} with its jailer"

    async def start(self) -> None:
        await super().start()  # cgroups: leftovers swept, the instance's prepared
        _remove_files(self.state_dir, self.instance)  # a crashed daemon's
        self.jail_base.mkdir(parents=True, mode=0o755)
        create_netns(self.netns)
        # What every cold boot links into its jail: the initramfs, and the kernel (a
        # KERNEL_PATH may be on another filesystem than the jails).
        initramfs = self.jail_base / "initramfs.img"
        initramfs.write_bytes(self.ramdisk)
        initramfs.chmod(0o644)
        try:
            os.link(self.kernel.vmlinux, self.jail_base / "vmlinux")
        except OSError:
            shutil.copyfile(self.kernel.vmlinux, self.jail_base / "vmlinux")
        await self.make_snapshot()

    async def aclose(self) -> None:
        await super().aclose()
        _remove_files(self.state_dir, self.instance)

    @classmethod
    def remove_leftovers(cls, config: Config) -> list[str]:
        return _remove_files(config.daemon.state_dir, config.daemon.name)

    async def _save(self, vm: FirecrackerSandbox) -> Path:
        """Pause the VM and save it; the files leave its jail before the jail goes."""
        await vm.api.patch("/vm", {"state": "Paused"})
        # The memory file is written through the page cache, which is charged to the VM's
        # cgroup: room for all of it beside the guest, for this VM only (it goes after).
        vm.cgroup.set_limits(
            memory_bytes=2 * self.memory + VMM_OVERHEAD, processes=VMM_PROCESSES, cpus=self.cpus
        )
        await vm.api.put(
            "/snapshot/create",
            {"snapshot_type": "Full", "snapshot_path": "/snapshot", "mem_file_path": "/memory"},
        )
        saved = self.jail_base / "snapshot"
        shutil.rmtree(saved, ignore_errors=True)
        saved.mkdir()
        for name in SNAPSHOT_FILES:
            os.rename(vm.chroot / name, saved / name)
            # The jail is the VM uid's: take only a plain file of its own, never a link.
            fd = os.open(saved / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
                    raise LaunchError(f"the snapshot's {name} is not a plain file")
                os.fchown(fd, 0, 0)
                os.fchmod(fd, 0o644)  # every sandbox's uid loads it
            finally:
                os.close(fd)
        return saved

    def _jailer_argv(
        self, sandbox_id: str, uid: int, cgroup: Cgroup, network: VmNetwork | None
    ) -> list[str]:
        assert self.cgroups is not None
        limits = cgroup.limit_values(
            memory_bytes=self.memory + VMM_OVERHEAD, processes=VMM_PROCESSES, cpus=self.cpus
        )
        return [
            str(self.jailer),
            "--id", sandbox_id,
            "--exec-file", str(self.firecracker),
            "--uid", str(uid), "--gid", str(uid),
            "--chroot-base-dir", str(self.jail_base),
            "--cgroup-version", str(self.cgroups.version),
            "--parent-cgroup", self.instance,
            "--netns", network.path if network else f"{netns.NETNS_RUN_DIR}/{self.netns}",
            *(arg for value in limits for arg in ("--cgroup", value)),
            # The jail is writable by the VM's uid: a VMM a guest broke into may write no
            # more than a snapshot's memory file.
            "--resource-limit", f"fsize={self.memory + VMM_OVERHEAD}",
            # Info, its default, logs every API request with its body on stdout.
            "--", "--api-sock", f"/{API_SOCKET}", "--level", "Warning",
        ]  # fmt: skip

    def _furnish(self, chroot: Path, restore: Path | None) -> None:
        """Hard-link what the VM reads into its chroot (restores: the saved state)."""
        files = {ROOT_DISK: self.vm_dir / ROOT_DISK}
        if restore is None:
            files |= {name: self.jail_base / name for name in ("vmlinux", "initramfs.img")}
        else:
            files |= {name: restore / name for name in SNAPSHOT_FILES}
        for name, source in files.items():
            try:
                os.link(source, chroot / name)
            except OSError as exc:
                raise LaunchError(
                    f"cannot link {source} into the jail {chroot}: {exc.strerror} (the jails "
                    "and the images must be on one filesystem: daemon.state_dir)"
                ) from exc

    async def _configure(self, sandbox: FirecrackerSandbox, restore: Path | None) -> None:
        """Boot the VM, or load the snapshot into it and resume (its TAP has the same name
        in every VM's namespace: the snapshot's interface needs no override)."""
        api = sandbox.api
        if restore is not None:
            await api.put(
                "/snapshot/load",
                {
                    "snapshot_path": "/snapshot",
                    "mem_backend": {"backend_type": "File", "backend_path": "/memory"},
                    "resume_vm": True,
                },
            )
            return
        await api.put(
            "/boot-source",
            {
                "kernel_image_path": "/vmlinux",
                "initrd_path": "/initramfs.img",
                "boot_args": kernel_cmdline(
                    agent_port=self.agent_port,
                    extra=" ".join([*BOOT_ARGS, *([guest_cmdline()] if self.has_network else [])]),
                ),
            },
        )
        await api.put(
            "/drives/rootfs",
            {
                "drive_id": "rootfs",
                "path_on_host": f"/{ROOT_DISK}",
                "is_root_device": False,  # the initramfs mounts it
                "is_read_only": True,
                **_rate_limiter(self.disk),
            },
        )
        await api.put(
            "/machine-config", {"vcpu_count": self.cpus, "mem_size_mib": self.memory >> 20}
        )
        if sandbox.network is not None:
            interface = {"iface_id": "eth0", "host_dev_name": TAP, "guest_mac": GUEST_MAC}
            await api.put("/network-interfaces/eth0", interface)
        await api.put("/vsock", {"guest_cid": GUEST_CID, "uds_path": f"/{VSOCK_SOCKET}"})
        await api.put("/entropy", {})
        await api.put("/actions", {"action_type": "InstanceStart"})

    @asynccontextmanager
    async def _vm(
        self,
        slot: int,
        start_timeout: float,
        *,
        restore: Path | None = None,
        warm: WarmRuntime | None = None,
    ) -> AsyncIterator[FirecrackerSandbox]:
        """A running VM, cold-booted or restored from ``restore``, with a ready agent."""
        assert self.cgroups is not None, "start() first"
        sandbox_id = new_sandbox_id()
        jail = self.jail_base / self.firecracker.name / sandbox_id
        chroot = jail / "root"
        cgroup = self.cgroups.sandbox(self.instance, sandbox_id)
        uid = self.uid_base + slot
        # Its TAP stays in its namespace, its uid's: Firecracker opens it by name.
        network = self.network_of(slot)
        try:
            chroot.mkdir(parents=True)
            self._furnish(chroot, restore)
            if network is not None:
                await trio.to_thread.run_sync(network.open, uid)
            argv = self._jailer_argv(sandbox_id, uid, cgroup, network)
            child = spawn(argv, stdout=True, stderr=True)
            async with AsyncExitStack() as stack:
                stack.push_async_callback(child.aclose)
                link = AgentLink()
                sandbox = FirecrackerSandbox(sandbox_id, link, child, cgroup, chroot)
                sandbox.network = network
                stack.push_async_callback(sandbox.api.aclose)

                async def start() -> None:
                    await _wait_for_socket(chroot / API_SOCKET, child)
                    await self._configure(sandbox, restore)
                    await _adopt_pit(child.pid, sandbox)
                    stream = await connect_hybrid_vsock(
                        chroot / VSOCK_SOCKET, self.agent_port, lambda: not child.exited()
                    )
                    stack.push_async_callback(stream.aclose)
                    link.attach(stream, stream)
                    await link.handshake(warm)

                async with sandbox.serving(start, argv, start_timeout):
                    yield sandbox
        finally:
            await cgroup.destroy()
            shutil.rmtree(jail, ignore_errors=True)
            if network is not None:
                network.close()


def _reported_version(said: str, name: str) -> str | None:
    """X.Y.Z of a ``<name> vX.Y.Z`` first line, as Firecracker and its jailer print it."""
    first = said.strip().splitlines()[0] if said.strip() else ""
    return first.removeprefix(f"{name} v").strip() if first.startswith(f"{name} v") else None


def _version(path: Path, name: str) -> str:
    """The version ``path --version`` reports; LaunchError if it does not run or is not
    that program."""
    try:
        said = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        raise LaunchError(f"{path} --version failed: {exc}") from exc
    version = _reported_version(said, name)
    if version is None:
        raise LaunchError(f"{path} is not {name} (--version said {said!r})")
    return version


def _jailed_version(jailer: Path, firecracker: Path, state_dir: Path, uid: int) -> str:
    """What Firecracker says to --version when the jailer starts it as it starts every VM
    (copied alone into a chroot, as ``uid``): a build that cannot run there fails here,
    not at the first VM."""
    with tempfile.TemporaryDirectory(prefix=".jailer-probe-", dir=state_dir) as base:
        os.chmod(base, 0o755)
        argv: list[str | Path] = [
            jailer, "--id", "probe", "--exec-file", firecracker,
            "--uid", str(uid), "--gid", str(uid), "--chroot-base-dir", base,
            "--", "--version",
        ]  # fmt: skip
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as exc:
            raise LaunchError(f"{jailer} failed: {exc}") from exc
    version = _reported_version(done.stdout, "Firecracker")
    if done.returncode != 0 or version is None:
        why = done.stderr.strip() or done.stdout.strip() or f"exit code {done.returncode}"
        raise LaunchError(f"Firecracker does not run in its jail: {why[-300:]}")
    return version


def _release(version: str) -> tuple[int, ...]:
    """The leading numbers of a version (``1.16.1``, ``6.1.0-13-amd64``)."""
    found = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(n) for n in found.group().split(".")) if found else ()


def _check_static(path: Path) -> None:
    """The jailer copies Firecracker alone into each chroot and runs it there: an ELF
    that names an interpreter (a dynamically linked build) cannot start."""
    with path.open("rb") as binary:
        header = binary.read(64)
        if header[:4] != b"\x7fELF" or header[4] != 2:  # what is not a 64-bit ELF runs as it is
            return
        phoff = int.from_bytes(header[32:40], "little")
        entry_size = int.from_bytes(header[54:56], "little")
        entries = int.from_bytes(header[56:58], "little")
        binary.seek(phoff)
        table = binary.read(entry_size * entries)
    for index in range(entries):
        if int.from_bytes(table[index * entry_size : index * entry_size + 4], "little") == 3:
            raise LaunchError(
                f"{path} is dynamically linked: the jailer runs it in a chroot without its "
                "libraries (use the static binary of Firecracker's release archive)"
            )


def jail_base(state_dir: Path, instance: str) -> Path:
    return state_dir / "jails" / instance


def check_jail_base(base: Path, firecracker_name: str) -> None:
    """LaunchError unless jails under ``base`` can work: the jailer makes /dev/kvm in
    each chroot and execs Firecracker there (a mount with nodev or noexec forbids it),
    and the daemon reaches each VM's API by its socket's path (a Unix socket's path
    holds at most 107 bytes)."""
    existing = next(path for path in (base, *base.parents) if path.exists())
    flags = os.statvfs(existing).f_flag
    for flag, option in ((os.ST_NODEV, "nodev"), (os.ST_NOEXEC, "noexec")):
        if flags & flag:
            raise LaunchError(
                f"{existing} is on {_mount_point(existing)}, mounted {option}: the jailer's "
                f"chroots need device nodes and executables (remount it without {option}, "
                "or set daemon.state_dir on another filesystem)"
            )
    longest = base / firecracker_name / ("0" * SANDBOX_ID_LENGTH) / "root" / API_SOCKET
    if len(bytes(longest)) > UNIX_PATH_MAX:
        raise LaunchError(
            f"the VMs' API sockets would be {len(bytes(longest))} bytes long ({longest}), "
            f"and a Unix socket's path holds {UNIX_PATH_MAX}: choose a shorter daemon.name "
            "or daemon.state_dir"
        )


def _mount_point(path: Path) -> str:
    """The mount point ``path`` is under (the longest that is a prefix of it)."""
    with open("/proc/self/mountinfo") as mounts:
        points = [line.split()[4] for line in mounts]
    resolved = path.resolve()
    under = [p for p in points if resolved == Path(p) or Path(p) in resolved.parents]
    return max(under, key=len, default="/")


def netns_name(instance: str) -> str:
    return f"sandboxd-{instance}"


def _remove_files(state_dir: Path, instance: str) -> list[str]:
    """Remove the jails and the network namespaces of ``instance``; what was there."""
    found = remove_vm_networks(instance)
    jails = jail_base(state_dir, instance)
    if jails.exists():
        shutil.rmtree(jails, ignore_errors=True)
        found.append(f"the jails {jails}")
    if netns_name(instance) in netns.listnetns():
        netns.remove(netns_name(instance))
        found.append(f"the network namespace {netns_name(instance)}")
    return found


async def _adopt_pit(vmm: int, sandbox: FirecrackerSandbox) -> None:
    """Move the VM's PIT thread, which KVM started as Firecracker built the VM, into the
    VM's cgroup (on aarch64 there is no PIT, and nothing to move). The search reads every
    kernel thread's stat: a worker thread's work, off the event loop."""
    threads = await trio.to_thread.run_sync(kvm_pit_threads, vmm)
    if len(threads) > 1:
        sandbox.log.warning(
            "kvm-pit/%d: %d kernel threads have that name, none moved", vmm, len(threads)
        )
    if len(threads) != 1:
        return
    (thread,) = threads
    try:
        await sandbox.cgroup.adopt_cpu(thread)
    except OSError as exc:
        sandbox.log.warning("kvm-pit/%d stays outside the VM's cgroup: %s", vmm, exc)


async def _wait_for_socket(path: Path, child: ChildProcess) -> None:
    """Until Firecracker accepts on its API socket (it exists a moment before it
    listens); LaunchError if Firecracker exits first."""
    while True:
        if child.exited():
            raise LaunchError(f"the jailer or Firecracker exited (code {await child.wait()})")
        try:
            probe = await trio.open_unix_socket(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            await trio.sleep(SOCKET_POLL)
            continue
        await probe.aclose()
        return


def _rate_limiter(disk: DiskRate) -> dict[str, Any]:
    """The drive body's ``rate_limiter`` for ``disk``: a token bucket per limit, each as
    big as one second's worth and refilled every second."""
    buckets = {
        name: {"size": size, "refill_time": 1000}
        for name, size in (("bandwidth", disk.bytes), ("ops", disk.ops))
        if size
    }
    return {"rate_limiter": buckets} if buckets else {}
