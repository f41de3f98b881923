"""The firecracker backend against the fake Firecracker and jailer (tests/fakes/): no
Firecracker can run here, so the fakes hold it to Firecracker's published interface (its
API spec and state rules, the jailer's layout and cgroups, hybrid vsock), and boot the
guest for real under QEMU, so jobs really run in VMs made through that interface."""

from __future__ import annotations

import ast
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from pyroute2 import netns

from sandboxctl import cli
from sandboxd.backends.firecracker.backend import FirecrackerBackend
from sandboxd.errors import LaunchError
from sandboxd.host.cgroups import CgroupLayout
from sandboxd.host.kernel_threads import kvm_pit_threads
from sandboxd.host.sharing import sharing
from sandboxd.images import ImageStore
from sandboxd.protocol import Status
from tests.conftest import IS_ROOT
from tests.daemon_process import Daemon, assert_jobs_outlive_a_broken_snapshot, start_daemon
from tests.fakes.firecracker_bin import install_fakes
from tests.host_state import (
    assert_vm_gone,
    cpu_cgroup,
    sandbox_cgroups,
    sandbox_processes,
    wait_for,
)
from tests.sandboxd.test_sessions import agent_loop

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(not IS_ROOT, reason="needs root: the jailer, cgroups and QEMU"),
]

STATE_DIR = Path("/var/lib/sandboxd")
PROBE_UID = 65534  # what the probes jail Firecracker as


def settings(fakes: tuple[Path, Path], **backend: object) -> dict[str, dict[str, object]]:
    firecracker, jailer = fakes
    return {
        "pool": {"size": 1, "max_sandboxes": 4, "start_timeout": 120, "queue_timeout": 120},
        "backend": {
            "name": "firecracker",
            "firecracker_bin": str(firecracker),
            "jailer_bin": str(jailer),
            "vm_memory": 512 * 2**20,
            **backend,
        },
    }


@pytest.fixture(scope="module")
def fakes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return install_fakes(tmp_path_factory.mktemp("fake-bin"))


@pytest.fixture(scope="module")
def fc_daemon(tmp_path_factory: pytest.TempPathFactory, fakes) -> Iterator[Daemon]:
    running = start_daemon(tmp_path_factory.mktemp("firecracker"), **settings(fakes))
    yield running
    assert running.stop() == 0, running.log()
    assert not (STATE_DIR / "jails" / running.name).exists()
    assert not sandbox_cgroups(running.name)
    assert f"sandboxd-{running.name}" not in netns.listnetns()


def jails(daemon: Daemon) -> set[str]:
    base = STATE_DIR / "jails" / daemon.name / "firecracker"
    return {path.name for path in base.iterdir()} if base.is_dir() else set()


def assert_firecracker_gone(daemon: Daemon, sandbox_id: str) -> None:
    assert wait_for(lambda: sandbox_id not in jails(daemon))
    # Only the pool's next VM remains: one Firecracker, one QEMU.
    assert_vm_gone(daemon.name, sandbox_id, lambda: sandbox_processes(daemon.uid_base), 2)


def test_status_says_firecracker_and_snapshot(fc_daemon):
    backend = fc_daemon.client.status()["backend"]
    assert backend["name"] == "firecracker"
    assert backend["reason"].startswith("firecracker: Firecracker v")
    assert backend["snapshot"].startswith("pool VMs restore a snapshot")
    shown = CliRunner().invoke(cli.main, ["--socket", str(fc_daemon.socket), "status"])
    assert "backend:  firecracker — Firecracker microVM" in shown.stdout
    for detail in ("kernel: ", "snapshot: pool VMs restore", "host: SMT "):
        assert detail in shown.stdout
    # What Firecracker's production host setup asks about: what VMs share on the host.
    assert backend["host"] == sharing()
    assert ("cgroups" in backend) == (CgroupLayout.detect().version == 1)


def test_jobs_run_in_restored_vms_and_leave_nothing(fc_daemon):
    code = "import os\nprint(os.uname().release.endswith('cloud-amd64'), os.getuid())"
    result = fc_daemon.client.execute("python", code)
    assert (result.status, result.stdout) == (Status.OK, "True 65534\n"), result.stderr
    assert_firecracker_gone(fc_daemon, result.sandbox_id)

    slow = fc_daemon.client.execute(
        "python", "import time\nprint('start', flush=True)\ntime.sleep(60)", timeout=2
    )
    assert (slow.status, slow.stdout) == (Status.TIMEOUT, "start\n")
    assert_firecracker_gone(fc_daemon, slow.sandbox_id)


