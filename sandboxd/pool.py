"""The warm pool: ready sandboxes waiting for jobs, one job each, refilled in the background.

A job takes a ready sandbox (waiting at most the queue timeout), runs, and retires it;
the sandbox is then torn down in the pool's own nursery while the pool starts another.
Nothing is ever handed to a second job. The pool keeps ``size`` sandboxes ready, starts
more while jobs are waiting, and never holds more than ``max_sandboxes`` at once. Once
closed (the daemon drains), it starts sandboxes only for the jobs already waiting.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from sandboxd.backends.base import Backend, Sandbox, SandboxState
from sandboxd.errors import NoCapacity, SandboxError

log = logging.getLogger(__name__)

MAX_BACKOFF = 5.0


class Pool:
    def __init__(
        self,
        backend: Backend,
        *,
        size: int,
        max_sandboxes: int,
        queue_timeout: float,
        start_timeout: float,
    ) -> None:
        self.backend = backend
        self.size = size
        self.max_sandboxes = max_sandboxes
        self.queue_timeout = queue_timeout
        self.start_timeout = start_timeout
        self._ready_send, self._ready_receive = trio.open_memory_channel[Sandbox](math.inf)
        self._live: set[Sandbox] = set()
        self._free_slots = list(range(max_sandboxes - 1, -1, -1))
        self._starting = 0
        self._waiting = 0
        self._failures = 0
        self._closing = False
        self._lot = trio.lowlevel.ParkingLot()  # woken whenever the counts change
        self.last_error = ""
        self._nursery: trio.Nursery | None = None

    def _count(self, *states: SandboxState) -> int:
        return sum(1 for sandbox in self._live if sandbox.state in states)

    def stats(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "max": self.max_sandboxes,
            "ready": self._count(SandboxState.READY),
            "busy": self._count(SandboxState.RUNNING, SandboxState.STOPPING),
            "starting": self._starting,
            "waiting": self._waiting,
            "last_error": self.last_error,
        }

    def can_serve(self) -> bool:
        """Whether a job would be served: a ready sandbox, or launches that succeed."""
        return self._count(SandboxState.READY) > 0 or self._failures == 0

    def _wanted(self) -> int:
        have = self._count(SandboxState.READY) + self._starting
        keep = 0 if self._closing else self.size
        # A slot comes back only once its sandbox is fully torn down: free slots are
        # exactly the room left under max_sandboxes.
        return max(0, min(keep + self._waiting - have, len(self._free_slots)))

    def _changed(self) -> None:
        if self._closing:
            self._retire_spare()
        self._lot.unpark_all()

    def _retire_spare(self) -> None:
        """Closed: retire the ready sandboxes that no waiting job will take."""
        ready = [sandbox for sandbox in self._live if sandbox.state is SandboxState.READY]
        for sandbox in ready[self._waiting :]:
            sandbox.retire()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the pool filled until cancelled; every sandbox is torn down on the way out."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._refill)
            task_status.started()

    async def _refill(self) -> None:
        while True:
            if self._failures:
                # Launches are failing (no image, a broken host): retry, but not in a loop.
                await trio.sleep(min(MAX_BACKOFF, 0.1 * 2**self._failures))
            for _ in range(self._wanted()):
                self._starting += 1
                assert self._nursery is not None
                self._nursery.start_soon(self._keep_sandbox, self._free_slots.pop())
            await self._lot.park()

    async def _keep_sandbox(self, slot: int) -> None:
        """Start one sandbox, offer it to jobs, and tear it down once it is finished."""
        starting = True
        try:
            async with self.backend.open_sandbox(slot, self.start_timeout) as sandbox:
                self._starting -= 1
                starting = False
                self._failures = 0
                self._live.add(sandbox)
                try:
                    self._ready_send.send_nowait(sandbox)
                    self._changed()
                    await sandbox.finished.wait()
                finally:
                    self._live.discard(sandbox)
        except SandboxError as exc:
            self._failures += 1
            self.last_error = exc.message
            log.error("cannot start a sandbox: %s", exc.message)
        except Exception as exc:
            # One sandbox failing in a way nobody foresaw must not take the daemon and
            # every other sandbox down with it; its teardown has already run.
            self._failures += 1
            self.last_error = f"unexpected failure: {exc!r}"
            log.exception("sandbox in slot %d failed unexpectedly", slot)
        finally:
            if starting:
                self._starting -= 1
            self._free_slots.append(slot)
            self._changed()

    @asynccontextmanager
    async def sandbox(self) -> AsyncIterator[Sandbox]:
        """A sandbox for one job, retired when the block ends however it ends.

        Raises NoCapacity if none is ready within the queue timeout.
        """
        sandbox = await self._acquire()
        try:
            yield sandbox
        finally:
            sandbox.retire()

    async def _acquire(self) -> Sandbox:
        while True:  # a sandbox that died while it waited in the channel is skipped
            try:
                sandbox = self._ready_receive.receive_nowait()
            except trio.WouldBlock:
                break
            if sandbox.claim():
                self._changed()
                return sandbox
        self._waiting += 1
        self._changed()
        try:
            with trio.move_on_after(self.queue_timeout):
                while True:
                    sandbox = await self._ready_receive.receive()
                    if sandbox.claim():
                        return sandbox
        finally:
            self._waiting -= 1
            self._changed()
        detail = f" (last launch error: {self.last_error})" if self._failures else ""
        raise NoCapacity(
            f"no sandbox became free within {self.queue_timeout:g} s{detail}",
            waited=self.queue_timeout,
        )

    async def wait_idle(self) -> None:
        """Wait until no job holds a sandbox and nothing is starting or tearing down."""
        while self._starting or len(self._free_slots) < self.max_sandboxes:
            await self._lot.park()

    def close(self) -> None:
        """Stop refilling beyond the jobs already waiting, and retire the ready sandboxes
        none of them needs; busy ones finish their jobs."""
        self._closing = True
        self._changed()
