"""The limits of a stage's processes: rlimits, and where the agent itself confines them
(in a VM: a cgroup and an unprivileged uid; in a jail the host does)."""

from __future__ import annotations

import os
import resource

TYPE_CHECKING = False  # typing costs every sandbox its import
if TYPE_CHECKING:
    from typing import Any


CLONE_NEWNET = 0x40000000
SIOCSIFFLAGS = 0x8914
IFF_UP, IFF_LOOPBACK, IFF_RUNNING = 0x1, 0x8, 0x40


class Confinement:
    """Where the program runs beyond its rlimits. In a jail the host holds the cgroup and
    the uid, so there is nothing more to do here."""

    owner: int | None = None  # the uid the agent gives the files it writes (None: its own)
    # Whether the next processes start in a network namespace of their own, with only
    # lo: in a jail the host gives its namespace a link only for a job that asks.
    isolate_network = False

    def give_network(self, network: bool) -> None:
        """Whether the job (or the session) to come asked for the network."""

    def prepare(self, workdir: str, limits: dict[str, Any]) -> None:
        """Before a stage: set the stage's limits."""

    def enter(self) -> None:
        """In the program's process, before it starts (pre-exec)."""

    def oom_kills(self) -> int:
        return 0

    def cpu_seconds(self) -> float | None:
        """CPU time used so far by every process of the job, where the agent can see
        it; None in a jail, whose cgroup the host watches."""
        return None


class VmConfinement(Confinement):
    """As PID 1 of a VM the agent is root: the program gets a cgroup of its own for
    memory and processes, and runs as an unprivileged uid."""

    CGROUP = "/sys/fs/cgroup/job"
    UID = 65534
    owner = UID

    def __init__(self, memory_reserve: int) -> None:
        self.memory_reserve = memory_reserve
        # A VM with a NIC (sandboxd.host.vm_network) keeps it from a job that did not
        # ask: its processes get a namespace of their own (warm runtimes too).
        self.has_nic = os.path.exists("/sys/class/net/eth0")
        self.isolate_network = self.has_nic
        if self.has_nic:
            import ctypes
            import fcntl
            import socket
            import struct

            libc = ctypes.CDLL(None, use_errno=True)
            lo_up = struct.pack("16sh", b"lo", IFF_UP | IFF_LOOPBACK | IFF_RUNNING)

            def isolate() -> None:
                if libc.unshare(CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                    fcntl.ioctl(probe, SIOCSIFFLAGS, lo_up)

            self._isolate = isolate
        if not os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
            os.makedirs("/sys/fs/cgroup", exist_ok=True)
            _mount("cgroup2", "/sys/fs/cgroup", "cgroup2")
        with open("/sys/fs/cgroup/cgroup.subtree_control", "w") as control:
            control.write("+memory +pids")
        os.makedirs(self.CGROUP, exist_ok=True)

    def prepare(self, workdir: str, limits: dict[str, Any]) -> None:
        os.chown(workdir, self.UID, self.UID)
        for entry in os.listdir(workdir):
            os.chown(os.path.join(workdir, entry), self.UID, self.UID, follow_symlinks=False)
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        memory = min(int(limits["memory_bytes"]), max(total - self.memory_reserve, 2**24))
        for name, value in (
            ("memory.max", memory),
            ("memory.swap.max", 0),
            ("pids.max", int(limits["processes"])),
        ):
            path = os.path.join(self.CGROUP, name)
            if os.path.exists(path):
                with open(path, "w") as control:
                    control.write(str(value))

    def give_network(self, network: bool) -> None:
        self.isolate_network = self.has_nic and not network

    def enter(self) -> None:
        with open(os.path.join(self.CGROUP, "cgroup.procs"), "w") as procs:
            procs.write(str(os.getpid()))
        if self.isolate_network:
            self._isolate()
        os.setgroups([])
        os.setresgid(self.UID, self.UID, self.UID)
        os.setresuid(self.UID, self.UID, self.UID)

    def oom_kills(self) -> int:
        return self._counter("memory.events", "oom_kill")

    def cpu_seconds(self) -> float:
        return self._counter("cpu.stat", "usage_usec") / 1e6

    def _counter(self, name: str, key: str) -> int:
        # As sandboxd.host.cgroups reads it on the host: the agent ships alone, stdlib only.
        try:
            with open(os.path.join(self.CGROUP, name)) as counters:
                for line in counters:
                    found, _, value = line.partition(" ")
                    if found == key:
                        return int(value)
        except OSError:
            pass
        return 0


def _mount(source: str, target: str, fstype: str) -> None:
    import ctypes  # in a VM only

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(source.encode(), target.encode(), fstype.encode(), 0, None) != 0:
        raise OSError(ctypes.get_errno(), f"mount {fstype} on {target}")


def cpu_rlimit(cpu_time: float) -> tuple[int, int]:
    """RLIMIT_CPU for a CPU-time limit: SIGXCPU at the soft limit, SIGKILL a second later."""
    soft = max(1, int(cpu_time + 0.999))
    return soft, soft + 1


def cpu_time_of(pid: int) -> float:
    """The CPU time a process has used so far (utime + stime), in seconds; 0 if it is
    gone (its run then reports how it ended)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def job_rlimits(limits: dict[str, Any], cpu_time: float) -> list[tuple[int, tuple[int, int]]]:
    """The rlimits a stage's process runs under."""
    size = int(limits["file_size_bytes"])
    nproc = int(limits["processes"])
    return [
        (resource.RLIMIT_CPU, cpu_rlimit(cpu_time)),
        (resource.RLIMIT_FSIZE, (size, size)),
        (resource.RLIMIT_NPROC, (nproc, nproc)),
        (resource.RLIMIT_CORE, (0, 0)),
    ]
