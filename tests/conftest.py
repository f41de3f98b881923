"""Shared fixtures: real daemons started as their own processes (tests/daemon_process.py)."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pyroute2 import netns

from sandboxctl.client import Client
from sandboxd.errors import ConfigError
from sandboxd.host.cgroups import CgroupLayout
from sandboxd.images import Image, ImageStore
from tests.daemon_process import INSTANCE_PREFIX, Daemon, start_daemon

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root: real jails and cgroups")


@pytest.fixture(scope="session", autouse=True)
def no_test_daemon_leaves_cgroups_or_namespaces() -> Iterator[None]:
    """After the whole run: no cgroup and no network namespace of any daemon the tests
    started is left on the host (a test that kills one must clean up after it, as
    systemd's ExecStopPost does)."""
    yield
    if IS_ROOT:
        roots = set(CgroupLayout.detect().roots.values())
        left = sorted(str(p) for root in roots for p in root.glob(f"{INSTANCE_PREFIX}*"))
        left += [n for n in netns.listnetns() if n.startswith(f"sandboxd-{INSTANCE_PREFIX}")]
        assert not left, f"test daemons left cgroups or network namespaces: {left}"


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon shared by the tests that only send it jobs."""
    if not IS_ROOT:
        pytest.skip("needs root: real jails and cgroups")
    running = start_daemon(tmp_path_factory.mktemp("daemon"))
    yield running
    assert running.stop() == 0, running.log()


@pytest.fixture
def client(daemon: Daemon) -> Client:
    return daemon.client


@pytest.fixture
def vm_image() -> Image:
    """The built image, for tests that boot its VMs with QEMU; skipped without either."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("QEMU is not installed")
    try:
        image = ImageStore(Path("/var/lib/sandboxd")).current()
    except ConfigError as exc:
        pytest.skip(str(exc))
    if image.vm_dir is None:
        pytest.skip("the image has no VM artifacts")
    return image


@pytest.fixture
def public_tmp_path() -> Iterator[Path]:
    """A temporary directory anyone can reach (pytest's own are private to their user),
    for files that unprivileged jails and VMMs read."""
    path = Path(tempfile.mkdtemp(prefix="sandboxd-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@dataclass(frozen=True)
class LocalUsers:
    """A group that may use a test daemon's socket, a user in it, and one outside it."""

    group: str
    member: str
    outsider: str = "nobody"

    def run(self, user: str, argv: list[str], **options: object) -> subprocess.CompletedProcess:
        """Run ``argv`` as ``user`` (with that user's groups)."""
        gid = str(pwd.getpwnam(user).pw_gid)
        return subprocess.run(
            ["setpriv", "--reuid", user, "--regid", gid, "--init-groups", "--", *argv],
            capture_output=True,
            text=True,
            timeout=60,
            **options,  # type: ignore[arg-type]
        )


@pytest.fixture(scope="session")
def local_users() -> Iterator[LocalUsers]:
    """Made for the session (and removed after) with groupadd and useradd."""
    if not IS_ROOT:
        pytest.skip("needs root: makes users")
    tag = os.getpid() % 10000
    users = LocalUsers(group=f"sbxsock{tag}", member=f"sbxuser{tag}")
    subprocess.run(["groupadd", "--system", users.group], check=True)
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--user-group", "--groups", users.group,
         "--shell", "/usr/sbin/nologin", users.member],
        check=True,
    )  # fmt: skip
    yield users
    subprocess.run(["userdel", users.member], check=False)
    subprocess.run(["groupdel", users.group], check=False)


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start daemons of the test's own (to stop, crash or starve); stopped at the end."""
    if not IS_ROOT:
        pytest.skip("needs root: real jails and cgroups")
    started: list[Daemon] = []

    def make(**sections: dict[str, object]) -> Daemon:
        directory = tmp_path / f"d{len(started)}"
        directory.mkdir()
        started.append(start_daemon(directory, **sections))
        return started[-1]

    yield make
    for running in started:  # SIGTERM: a daemon removes what it made (not so a killed one)
        try:
            running.stop()
        except subprocess.TimeoutExpired:
            running.stop(signal.SIGKILL)
        # A daemon the test killed leaves its cgroups (and a VM backend's files): as
        # systemd's ExecStopPost does, cleanup removes them.
        assert running.clean_up().returncode == 0
