"""A session's Python cells: one interpreter (guest/agent/kernel.py) kept alive from cell
to cell, each cell run as a stage of its own under the job's limits.

A cell ends when the kernel says so, its output flushed; the interpreter and what the
cell defined stay, every other process the cell started is killed. A cell that ends
the interpreter (a limit, ``sys.exit``, a crash) ends as a program would, and the
next cell gets a new interpreter.
"""

from __future__ import annotations

import _signal as signal
import os
import select
from resource import RLIM_INFINITY, RLIMIT_CPU

from .common import JobError, ignoring
from .limits import cpu_rlimit, cpu_time_of
from .processes import confine, spawn
from .protocol import from_json, to_json
from .stage import StageRun

TYPE_CHECKING = False  # typing costs every sandbox its import
if TYPE_CHECKING:
    from typing import Any

    from .capture import StageOutcome
    from .processes import Process
    from .runner import Runner
    from .warm import WarmRuntime

# The agent's bundle, which the kernel imports itself from: <bundle>/agent/cells.py(c).
BUNDLE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Kernel:
    """The session's interpreter, started with pipes for cells in and replies out."""

    def __init__(self, python: str, env: dict[str, str], runner: Runner) -> None:
        cells_r, self.cells = os.pipe2(os.O_CLOEXEC)
        self.replies, replies_w = os.pipe2(os.O_CLOEXEC)
        boot = (
            f"import sys; sys.path.insert(0, {BUNDLE!r}); "
            f"from agent.kernel import main; main({cells_r}, {replies_w})"
        )
        try:
            pid, stdin, stdout, stderr = spawn(
                [python, "-c", boot],
                cwd=runner.workdir,
                env=env,
                preexec=confine(runner.confinement, []),
                pass_fds=(cells_r, replies_w),
            )
        finally:
            os.close(cells_r)
            os.close(replies_w)
        os.close(stdin)  # a cell's input comes with its code; its children's stdin is empty
        self.process: Process = (pid, -1, stdout, stderr)
        os.set_blocking(self.replies, False)
        self._buffer = b""

    def reply(self) -> dict[str, Any] | None:
        """After the replies pipe polled readable: the reply, once a whole line came
        (``{"malformed": True}`` for one that is not the kernel's: the cell's code can
        write to the pipe too)."""
        with ignoring(BlockingIOError):
            self._buffer += os.read(self.replies, 65536)
        if b"\n" not in self._buffer:
            return None
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            reply = from_json(line)
        except ValueError:
            reply = None
        return reply if isinstance(reply, dict) else {"malformed": True}

    def resume(self) -> None:
        """Before a cell: let it run again, and drop any reply a cell wrote before."""
        os.kill(self.process[0], signal.SIGCONT)
        with ignoring(BlockingIOError):
            while os.read(self.replies, 65536):
                pass
        self._buffer = b""

    def pause(self) -> None:
        """After a cell: stopped until the next, with every thread a cell started (so
        nothing of the session runs between its calls, unwatched)."""
        os.kill(self.process[0], signal.SIGSTOP)

    def close(self, pipes: bool = False) -> None:
        """The interpreter is gone (its stage reaped it): close our ends of its cells
        and replies (and, for one reaped outside a stage, of its output)."""
        for fd in (self.cells, self.replies, *(self.process[2:] if pipes else ())):
            os.close(fd)

    def died(self, runner: Runner) -> bool:
        """Whether it died between cells (killed from outside): then it is reaped, and
        every pipe to it closed."""
        runner.reaper.reap()
        if runner.reaper.exits.pop(self.process[0], None) is None:
            return False
        self.close(pipes=True)
        return True


class CellRun(StageRun):
    """One cell as a stage: the kernel's process is the stage's until the cell ends."""

    def __init__(self, runner: Runner, kernel: Kernel, code: str, stdin: str, **stage: Any) -> None:
        self.kernel = kernel
        self.cell = to_json({"code": code, "stdin": stdin}).encode() + b"\n"
        self.reply: dict[str, Any] | None = None
        self.cpu_base = 0.0
        super().__init__(runner, "run", [], stdin=b"", stream_stdin=False, warm=None, **stage)
        self.poller.register(kernel.replies, select.POLLIN)

    def _launch(
        self,
        argv: list[str],
        env: dict[str, str],
        rlimits: list[tuple[int, tuple[int, int]]],
        warm: WarmRuntime | None,
    ) -> Process:
        pid = self.kernel.process[0]
        self.kernel.resume()
        # RLIMIT_CPU counts the interpreter's whole life: the cell gets its own on top,
        # as a soft limit only (no process may raise its hard limit again); past it,
        # SIGXCPU, and the CPU time the stage's cgroup counts, stop the cell.
        self.cpu_base = cpu_time_of(pid)
        soft = cpu_rlimit(self.cpu_base + self.cpu_time)[0]
        limited = [
            (which, (soft, RLIM_INFINITY) if which == RLIMIT_CPU else values)
            for which, values in rlimits
        ]
        self.runner.limit_warm(pid, limited)
        self.feed_source(self.kernel.cells, self.cell, owned=False)
        return self.kernel.process

    def step(self) -> bool:
        return self.reply is None and super().step()

    def _ready(self, fd: int) -> None:
        if fd != self.kernel.replies:
            super()._ready(fd)
        elif (reply := self.kernel.reply()) is None or self.killed_at is not None:
            return  # (a reply that comes once the interpreter is being killed is void)
        elif reply.get("malformed"):
            self._kill()  # not the kernel's: the interpreter cannot be trusted on
        else:
            self.reply = reply
            for pipe in list(self.pipes):  # what the cell wrote before its reply
                while pipe in self.pipes and self._read(pipe):
                    pass

    def close(self) -> None:
        if self.reply is None:  # the interpreter ended, or is killed now
            super().close()
            self.kernel.close()
            return
        self.writer.abandon()
        self.runner.kill_all_but(self.pid)
        self.kernel.pause()

    def finish(self) -> StageOutcome:
        if self.reply is None:
            return super().finish()
        outcome = self.settle()
        if self.cpu_before is None:
            outcome.cpu = cpu_time_of(self.pid) - self.cpu_base
        outcome.memory_bytes = _peak_memory(self.pid)
        outcome.exit_code = 0 if self.reply.get("ok") else 1
        return outcome


def _peak_memory(pid: int) -> int:
    """The interpreter's peak resident memory (VmHWM) in bytes; 0 if unknown."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def run_cell(
    runner: Runner, python: str, code: str, stdin: str, **stage: Any
) -> tuple[StageOutcome, dict[str, Any]]:
    """Run one cell in the session's interpreter (started first if there is none); its
    outcome, and the job result's ``cell``: the value, and whether the interpreter was
    new and whether it (and what the cell defined) is kept."""
    kernel = runner.kernel
    if kernel is not None and kernel.died(runner):
        kernel = runner.kernel = None
    fresh = kernel is None
    if kernel is None:
        kernel = runner.kernel = Kernel(python, stage["env"], runner)
    try:
        run = CellRun(runner, kernel, code, stdin, **stage)
    except JobError:  # it could not be limited: killed and reaped
        kernel.close(pipes=True)
        runner.kernel = None
        raise
    try:
        outcome = run.complete()
    finally:
        if run.reply is None:  # the interpreter ended with the cell
            runner.kernel = None
    reply = run.reply or {}
    cell = {"value": reply.get("value"), "fresh": fresh, "kept": run.reply is not None}
    if reply.get("error"):
        cell["error"] = reply["error"]
    return outcome, cell
