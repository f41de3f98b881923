"""The VMs' initramfs: busybox, the virtio modules, ``guest/init.sh`` and the running
daemon's agent, packed as a gzip'd cpio (newc) archive.

Built in memory at daemon start from the image's VM artifacts, so the agent always
matches the daemon; each VM gets it through a memfd.
"""

from __future__ import annotations

import gzip
import stat
from importlib import resources
from pathlib import Path

from sandboxd.images import Image

AGENT_PORT_NAME = "sandboxd.agent"  # guest/init.sh starts the agent on this port
_DIRS = ("bin", "dev", "proc", "sys", "lower", "rw", "newroot", "modules")


class _Cpio:
    """A newc-format cpio archive, written in memory."""

    def __init__(self) -> None:
        self.data = bytearray()
        self._inode = 0

    def add(
        self, name: str, mode: int, content: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        self._inode += 1
        fields = (
            self._inode,
            mode,
            0,
            0,
            1,
            0,
            len(content),
            0,
            0,
            rdev[0],
            rdev[1],
            len(name) + 1,
            0,
        )
        header = b"070701" + b"".join(b"%08X" % field for field in fields)
        self.data += header + name.encode() + b"\0"
        self._pad()
        self.data += content
        self._pad()

    def _pad(self) -> None:
        self.data += b"\0" * (-len(self.data) % 4)

    def close(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return bytes(self.data)


def build(vm_dir: Path, modules: list[str], agent: bytes) -> bytes:
    """The gzip'd initramfs for an image's VM artifacts and this agent."""
    archive = _Cpio()
    for directory in _DIRS:
        archive.add(directory, stat.S_IFDIR | 0o755)
    archive.add("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))  # the kernel's first console
    init = resources.files("guest").joinpath("init.sh").read_bytes()
    archive.add("init", stat.S_IFREG | 0o755, init)
    archive.add("bin/busybox", stat.S_IFREG | 0o755, (vm_dir / "busybox").read_bytes())
    for module in modules:
        archive.add(
            f"modules/{module}.ko",
            stat.S_IFREG | 0o644,
            (vm_dir / "modules" / f"{module}.ko").read_bytes(),
        )
    archive.add("modules.order", stat.S_IFREG | 0o644, "\n".join(modules).encode() + b"\n")
    archive.add("agent.pyz", stat.S_IFREG | 0o644, agent)
    return gzip.compress(archive.close(), compresslevel=1)


def for_image(image: Image, agent: bytes, *, with_modules: bool = True) -> bytes:
    """The initramfs for ``image``'s VMs with this daemon's agent, and the image's kernel
    modules unless the VMs boot another kernel; LaunchError if the image has no VM
    artifacts."""
    vm_dir = image.require_vm_dir()
    modules = image.manifest["vm"]["modules"] if with_modules else []
    return build(vm_dir, modules, agent)
