"""What a daemon under test has on the host: processes, cgroups, mounts.

Tests read these to show that nothing of a sandbox is left once it is gone.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Sized
from pathlib import Path

from sandboxd.host.cgroups import CgroupLayout

# How the programs of the three languages show up in the process table.
PROGRAM_COMMANDS = ("python3 main.py", "./main", "deno run")
WARM_SOURCES = ("/work/main.py", "/work/main.ts")


def sandbox_processes(uid_base: int, count: int = 64) -> dict[int, str]:
    """Pid → command line of the live processes of one of the daemon's sandbox uids."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        uid = int(status.split("\nUid:")[1].split()[1])
        # A zombie has stopped; it waits for its (new) parent to reap it, which this
        # machine's PID 1 does late.
        zombie = status.split("\nState:")[1].split()[0] == "Z"
        if uid_base <= uid < uid_base + count and not zombie:
            found[int(entry.name)] = cmdline
    return found


def waiting_for_source(pid: int) -> bool:
    """Whether ``pid`` waits for a ready sandbox's source to come through its FIFO: the
    warm runtime blocked opening it (a reaper's sandbox, which holds no writer yet) or
    holding it open (an agent's), or the agent that will write it."""
    try:
        if Path(f"/proc/{pid}/wchan").read_text() == "wait_for_partner":
            return True  # blocked in open() of a FIFO: only warm runtimes open one
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
        return any(
            os.readlink(fd).startswith(WARM_SOURCES) and stat.S_ISFIFO(fd.stat().st_mode)
            for fd in fds
        )
    except OSError:
        return False


def program_processes(uid_base: int) -> set[int]:
    """The user programs' processes (not the jails, agents and warm runtimes waiting in
    the pool)."""
    return {
        pid
        for pid, cmd in sandbox_processes(uid_base).items()
        if (cmd.startswith(PROGRAM_COMMANDS) or "rustc" in cmd) and not waiting_for_source(pid)
    }


def sandbox_cgroups(name: str) -> list[Path]:
    return [
        child
        for parent in CgroupLayout.detect().parents(name)
        if parent.is_dir()
        for child in parent.iterdir()
        if child.is_dir()
    ]


def cpu_cgroup(pid: int, layout: CgroupLayout) -> str:
    """The cgroup of ``pid`` in the CPU controller's hierarchy (v2: the one hierarchy)."""
    controller = "cpu" if layout.version == 1 else ""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return path
    raise AssertionError(f"{pid} is in no {controller or 'v2'} cgroup")


def mounts() -> list[str]:
    return Path("/proc/self/mountinfo").read_text().splitlines()


def wait_for(condition: Callable[[], object], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return bool(condition())


def assert_vm_gone(name: str, sandbox_id: str, vms: Callable[[], Sized], at_most: int) -> None:
    """The VM of ``sandbox_id`` is gone with its cgroup, and at most ``at_most`` of what
    ``vms`` lists (the VMM processes) remain: the pool's next VMs."""
    assert wait_for(lambda: not any(p.name == sandbox_id for p in sandbox_cgroups(name)))
    assert wait_for(lambda: len(vms()) <= at_most)
