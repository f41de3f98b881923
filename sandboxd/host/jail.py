"""Jailed processes: bubblewrap run as a sandbox's own unprivileged host uid, inside the
sandbox's cgroup. The namespaces backend jails the agent this way, the qemu backend
jails QEMU itself.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from sandboxd.errors import LaunchError
from sandboxd.host.cgroups import Cgroup, CgroupLayout, CgroupLimits
from sandboxd.host.process import ChildProcess, spawn

# Every namespace, no way to make more user namespaces, gone with the daemon, a new
# session (no terminal to inject into), no capabilities, and the command as PID 1: it
# reaps for itself and bubblewrap reaps it, so no init of bubblewrap's can be orphaned.
BWRAP = (
    "bwrap",
    "--unshare-all", "--unshare-user", "--disable-userns",
    "--die-with-parent", "--new-session", "--cap-drop", "ALL",
    "--as-pid-1",
)  # fmt: skip


def data_fd(data: bytes, name: str) -> int:
    """A memfd holding ``data``, for bubblewrap's --ro-bind-data: what a jail is given
    this way never has to be readable on the host's disk by the jail's uid."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


# Built beside this module from enter_jail.c by make build and make deb, with the host's
# compiler (never an image's): the daemon runs it as root.
ENTER_JAIL = Path(__file__).with_name("enter-jail")


def check_launcher() -> None:
    """LaunchError unless ENTER_JAIL is built. It is trusted as the daemon's own code
    is: it lives, and is owned, with it."""
    if not os.access(ENTER_JAIL, os.X_OK):
        raise LaunchError(
            f"{ENTER_JAIL} is missing: build it with `make build` (or install the package)"
        )


@functools.cache
def _found(program: str) -> str:
    """``program`` as found on PATH, once: enter-jail then execs it without a search of
    its own (every directory before the right one was a failed exec per sandbox)."""
    return shutil.which(program) or program


def entering(cgroup: Cgroup, uid: int, groups: Sequence[int] = ()) -> list[str]:
    """The command prefix that runs the rest in ``cgroup`` as ``uid`` for good (keeping
    only ``groups``, e.g. the one that may open /dev/kvm). A program the child execs,
    not a pre-exec hook: the daemon then spawns without running Python in the child,
    which lets it vfork (a fraction of a millisecond of its event loop, against about
    5 ms for a fork of the daemon that runs a hook)."""
    kept = ",".join(map(str, groups)) or "-"
    return [str(ENTER_JAIL), str(uid), kept, *map(str, cgroup.procs_files()), "--"]


@asynccontextmanager
async def jailed(
    cgroups: CgroupLayout,
    instance: str,
    name: str,
    uid: int,
    argv: Sequence[str],
    *,
    limits: CgroupLimits,
    pass_fds: Sequence[int] = (),
    groups: Sequence[int] = (),
    stdin: bool = False,
    stdout: bool = False,
    stderr: bool = False,
) -> AsyncIterator[tuple[ChildProcess, Cgroup]]:
    """Run ``argv`` as ``uid`` in a new cgroup ``name`` that has ``limits`` (as for
    :meth:`Cgroup.set_limits`) before its first process starts; on the way out the
    process is killed and reaped and the cgroup removed, whatever happened.

    ``pass_fds`` are handed over: they are closed here once the child holds them.
    """
    try:
        cgroup = cgroups.sandbox(instance, name)
        cgroup.create()
    except BaseException:
        _close(pass_fds)
        raise
    try:
        try:
            cgroup.set_limits(**limits)
        except OSError as exc:
            _close(pass_fds)
            raise LaunchError(f"cannot set the limits of cgroup {name}: {exc}") from exc
        try:
            child = spawn(
                [*entering(cgroup, uid, groups), _found(argv[0]), *argv[1:]],
                cwd="/",
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                pass_fds=pass_fds,
            )
        finally:
            _close(pass_fds)
        try:
            yield child, cgroup
        finally:
            await child.aclose()
    finally:
        await cgroup.destroy()


def _close(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)
