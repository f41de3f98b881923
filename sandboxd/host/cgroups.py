"""A cgroup per sandbox, on cgroup v2 or on v1's separate memory/pids/cpu hierarchies.

Every sandbox's processes live in ``<hierarchy>/<instance name>/<sandbox id>``, created
before the sandbox's first process starts (it joins in its pre-exec hook, so nothing it
forks can escape) and removed after the last one is gone. The per-instance parent lets
a restarted daemon find and remove what a crashed one left, and nothing else.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import trio

from sandboxd.errors import LaunchError

log = logging.getLogger(__name__)

# cpuacct counts CPU time (v2's cpu.stat has it in every cgroup).
V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct")
CPU_PERIOD_US = 100_000
KTHREAD_MOVE_ATTEMPTS = 25  # 2 ms apart: a kernel thread just made has run by then


class CgroupLimits(TypedDict):
    """What :meth:`Cgroup.set_limits` takes: the whole sandbox's memory (swap included),
    process count and CPU share."""

    memory_bytes: int
    processes: int
    cpus: float


def _mounts() -> list[tuple[str, str, set[str]]]:
    """(fstype, mount point, super options) of each cgroup mount."""
    found = []
    with open("/proc/self/mountinfo") as info:
        for line in info:
            fields = line.split()
            sep = fields.index("-")
            fstype, options = fields[sep + 1], fields[sep + 3]
            if fstype in ("cgroup", "cgroup2"):
                found.append((fstype, fields[4], set(options.split(","))))
    return found


@dataclass(frozen=True)
class CgroupLayout:
    """Where this host keeps the controllers sandboxd needs."""

    version: int
    roots: dict[str, Path]  # controller → hierarchy root (one shared root on v2)

    @classmethod
    def detect(cls) -> CgroupLayout:
        """Prefer v2 when it carries the controllers; else v1. LaunchError if neither."""
        mounts = _mounts()
        for fstype, point, _ in mounts:
            controllers = Path(point, "cgroup.controllers")
            if fstype == "cgroup2" and controllers.exists():
                available = set(controllers.read_text().split())
                if {"memory", "pids", "cpu"} <= available:
                    return cls(2, {name: Path(point) for name in V1_CONTROLLERS})
        roots: dict[str, Path] = {}
        for fstype, point, options in mounts:
            for name in V1_CONTROLLERS:
                if fstype == "cgroup" and name in options:
                    roots.setdefault(name, Path(point))
        missing = [name for name in V1_CONTROLLERS if name not in roots]
        if missing:
            raise LaunchError(
                f"no usable cgroups: controllers {', '.join(missing)} are mounted neither "
                "on cgroup v2 nor on v1"
            )
        return cls(1, roots)

    def parents(self, instance: str) -> list[Path]:
        return sorted({root / instance for root in self.roots.values()})

    def prepare(self, instance: str) -> None:
        """Create the instance's parent cgroups and delegate the controllers on v2."""
        try:
            for parent in self.parents(instance):
                parent.mkdir(exist_ok=True)
            if self.version == 2:
                root = self.roots["memory"]
                for level in (root, root / instance):
                    (level / "cgroup.subtree_control").write_text("+memory +pids +cpu")
        except OSError as exc:
            raise LaunchError(f"cannot prepare cgroups for {instance}: {exc}") from exc

    def sandbox(self, instance: str, name: str) -> Cgroup:
        return Cgroup(self, instance, name)

    async def sweep(self, instance: str, *, remove_parents: bool = False) -> int:
        """Kill and remove every sandbox cgroup of ``instance``; how many were found."""
        names: set[str] = set()
        for parent in self.parents(instance):
            if parent.is_dir():
                names |= {child.name for child in parent.iterdir() if child.is_dir()}
        for name in sorted(names):
            await self.sandbox(instance, name).destroy()
        if remove_parents:
            for parent in self.parents(instance):
                _rmdir(parent)
        return len(names)


@functools.cache
def _has_file(path: Path) -> bool:
    """Whether the kernel offers a control file (it does not change while we run)."""
    return path.exists()


def _read(path: Path) -> str:
    """A control file's text, read unbuffered: the job path reads and writes a dozen of
    them per sandbox, and a buffered text file costs three more system calls each."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode()
    finally:
        os.close(fd)


def _write(path: Path, text: str) -> None:
    """Write a control file in one system call (the kernel takes a setting whole)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _rmdir(path: Path) -> bool:
    try:
        path.rmdir()
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return False
        raise
    return True


