"""A backend whose sandboxes are the real agent run as a plain child process of the test:
no jail, no cgroup, no root.

The fast test layer (tests/fast/) drives the real pool, service and RPC server with it,
so their logic (queueing, demand, cancellation, error mapping) is tested in a fraction
of a second on any machine. The agent, its protocol and the programs are the real ones;
what isolates one sandbox from another and from the host is not here at all, and is
tested with the real backends.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from functools import partial
from pathlib import Path

import trio

from sandboxd.agent_link import AgentLink, WarmRuntime
from sandboxd.backends.agent_bundle import agent_bundle, agent_command
from sandboxd.backends.base import Backend, Sandbox
from sandboxd.host.process import spawn
from sandboxd.limits import Limits

log = logging.getLogger("sandboxd.sandbox.local")


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, children first (from /proc's children lists)."""
    found: list[int] = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except FileNotFoundError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as children:
                    kids = [int(child) for child in children.read().split()]
            except FileNotFoundError:
                continue
            found += kids
            pending += kids
    return found


class LocalSandbox(Sandbox):
    """The agent as a child of the test; the job's limits are the agent's rlimits."""

    def apply_limits(self, limits: Limits) -> None:
        """No cgroup: the agent's rlimits and time limits are all there is."""

    def oom_kills(self) -> int:
        return 0

    def memory_bytes(self) -> int:
        try:
            with open(f"/proc/{self.child.pid}/statm") as statm:
                return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except FileNotFoundError:
            return 0

    def kill(self) -> None:
        for pid in [*descendants(self.child.pid), self.child.pid]:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    async def stop(self) -> None:
        with trio.CancelScope(shield=True):
            self.kill()
            await self.child.stop()


class LocalBackend(Backend):
    name = "local"
    isolation = "none: the agent as a plain child process (tests only)"

    def __init__(self, workdirs: Path, wrapper: Sequence[str] = ()) -> None:
        self.workdirs = workdirs
        self.wrapper = list(wrapper)  # a command the agent's command line is given to
        self.opened: list[LocalSandbox] = []  # every sandbox it made, for the tests to see

    async def start(self) -> None:
        self.workdirs.mkdir(parents=True, exist_ok=True)
        self.agent.write_bytes(agent_bundle())

    @property
    def agent(self) -> Path:
        return self.workdirs / "agent.pyz"

    @asynccontextmanager
    async def open_sandbox(
        self, slot: int, start_timeout: float, warm: WarmRuntime | None = None
    ) -> AsyncIterator[Sandbox]:
        sandbox_id = uuid.uuid4().hex[:12]
        workdir = self.workdirs / sandbox_id
        workdir.mkdir()
        argv = [
            *self.wrapper,
            *agent_command(sys.executable, str(self.agent)),
            "--workdir",
            str(workdir),
        ]
        child = spawn(argv, stdin=True, stdout=True, stderr=True)
        try:
            assert child.stdin and child.stdout
            link = AgentLink(child.stdin, child.stdout)
            sandbox = LocalSandbox(sandbox_id, link, child, log)
            self.opened.append(sandbox)
            async with sandbox.serving(partial(link.handshake, warm), argv, start_timeout):
                yield sandbox
        finally:
            await child.aclose()

    async def aclose(self) -> None:
        for sandbox in self.opened:
            await sandbox.stop()