def test_vms_boot_with_firecracker_s_default_arguments_that_save_boot_time(fc_daemon):
    # Firecracker's defaults (replaced by any boot_args) skip probing the i8042 controller's
    # extra ports and bouncing DMA through swiotlb; a reboot ends the VMM.
    shown = fc_daemon.client.execute("python", "print(open('/proc/cmdline').read().split())")
    words = set(ast.literal_eval(shown.stdout))
    assert {"reboot=k", "i8042.noaux", "i8042.nomux", "i8042.dumbkbd", "swiotlb=noforce"} <= words


def test_a_vmm_that_floods_its_stdout_while_a_vm_starts_still_starts(tmp_path):
    # Its serial console (a guest that logs its whole boot) and its logger share stdout:
    # here far more than a pipe holds, written before the VM answers its InstanceStart.
    noisy = install_fakes(tmp_path / "bin", console_noise=4 << 20)
    daemon = start_daemon(tmp_path, **settings(noisy, snapshot=False))
    try:
        result = daemon.client.execute("python", "print('heard')", timeout=60)
        assert (result.status, result.stdout) == (Status.OK, "heard\n"), result.stderr
    finally:
        assert daemon.stop() == 0, daemon.log()


def test_a_session_in_a_vm(fc_daemon):
    sandbox_id = agent_loop(fc_daemon.client)
    assert_firecracker_gone(fc_daemon, sandbox_id)


def test_each_vm_is_jailed_as_its_own_uid_in_its_cgroup(fc_daemon):
    assert wait_for(lambda: len(jails(fc_daemon)) == 1, timeout=120)  # the pool's VM
    (sandbox_id,) = jails(fc_daemon)
    root = STATE_DIR / "jails" / fc_daemon.name / "firecracker" / sandbox_id / "root"
    owner = (root / "firecracker").stat().st_uid
    assert fc_daemon.uid_base <= owner < fc_daemon.uid_base + 4
    # The guest's files are hard links into the jail, not copies.
    assert (root / "rootfs.ext4").stat().st_nlink > 1
    assert any(p.name == sandbox_id for p in sandbox_cgroups(fc_daemon.name))
    # In the daemon's empty network namespace.
    vmm = int((root / "firecracker.pid").read_text())
    assert os.readlink(f"/proc/{vmm}/ns/net") != os.readlink("/proc/self/ns/net")


def test_each_vm_s_pit_thread_counts_its_cpu_in_the_vm_s_cgroup(fc_daemon):
    """KVM's kvm-pit/<pid> kernel thread of a VM (the fake builds its VM in KVM as
    Firecracker does) is moved into the VM's cgroup, where its CPU is limited and counted
    (Firecracker's production host setup); it is gone with the VM."""
    assert wait_for(lambda: len(jails(fc_daemon)) == 1, timeout=120)  # the pool's VM
    (sandbox_id,) = jails(fc_daemon)
    root = STATE_DIR / "jails" / fc_daemon.name / "firecracker" / sandbox_id / "root"
    vmm = int((root / "firecracker.pid").read_text())
    (thread,) = kvm_pit_threads(vmm)
    assert cpu_cgroup(thread, CgroupLayout.detect()) == f"/{fc_daemon.name}/{sandbox_id}"
    fc_daemon.client.execute("python", "print(1)")  # takes the VM; it goes after the job
    assert_firecracker_gone(fc_daemon, sandbox_id)
    assert not Path(f"/proc/{thread}").exists()


