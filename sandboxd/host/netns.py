"""Network namespaces as the daemon uses them: entered, made, and commands run in them.

Entering and making are done by a thread of the daemon's own, which ends with the work
and takes the namespace along, never by a fork: pyroute2's NetNS and netns.create fork
the daemon, and the child of a process with threads can hang for ever on a lock one of
them held (a daemon waited on one and never stopped). What the thread opens there
(netlink sockets, a TAP, /proc/sys/net files) belongs to that namespace.
"""

from __future__ import annotations

import ctypes
import subprocess
import threading
from collections.abc import Callable
from typing import TypeVar

from pyroute2 import netns

from sandboxd.errors import LaunchError

T = TypeVar("T")
CLONE_NEWNET = 0x40000000  # os.CLONE_NEWNET and os.setns come with Python 3.12
_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(namespace: str | None, work: Callable[[], T]) -> T:
    """``work()`` done in the network namespace whose file is ``namespace`` (None: the
    daemon's own), by a thread of its own that entered it."""
    if namespace is None:
        return work()

    def entered() -> T:
        with open(namespace) as entering:
            if _libc.setns(entering.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"cannot enter {namespace}")
        return work()

    return _on_a_thread_of_its_own(entered)


def create_netns(name: str) -> str:
    """A new network namespace, named ``name`` as ``ip netns add`` would (by a thread of
    its own that made it: pyroute2's netns.create forks the daemon); its file."""

    def make() -> None:
        if _libc.unshare(CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"cannot make the network namespace {name}")
        netns.attach(name, "thread-self")  # bound as iproute2 binds it, from this thread

    try:
        _on_a_thread_of_its_own(make)
    except OSError as exc:
        raise LaunchError(f"cannot make the network namespace {name}: {exc}") from exc
    return f"{netns.NETNS_RUN_DIR}/{name}"


def _on_a_thread_of_its_own(work: Callable[[], T]) -> T:
    """``work()`` on a new thread, which ends with it (and takes its namespaces along)."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(work())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, name="sandboxd-netns")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]


def run_in_netns(namespace: str | None, argv: list[str], stdin: str = "") -> str:
    """Run ``argv`` in the network namespace whose file is ``namespace`` (None: the
    host's) to its end; its output, LaunchError if it failed."""
    command = argv[0]
    if namespace is not None:
        argv = ["nsenter", f"--net={namespace}", *argv]
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise LaunchError(f"cannot run {command} (apt install nftables): {exc}") from exc
    if done.returncode != 0:
        raise LaunchError(f"{command} failed: {done.stderr.strip()}", argv=argv)
    return done.stdout
