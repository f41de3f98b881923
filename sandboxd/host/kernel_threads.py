"""Kernel threads the kernel starts for a VM, found by name: KVM's ``kvm-pit/<pid>``, the
timer of the VM that process ``<pid>`` made. A kernel thread's CPU time goes to the cgroup
it is in, the root one unless it is moved, so a guest that keeps its PIT busy would use CPU
beyond its VM's limits (Firecracker's production host setup: move it into the VM's cgroup).
"""

from __future__ import annotations

from pathlib import Path

from sandboxd.host import proc

KTHREADD = 2  # the parent of every kernel thread
PF_KTHREAD = 0x00200000  # in /proc/<pid>/stat's flags


def kernel_threads(name: str) -> list[int]:
    """The pids of the kernel threads called ``name``; never a process's: a program may
    give itself any name, but not kthreadd for a parent nor PF_KTHREAD."""
    found = []
    for pid in _kthreadd_children():
        info = proc.stat(pid)  # None: it ended meanwhile
        if info and info.comm == name and info.ppid == KTHREADD and info.flags & PF_KTHREAD:
            found.append(pid)
    return found


def kvm_pit_threads(vmm_pid: int) -> list[int]:
    """The kernel threads named as KVM names the PIT thread of a VM that the process
    ``vmm_pid`` made: for that pid as the process sees it (its host pid: the VMMs here
    run in the host's pid namespace). A KVM user in another pid namespace may have the
    same pid there, and its thread the same name."""
    return kernel_threads(f"kvm-pit/{vmm_pid}")


def _kthreadd_children() -> list[int]:
    found = proc.children(KTHREADD)
    if found is None:  # a kernel without CONFIG_PROC_CHILDREN: every process, then
        return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]
    return found
