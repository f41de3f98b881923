"""Real microVMs with the qemu backend: KVM where the host has it, software emulation
(TCG) here. Every job runs in a VM restored from the daemon's snapshot, and nothing of
a VM is left once its job is done."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandboxd.images import ImageStore
from sandboxd.protocol import Status
from tests.conftest import IS_ROOT
from tests.daemon_process import (
    Daemon,
    assert_jobs_outlive_a_broken_snapshot,
    start_daemon,
    wait_for_warm,
)
from tests.host_state import assert_vm_gone, sandbox_processes
from tests.sandboxd.test_sessions import agent_loop

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(not IS_ROOT, reason="needs root: jails, cgroups and QEMU"),
]

POOL_SIZE = 1
VM_SETTINGS = {
    "pool": {"size": POOL_SIZE, "max_sandboxes": 4, "start_timeout": 120, "queue_timeout": 120},
    "backend": {"name": "qemu", "vm_memory": 768 * 2**20},
}


@pytest.fixture(scope="module")
def vm_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    running = start_daemon(tmp_path_factory.mktemp("qemu"), **VM_SETTINGS)
    yield running
    assert running.stop() == 0, running.log()


def qemu_processes(daemon: Daemon) -> dict[int, str]:
    return {
        pid: cmd
        for pid, cmd in sandbox_processes(daemon.uid_base).items()
        if cmd.startswith("qemu-system")
    }


def assert_qemu_gone(daemon: Daemon, sandbox_id: str) -> None:
    assert_vm_gone(daemon.name, sandbox_id, lambda: qemu_processes(daemon), POOL_SIZE)


def test_status_says_qemu_how_and_snapshot(vm_daemon):
    backend = vm_daemon.client.status()["backend"]
    assert backend["name"] == "qemu"
    assert backend["accel"] in ("kvm", "tcg")
    assert backend["snapshot"].startswith("pool VMs restore a snapshot")
    assert "KVM" in backend["reason"]


@pytest.mark.parametrize(
    ("language", "code", "output"),
    [
        (
            "python",
            "import os; print('hello', os.uname().release.endswith('cloud-amd64'))",
            "hello True\n",
        ),
        ("typescript", "console.log('hello from ' + Deno.build.os)", "hello from linux\n"),
        ("rust", 'fn main() { println!("hello rust"); }', "hello rust\n"),
    ],
)
def test_hello_in_a_vm(vm_daemon, language, code, output):
    result = vm_daemon.client.execute(language, code, timeout=60, limits={"compile_time": 120})
    assert (result.status, result.stdout) == (Status.OK, output), result.stderr
    assert_qemu_gone(vm_daemon, result.sandbox_id)


def test_limits_in_a_vm(vm_daemon):
    client = vm_daemon.client
    slow = client.execute(
        "python", "import time\nprint('start', flush=True)\ntime.sleep(60)", timeout=2
    )
    assert (slow.status, slow.stdout) == (Status.TIMEOUT, "start\n")
    assert_qemu_gone(vm_daemon, slow.sandbox_id)

    bomb = client.execute(
        "python",
        "a = []\nprint('start', flush=True)\nwhile True: a.append(bytearray(10**7))",
        limits={"memory_bytes": 256 * 2**20},
    )
    assert (bomb.status, bomb.stdout) == (Status.MEMORY_LIMIT, "start\n"), bomb.message
    assert_qemu_gone(vm_daemon, bomb.sandbox_id)

    flood = client.execute("python", "while True: print('y' * 99)", limits={"output_bytes": 5000})
    assert flood.status == Status.OUTPUT_LIMIT
    assert len(flood.stdout) == 5000 and flood.truncated["stdout"]
    assert_qemu_gone(vm_daemon, flood.sandbox_id)

    # In a VM the agent counts the job's CPU in its own cgroup: children share the limit.
    busy = client.execute(
        "python",
        "import os\nfor _ in range(4):\n    if os.fork() == 0:\n        while True: pass\n"
        "os.wait()",
        limits={"cpu_time": 1, "wall_time": 60},
    )
    assert (busy.status, busy.message) == (Status.TIMEOUT, "CPU time limit of 1 s exceeded")
    assert 0.9 <= busy.usage["cpu_time"] < 2
    assert_qemu_gone(vm_daemon, busy.sandbox_id)


def test_restored_vms_do_not_share_randomness_or_a_stale_clock(vm_daemon):
    code = "import os, time\nprint(os.urandom(16).hex(), time.time())"
    first, second = (vm_daemon.client.execute("python", code) for _ in range(2))
    (random_a, clock_a), (random_b, clock_b) = (r.stdout.split() for r in (first, second))
    assert random_a != random_b
    for clock in (clock_a, clock_b):  # the host's time, not the snapshot's
        assert abs(float(clock) - time.time()) < 30


def test_the_program_runs_unprivileged_in_its_vm(vm_daemon):
    result = vm_daemon.client.execute("python", "import os; print(os.getuid(), os.getgid())")
    assert result.stdout == "65534 65534\n"


def test_cold_boot_without_a_snapshot_and_fallback_when_restore_fails(tmp_path):
    settings = {**VM_SETTINGS, "backend": {**VM_SETTINGS["backend"], "snapshot": False}}
    (tmp_path / "cold").mkdir()
    cold = start_daemon(tmp_path / "cold", **settings)
    try:
        assert cold.client.status()["backend"]["snapshot"].startswith("off")
        assert cold.client.execute("python", "print(1)").stdout == "1\n"
    finally:
        assert cold.stop() == 0

    broken_dir = tmp_path / "broken"
    broken_dir.mkdir()
    daemon = start_daemon(broken_dir, **VM_SETTINGS)
    try:
        snapshot = daemon.run_dir / daemon.name / "vm" / "snapshot.bin"
        with open(snapshot, "r+b") as damaged:
            damaged.truncate(4096)
        assert_jobs_outlive_a_broken_snapshot(daemon)
    finally:
        assert daemon.stop() == 0
    assert not os.path.exists(daemon.run_dir / daemon.name)


def test_kernel_path_boots_that_kernel(tmp_path, public_tmp_path):
    """KERNEL_PATH (backend.kernel_path): an ELF vmlinux, here a copy of the image's,
    which QEMU boots through its PVH entry."""
    vmlinux = public_tmp_path / "vmlinux"
    image = ImageStore(Path("/var/lib/sandboxd")).current()
    assert image.vm_dir is not None
    shutil.copyfile(image.vm_dir / "vmlinux", vmlinux)
    (tmp_path / "d").mkdir()
    backend = {**VM_SETTINGS["backend"], "snapshot": False, "kernel_path": str(vmlinux)}
    daemon = start_daemon(tmp_path / "d", **{**VM_SETTINGS, "backend": backend})
    try:
        kernel = daemon.client.status()["backend"]["kernel"]
        assert kernel.startswith(f"{vmlinux} (Linux ") and "the image's modules" in kernel
        assert daemon.client.execute("python", "print(6 * 7)").stdout == "42\n"
    finally:
        assert daemon.stop() == 0


def test_auto_chooses_by_probing(tmp_path):
    daemon = start_daemon(tmp_path, backend={"name": "auto"})
    try:
        backend = daemon.client.status()["backend"]
        # Here KVM does not boot a guest and TCG is not allowed for auto: namespaces,
        # saying why; on a host with working KVM: qemu with KVM.
        assert backend["reason"].startswith("auto: firecracker: not installed")
        assert "qemu:" in backend["reason"]
        assert backend["name"] == ("qemu" if "KVM boots" in backend["reason"] else "namespaces")
    finally:
        assert daemon.stop() == 0


def test_vms_restored_from_one_snapshot_run_warm_with_their_own_random_state(vm_daemon):
    """The warm runtime starts after the restore's reseed: two VMs cloned from one
    snapshot draw different hash seeds, ``random`` and ``os.urandom``."""
    code = "import os, random\nprint(hash('sandboxd'), random.random(), os.urandom(8).hex())"
    draws = []
    for _ in range(2):
        wait_for_warm(vm_daemon.client, "python", timeout=120)
        result = vm_daemon.client.execute("python", code, timeout=60)
        assert result.ok and result.warm, result
        draws.append(result.stdout.split())
    assert all(first != second for first, second in zip(*draws, strict=True)), draws


def test_a_session_in_a_vm(vm_daemon):
    sandbox_id = agent_loop(vm_daemon.client)
    assert_qemu_gone(vm_daemon, sandbox_id)


def test_a_session_in_a_vm_reads_no_file_a_program_linked_from_root(vm_daemon):
    link = "import os; os.link('/etc/shadow', 'shadow')"
    with vm_daemon.client.session() as session:
        linked = session.exec(link + "\nprint('linked')", timeout=60)
        # The VM's init forbids it (protected_hardlinks); the agent would refuse it too.
        assert linked.status is Status.RUNTIME_ERROR and "PermissionError" in linked.stderr
        session.exec("open('mine.txt', 'w').write('mine')", timeout=60)
        assert session.read_file("mine.txt") == b"mine"
