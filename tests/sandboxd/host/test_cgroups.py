"""Cgroups for real: v1 with its limits here, and v2's create/attach/kill/remove on the
host's (controller-less) unified hierarchy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from sandboxd.host.cgroups import CgroupLayout
from sandboxd.host.jail import entering
from tests.conftest import needs_root

pytestmark = needs_root

NAME = f"sbxcgtest{os.getpid()}"


def spawn_in(cgroup, code: str) -> subprocess.Popen:
    return subprocess.Popen([*entering(cgroup, 0), sys.executable, "-c", code])


@pytest.fixture
def layout():
    detected = CgroupLayout.detect()
    detected.prepare(NAME)
    yield detected
    for parent in detected.parents(NAME):
        if parent.exists():
            parent.rmdir()


async def test_limits_oom_count_and_destroy(layout):
    cgroup = layout.sandbox(NAME, "oom")
    cgroup.create()
    cgroup.set_limits(memory_bytes=64 * 2**20, processes=16, cpus=0.5)
    hog = spawn_in(cgroup, "x = bytearray(256 * 2**20)")
    assert hog.wait(30) == -9
    assert cgroup.oom_kills() == 1
    assert cgroup.peak_memory() <= 64 * 2**20
    sleeper = spawn_in(cgroup, "import os, time\nos.fork(); os.fork()\ntime.sleep(60)")
    while len(cgroup.pids()) < 4:
        pass
    await cgroup.destroy()
    assert sleeper.wait(10) == -9
    assert not any(path.exists() for path in cgroup.dirs.values())


async def test_raising_and_lowering_memory_keeps_swap_above_memory(layout):
    cgroup = layout.sandbox(NAME, "updown")
    cgroup.create()
    for size in (256 * 2**20, 64 * 2**20, 512 * 2**20):
        cgroup.set_limits(memory_bytes=size, processes=8, cpus=1)
    await cgroup.destroy()


async def test_sweep_removes_leftovers_of_an_instance(layout):
    children, cgroups = [], []
    for name in ("a", "b"):
        cgroup = layout.sandbox(NAME, name)
        cgroup.create()
        children.append(spawn_in(cgroup, "import time; time.sleep(60)"))
        cgroups.append(cgroup)
    while not all(cgroup.pids() for cgroup in cgroups):  # joined once its sh has run
        await trio.sleep(0.01)
    assert await layout.sweep(NAME) == 2
    assert [child.wait(10) for child in children] == [-9, -9]
    assert await layout.sweep(NAME) == 0


async def test_v2_create_attach_kill_remove():
    unified = Path("/sys/fs/cgroup/unified")
    if not (unified / "cgroup.procs").exists():
        unified = Path("/sys/fs/cgroup")
    if not (unified / "cgroup.kill").exists() and not (unified / "cgroup.subtree_control").exists():
        pytest.skip("no cgroup v2 hierarchy mounted")
    layout = CgroupLayout(2, {c: unified for c in ("memory", "pids", "cpu")})
    (unified / NAME).mkdir(exist_ok=True)
    try:
        cgroup = layout.sandbox(NAME, "v2")
        cgroup.create()
        child = spawn_in(cgroup, "import os, time\nos.fork()\ntime.sleep(60)")
        while len(cgroup.pids()) < 2:
            pass
        await cgroup.destroy()  # cgroup.kill on v2
        assert child.wait(10) == -9
        assert not (unified / NAME / "v2").exists()
    finally:
        (unified / NAME).rmdir()
