"""The guest kernel every VM boots, and what it is told on its command line, whatever
runs the VM."""

from __future__ import annotations

import re
import stat
from dataclasses import dataclass
from pathlib import Path

from sandboxd.errors import ConfigError

EM_X86_64 = 62  # the ELF header's e_machine


def host_tsc_khz() -> int | None:
    """The host's TSC frequency: a guest under TCG must be told it (tsc_early_khz), or
    the Debian kernel can hang calibrating its clocks."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    match = re.search(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo, re.MULTILINE)
    return int(float(match.group(1)) * 1000) if match else None


def kernel_cmdline(
    *, agent_port: int, emulated: bool = False, hz: int = 250, extra: str = ""
) -> str:
    """The command line: serial console, no reboot on panic, the agent's vsock port (see
    guest/init.sh); under software emulation (``emulated``) the clock hints."""
    words = ["console=ttyS0", "quiet", "panic=-1", "random.trust_cpu=on"]
    words.append(f"sandboxd.agent_port={agent_port}")
    khz = host_tsc_khz()
    if emulated and khz:
        words += [f"tsc_early_khz={khz}", f"lpj={khz * 1000 // hz}"]
    return " ".join([*words, *extra.split()])


@dataclass(frozen=True)
class GuestKernel:
    """The kernel VMs boot: the image's, or ``backend.kernel_path`` (``KERNEL_PATH``)."""

    path: Path  # an uncompressed ELF vmlinux, or the image's bzImage for QEMU
    vmlinux: Path  # the ELF one (Firecracker boots only that)
    version: str
    with_modules: bool  # the image's modules fit it; else its drivers must be built in

    def describe(self) -> str:
        how = "the image's modules" if self.with_modules else "its built-in drivers"
        return f"{self.vmlinux} (Linux {self.version}, with {how})"


def choose_kernel(kernel_path: str, vm_dir: Path, image_version: str) -> GuestKernel:
    """The image's kernel, or the one at ``kernel_path``; ConfigError if that is not an
    uncompressed Linux ELF kernel."""
    if not kernel_path:
        return GuestKernel(vm_dir / "bzImage", vm_dir / "vmlinux", image_version, True)
    path = Path(kernel_path)
    try:
        with path.open("rb") as kernel:
            data = kernel.read()
    except OSError as exc:
        raise ConfigError(f"backend.kernel_path: cannot read {path}: {exc.strerror}") from exc
    found = re.search(rb"Linux version (\d\S*) ", data)
    x86_64 = data[4:5] == b"\x02" and int.from_bytes(data[18:20], "little") == EM_X86_64
    if not data.startswith(b"\x7fELF") or not x86_64 or found is None:
        raise ConfigError(
            f"backend.kernel_path: {path} is not an uncompressed x86-64 Linux kernel (an "
            "ELF vmlinux, as Firecracker boots)"
        )
    _check_everyone_reads(path)
    _check_only_root_writes(path)
    version = found.group(1).decode(errors="replace")
    return GuestKernel(path, path, version, version == image_version)


def _check_only_root_writes(path: Path) -> None:
    """Every VM boots the kernel (Firecracker's jails link it in): a user who could
    replace it, or a directory above it, would run their own kernel in every sandbox."""
    for place in (path, *path.resolve().parents):
        info = place.stat()
        sticky = stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX
        if info.st_uid != 0 or (info.st_mode & 0o022 and not sticky):
            raise ConfigError(
                f"backend.kernel_path: {path} must be root's and writable only by root, and "
                f"{place} is not (chown root, chmod go-w): every VM boots it"
            )


def _check_everyone_reads(path: Path) -> None:
    """VMMs run as unprivileged sandbox uids: the kernel must be readable by anyone."""
    if not path.stat().st_mode & stat.S_IROTH:
        raise ConfigError(f"backend.kernel_path: {path} must be readable by everyone (chmod o+r)")
    for directory in path.resolve().parents:
        if not directory.stat().st_mode & stat.S_IXOTH:
            raise ConfigError(
                f"backend.kernel_path: {path} must be reachable by everyone, and "
                f"{directory} is not (chmod o+x): the VMMs run as unprivileged users"
            )
