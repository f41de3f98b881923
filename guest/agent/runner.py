"""The runner: one job's processes, each stage under its limits, with the warm runtime
the sandbox holds for it."""

from __future__ import annotations

import _signal as signal
import os
import resource
import sys

from .capture import STDIN_BACKLOG
from .common import JobError, ignoring
from .files import Workdir
from .processes import Reaper, kill_group
from .stage import StageRun
from .warm import WarmRuntime

TYPE_CHECKING = False  # typing costs every sandbox its import
if TYPE_CHECKING:
    from typing import Any

    from .capture import StageOutcome, StdinWriter
    from .cells import Kernel
    from .limits import Confinement
    from .protocol import Channel


KILL_PASSES = 20  # at most, over /proc, killing what a cell left


def _zombie(pid: int) -> bool:
    """Whether ``pid`` has exited and waits to be reaped (killing it changes nothing)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split()[0] == b"Z"
    except OSError:
        return True


class Runner:
    """Runs processes for one job under its limits, reporting output as it comes."""

    def __init__(self, workdir: str, isolated: bool, confinement: Confinement) -> None:
        self.workdir = workdir
        self.files = Workdir(workdir, confinement.owner)
        self.isolated = isolated
        self.confinement = confinement
        self.reaper = Reaper()
        self.channel: Channel | None = None  # the host's, while serving
        self.warm: WarmRuntime | None = None
        self.kernel: Kernel | None = None  # a session's interpreter for Python cells
        self.cancelled = False  # the host cancelled the job that runs now
        self.held_stdin: list[dict[str, Any]] = []  # streamed while the compile ran

    def start_warm(self, spec: dict[str, Any] | None) -> None:
        """(Re)start the warm runtime ``spec`` describes, after each sync: in a VM
        restored from a snapshot, only once the random pool has been reseeded."""
        if self.warm is not None:
            self.warm.discard()
        self.warm = None
        if spec:
            try:
                self.warm = WarmRuntime(spec, self.files, self.confinement, self.reaper)
            except (OSError, JobError, KeyError, TypeError) as exc:
                # Jobs start cold; the host's log of the sandbox says why.
                sys.stderr.write(f"agent: no warm runtime: {exc}\n")

    def take_warm(
        self, argv: list[str], env: dict[str, str], files: list[dict[str, Any]], compiles: bool
    ) -> WarmRuntime | None:
        """The warm runtime for a job that runs ``argv``, the files written but for its
        source; None (and the runtime gone) if the job needs a cold start."""
        warm, self.warm = self.warm, None
        if warm is None:
            return None
        if not compiles and warm.serves(argv, env, files):
            warm.take(files)
            return warm
        warm.discard()
        return None

    def kill_all(self, pid: int) -> None:
        """Kill the program's process group and, when alone in the namespace, every
        other process but ourselves (what a program detached from its group left) and
        a session's interpreter, unless that is what ``pid`` is."""
        with ignoring(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        if not self.isolated:
            return
        if self.kernel is not None and self.kernel.process[0] != pid:
            self.kill_all_but(self.kernel.process[0])
            return
        with ignoring(ProcessLookupError, PermissionError):
            os.kill(-1, signal.SIGKILL)

    def kill_all_but(self, keep: int) -> None:
        """Kill every process the program started but ``keep`` (a session's interpreter,
        whose cell ended): when alone in the namespace, all others; else its group's.
        Again while a pass finds any: one forked as the last pass read /proc is not
        missed (a pid namespace cannot be fork-bombed past its process limit)."""
        for _ in range(KILL_PASSES):
            found = False
            for entry in os.listdir("/proc"):
                if not entry.isdigit() or int(entry) in (keep, os.getpid()):
                    continue
                pid = int(entry)
                with ignoring(ProcessLookupError, PermissionError):
                    if (self.isolated or os.getpgid(pid) == keep) and not _zombie(pid):
                        os.kill(pid, signal.SIGKILL)
                        found = True
            if not found:
                return
            self.reaper.reap()  # the orphans among them are ours to reap

    def limit_warm(self, pid: int, rlimits: list[tuple[int, tuple[int, int]]]) -> None:
        """Set a warm process's rlimits before its program's first line."""
        try:
            for which, values in rlimits:
                resource.prlimit(pid, which, values)
        except OSError as exc:
            kill_group(pid)
            self.reaper.wait(pid)
            raise JobError(f"cannot limit the warm runtime: {exc.strerror}") from exc

    def take_messages(self, writer: StdinWriter, streaming: bool, read: bool = True) -> bool:
        """Take what the host sent during a stage: streamed stdin, passed on to the
        program (or, in a stage that takes none, a compile, held for the run), or a
        ``cancel`` (its caller left: the stage is to stop); whether the channel is still
        worth listening to."""
        assert self.channel is not None
        messages = self.channel.receive_ready(read)
        if streaming:
            messages, self.held_stdin = [*self.held_stdin, *messages], []
        for message in messages:
            if message.get("type") == "cancel":
                self.cancelled = True
                return False
            if message.get("type") != "stdin":
                raise JobError(f"unexpected message during a run: {message.get('type')!r}")
            if not streaming:
                self.held_stdin.append(message)
                continue
            writer.feed(str(message.get("data", "")).encode())
            if message.get("eof"):
                writer.close()
        if self.channel.closed:
            writer.close()
            return False
        return True

    @property
    def holding_stdin(self) -> bool:
        """Whether as much stdin is held for the run as the agent keeps at most."""
        return sum(len(str(m.get("data", ""))) for m in self.held_stdin) >= STDIN_BACKLOG

    def run(
        self,
        stage: str,
        argv: list[str],
        *,
        env: dict[str, str],
        stdin: bytes,
        stream_stdin: bool = False,
        wall_time: float,
        cpu_time: float,
        limits: dict[str, Any],
        warm: WarmRuntime | None = None,
    ) -> StageOutcome:
        """Run one stage: ``argv`` started now, or the ``warm`` process that waits for
        its source (written to the FIFO once its limits are set)."""
        return StageRun(
            self,
            stage,
            argv,
            env=env,
            stdin=stdin,
            stream_stdin=stream_stdin,
            wall_time=wall_time,
            cpu_time=cpu_time,
            limits=limits,
            warm=warm,
        ).complete()
