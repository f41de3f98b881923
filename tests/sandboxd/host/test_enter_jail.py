"""The launcher the daemon runs as root before every jail (sandboxd/host/enter_jail.c):
what it leaves the jail with, and that nothing runs when a step fails."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sandboxd.errors import LaunchError
from sandboxd.host import jail
from sandboxd.host.cgroups import CgroupLayout
from sandboxd.host.jail import ENTER_JAIL, check_launcher, entering
from tests.conftest import needs_root
from tests.elf import needs_loader

pytestmark = needs_root

NAME = f"sbxejtest{os.getpid()}"
NOBODY = 65534
# Prints what the process holds at its first instruction: its status lines and cgroups.
SHOW = "print(open('/proc/self/status').read()); print(open('/proc/self/cgroup').read())"


@pytest.fixture
def cgroup():
    layout = CgroupLayout.detect()
    layout.prepare(NAME)
    made = layout.sandbox(NAME, "launch")
    made.create()
    yield made
    for path in made.procs_files():
        path.parent.rmdir()
    for parent in layout.parents(NAME):
        if parent.exists():
            parent.rmdir()


def field(status: str, name: str) -> str:
    found = re.search(rf"^{name}:[ \t]*(.*)$", status, re.MULTILINE)
    assert found, name
    return found.group(1).strip()


def test_the_jail_starts_as_its_uid_in_its_cgroups_with_no_capabilities(cgroup):
    done = subprocess.run(
        [*entering(cgroup, NOBODY), sys.executable, "-I", "-S", "-c", SHOW],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert field(done.stdout, "Uid").split() == [str(NOBODY)] * 4
    assert field(done.stdout, "Gid").split() == [str(NOBODY)] * 4
    assert field(done.stdout, "Groups") == ""  # root's groups are gone
    for kind in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert int(field(done.stdout, kind), 16) == 0, kind
    for procs in cgroup.procs_files():
        relative = "/" + str(procs.parent.relative_to(procs.parents[2]))
        assert re.search(rf":{re.escape(relative)}$", done.stdout, re.MULTILINE), relative


def test_it_keeps_exactly_the_groups_it_is_given(cgroup):
    done = subprocess.run(
        [*entering(cgroup, NOBODY, [5, 6]), sys.executable, "-I", "-S", "-c", SHOW],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert field(done.stdout, "Groups").split() == ["5", "6"]


def test_a_cgroup_it_cannot_join_stops_it_before_anything_runs(cgroup, tmp_path):
    marker = tmp_path / "ran"
    gone = Path("/sys/fs/cgroup/no-such-sandbox/cgroup.procs")
    done = subprocess.run(
        [str(ENTER_JAIL), str(NOBODY), "-", str(gone), "--", "touch", str(marker)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 126
    assert f"cannot join {gone}" in done.stderr
    assert not marker.exists()


@pytest.mark.parametrize(
    "args, says",
    [
        (["x", "-", "--", "true"], "bad number x"),
        (["-1", "-", "--", "true"], "bad number -1"),
        ([str(2**32), "-", "--", "true"], "bad number"),
        ([str(NOBODY), "5,x", "--", "true"], "bad number x"),
        ([str(NOBODY), "-", "--"], "usage"),
        ([str(NOBODY), "-", "/dev/null", "--"], "no command after --"),
        ([str(NOBODY), "-", "/dev/null", "true"], "cannot join true"),
    ],
)
def test_a_malformed_command_line_runs_nothing(args, says, tmp_path):
    done = subprocess.run(
        [str(ENTER_JAIL), *args], capture_output=True, text=True, timeout=30, cwd=tmp_path
    )
    assert done.returncode == 126
    assert says in done.stderr


def test_a_command_it_cannot_run_exits_127_naming_it():
    done = subprocess.run(
        [str(ENTER_JAIL), str(NOBODY), "-", "--", "/nonexistent/program"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 127
    assert "cannot run /nonexistent/program" in done.stderr


def test_a_daemon_without_the_launcher_says_how_to_build_it(monkeypatch, tmp_path):
    monkeypatch.setattr(jail, "ENTER_JAIL", tmp_path / "enter-jail")
    with pytest.raises(LaunchError, match="missing: build it with `make build`"):
        check_launcher()


def test_it_starts_without_a_dynamic_loader():
    """Every sandbox's start execs it: linked statically, it skips ld.so's work (about a
    quarter of that exec), as make build and the package build it."""
    assert not needs_loader(ENTER_JAIL.read_bytes())
