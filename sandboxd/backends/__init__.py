"""The backends, and the choice among them that ``backend = auto`` makes.

The choice really probes the host — can QEMU boot the image's kernel under KVM, is
bubblewrap able to make unprivileged jails — and says why in words that end up in the
log and in ``sandboxctl status``. ``auto`` takes the strongest backend that works:
Firecracker (not part of this version yet), then QEMU (with KVM; with software
emulation only when ``backend.allow_tcg`` says so), then namespaces.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

from sandboxd.backends.base import Backend, Sandbox, SandboxState
from sandboxd.backends.namespaces import NamespacesBackend
from sandboxd.backends.qemu import QemuBackend
from sandboxd.backends.vm_channel import choose_channel
from sandboxd.config import Config
from sandboxd.errors import ConfigError, LaunchError
from sandboxd.images import Image

__all__ = ["Backend", "Sandbox", "SandboxState", "choose_backend"]


def agent_source() -> Path:
    return Path(str(resources.files("guest").joinpath("agent.py")))


def choose_backend(config: Config, image: Image) -> tuple[Backend, str]:
    """The backend this daemon will use and why; ConfigError/LaunchError if none can run."""
    wanted = config.backend.name
    if wanted == "firecracker":
        raise ConfigError(
            f"{config.source}: backend.name: the firecracker backend is not part of this "
            "version of sandboxd yet; use qemu, namespaces or auto"
        )
    passed_over = [
        f"firecracker: {_firecracker_found()}, but its backend is not part of this version"
    ]
    if wanted in ("auto", "qemu"):
        try:
            backend, why = _qemu(config, image, allow_tcg=wanted == "qemu")
        except LaunchError as exc:
            if wanted == "qemu":
                raise
            passed_over.append(f"qemu: {exc.message}")
        else:
            return (
                backend,
                f"auto: {'; '.join(passed_over)}; qemu: {why}"
                if wanted == "auto"
                else f"qemu: {why}",
            )
    try:
        works = NamespacesBackend.probe(config.backend.uid_base)
    except LaunchError as exc:
        raise LaunchError(f"no backend can run on this host: {exc.message}", **exc.data) from exc
    reason = f"namespaces: {works}"
    if wanted == "auto":
        reason = f"auto: {'; '.join(passed_over)}; {reason}"
    backend = NamespacesBackend(
        rootfs=image.rootfs,
        agent_source=agent_source(),
        instance=config.daemon.name,
        uid_base=config.backend.uid_base,
        cpus=config.backend.cpus,
        workdir_bytes=int(config.limits["memory_bytes"].maximum),
        max_message_bytes=_max_agent_message(config),
    )
    return backend, reason


def _firecracker_found() -> str:
    found = [name for name in ("firecracker", "jailer") if shutil.which(name)]
    return f"{' and '.join(found)} installed" if found else "not installed"


def _qemu(config: Config, image: Image, *, allow_tcg: bool) -> tuple[Backend, str]:
    """The qemu backend if it can run here (explicitly asked for, TCG is allowed)."""
    ramdisk = QemuBackend.make_ramdisk(image, agent_source())  # for the probe and the VMs
    accel, why = QemuBackend.probe(image, ramdisk, allow_tcg or config.backend.allow_tcg)
    backend = QemuBackend(
        image=image,
        ramdisk=ramdisk,
        instance=config.daemon.name,
        uid_base=config.backend.uid_base,
        memory=config.backend.vm_memory,
        cpus=config.backend.vm_cpus,
        accel=accel,
        run_dir=config.daemon.run_dir,
        max_message_bytes=_max_agent_message(config),
        snapshot=config.backend.snapshot,
        channel=choose_channel(config.backend.vm_channel),
        agent_port=config.backend.agent_port,
    )
    return backend, why


def _max_agent_message(config: Config) -> int:
    # A result line carries both streams, JSON-escaped (at worst 6 bytes per byte).
    return int(12 * config.limits["output_bytes"].maximum + 4 * config.daemon.max_request_bytes)
