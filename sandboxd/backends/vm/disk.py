"""How fast a VM may use its root disk. Its reads come from the host's page cache, or
from the host's disk when that has to give them: the limit keeps one VM (a job reading
the whole image in a loop) from taking the host's disk from the others. Each VM backend
hands it to its VMM in that VMM's own terms."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DiskRate:
    """Per second, for each VM: bytes and requests its disk serves (0: no limit)."""

    bytes: int
    ops: int

    def describe(self) -> str:
        limits = [
            f"{self.bytes / 2**20:g} MiB/s" if self.bytes else "",
            f"{self.ops} requests/s" if self.ops else "",
        ]
        said = " and ".join(part for part in limits if part)
        return f"each VM's disk at most {said}" if said else "no limit on the VMs' disks"


UNLIMITED = DiskRate(0, 0)
