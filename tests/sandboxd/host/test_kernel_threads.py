"""KVM's PIT thread of a real KVM VM (made here as Firecracker makes one), found among the
kernel threads, never mistaken for a process that takes its name, and moved into a
sandbox's cgroup."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandboxd.host.cgroups import CgroupLayout
from sandboxd.host.kernel_threads import kvm_pit_threads
from tests.conftest import needs_root
from tests.fakes.firecracker_vmm import kvm_vm
from tests.host_state import cpu_cgroup, wait_for

pytestmark = needs_root

NAME = f"sbxkttest{os.getpid()}"


def make_vm() -> int:
    """A KVM VM with its irqchip and PIT, made by this process: the fd of the VM."""
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        return kvm_vm(kvm)
    finally:
        os.close(kvm)


# A program that calls itself what a VM's PIT thread is called (PR_SET_NAME), then waits.
IMPOSTOR = (
    "import ctypes, sys\n"
    "ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)\n"
    "print(flush=True)\n"
    "sys.stdin.read()\n"
)


@pytest.fixture
def impostor() -> Iterator[int]:
    """Another user's process named as our VM's PIT thread will be."""
    name = f"kvm-pit/{os.getpid()}"
    process = subprocess.Popen(
        ["/usr/bin/python3", "-c", IMPOSTOR, name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        user=65534,
        group=65534,
        extra_groups=[],
    )
    assert process.stdout is not None and process.stdout.readline() == b"\n"
    assert Path(f"/proc/{process.pid}/comm").read_text() == f"{name}\n"
    with process:
        yield process.pid
        process.kill()


def test_the_pit_thread_is_the_kernel_s_not_a_process_named_so(impostor):
    assert kvm_pit_threads(os.getpid()) == []  # no VM yet: the impostor is no answer
    made = make_vm()
    try:
        (thread,) = kvm_pit_threads(os.getpid())
        assert thread != impostor
        assert Path(f"/proc/{thread}/comm").read_text() == f"kvm-pit/{os.getpid()}\n"
    finally:
        os.close(made)
    # It ends with the VM.
    assert wait_for(lambda: not Path(f"/proc/{thread}").exists())


async def test_the_pit_thread_moves_into_the_cpu_of_a_sandbox_s_cgroup():
    vm = make_vm()
    layout = CgroupLayout.detect()
    layout.prepare(NAME)
    cgroup = layout.sandbox(NAME, "vm")
    cgroup.create()
    try:
        (thread,) = kvm_pit_threads(os.getpid())
        await cgroup.adopt_cpu(thread)
        assert cpu_cgroup(thread, layout).endswith(f"/{NAME}/vm")
    finally:
        os.close(vm)  # the VM, and its thread with it, ends: the cgroup can go
        await cgroup.destroy()
        for parent in layout.parents(NAME):
            if parent.exists():
                parent.rmdir()
    assert not any(path.exists() for path in cgroup.dirs.values())