class Cgroup:
    """One sandbox's cgroup (one directory per hierarchy on v1)."""

    def __init__(self, layout: CgroupLayout, instance: str, name: str) -> None:
        self.layout = layout
        self.name = name
        self.dirs = {c: root / instance / name for c, root in layout.roots.items()}
        self._written: dict[str, str] = {}  # limit file → what set_limits wrote there

    def __repr__(self) -> str:
        return f"<Cgroup v{self.layout.version} {self.name}>"

    def _file(self, controller: str, v1: str, v2: str) -> Path:
        return self.dirs[controller] / (v2 if self.layout.version == 2 else v1)

    def create(self) -> None:
        try:
            for path in set(self.dirs.values()):
                path.mkdir()
        except OSError as exc:
            raise LaunchError(f"cannot create cgroup {self.name}: {exc}") from exc

    def limit_values(self, *, memory_bytes: int, processes: int, cpus: float) -> list[str]:
        """``file=value`` for each limit (memory with swap, processes, CPU share), in an
        order a new cgroup accepts; a file's controller is its prefix. For a jailer's
        ``--cgroup``, or :meth:`set_limits`."""
        quota = max(1000, int(cpus * CPU_PERIOD_US))
        parent = self.dirs["memory"].parent  # has the files a sandbox's cgroup will have
        if self.layout.version == 2:
            swap = ["memory.swap.max=0"] if _has_file(parent / "memory.swap.max") else []
            return [
                f"memory.max={memory_bytes}",
                *swap,
                f"pids.max={processes}",
                f"cpu.max={quota} {CPU_PERIOD_US}",
            ]
        memsw = _has_file(parent / "memory.memsw.limit_in_bytes")
        return [
            f"memory.limit_in_bytes={memory_bytes}",
            *([f"memory.memsw.limit_in_bytes={memory_bytes}"] if memsw else []),
            f"pids.max={processes}",
            f"cpu.cfs_period_us={CPU_PERIOD_US}",
            f"cpu.cfs_quota_us={quota}",
        ]

    def set_limits(self, *, memory_bytes: int, processes: int, cpus: float) -> None:
        """Memory (swap included), process count and CPU share of the whole sandbox
        (what is already set as asked is not written again: a job's limits are most
        often the defaults its ready sandbox was started with)."""
        values = self.limit_values(memory_bytes=memory_bytes, processes=processes, cpus=cpus)
        if self.layout.version == 1 and values[1].startswith("memory.memsw."):
            # memory+swap may never be below memory alone: when raising, it goes first.
            current = self._written.get("memory.limit_in_bytes")
            if current is None:
                current = _read(self.dirs["memory"] / "memory.limit_in_bytes")
            if memory_bytes > int(current):
                values[:2] = values[1::-1]
        for value in values:
            name, _, setting = value.partition("=")
            if self._written.get(name) != setting:
                _write(self.dirs[name.split(".")[0]] / name, setting)
                self._written[name] = setting

    async def adopt_cpu(self, pid: int) -> None:
        """Move ``pid`` (a kernel thread that works for the sandbox's VM) into this
        cgroup's CPU controller, whose limit then holds its CPU time too (on v1 only that
        one: a jailer makes no more than the controllers it sets limits in, and a kernel
        thread has no memory and no children to count). OSError if the kernel refuses."""
        procs = self.dirs["cpu"] / "cgroup.procs"
        for attempt in range(KTHREAD_MOVE_ATTEMPTS):
            try:
                _write(procs, str(pid))
                return
            except OSError as exc:
                # A new kernel thread may not move until it has first run (the kernel's
                # no_cgroup_migration, which it clears then): EINVAL until it has.
                if exc.errno != errno.EINVAL or attempt == KTHREAD_MOVE_ATTEMPTS - 1:
                    raise
            await trio.sleep(0.002)

    def procs_files(self) -> list[Path]:
        """Where a process writes itself to join this cgroup (each hierarchy's)."""
        return [path / "cgroup.procs" for path in sorted(set(self.dirs.values()))]

    def pids(self) -> set[int]:
        """Its processes, as the pids controller counts them (on v1 every hierarchy holds
        the same ones: a process joins them all before it starts)."""
        try:
            return {int(pid) for pid in _read(self.dirs["pids"] / "cgroup.procs").split()}
        except FileNotFoundError:
            return set()

    def oom_kills(self) -> int:
        """How many processes the OOM killer took in this cgroup."""
        path = self._file("memory", "memory.oom_control", "memory.events")
        try:
            for line in _read(path).splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except FileNotFoundError:
            pass
        return 0

    def cpu_seconds(self) -> float:
        """CPU time used by every process that ever ran in this cgroup."""
        if self.layout.version == 2:
            for line in _read(self.dirs["cpu"] / "cpu.stat").splitlines():
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    return int(value) / 1e6
            return 0.0
        return int(_read(self.dirs["cpuacct"] / "cpuacct.usage")) / 1e9

    def memory_usage(self) -> int:
        """The memory charged to the cgroup now (page cache of its tmpfs included)."""
        return self._memory_counter("memory.usage_in_bytes", "memory.current")

    def working_memory(self) -> int:
        """The memory charged that the kernel cannot simply drop: all but the page cache
        of files on disk (which a tmpfs's files, and processes, are not)."""
        prefix = "" if self.layout.version == 2 else "total_"
        names = {f"{prefix}active_file", f"{prefix}inactive_file"}
        dropped = 0
        try:
            for line in _read(self._file("memory", "memory.stat", "memory.stat")).splitlines():
                key, _, value = line.partition(" ")
                if key in names:
                    dropped += int(value)
        except (FileNotFoundError, ValueError):
            pass
        return self.memory_usage() - dropped

    def peak_memory(self) -> int:
        return self._memory_counter("memory.max_usage_in_bytes", "memory.peak")

    def _memory_counter(self, v1: str, v2: str) -> int:
        try:
            return int(_read(self._file("memory", v1, v2)))
        except (FileNotFoundError, ValueError):
            return 0

    async def destroy(self) -> None:
        """Kill whatever is left in the cgroup and remove it. Shielded, idempotent."""
        with trio.CancelScope(shield=True):
            kill_file = self.dirs["memory"] / "cgroup.kill"
            for attempt in range(200):
                pids = self.pids()
                if not pids and all(_rmdir(path) for path in set(self.dirs.values())):
                    return
                if self.layout.version == 2 and kill_file.exists():
                    _write(kill_file, "1")
                else:
                    for pid in pids:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                # A killed process leaves its cgroup only once the kernel has reaped it;
                # v1 offers no event for "empty", so check again shortly.
                await trio.sleep(0.005 * min(attempt + 1, 20))
            log.error("cgroup %s still busy after repeated kills: %s", self.name, self.pids())
