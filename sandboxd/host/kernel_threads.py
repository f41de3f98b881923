"""Kernel threads the kernel starts for a VM, found by name: KVM's ``kvm-pit/<pid>``, the
timer of the VM that process ``<pid>`` made. A kernel thread's CPU time goes to the cgroup
it is in, the root one unless it is moved, so a guest that keeps its PIT busy would use CPU
beyond its VM's limits (Firecracker's production host setup: move it into the VM's cgroup).
"""

from __future__ import annotations

from pathlib import Path

KTHREADD = 2  # the parent of every kernel thread
PF_KTHREAD = 0x00200000  # in /proc/<pid>/stat's flags


def kernel_threads(name: str) -> list[int]:
    """The pids of the kernel threads called ``name``; never a process's: a program may
    give itself any name, but not kthreadd for a parent nor PF_KTHREAD."""
    found = []
    for pid in _kthreadd_children():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue  # it ended meanwhile
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        # After the name: state, ppid, pgrp, session, tty, tpgid, flags, ...
        fields = stat[stat.rindex(")") + 2 :].split()
        if comm == name and int(fields[1]) == KTHREADD and int(fields[6]) & PF_KTHREAD:
            found.append(int(pid))
    return found


def kvm_pit_threads(vmm_pid: int) -> list[int]:
    """The kernel threads named as KVM names the PIT thread of a VM that the process
    ``vmm_pid`` made: for that pid as the process sees it (its host pid: the VMMs here
    run in the host's pid namespace). A KVM user in another pid namespace may have the
    same pid there, and its thread the same name."""
    return kernel_threads(f"kvm-pit/{vmm_pid}")


def _kthreadd_children() -> list[str]:
    try:
        return Path(f"/proc/{KTHREADD}/task/{KTHREADD}/children").read_text().split()
    except OSError:  # a kernel without CONFIG_PROC_CHILDREN: every process, then
        return [entry.name for entry in Path("/proc").iterdir() if entry.name.isdigit()]
