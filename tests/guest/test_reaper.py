"""The reaper (guest/reaper.c) on its own, built by the host's cc and run as PID 1 of a
pid namespace of its own (as PID 1 it kills every other process it can when the runtime
ends or it becomes the agent: here, only its namespace's): the rlimits queued as its
first message are the runtime's before it reports it started, and a first message of
any other kind starts nothing."""

from __future__ import annotations

import errno
import os
import resource
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pytest

from sandboxd.backends.direct_run import RECORD, RLimits, queue_first_rlimits
from sandboxd.host import proc


@pytest.fixture(scope="module")
def reaper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    program = tmp_path_factory.mktemp("reaper") / "reaper"
    source = resources.files("guest").joinpath("reaper.c").read_bytes()
    subprocess.run(["cc", "-O2", "-o", str(program), "-x", "c", "-"], input=source, check=True)
    return program


PID_NAMESPACE = ["unshare", "--pid", "--fork", "--kill-child"]


@dataclass
class Started:
    process: subprocess.Popen[bytes]  # unshare, whose child is the reaper
    control: socket.socket

    def record(self) -> tuple[bytes, int]:
        """The reaper's next record: its type and status."""
        kind, _, status, *_ = RECORD.unpack(self.control.recv(RECORD.size))
        return kind, status

    def runtime_pid(self) -> int:
        """The runtime's pid on the host (the record has the namespace's)."""
        (reaper,) = proc.children(self.process.pid) or []
        (runtime,) = proc.children(reaper) or []
        return runtime


@pytest.fixture
def start(reaper: Path, tmp_path: Path) -> Iterator:
    """Start the reaper with a runtime that waits on its stdin."""

    def run(rlimits: RLimits | None = None, other: bytes = b"") -> Started:
        """Queue ``rlimits`` first as the daemon does, or ``other`` instead."""
        control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        control.settimeout(10)
        if rlimits is not None:
            queue_first_rlimits(control, rlimits)
        else:
            control.send(other)
        pipes = [os.pipe() for _ in range(3)]
        jail_ends = [theirs.fileno(), pipes[0][0], pipes[1][1], pipes[2][1]]
        argv = [str(reaper), *map(str, jail_ends), "main.py", "1", "cat", "true"]
        process = subprocess.Popen(
            [*PID_NAMESPACE, *argv], cwd=tmp_path, pass_fds=jail_ends, stderr=subprocess.PIPE
        )
        theirs.close()
        for fd in jail_ends[1:]:
            os.close(fd)
        ours.extend([pipes[0][1], pipes[1][0], pipes[2][0]])
        started.append(Started(process, control))
        return started[-1]

    ours: list[int] = []
    started: list[Started] = []
    yield run
    for each in started:
        each.control.close()  # the daemon gone: the reaper ends, and its runtime with it
        each.process.wait(timeout=10)
        each.process.stderr.close()
    for fd in ours:
        os.close(fd)


def soft_and_hard_open_files(pid: int) -> list[str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return line.split()[3:5]
    raise AssertionError("no open files limit")


def test_the_rlimits_queued_first_are_the_runtime_s_when_it_is_reported(start):
    started = start([(resource.RLIMIT_NOFILE, (17, 19))])
    assert started.record() == (b"R", 0)
    assert soft_and_hard_open_files(started.runtime_pid()) == ["17", "19"]


def test_rlimits_the_kernel_refuses_are_reported_with_the_start(start):
    started = start([(resource.RLIMIT_NOFILE, (19, 17))])  # soft above hard
    assert started.record() == (b"R", errno.EINVAL)  # the daemon then refuses the sandbox


def test_a_first_message_that_is_not_the_rlimits_starts_nothing(start):
    started = start(other=b"A")
    assert started.process.wait(timeout=10) == 1
    assert b"the first message is not the runtime's rlimits" in started.process.stderr.read()
    assert started.control.recv(RECORD.size) == b""  # no 'R': no runtime was started
