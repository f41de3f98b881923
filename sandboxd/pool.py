"""The warm pool: ready sandboxes waiting for jobs, one job each, refilled in the background.

A job takes a ready sandbox (waiting at most the queue timeout), runs, and retires it;
the sandbox is then torn down in the pool's own nursery while the pool starts another.
Nothing is ever handed to a second job. Once closed (the daemon drains), the pool starts
sandboxes only for the jobs already waiting.

Ready sandboxes are kept per language: a sandbox for a language that warms holds its
runtime already started (sandboxd.job.warm_runtime); the others are plain. The pool
keeps ``size`` ready in all, shared out by recent demand (:class:`Demand`), starts more
while jobs are waiting, and never holds more than ``max_sandboxes`` at once. A job takes
one of its own language if there is one, else any ready one (whose runtime the agent
then drops): no job waits while a sandbox is ready.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import trio

from sandboxd.agent_link import WarmRuntime
from sandboxd.backends.base import Backend, Sandbox, SandboxState
from sandboxd.errors import NoCapacity, SandboxError

log = logging.getLogger(__name__)

MAX_BACKOFF = 5.0
PLAIN = ""  # the kind of a ready sandbox without a warm runtime
DEMAND_HALF_LIFE = 32  # jobs after which a job counts half as much in the demand


class Demand:
    """How many jobs of each kind came recently, an older job counting less."""

    def __init__(self, kinds: list[str]) -> None:
        self.kinds = kinds
        self.weights = dict.fromkeys(kinds, 1.0)  # until jobs say otherwise: even
        self._decay = 0.5 ** (1 / DEMAND_HALF_LIFE)

    def record(self, kind: str) -> None:
        for name in self.weights:
            self.weights[name] *= self._decay
        self.weights[kind] += 1.0

    def shares(self, total: int) -> dict[str, int]:
        """``total`` ready sandboxes shared in proportion (largest remainders)."""
        weight = sum(self.weights.values())
        exact = {kind: total * self.weights[kind] / weight for kind in self.kinds}
        shares = {kind: int(value) for kind, value in exact.items()}
        by_remainder = sorted(self.kinds, key=lambda kind: shares[kind] - exact[kind])
        for kind in by_remainder[: total - sum(shares.values())]:
            shares[kind] += 1
        return shares


class Pool:
    def __init__(
        self,
        backend: Backend,
        *,
        size: int,
        max_sandboxes: int,
        queue_timeout: float,
        start_timeout: float,
        warm: Mapping[str, WarmRuntime] | None = None,
    ) -> None:
        self.backend = backend
        self.size = size
        self.max_sandboxes = max_sandboxes
        self.queue_timeout = queue_timeout
        self.start_timeout = start_timeout
        self.warm = dict(warm or {})  # language → the runtime its sandboxes start
        self.demand = Demand([*self.warm, PLAIN])
        self._ready: dict[str, deque[Sandbox]] = {kind: deque() for kind in self.demand.kinds}
        self._live: set[Sandbox] = set()
        self._free_slots = list(range(max_sandboxes - 1, -1, -1))
        self._starting: Counter[str] = Counter()
        self._waiting: Counter[str] = Counter()
        self._failures = 0
        self._closing = False
        self._lot = trio.lowlevel.ParkingLot()  # woken whenever the counts change
        self._arrivals = trio.lowlevel.ParkingLot()  # jobs waiting for a ready sandbox
        self.last_error = ""
        self._nursery: trio.Nursery | None = None

    def kind_of(self, language: str) -> str:
        return language if language in self.warm else PLAIN

    def _count(self, *states: SandboxState) -> int:
        return sum(1 for sandbox in self._live if sandbox.state in states)

    def _ready_of(self, kind: str) -> list[Sandbox]:
        return [sandbox for sandbox in self._ready[kind] if sandbox.state is SandboxState.READY]

    def stats(self) -> dict[str, Any]:
        ready = {kind or "plain": self._ready_of(kind) for kind in self.demand.kinds}
        held = sum(1 for sandbox in self._live if sandbox.session and not sandbox.finished.is_set())
        return {
            "size": self.size,
            "max": self.max_sandboxes,
            "ready": self._count(SandboxState.READY),
            "busy": self._count(SandboxState.RUNNING, SandboxState.STOPPING) - held,
            "sessions": held,
            "starting": sum(self._starting.values()),
            "waiting": sum(self._waiting.values()),
            "ready_by_kind": {kind: len(sandboxes) for kind, sandboxes in ready.items()},
            "ready_memory_bytes": sum(
                sandbox.memory_bytes() for sandboxes in ready.values() for sandbox in sandboxes
            ),
            "last_error": self.last_error,
        }

    def can_serve(self) -> bool:
        """Whether a job would be served: a ready sandbox, or launches that succeed."""
        return self._count(SandboxState.READY) > 0 or self._failures == 0

    def _launches(self) -> list[str]:
        """The kinds of sandbox to start now: one for each waiting job without one on
        the way, then what the demand's share of the pool lacks. A slot comes back only
        once its sandbox is fully torn down: free slots are the room under the maximum."""
        keep = 0 if self._closing else self.size
        have = {kind: len(self._ready_of(kind)) + self._starting[kind] for kind in self._ready}
        room = min(keep + sum(self._waiting.values()) - sum(have.values()), len(self._free_slots))
        launches: list[str] = []
        for wanted in (self._waiting, self.demand.shares(keep)):
            for kind, count in wanted.items():
                missing = count - have[kind]
                launches += [kind] * max(0, missing)
                have[kind] += max(0, missing)
        return launches[: max(0, room)]

    def _changed(self) -> None:
        if self._closing:
            self._retire_spare()
        self._lot.unpark_all()

    def _retire_spare(self) -> None:
        """Closed: retire the ready sandboxes that no waiting job will take."""
        ready = [sandbox for kind in self._ready for sandbox in self._ready_of(kind)]
        for sandbox in ready[sum(self._waiting.values()) :]:
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
            for kind in self._launches():
                self._starting[kind] += 1
                assert self._nursery is not None
                self._nursery.start_soon(self._keep_sandbox, kind, self._free_slots.pop())
            await self._lot.park()

    async def _keep_sandbox(self, kind: str, slot: int) -> None:
        """Start one sandbox, offer it to jobs, and tear it down once it is finished."""
        starting = True
        warm = self.warm.get(kind)
        try:
            async with self.backend.open_sandbox(slot, self.start_timeout, warm) as sandbox:
                self._starting[kind] -= 1
                starting = False
                self._failures = 0
                self._live.add(sandbox)
                try:
                    self._ready[kind].append(sandbox)
                    self._arrivals.unpark()
                    self._changed()
                    await sandbox.finished.wait()
                finally:
                    self._live.discard(sandbox)
                    if sandbox in self._ready[kind]:
                        self._ready[kind].remove(sandbox)
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
                self._starting[kind] -= 1
            self._free_slots.append(slot)
            self._changed()

    @asynccontextmanager
    async def sandbox(self, language: str) -> AsyncIterator[Sandbox]:
        """A sandbox for one job in ``language``, retired when the block ends however it
        ends. Raises NoCapacity if none is ready within the queue timeout."""
        sandbox = await self._acquire(self.kind_of(language))
        try:
            yield sandbox
        finally:
            sandbox.retire()

    def _take(self, kind: str) -> Sandbox | None:
        """A ready sandbox, of ``kind`` if there is one, claimed."""
        for candidates in (self._ready[kind], self._ready[PLAIN], *self._ready.values()):
            while candidates:
                sandbox = candidates.popleft()
                if sandbox.claim():  # one that died while it waited is skipped
                    self._changed()
                    return sandbox
        return None

    async def _acquire(self, kind: str) -> Sandbox:
        self.demand.record(kind)
        sandbox = self._take(kind)
        if sandbox is not None:
            return sandbox
        self._waiting[kind] += 1
        self._changed()
        try:
            with trio.move_on_after(self.queue_timeout):
                while True:
                    # Woken one job per sandbox that becomes ready, first come first.
                    await self._arrivals.park()
                    sandbox = self._take(kind)
                    if sandbox is not None:
                        return sandbox
        finally:
            self._waiting[kind] -= 1
            self._changed()
        detail = f" (last launch error: {self.last_error})" if self._failures else ""
        raise NoCapacity(
            f"no sandbox became free within {self.queue_timeout:g} s{detail}",
            waited=self.queue_timeout,
        )

    async def wait_idle(self) -> None:
        """Wait until no job holds a sandbox and nothing is starting or tearing down."""
        while sum(self._starting.values()) or len(self._free_slots) < self.max_sandboxes:
            await self._lot.park()

    def close(self) -> None:
        """Stop refilling beyond the jobs already waiting, and retire the ready sandboxes
        none of them needs; busy ones finish their jobs."""
        self._closing = True
        self._changed()
