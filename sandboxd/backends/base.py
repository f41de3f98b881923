"""What every backend provides: sandboxes that start with a ready agent, run one job,
and release every host resource they held when they are closed.
"""

from __future__ import annotations

import abc
import enum
import logging
import os
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import trio

from sandboxd.agent_link import AgentLink, OutputHandler, StageHandler, Transcript, WarmRuntime
from sandboxd.errors import AgentError, InternalError, LaunchError, SandboxError, StartTimeout
from sandboxd.host.cgroups import Cgroup, CgroupLayout
from sandboxd.host.jail import check_launcher, jailed
from sandboxd.host.process import ChildProcess, LogTail
from sandboxd.limits import Limits
from sandboxd.stdin_stream import StdinStream

if TYPE_CHECKING:
    from sandboxd.config import Config

log = logging.getLogger(__name__)

SANDBOX_ID_LENGTH = 12  # hex digits: a sandbox's id names its cgroup (and a VM's jail)


def new_sandbox_id() -> str:
    return uuid.uuid4().hex[:SANDBOX_ID_LENGTH]


# How long past its own limits the host lets a job run before killing the sandbox: the
# agent enforces the limits itself, this only catches an agent that cannot.
HOST_GRACE = 5.0
CPU_CHECK_MIN = 0.02  # seconds between looks at a sandbox's CPU time, at least
JAIL_EXIT_TIMEOUT = 5.0  # for a jail's outer bubblewrap to follow its PID 1
REQUEST_TIMEOUT = 30.0  # for the agent to answer a session's file request
SETTLE_TIMEOUT = 5.0  # for the agent to finish answering a call that was cancelled


class SandboxState(enum.Enum):
    CREATING = "creating"
    READY = "ready"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


class SandboxStateError(InternalError):
    """A sandbox was asked to do something its state does not allow (a bug)."""


@dataclass
class JobRun:
    """What a sandbox saw of one job, before the daemon turns it into a result."""

    record: dict[str, Any] | None  # the agent's result; None if it never came
    transcript: Transcript
    lost: str  # why there is no record
    deadline_hit: bool  # the host had to stop a job that outlived its limits
    oom_kills: int
    cpu: CpuWatch | None  # the last stage's CPU time, where the host counts it


class CpuWatch:
    """The CPU time of a job's stage as the host counts it (every process of the
    sandbox: per-process rlimits miss a program that shares its work among children),
    and the limit enforced on it. A stage starts when the agent says so."""

    def __init__(self, sandbox: Sandbox, limits: Limits, cpus: float) -> None:
        self.sandbox = sandbox
        self.limits = limits
        self.cpus = cpus
        self.stage = ""
        self.limit = 0.0
        self.exceeded = False
        self._base = 0.0
        self._final: float | None = None
        self._started = trio.Event()

    def stage_started(self, stage: str) -> None:
        self.stage = stage
        self.limit = self.limits.compile_time if stage == "compile" else self.limits.cpu_time
        self._base = self._read()
        self._started.set()

    def _read(self) -> float:
        return self.sandbox.cpu_seconds()

    @property
    def used(self) -> float:
        """The stage's CPU time so far, or at the job's end once that came."""
        if self._final is not None:
            return self._final
        return self._read() - self._base if self.stage else 0.0

    def finish(self) -> None:
        """The job is over: what comes after (the agent's exit) is not the job's."""
        self._final = self.used

    async def enforce(self) -> None:
        """Stop the program once its stage used up its CPU time (runs until cancelled)."""
        while True:
            started = self._started
            await started.wait()
            self._started = trio.Event()
            while not self._started.is_set():
                left = self.limit - self.used
                if left <= 0:
                    self.exceeded = True
                    self.sandbox.log.info("stopping the %s stage: out of CPU time", self.stage)
                    self.sandbox.kill_program()
                    return
                # The cgroup's quota is the fastest the job can use up what is left.
                with trio.move_on_after(max(CPU_CHECK_MIN, left / self.cpus)):
                    await self._started.wait()


class SandboxLog(logging.LoggerAdapter[logging.Logger]):
    """A sandbox's log: its backend's logger, each line after the sandbox's id. Not a
    child logger: logging keeps every logger it names for good, and a sandbox is made
    for every job (the daemon would grow with each)."""

    def __init__(self, logger: logging.Logger, sandbox_id: str) -> None:
        super().__init__(logger)
        self.sandbox_id = sandbox_id

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"{self.sandbox_id}: {msg}", kwargs


