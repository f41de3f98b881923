"""The backends, and the choice among them that ``backend = auto`` makes.

The choice really probes the host — are Firecracker and its jailer installed, can KVM
boot the image's kernel, is bubblewrap able to make unprivileged jails — and says why
in words that end up in the log and in ``sandboxctl status``. ``auto`` takes the
strongest backend that works: Firecracker (with KVM that boots a guest), then QEMU (with
KVM; with software emulation only when ``backend.allow_tcg`` says so), then namespaces.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable

from sandboxd.backends.agent_bundle import agent_bundle
from sandboxd.backends.base import Backend, Sandbox, SandboxState
from sandboxd.backends.firecracker.backend import FirecrackerBackend
from sandboxd.backends.namespaces import NamespacesBackend
from sandboxd.backends.qemu.backend import QEMU, QemuBackend, kvm_boots
from sandboxd.backends.vm import initramfs
from sandboxd.backends.vm.channel import choose_channel
from sandboxd.backends.vm.disk import DiskRate
from sandboxd.backends.vm.kernel import GuestKernel, choose_kernel
from sandboxd.backends.vm.snapshots import VmOptions
from sandboxd.config import Config
from sandboxd.errors import LaunchError
from sandboxd.host.cgroups import CgroupLayout
from sandboxd.images import Image
from sandboxd.limits import resolve_limits

__all__ = ["Backend", "Sandbox", "SandboxState", "choose_backend", "remove_leftovers"]

BACKENDS: tuple[type[Backend], ...] = (FirecrackerBackend, QemuBackend, NamespacesBackend)


def choose_backend(config: Config, image: Image) -> tuple[Backend, str]:
    """The backend this daemon will use and why; ConfigError/LaunchError if none can run."""
    wanted = config.backend.name
    auto = wanted == "auto"
    # What VMs boot, made once and only if a VM backend is considered.
    kernel = functools.cache(lambda: _guest_kernel(config, image))
    ramdisk = functools.cache(
        lambda: initramfs.for_image(image, agent_bundle(), with_modules=kernel().with_modules)
    )
    why_not_kvm = functools.cache(lambda: kvm_boots(image, kernel(), ramdisk()))
    passed_over: list[str] = []
    candidates: list[tuple[str, Callable[[], tuple[Backend, str]]]] = [
        (
            "firecracker",
            lambda: _firecracker(config, image, kernel, ramdisk, why_not_kvm if auto else None),
        ),
        ("qemu", lambda: _qemu(config, image, kernel, ramdisk, why_not_kvm, allow_tcg=not auto)),
    ]
    for name, make in candidates:
        if wanted not in ("auto", name):
            continue
        try:
            backend, why = make()
        except LaunchError as exc:
            if not auto:
                raise
            passed_over.append(f"{name}: {exc.message}")
        else:
            return (
                backend,
                f"auto: {'; '.join([*passed_over, f'{name}: {why}'])}"
                if auto
                else f"{name}: {why}",
            )
    try:
        works = NamespacesBackend.probe(config.backend.uid_base)
    except LaunchError as exc:
        raise LaunchError(f"no backend can run on this host: {exc.message}", **exc.data) from exc
    reason = f"namespaces: {works}"
    if auto:
        reason = f"auto: {'; '.join([*passed_over, reason])}"
    backend = NamespacesBackend(
        rootfs=image.rootfs,
        agent=agent_bundle(),
        instance=config.daemon.name,
        uid_base=config.backend.uid_base,
        cpus=config.backend.cpus,
        workdir_bytes=int(config.limits["memory_bytes"].maximum),
        default_limits=resolve_limits(None, None, config.limits),
    )
    return backend, reason


async def remove_leftovers(config: Config) -> list[str]:
    """What a daemon of this configuration left when it died, whatever its backend: its
    sandboxes (processes and cgroups: jails, VMMs), VM files, jails and network
    namespace, removed; what was found. A daemon's start does the same for its own."""
    instance = config.daemon.name
    found = []
    if count := await CgroupLayout.detect().sweep(instance, remove_parents=True):
        found.append(f"{count} sandbox(es) with their processes and cgroups")
    for backend in BACKENDS:
        found += backend.remove_leftovers(config)
    return found


def _guest_kernel(config: Config, image: Image) -> GuestKernel:
    vm_dir = image.require_vm_dir()
    return choose_kernel(config.backend.kernel_path, vm_dir, image.manifest["vm"]["kernel_version"])


def _firecracker(
    config: Config,
    image: Image,
    kernel: Callable[[], GuestKernel],
    ramdisk: Callable[[], bytes],
    why_not_kvm: Callable[[], str | None] | None,
) -> tuple[Backend, str]:
    """The firecracker backend if it is installed and can use KVM; ``why_not_kvm`` (for
    auto) also demands that KVM boots an ordinary guest, where QEMU can find that out."""
    firecracker, jailer, why = FirecrackerBackend.probe(
        config.backend.firecracker_bin,
        config.backend.jailer_bin,
        config.daemon.state_dir,
        config.daemon.name,
        config.backend.uid_base,
    )
    if why_not_kvm is not None and shutil.which(QEMU) and (reason := why_not_kvm()):
        raise LaunchError(f"installed, but no usable KVM ({reason})")
    backend = FirecrackerBackend(
        _vm_options(config, image, kernel(), ramdisk()),
        state_dir=config.daemon.state_dir,
        firecracker=firecracker,
        jailer=jailer,
    )
    return backend, why


def _qemu(
    config: Config,
    image: Image,
    kernel: Callable[[], GuestKernel],
    ramdisk: Callable[[], bytes],
    why_not_kvm: Callable[[], str | None],
    *,
    allow_tcg: bool,
) -> tuple[Backend, str]:
    """The qemu backend if it can run here (explicitly asked for, TCG is allowed)."""
    accel, why = QemuBackend.probe(why_not_kvm, allow_tcg or config.backend.allow_tcg)
    backend = QemuBackend(
        _vm_options(config, image, kernel(), ramdisk()),
        accel=accel,
        run_dir=config.daemon.run_dir,
        channel=choose_channel(config.backend.vm_channel),
    )
    return backend, why


def _vm_options(config: Config, image: Image, kernel: GuestKernel, ramdisk: bytes) -> VmOptions:
    return VmOptions(
        image=image,
        vm_dir=image.require_vm_dir(),
        kernel=kernel,
        ramdisk=ramdisk,
        instance=config.daemon.name,
        uid_base=config.backend.uid_base,
        memory=config.backend.vm_memory,
        cpus=config.backend.vm_cpus,
        disk=DiskRate(config.backend.vm_disk_bandwidth, config.backend.vm_disk_iops),
        agent_port=config.backend.agent_port,
        snapshot=config.backend.snapshot,
        network=bool(config.network.allow),
        max_connections=config.network.max_connections,
    )