def test_links_a_vmm_plants_in_its_jail_are_not_followed_when_the_jail_goes(
    fc_daemon, public_tmp_path
):
    # The jail is the VMM's uid's: a VMM a guest broke into may leave links out of it
    # there, and the daemon's teardown must remove them, not what they point at.
    host_files = public_tmp_path / "host-files"
    host_files.mkdir()
    (host_files / "keep").write_text("the host's")
    assert wait_for(lambda: len(jails(fc_daemon)) == 1, timeout=120)  # the pool's VM
    (sandbox_id,) = jails(fc_daemon)
    root = STATE_DIR / "jails" / fc_daemon.name / "firecracker" / sandbox_id / "root"
    uid = (root / "firecracker").stat().st_uid
    as_vmm = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
    plant = f"ln -s {host_files} escape && mkdir deep && ln -s {host_files} deep/link"
    subprocess.run([*as_vmm, "sh", "-c", plant], cwd=root, check=True)
    result = fc_daemon.client.execute("python", "print('ran')")
    assert (result.sandbox_id, result.stdout) == (sandbox_id, "ran\n")
    assert_firecracker_gone(fc_daemon, sandbox_id)
    assert (host_files / "keep").read_text() == "the host's"


def test_a_broken_snapshot_falls_back_to_cold_boots(tmp_path, public_tmp_path, fakes):
    # With KERNEL_PATH: the kernel is copied in beside the jails (it may be elsewhere).
    vmlinux = public_tmp_path / "vmlinux"
    vmlinux.write_bytes((ImageStore(STATE_DIR).current().path / "vm" / "vmlinux").read_bytes())
    daemon = start_daemon(tmp_path, **settings(fakes, kernel_path=str(vmlinux)))
    try:
        assert daemon.client.status()["backend"]["kernel"].startswith(f"{vmlinux} (Linux ")
        snapshot = STATE_DIR / "jails" / daemon.name / "snapshot" / "snapshot"
        snapshot.write_text("not a snapshot")
        assert_jobs_outlive_a_broken_snapshot(daemon)
    finally:
        assert daemon.stop() == 0
    assert not (STATE_DIR / "jails" / daemon.name).exists()


def test_a_crashed_daemons_vms_are_removed_by_cleanup(tmp_path, fakes):
    crashed = start_daemon(tmp_path, **settings(fakes, snapshot=False))
    assert jails(crashed)
    crashed.stop(signal.SIGKILL)
    # Firecracker has no parent-death signal (the jailer's uid drop clears it): the VMs
    # outlive a crashed daemon, in its cgroups, until `sandboxd cleanup` (systemd's
    # ExecStopPost) or the next start of a daemon of its name.
    assert sandbox_processes(crashed.uid_base)
    cleaned = crashed.clean_up()
    assert cleaned.returncode == 0, cleaned.stderr
    assert "the jails" in cleaned.stdout and "the network namespace" in cleaned.stdout
    assert not sandbox_processes(crashed.uid_base)
    assert not (STATE_DIR / "jails" / crashed.name).exists()
    assert not sandbox_cgroups(crashed.name)
    assert f"sandboxd-{crashed.name}" not in netns.listnetns()


def test_auto_takes_firecracker_only_where_kvm_boots_a_guest(tmp_path, fakes):
    daemon = start_daemon(tmp_path, **settings(fakes, name="auto", snapshot=False))
    try:
        reason = daemon.client.status()["backend"]["reason"]
        if "KVM boots" in reason:  # a host with working KVM
            assert reason.startswith("auto: firecracker: Firecracker v")
        else:
            assert reason.startswith("auto: firecracker: installed, but no usable KVM")
    finally:
        assert daemon.stop() == 0


def test_probe_names_what_is_missing_or_wrong(tmp_path):
    with pytest.raises(LaunchError, match="not installed"):
        FirecrackerBackend.probe(
            str(tmp_path / "firecracker"), "jailer", STATE_DIR, "fc", PROBE_UID
        )
    impostor = tmp_path / "firecracker"
    impostor.write_text("#!/bin/sh\necho 'Not Firecracker 1.0'\n")
    impostor.chmod(0o755)
    with pytest.raises(LaunchError, match="is not Firecracker"):
        FirecrackerBackend.probe(str(impostor), str(impostor), STATE_DIR, "fc", PROBE_UID)


def _impostor(path: Path, says: str, then: Path | None = None) -> Path:
    """A program that answers --version with ``says`` (and runs ``then`` otherwise)."""
    rest = f'exec {then} "$@"' if then else "exit 1"
    path.write_text(f'#!/bin/sh\n[ "$1" = --version ] && {{ echo "{says}"; exit 0; }}\n{rest}\n')
    path.chmod(0o755)
    return path