class Sandbox(abc.ABC):
    """One sandbox with its agent. The backend's ``open_sandbox`` owns its lifetime; the
    pool hands it to one job and then retires it."""

    def __init__(
        self, sandbox_id: str, link: AgentLink, child: ChildProcess, log: logging.Logger
    ) -> None:
        """``log``: the backend's logger (the sandbox's lines carry its id)."""
        self.id = sandbox_id
        self.link = link
        self.child = child  # the process the sandbox lives in (a jail, a VMM)
        self.log = SandboxLog(log, sandbox_id)
        self.tail = LogTail(self.log)  # its last lines of log, for errors
        self.state = SandboxState.CREATING
        self.finished = trio.Event()  # set once it can serve nothing more
        self.gone = trio.Event()  # set once it is stopped and everything it held released
        self.session = ""  # the id of the session that holds it, if one does

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} {self.state.value}>"

    def set_state(self, state: SandboxState) -> None:
        self.log.debug("%s -> %s", self.state.value, state.value)
        self.state = state
        if state in (SandboxState.STOPPING, SandboxState.STOPPED, SandboxState.FAILED):
            self.finished.set()
        if state in (SandboxState.STOPPED, SandboxState.FAILED):
            self.gone.set()

    def _expect(self, *states: SandboxState) -> None:
        if self.state not in states:
            raise SandboxStateError(
                f"sandbox {self.id} is {self.state.value}, not "
                + " or ".join(s.value for s in states)
            )

    def claim(self) -> bool:
        """Take a ready sandbox for a job; False if it is no longer ready."""
        if self.state is not SandboxState.READY:
            return False
        self.set_state(SandboxState.RUNNING)
        return True

    def retire(self) -> None:
        """No more jobs: its owner tears it down."""
        if not self.finished.is_set():
            self.set_state(SandboxState.STOPPING)

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop everything of the sandbox and reap its process. Shielded, idempotent."""

    def log_streams(self) -> list[trio.abc.ReceiveStream]:
        """The process's streams that carry its log (not its agent channel)."""
        return [self.child.stderr] if self.child.stderr is not None else []

    async def _watch(self) -> None:
        """Notice the sandbox ending on its own (a crash, the agent killed)."""
        code = await self.child.wait()
        # A running job finds out through its agent link; a ready sandbox that dies
        # must leave the pool, and a session's, between its calls, the session.
        if self.state is SandboxState.READY or (self.session and not self.finished.is_set()):
            held = f" by session {self.session}" if self.session else " while ready"
            self.log.warning("died%s (code %s): %s", held, code, self.tail.text()[-500:])
            self.set_state(SandboxState.FAILED)

    @asynccontextmanager
    async def serving(
        self, start: Callable[[], Awaitable[object]], argv: list[str], start_timeout: float
    ) -> AsyncIterator[None]:
        """A backend's sandbox from its process's start to its end: its log read from the
        first line (a VMM that logs while it boots would block on a full pipe), ``start``
        (up to the agent's hello) within ``start_timeout``, its death watched while the
        body uses it, then stopped. If it does not start: stopped, and LaunchError or
        StartTimeout with the command line and the log's tail."""
        failure: SandboxError | trio.TooSlowError | None = None
        try:
            async with trio.open_nursery() as nursery:
                for stream in self.log_streams():
                    nursery.start_soon(self.tail.pump, stream)
                try:
                    with trio.fail_after(start_timeout):
                        await start()
                except (SandboxError, trio.TooSlowError) as exc:
                    failure = exc
                    await self.stop()
                    # What the process wrote before it died, for the error.
                    nursery.cancel_scope.deadline = trio.current_time() + 1
                else:
                    self.set_state(SandboxState.READY)
                    nursery.start_soon(self._watch)
                    try:
                        yield
                    finally:
                        self.retire()
                        await self.stop()
                        nursery.cancel_scope.cancel()  # the pumps, before their pipes close
        except BaseExceptionGroup as group:
            # The pumps and the watch end quietly: what comes out is the body's own
            # error, which callers expect as itself, not wrapped in a group.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        if failure is not None:
            self.set_state(SandboxState.FAILED)
            timed_out = isinstance(failure, trio.TooSlowError)
            error = StartTimeout if timed_out else LaunchError
            reason = f"not ready within {start_timeout:g} s" if timed_out else str(failure)
            raise error(
                f"sandbox {self.id} did not start: {reason}: {self.tail.text()[-300:]}",
                argv=argv,
                exit_code=self.child.returncode,
                log_tail=self.tail.text(),
            ) from failure
        self.set_state(SandboxState.STOPPED)

    def network_namespace(self) -> str:
        """The file of the sandbox's own network namespace, where its egress link goes
        (only for backends whose ``has_network`` is true)."""
        raise SandboxStateError(f"{type(self).__name__} has no network namespace for egress")

    @abc.abstractmethod
    def apply_limits(self, limits: Limits) -> None:
        """Set the job's limits on what the host controls (cgroup, VM size)."""

    @abc.abstractmethod
    def oom_kills(self) -> int:
        """How many processes the OOM killer took in this sandbox so far."""

    @abc.abstractmethod
    def kill(self) -> None:
        """Stop everything in the sandbox at once (its owner still cleans up)."""

    def kill_program(self) -> None:
        """Stop the job's program but not the agent, which then reports on it."""
        self.kill()

    # Whether the host counts a job's CPU time (cpu_seconds); if not, the agent does, as
    # in a VM, where the VMM's time is not the job's.
    host_counts_cpu: ClassVar[bool] = False

    def cpu_seconds(self) -> float:
        """CPU time the sandbox used so far (where ``host_counts_cpu``)."""
        raise SandboxStateError(f"{type(self).__name__} does not count its CPU time")

    def memory_room(self) -> int | None:
        """Of the memory the sandbox may hold, what is free now; None where the host
        cannot tell (a VM's own memory)."""
        return None

    @abc.abstractmethod
    def memory_bytes(self) -> int:
        """The host memory the sandbox holds now (a ready one: what waiting costs)."""

    # The CPU share a sandbox has: the fastest it can use up CPU time.
    cpus: float = 1.0

    async def run(
        self,
        job: dict[str, Any],
        limits: Limits,
        on_output: OutputHandler,
        stdin: StdinStream | None = None,
    ) -> JobRun:
        """Run one job through the agent, enforcing the time limits from outside too.

        ``stdin`` streams input to an interactive job as it comes.
        """
        self._expect(SandboxState.RUNNING)
        self.apply_limits(limits)
        transcript = Transcript(limits.output_bytes)
        budget = limits.wall_time + HOST_GRACE
        if job.get("compile"):
            budget += limits.compile_time
        cpu = CpuWatch(self, limits, self.cpus) if self.host_counts_cpu else None
        record, lost = None, ""
        with trio.move_on_after(budget) as deadline:
            async with trio.open_nursery() as nursery:
                if cpu is not None:
                    nursery.start_soon(cpu.enforce)
                try:
                    on_stage = cpu.stage_started if cpu else None
                    record = await self._run_job(job, on_output, transcript, stdin, on_stage)
                except AgentError as exc:
                    lost = str(exc)
                nursery.cancel_scope.cancel()
        if cpu is not None:
            cpu.finish()
        if deadline.cancelled_caught:
            lost = f"the sandbox outlived its time limits by {HOST_GRACE:g} s and was killed"
        if record is None:
            self.log.warning("job lost: %s", lost)
            self.kill()
        return JobRun(record, transcript, lost, deadline.cancelled_caught, self.oom_kills(), cpu)

    async def _run_job(
        self,
        job: dict[str, Any],
        on_output: OutputHandler,
        transcript: Transcript,
        stdin: StdinStream | None,
        on_stage: StageHandler | None,
    ) -> dict[str, Any]:
        """The job's record, from its agent (AgentError if it breaks or goes away)."""
        return await self.link.run(job, on_output, transcript, stdin, on_stage)

    async def open_session(self, limits: Limits) -> None:
        """Keep the sandbox for a session with ``limits``: its agent serves every request
        that follows."""
        self._expect(SandboxState.RUNNING)
        self.apply_limits(limits)
        try:
            await self.link.open_session()
        except AgentError:
            self.kill()
            raise
        await self.size_disk(limits)

    async def settle(self) -> bool:
        """After a session's call was cancelled (its caller left): have the agent stop
        the program it runs and take the rest of its answer, so the next call starts
        clean; whether that worked (if not, the sandbox is killed). Shielded."""
        with trio.CancelScope(shield=True):
            with trio.move_on_after(SETTLE_TIMEOUT):
                try:
                    await self.link.settle()
                    return True
                except AgentError as exc:
                    self.log.warning("cannot settle its agent: %s", exc.message)
            self.kill()
        return False

    async def size_disk(self, limits: Limits) -> None:
        """Make the files a session can write fit ``limits`` where they count toward its
        memory (and could otherwise take what its agent needs)."""
        return  # a VM's agent is outside its job's cgroup: nothing to do

    async def request(
        self, message: dict[str, Any], max_data: int = 0
    ) -> tuple[dict[str, Any], bytes]:
        """A session's file request (see AgentLink.request); a sandbox whose agent does
        not answer in time, or breaks the protocol, is killed (AgentError)."""
        self._expect(SandboxState.RUNNING)
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                return await self.link.request(message, max_data)
        except trio.TooSlowError:
            self.kill()
            raise AgentError(f"agent did not answer within {REQUEST_TIMEOUT:g} s") from None
        except AgentError:
            self.kill()
            raise


