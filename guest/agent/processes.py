"""Starting the program's processes (fork, pipes, a new session, its limits before its
exec) and reaping every child, the orphans of a PID 1 included."""

from __future__ import annotations

import _signal as signal
import os
import resource

from .common import JobError, ignoring

TYPE_CHECKING = False  # typing costs every sandbox its import
if TYPE_CHECKING:
    from collections.abc import Callable

    from .limits import Confinement

# Every signal the program could send to the agent: ignored, as PID 1 must (SIGCHLD has
# a handler of its own; SIGKILL and SIGSTOP cannot be caught, nor sent by the program).
IGNORED_SIGNALS = sorted(
    set(signal.valid_signals()) - {signal.SIGCHLD, signal.SIGKILL, signal.SIGSTOP}
)
Process = tuple[int, int, int, int]  # (pid, stdin, stdout, stderr) as spawn returns them


def confine(
    confinement: Confinement, rlimits: list[tuple[int, tuple[int, int]]]
) -> Callable[[], None]:
    """What the program's process does before its exec."""

    def preexec() -> None:
        for number in IGNORED_SIGNALS:  # ignored dispositions would survive the exec
            signal.signal(number, signal.SIG_DFL)
        confinement.enter()
        for which, values in rlimits:
            resource.setrlimit(which, values)
        try:  # the program, not the agent, is what the OOM killer should take first
            with open("/proc/self/oom_score_adj", "w") as adj:
                adj.write("1000")
        except OSError:
            pass

    return preexec


def spawn(
    argv: list[str],
    *,
    cwd: str,
    env: dict[str, str],
    preexec: Callable[[], None],
    pass_fds: tuple[int, ...] = (),
) -> Process:
    """Start ``argv`` in a new session with pipes for its stdin, stdout and stderr (and
    ``pass_fds`` kept open), after ``preexec`` in the child; (pid, stdin, stdout,
    stderr) or JobError if it cannot start. (subprocess would cost every sandbox its
    import; the agent has one thread.)"""
    stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
    stdout_r, stdout_w = os.pipe2(os.O_CLOEXEC)
    stderr_r, stderr_w = os.pipe2(os.O_CLOEXEC)
    report_r, report_w = os.pipe2(os.O_CLOEXEC)  # the child's exec error, if any
    pid = os.fork()
    if pid == 0:  # the child: nothing here may return
        try:
            for fd, target in ((stdin_r, 0), (stdout_w, 1), (stderr_w, 2)):
                os.dup2(fd, target)
            low = 3
            for fd in sorted({report_w, *pass_fds}):
                os.closerange(low, fd)
                low = fd + 1
            os.closerange(low, 1 << 16)
            for fd in pass_fds:
                os.set_inheritable(fd, True)
            os.setsid()
            os.chdir(cwd)
            preexec()
            os.execvpe(argv[0], argv, env)
        except BaseException as exc:
            error = exc.errno if isinstance(exc, OSError) and exc.errno else 0
            os.write(report_w, str(error).encode())
        os._exit(127)
    for fd in (stdin_r, stdout_w, stderr_w, report_w):
        os.close(fd)
    with os.fdopen(report_r, "rb") as report:
        failed = report.read()
    if failed:
        os.waitpid(pid, 0)
        for fd in (stdin_w, stdout_r, stderr_r):
            os.close(fd)
        error = int(failed)
        reason = os.strerror(error) if error else "it failed before exec"
        raise JobError(f"cannot start {argv[0]}: {reason}")
    return pid, stdin_w, stdout_r, stderr_r


class Reaper:
    """Reaps every child of the agent, with its resource usage.

    The agent may be PID 1 (in a VM, or a jail without an init of its own): then the
    orphans a program leaves behind become its children too and must be reaped, or
    their zombies would use up the process limit. SIGCHLD wakes the poll through
    a pipe, so no exit is missed however early it happens.
    """

    def __init__(self) -> None:
        self.fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        os.set_blocking(write_fd, False)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        signal.set_wakeup_fd(write_fd)
        self.exits: dict[int, tuple[int, resource.struct_rusage]] = {}

    def reap(self) -> None:
        try:
            while os.read(self.fd, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.exits[pid] = (status, usage)

    def wait(self, pid: int) -> tuple[int, resource.struct_rusage]:
        """Block until ``pid`` has been reaped."""
        while pid not in self.exits:
            try:
                _, status, usage = os.wait4(pid, 0)
            except ChildProcessError:
                self.reap()
                if pid not in self.exits:
                    raise JobError(f"process {pid} is not the agent's to wait for") from None
                continue
            self.exits[pid] = (status, usage)
        return self.exits.pop(pid)


def kill_group(pid: int) -> None:
    with ignoring(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
