"""What the VM backends share: sandboxes that are VMs, whose agent enforces the job's
limits inside, and a pool that restores a snapshot of one booted VM.

The snapshot is made when the backend starts: one VM is booted to agent-ready and saved.
Each pool VM restores it — saving the boot, not sharing a sandbox: a VM still serves one
job and is destroyed, and its agent reseeds its random pool from the host. If making or
restoring the snapshot keeps failing, VMs cold-boot from then on, and the log and
``status`` say why.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import trio

from sandboxd.agent_link import WarmRuntime
from sandboxd.backends.base import JailedBackend, JailedSandbox, Sandbox
from sandboxd.backends.vm.disk import DiskRate
from sandboxd.backends.vm.kernel import GuestKernel
from sandboxd.errors import LaunchError, SandboxError
from sandboxd.host.sharing import sharing
from sandboxd.host.vm_network import VmNetwork
from sandboxd.images import Image
from sandboxd.limits import Limits

log = logging.getLogger(__name__)

SNAPSHOT_BOOT_TIMEOUT = 120.0  # the snapshot's VM boots while nothing else runs yet
RESTORE_ATTEMPTS = 3  # failed restores in a row before VMs stop trying


class VmSandbox(JailedSandbox):
    """A VM in a jail: its VMM's stdout is the guest's serial console, and the job's
    limits are enforced inside it by the agent (VmConfinement)."""

    network: VmNetwork | None = None  # its NIC's namespace, where the VM has one

    def network_namespace(self) -> str:
        if self.network is None:
            return super().network_namespace()
        return self.network.path

    def log_streams(self) -> list[trio.abc.ReceiveStream]:
        return [s for s in (self.child.stdout, self.child.stderr) if s is not None]

    def apply_limits(self, limits: Limits) -> None:
        """The VM's size is fixed when it starts; the agent applies the rest inside."""


@dataclass(frozen=True)
class VmOptions:
    """What every VM backend is made with, from the configuration and the image."""

    image: Image
    vm_dir: Path  # the image's VM artifacts (Image.require_vm_dir)
    kernel: GuestKernel
    ramdisk: bytes  # the initramfs (initramfs.for_image)
    instance: str
    uid_base: int
    memory: int  # bytes of each VM
    cpus: int  # of each VM
    disk: DiskRate  # each VM's root disk, at most
    agent_port: int
    snapshot: bool  # restore pool VMs from a snapshot
    network: bool  # VMs have a NIC, for the jobs that ask ([network] allow)
    max_connections: int  # a VM's at once, in its own namespace ([network])


VmT = TypeVar("VmT", bound=VmSandbox)


class SnapshotBackend(JailedBackend, Generic[VmT]):
    def __init__(self, options: VmOptions) -> None:
        super().__init__(options.instance, options.uid_base)
        self.image = options.image
        self.vm_dir = options.vm_dir
        self.kernel = options.kernel
        self.ramdisk = options.ramdisk
        self.memory = options.memory
        self.cpus = options.cpus
        self.disk = options.disk
        self.agent_port = options.agent_port
        self.use_snapshot = options.snapshot
        self.has_network = options.network
        self.max_connections = options.max_connections
        self.snapshot: Path | None = None  # what _save made, while restores work
        self.snapshot_note = "not made yet"
        self.restore_failures = 0  # in a row

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "snapshot": self.snapshot_note,
            "kernel": self.kernel.describe(),
            "disk": self.disk.describe(),
            "host": sharing(),
        }

    def network_of(self, slot: int) -> VmNetwork | None:
        """The network namespace (made by its open()) of the VM in ``slot``, where VMs
        have a NIC."""
        return VmNetwork(self.instance, slot, self.max_connections) if self.has_network else None

    @abc.abstractmethod
    def _vm(
        self,
        slot: int,
        start_timeout: float,
        *,
        restore: Path | None = None,
        warm: WarmRuntime | None = None,
    ) -> AbstractAsyncContextManager[VmT]:
        """A VM with a ready agent (which started ``warm``), cold-booted or restored
        from ``restore``."""

    @abc.abstractmethod
    async def _save(self, vm: VmT) -> Path:
        """Save ``vm`` (ready, booted for this); the snapshot's file or directory."""

    async def make_snapshot(self) -> None:
        """Boot a VM and save it for the pool, if snapshots are on (the end of start())."""
        if not self.use_snapshot:
            self.snapshot_note = "off (backend.snapshot = false): every VM cold-boots"
            return
        started = trio.current_time()
        try:
            async with self._vm(slot=0, start_timeout=SNAPSHOT_BOOT_TIMEOUT) as vm:
                saved = await self._save(vm)
        except (SandboxError, OSError) as exc:
            self.snapshot_note = f"failed ({exc}): every VM cold-boots"
            log.warning("snapshot %s", self.snapshot_note)
            return
        self.snapshot = saved
        files = [saved] if saved.is_file() else [p for p in saved.iterdir() if p.is_file()]
        size = sum(path.stat().st_size for path in files)
        seconds = trio.current_time() - started
        self.snapshot_note = (
            f"pool VMs restore a snapshot ({size >> 20} MiB, made in {seconds:.1f} s)"
        )
        log.info("snapshot: %s", self.snapshot_note)

    @asynccontextmanager
    async def open_sandbox(
        self, slot: int, start_timeout: float, warm: WarmRuntime | None = None
    ) -> AsyncIterator[Sandbox]:
        async with AsyncExitStack() as stack:
            sandbox: Sandbox | None = None
            if self.snapshot is not None:
                try:
                    sandbox = await stack.enter_async_context(
                        self._vm(slot, start_timeout, restore=self.snapshot, warm=warm)
                    )
                except LaunchError as exc:
                    # This VM cold-boots; a few failures in a row (not one slow start
                    # under load) and every VM does.
                    self.restore_failures += 1
                    log.warning("restore failed (%d in a row): %s", self.restore_failures, exc)
                    if self.restore_failures >= RESTORE_ATTEMPTS:
                        self.snapshot = None
                        self.snapshot_note = f"restore failed ({exc.message}): VMs cold-boot"
                        log.warning("snapshot %s", self.snapshot_note)
                else:
                    self.restore_failures = 0
            if sandbox is None:
                sandbox = await stack.enter_async_context(self._vm(slot, start_timeout, warm=warm))
            yield sandbox