def test_a_dynamically_linked_firecracker_is_refused(tmp_path, fakes):
    # The jailer copies the binary alone into the chroot: the loader and libc stay out.
    dynamic = tmp_path / "firecracker"
    shutil.copy("/usr/bin/true", dynamic)
    with pytest.raises(LaunchError, match="is dynamically linked: the jailer runs it"):
        FirecrackerBackend.probe(str(dynamic), str(fakes[1]), STATE_DIR, "fc", PROBE_UID)


def test_a_jailer_of_another_release_or_an_old_firecracker_is_refused(tmp_path, fakes):
    jailer = _impostor(tmp_path / "jailer", "Jailer v1.15.0", fakes[1])
    with pytest.raises(
        LaunchError, match=re.escape("the jailer is v1.15.0 and Firecracker v1.16.1")
    ):
        FirecrackerBackend.probe(str(fakes[0]), str(jailer), STATE_DIR, "fc", PROBE_UID)
    old = _impostor(tmp_path / "firecracker", "Firecracker v1.7.0", fakes[0])
    old_jailer = _impostor(tmp_path / "old-jailer", "Jailer v1.7.0", fakes[1])
    with pytest.raises(LaunchError, match=re.escape("Firecracker v1.7.0 is older than v1.16.0")):
        FirecrackerBackend.probe(str(old), str(old_jailer), STATE_DIR, "fc", PROBE_UID)


def test_auto_passes_over_a_firecracker_that_cannot_run_and_says_why(tmp_path, fakes):
    old = _impostor(tmp_path / "firecracker", "Firecracker v1.7.0", fakes[0])
    old_jailer = _impostor(tmp_path / "old-jailer", "Jailer v1.7.0", fakes[1])
    daemon = start_daemon(
        tmp_path,
        pool={"size": 1},
        backend={"name": "auto", "firecracker_bin": str(old), "jailer_bin": str(old_jailer)},
    )
    try:
        reason = daemon.client.status()["backend"]["reason"]
    finally:
        assert daemon.stop() == 0
    assert "firecracker: Firecracker v1.7.0 is older than v1.16.0" in reason


@pytest.mark.parametrize("option", ["nodev", "noexec"])
def test_a_state_dir_mounted_nodev_or_noexec_is_refused_naming_the_mount(
    public_tmp_path, fakes, option
):
    # A common hardening of /var: the jailer's /dev/kvm (or Firecracker's exec) in each
    # chroot would fail at every VM's start, long after the daemon said it was ready.
    state = public_tmp_path / "state"  # a short path: pytest's would be too long for sockets
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", option, "sandboxd-test", state], check=True)
    try:
        with pytest.raises(LaunchError, match=f"{state} is on {state}, mounted {option}: "):
            FirecrackerBackend.probe(str(fakes[0]), str(fakes[1]), state, "fc", PROBE_UID)
    finally:
        subprocess.run(["umount", state], check=True)
    FirecrackerBackend.probe(str(fakes[0]), str(fakes[1]), state, "fc", PROBE_UID)


def test_a_daemon_name_that_makes_the_socket_paths_too_long_is_refused_at_start(fakes):
    # 32 characters, the longest name there is: 109 bytes to each VM's API socket.
    with pytest.raises(LaunchError, match=r"holds 107: choose a shorter daemon\.name"):
        FirecrackerBackend.probe(str(fakes[0]), str(fakes[1]), STATE_DIR, "n" * 32, PROBE_UID)
    FirecrackerBackend.probe(str(fakes[0]), str(fakes[1]), STATE_DIR, "n" * 30, PROBE_UID)


def test_a_firecracker_that_does_not_run_in_its_jail_is_refused(tmp_path, fakes):
    # As a dynamically linked build in a real chroot: the jailer starts it, and it fails.
    broken = tmp_path / "firecracker"
    broken.write_text(
        '#!/bin/sh\n[ "$1" = --version ] && { echo "Firecracker v1.16.1"; exit 0; }\n'
        'echo "error while loading shared libraries: libc.so.6" >&2; exit 127\n'
    )
    broken.chmod(0o755)
    with pytest.raises(LaunchError, match=r"does not run in its jail: .*shared libraries"):
        FirecrackerBackend.probe(str(broken), str(fakes[1]), STATE_DIR, "fc", PROBE_UID)
    # The probe's jail is gone with it.
    assert not list(STATE_DIR.glob(".jailer-probe-*"))
