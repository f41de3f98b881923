"""The VM side of an image: the guest kernel (bzImage for QEMU, an ELF vmlinux for
Firecracker), the kernel modules and busybox the initramfs needs, and the root tree as an
ext4 file made with ``mkfs.ext4 -d`` (no loop mount).

Kernel and busybox come from Debian packages fetched with the host's apt
(``apt-get download``) and unpacked aside: nothing is installed on the host or in the
root tree.
"""

from __future__ import annotations

import lzma
import re
import shutil
import subprocess
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sandboxd.errors import LaunchError

Progress = Callable[[str], None]

# What the initramfs loads, in this order: the virtio core, the MMIO transport of
# microvm machines, then the drivers (disk, serial port, entropy, vsock, network) and
# the overlay the root is mounted under.
MODULES = (
    "drivers/virtio/virtio_ring",
    "drivers/virtio/virtio",
    "drivers/virtio/virtio_mmio",
    "drivers/block/virtio_blk",
    "drivers/char/virtio_console",
    "drivers/char/hw_random/virtio-rng",
    "net/vmw_vsock/vsock",
    "net/vmw_vsock/vmw_vsock_virtio_transport_common",
    "net/vmw_vsock/vmw_vsock_virtio_transport",
    "net/core/failover",
    "drivers/net/net_failover",
    "drivers/net/virtio_net",
    "fs/overlayfs/overlay",
)
# The magic of each compressed kernel payload, and how to unpack it.
_PAYLOADS: tuple[tuple[bytes, str], ...] = (
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x1f\x8b\x08", "gzip"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
)


def _run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    done = subprocess.run(argv, capture_output=True, **kwargs)
    if done.returncode != 0:
        raise LaunchError(
            f"{argv[0]} failed with exit code {done.returncode}",
            argv=argv,
            exit_code=done.returncode,
            log_tail=done.stderr.decode(errors="replace")[-2000:],
        )
    return done


def kernel_package(name: str) -> str:
    """The versioned kernel package a metapackage like linux-image-cloud-amd64 names."""
    depends = _run(["apt-cache", "depends", name]).stdout.decode()
    versioned = re.findall(r"Depends: (linux-image-\S+)", depends)
    return versioned[0] if versioned else name


def download_package(package: str, into: Path) -> Path:
    """Fetch a Debian package with the host's apt and unpack it under ``into``."""
    _run(["apt-get", "download", package], cwd=into)
    [deb] = list(into.glob(f"{package}_*.deb"))
    unpacked = into / package
    _run(["dpkg-deb", "-x", str(deb), str(unpacked)])
    return unpacked


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The uncompressed ELF kernel inside a bzImage (what Firecracker boots)."""
    for magic, method in _PAYLOADS:
        start = bzimage.find(magic)
        while start >= 0:
            payload = bzimage[start:]
            try:
                if method == "xz":
                    kernel = lzma.LZMADecompressor().decompress(payload)
                elif method == "gzip":  # the payload is followed by more of the bzImage
                    kernel = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
                else:
                    kernel = subprocess.run(
                        [method, "-dc"], input=payload, capture_output=True
                    ).stdout
            except (OSError, EOFError, lzma.LZMAError, zlib.error):
                kernel = b""
            if kernel.startswith(b"\x7fELF"):
                return kernel
            start = bzimage.find(magic, start + 1)
    raise LaunchError("no ELF kernel found inside the bzImage (unknown compression)")


def build_vm_artifacts(
    recipe: dict[str, Any], rootfs: Path, out: Path, progress: Progress
) -> dict[str, Any]:
    """Write kernel, modules, busybox and rootfs.ext4 under ``out``; their manifest."""
    out.mkdir(mode=0o755)
    with tempfile.TemporaryDirectory(prefix="sandboxd-vm-") as tmp:
        progress(f"    fetching {recipe['kernel']} with apt")
        kernel_tree = download_package(kernel_package(recipe["kernel"]), Path(tmp))
        [vmlinuz] = sorted((kernel_tree / "boot").glob("vmlinuz-*"))
        version = vmlinuz.name.removeprefix("vmlinuz-")
        config = (kernel_tree / "boot" / f"config-{version}").read_text()
        hz_setting = re.search(r"^CONFIG_HZ=(\d+)$", config, re.MULTILINE)
        if hz_setting is None:
            raise LaunchError(f"{recipe['kernel']}: its config-{version} sets no CONFIG_HZ")
        hz = int(hz_setting.group(1))
        shutil.copyfile(vmlinuz, out / "bzImage")
        progress("    extracting the ELF vmlinux (for Firecracker)")
        (out / "vmlinux").write_bytes(extract_vmlinux(vmlinuz.read_bytes()))
        modules = out / "modules"
        modules.mkdir()
        names = []
        for module in MODULES:
            source = kernel_tree / "lib/modules" / version / "kernel" / f"{module}.ko"
            if source.exists():  # built in, or absent from this kernel: nothing to load
                shutil.copyfile(source, modules / source.name)
                names.append(source.stem)
        progress(f"    fetching {recipe['busybox']} with apt")
        busybox_tree = download_package(recipe["busybox"], Path(tmp))
        shutil.copyfile(busybox_tree / "bin/busybox", out / "busybox")
        (out / "busybox").chmod(0o755)
    progress("    making rootfs.ext4 with mkfs.ext4 -d")
    size = sum(f.stat().st_size for f in rootfs.rglob("*") if f.is_file() and not f.is_symlink())
    blocks_mib = int(size * 1.25 / 2**20) + 128
    _run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            "sandboxd-root",
            "-O",
            "^has_journal",
            "-E",
            "root_owner=0:0",
            "-d",
            str(rootfs),
            str(out / "rootfs.ext4"),
            f"{blocks_mib}M",
        ]
    )
    for artifact in out.rglob("*"):
        artifact.chmod(0o755 if artifact.is_dir() or artifact.name == "busybox" else 0o644)
    return {"kernel_version": version, "hz": hz, "modules": names}