class JailedSandbox(Sandbox):
    """A sandbox whose process is a jail (sandboxd.host.jail): bubblewrap, its command as the
    jail's PID 1, all of it in the sandbox's cgroup."""

    def __init__(
        self,
        sandbox_id: str,
        link: AgentLink,
        child: ChildProcess,
        cgroup: Cgroup,
        log: logging.Logger,
    ) -> None:
        super().__init__(sandbox_id, link, child, log)
        self.cgroup = cgroup

    def oom_kills(self) -> int:
        return self.cgroup.oom_kills()

    def memory_bytes(self) -> int:
        return self.cgroup.memory_usage()

    # Whether the sandbox's own process outlives a kill of the rest: the outer bubblewrap
    # stays to reap the jail's PID 1, whose death takes the pid namespace with it, and
    # then exits on its own. Killing it first would orphan the jail's processes.
    spares_its_process: ClassVar[bool] = True

    def kill(self, spared: set[int] | None = None) -> None:
        """Kill every process of the cgroup but ``spared`` (by default: its own, if it
        spares it)."""
        if spared is None:
            spared = {self.child.pid} if self.spares_its_process else set()
        for pid in self.cgroup.pids() - spared:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    async def stop(self) -> None:
        with trio.CancelScope(shield=True):
            self.kill()
            with trio.move_on_after(JAIL_EXIT_TIMEOUT):
                await self.child.wait()
            await self.child.stop()


