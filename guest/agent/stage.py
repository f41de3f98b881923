"""One stage's process from its start to its exit: output captured and streamed, stdin
(and a warm runtime's source) fed, wall time, CPU time and output watched."""

from __future__ import annotations

import math
import os
import select
import time

from .capture import Capture, StageOutcome, StdinWriter
from .common import CHUNK
from .limits import cpu_time_of, job_rlimits
from .processes import confine, spawn

TYPE_CHECKING = False  # typing costs every sandbox its import
if TYPE_CHECKING:
    import resource
    from typing import Any

    from .processes import Process
    from .runner import Runner
    from .warm import WarmRuntime

CPU_CHECK_MIN = 0.02  # seconds between looks at the job's CPU time, at least
# After the program is killed, how long to wait for pipes that a stray process might hold.
DRAIN_GRACE = 2.0


class StageRun:
    """Started by its constructor, run by :meth:`complete` (:meth:`step` until it
    returns False, :meth:`close` whatever happened, :meth:`finish` for the outcome)."""

    def __init__(
        self,
        runner: Runner,
        stage: str,
        argv: list[str],
        *,
        env: dict[str, str],
        stdin: bytes,
        stream_stdin: bool,
        wall_time: float,
        cpu_time: float,
        limits: dict[str, Any],
        warm: WarmRuntime | None,
    ) -> None:
        assert runner.channel is not None
        self.runner = runner
        self.channel = channel = runner.channel
        self.cpu_time = cpu_time
        self.outcome = StageOutcome()

        def emit(stream: str, data: str) -> None:
            channel.send({"type": "output", "stage": stage, "stream": stream, "data": data})

        cap = int(limits["output_bytes"])
        confinement = runner.confinement
        confinement.prepare(runner.workdir, limits)
        self.oom_kills = confinement.oom_kills()
        self.cpu_before = confinement.cpu_seconds()
        # The host, which may watch the job's CPU time from outside, starts its count.
        channel.send({"type": "stage", "stage": stage})
        self.start = time.monotonic()
        rlimits = job_rlimits(limits, cpu_time)
        self.poller = select.poll()
        self.source_writer: StdinWriter | None = None
        self.pid, stdin_fd, stdout_fd, stderr_fd = self._launch(argv, env, rlimits, warm)
        self.writer = StdinWriter(stdin_fd, self.poller)
        self.writer.feed(stdin)
        self.streams = {stdout_fd: "stdout", stderr_fd: "stderr"}
        self.pipes = set(self.streams)  # still open
        self.outcome.captures = {
            "stdout": Capture("stdout", cap, emit),
            "stderr": Capture("stderr", cap, emit),
        }
        for fd in self.pipes:
            os.set_blocking(fd, False)
            self.poller.register(fd, select.POLLIN)
        self.poller.register(runner.reaper.fd, select.POLLIN)
        # The channel is listened to for streamed stdin, and for a cancel.
        self.streaming = stream_stdin
        self.taking_stdin = not channel.closed
        if stream_stdin and self.taking_stdin:  # what came with the job, or in a compile
            self.taking_stdin = runner.take_messages(self.writer, True, read=False)
        else:
            self.writer.close()
        self.listening = False
        self.deadline = self.start + wall_time
        self.next_cpu_check = self.start
        self.killed_at: float | None = None
        self.exit_status: tuple[int, resource.struct_rusage] | None = None
        if runner.cancelled:  # during the stage before
            self._kill()

    def _launch(
        self,
        argv: list[str],
        env: dict[str, str],
        rlimits: list[tuple[int, tuple[int, int]]],
        warm: WarmRuntime | None,
    ) -> Process:
        """The stage's process, started under ``rlimits``: ``argv`` now, or the ``warm``
        runtime, whose source then goes through its FIFO like stdin."""
        runner = self.runner
        if warm is None:
            preexec = confine(runner.confinement, rlimits)
            return spawn(argv, cwd=runner.workdir, env=env, preexec=preexec)
        runner.limit_warm(warm.process[0], rlimits)
        if self.cpu_before is not None:
            # As in a cold start (and as its rlimit counts), the runtime's own start is
            # the job's CPU time too.
            self.cpu_before -= cpu_time_of(warm.process[0])
        fifo, source = warm.publish()
        self.feed_source(fifo, source, owned=True)
        return warm.process

    def feed_source(self, fd: int, source: bytes, owned: bool) -> None:
        """Write ``source`` to ``fd`` as the stage runs (closing it after, if ``owned``)."""
        self.source_writer = StdinWriter(fd, self.poller, owned)
        self.source_writer.feed(source)
        self.source_writer.close()

    def _kill(self) -> None:
        self.killed_at = time.monotonic()
        self.runner.kill_all(self.pid)

    def _watch_limits(self, now: float) -> None:
        """Kill the stage once it is past its wall time or its processes' CPU time."""
        if self.killed_at is None and now >= self.deadline:
            self.outcome.timed_out = True
            self._kill()
        if self.cpu_before is not None and self.killed_at is None and now >= self.next_cpu_check:
            used = (self.runner.confinement.cpu_seconds() or 0.0) - self.cpu_before
            left = self.cpu_time - used
            if left <= 0:
                self.outcome.cpu_limited = True
                self._kill()
            # All CPUs busy is the fastest the job can use up what is left.
            self.next_cpu_check = now + max(CPU_CHECK_MIN, left / (os.cpu_count() or 1))

    def _listen(self) -> None:
        """Read the channel (stdin, a cancel) only while the program's stdin has room."""
        wanted = self.taking_stdin and not self.writer.full and not self.runner.holding_stdin
        if wanted != self.listening:
            if wanted:
                self.poller.register(self.channel.fd, select.POLLIN)
            else:
                self.poller.unregister(self.channel.fd)
            self.listening = wanted

    def step(self) -> bool:
        """One wait on the poll and what it brought; False once the stage is over (its
        process reaped and its pipes closed, or given up on after the drain grace)."""
        if not self.pipes and self.exit_status is not None:
            return False
        now = time.monotonic()
        self._watch_limits(now)
        self._listen()
        killed_at = self.killed_at
        limit = self.deadline if killed_at is None else killed_at + DRAIN_GRACE
        if self.cpu_before is not None and killed_at is None:
            limit = min(limit, self.next_cpu_check)
        wait: float | None = max(0.0, limit - now)
        if now >= limit and killed_at is not None:
            if self.exit_status is not None:
                return False  # a process we cannot reach still holds a pipe; stop waiting
            wait = None  # killed: only its exit is left to wait for
        for fd, _ in self.poller.poll(None if wait is None else math.ceil(wait * 1000)):
            self._ready(fd)
        return True

    def _ready(self, fd: int) -> None:
        """Handle one fd the poll found ready."""
        runner = self.runner
        if fd == runner.reaper.fd:
            runner.reaper.reap()
            if self.exit_status is None and self.pid in runner.reaper.exits:
                self.exit_status = runner.reaper.exits.pop(self.pid)
                # Whatever the program left running dies with it.
                runner.kill_all(self.pid)
        elif fd == self.channel.fd and self.listening:
            self.taking_stdin = runner.take_messages(self.writer, self.streaming)
            if runner.cancelled and self.killed_at is None:
                self._kill()
        elif self.writer.owns(fd):
            self.writer.write()
        elif self.source_writer is not None and self.source_writer.owns(fd):
            self.source_writer.write()
        elif fd in self.pipes:  # not unregistered by an earlier event of this round
            self._read(fd)

    def _read(self, fd: int) -> bool:
        """Take what the pipe ``fd`` holds (closing it at its end); whether it held any."""
        try:
            chunk = os.read(fd, CHUNK)
        except BlockingIOError:
            return False
        if not chunk:
            self.poller.unregister(fd)
            self.pipes.discard(fd)
            os.close(fd)
            return False
        stream = self.streams[fd]
        if not self.outcome.captures[stream].add(chunk) and self.killed_at is None:
            self.outcome.output_limited = stream
            self._kill()
        return True

    def close(self) -> None:
        """Drop what is left to write, close the pipes, and reap the process (killed
        first if the stage ended early)."""
        self.writer.abandon()
        if self.source_writer is not None:
            self.source_writer.abandon()
        for fd in self.pipes:
            os.close(fd)
        self.pipes.clear()
        if self.exit_status is None:
            self.runner.kill_all(self.pid)
            self.exit_status = self.runner.reaper.wait(self.pid)

    def complete(self) -> StageOutcome:
        try:
            while self.step():
                pass
        finally:
            self.close()
        return self.finish()

    def settle(self) -> StageOutcome:
        """The outcome of the closed stage but for how its process ended."""
        outcome = self.outcome
        for capture in outcome.captures.values():
            if not capture.truncated:
                capture.finish()
        outcome.wall = time.monotonic() - self.start
        confinement = self.runner.confinement
        outcome.oom_killed = confinement.oom_kills() > self.oom_kills
        cpu_after = confinement.cpu_seconds()
        if self.cpu_before is not None and cpu_after is not None:
            outcome.cpu = cpu_after - self.cpu_before  # every process of the stage
        return outcome

    def finish(self) -> StageOutcome:
        """The outcome of the closed stage."""
        assert self.exit_status is not None
        outcome = self.settle()
        status, usage = self.exit_status
        returncode = os.waitstatus_to_exitcode(status)
        if self.cpu_before is None:  # no cgroup of its own to count it: its processes'
            outcome.cpu = usage.ru_utime + usage.ru_stime
        outcome.memory_bytes = usage.ru_maxrss * 1024
        if returncode < 0:
            outcome.signal = -returncode
        else:
            outcome.exit_code = returncode
        return outcome
