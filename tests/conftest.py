"""Shared fixtures: real daemons started as their own processes (tests/daemon_process.py)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sandboxctl.client import Client
from sandboxd.errors import ConfigError
from sandboxd.images import Image, ImageStore
from tests.daemon_process import Daemon, start_daemon

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root: real jails and cgroups")


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