class Backend(abc.ABC):
    name: ClassVar[str]
    isolation: ClassVar[str]
    has_network: bool = False  # can its sandboxes get egress (sandboxd.host.network)?
    shares_host_kernel: ClassVar[bool] = False  # weaker than a VM: the daemon warns

    @abc.abstractmethod
    async def start(self) -> None:
        """Prepare the host and remove what a crashed earlier daemon left behind."""

    @abc.abstractmethod
    def open_sandbox(
        self, slot: int, start_timeout: float, warm: WarmRuntime | None = None
    ) -> AbstractAsyncContextManager[Sandbox]:
        """A ready sandbox for the duration of the ``async with``; everything it held is
        released on exit, whatever happened. ``slot`` is unique among live sandboxes;
        its agent starts ``warm`` before it is ready."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Remove everything the backend created on the host."""

    @classmethod
    def remove_leftovers(cls, config: Config) -> list[str]:
        """Remove what a dead daemon of ``config`` left of this backend's own files (its
        sandboxes' cgroups and processes are the instance's sweep); what was found."""
        return []

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "isolation": self.isolation}


class JailedBackend(Backend):
    """A backend whose sandboxes are jails in cgroups of this daemon's instance."""

    def __init__(self, instance: str, uid_base: int) -> None:
        self.instance = instance
        self.uid_base = uid_base
        self.cgroups: CgroupLayout | None = None

    def jail(
        self, slot: int, argv: Sequence[str], **options: Any
    ) -> AbstractAsyncContextManager[tuple[ChildProcess, Cgroup]]:
        """A new sandbox's jail: its own id (and cgroup), the uid of its slot.
        ``options`` as for :func:`sandboxd.host.jail.jailed`."""
        assert self.cgroups is not None, "start() first"
        sandbox_id = new_sandbox_id()
        return jailed(
            self.cgroups, self.instance, sandbox_id, self.uid_base + slot, argv, **options
        )

    async def start(self) -> None:
        check_launcher()
        self.cgroups = CgroupLayout.detect()
        found = await self.cgroups.sweep(self.instance)
        if found:
            log.warning("removed %d sandbox(es) left by an earlier daemon", found)
        self.cgroups.prepare(self.instance)

    async def aclose(self) -> None:
        if self.cgroups is not None:
            await self.cgroups.sweep(self.instance, remove_parents=True)
