"""Child processes of the daemon: started from the main thread, awaited through a pidfd.

Why not ``trio.lowlevel.open_process``: it forks from a worker thread, and a parent-death
signal (bubblewrap's ``--die-with-parent``, QEMU's) fires when that *thread* exits, so a
pooled sandbox would be killed as soon as trio retires the idle thread. Forking from the
main thread keeps the parent-death signal tied to the daemon itself.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence

import trio

from sandboxd.errors import LaunchError

log = logging.getLogger(__name__)


class ChildProcess:
    """A running child with trio streams for the pipes that were asked for."""

    def __init__(
        self,
        args: Sequence[str],
        popen: subprocess.Popen[bytes],
        stdin: trio.lowlevel.FdStream | None,
        stdout: trio.lowlevel.FdStream | None,
        stderr: trio.lowlevel.FdStream | None,
    ) -> None:
        self._popen = popen
        self.args = list(args)
        self.pid = popen.pid
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self._pidfd = os.pidfd_open(popen.pid)
        self._wait_lock = trio.Lock()

    def __repr__(self) -> str:
        return f"<ChildProcess {self.pid} {self.args[0]} returncode={self.returncode}>"

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    def exited(self) -> bool:
        """Whether the child has exited, without reaping it (``wait`` does that)."""
        if self._popen.returncode is not None:
            return True
        flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
        return os.waitid(os.P_PIDFD, self._pidfd, flags) is not None

    async def wait(self) -> int:
        """Wait for the child to exit and reap it; its exit code, or -signal."""
        async with self._wait_lock:
            if self._popen.returncode is None:
                await trio.lowlevel.wait_readable(self._pidfd)
                self._popen.wait()  # it has exited: this reaps it without blocking
                os.close(self._pidfd)
        return self._popen.returncode

    def send_signal(self, sig: int) -> None:
        if self._popen.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    async def stop(self, grace: float = 0.0) -> None:
        """Stop the child (SIGTERM, then SIGKILL after ``grace``) and reap it.

        Idempotent; runs shielded so that cancellation cannot leave a child behind.
        """
        with trio.CancelScope(shield=True):
            if grace > 0:
                self.send_signal(signal.SIGTERM)
                with trio.move_on_after(grace):
                    await self.wait()
            self.send_signal(signal.SIGKILL)
            await self.wait()

    async def aclose(self) -> None:
        """Stop the child and close our ends of its pipes (no task may still use them)."""
        with trio.CancelScope(shield=True):
            await self.stop()
            for stream in (self.stdin, self.stdout, self.stderr):
                if stream is not None:
                    await stream.aclose()


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    preexec: Callable[[], None] | None = None,
    stdin: bool = False,
    stdout: bool = False,
    stderr: bool = False,
    pass_fds: Sequence[int] = (),
) -> ChildProcess:
    """Start ``argv`` from the calling (main) thread; LaunchError if it cannot start.

    Pipes that are not asked for are connected to /dev/null.
    """
    ends: list[tuple[int, int] | None] = [
        os.pipe2(os.O_CLOEXEC) if wanted else None for wanted in (stdin, stdout, stderr)
    ]
    child_ends = [
        (pair[0] if index == 0 else pair[1]) if pair else subprocess.DEVNULL
        for index, pair in enumerate(ends)
    ]
    try:
        popen = subprocess.Popen(
            list(argv),
            stdin=child_ends[0],
            stdout=child_ends[1],
            stderr=child_ends[2],
            env=dict(env) if env is not None else None,
            cwd=cwd,
            preexec_fn=preexec,
            pass_fds=tuple(pass_fds),
        )
    except (OSError, subprocess.SubprocessError) as exc:
        for pair in ends:
            if pair:
                os.close(pair[0])
                os.close(pair[1])
        raise LaunchError(f"cannot start {argv[0]}: {exc}", argv=list(argv)) from exc
    log.debug("spawned pid %d: %s", popen.pid, " ".join(argv))
    for index, pair in enumerate(ends):
        if pair:
            os.close(pair[0] if index == 0 else pair[1])
    ours = [
        trio.lowlevel.FdStream(pair[1] if index == 0 else pair[0]) if pair else None
        for index, pair in enumerate(ends)
    ]
    return ChildProcess(argv, popen, *ours)


class LogTail:
    """The last lines a child wrote to a stream, for error messages and the debug log."""

    def __init__(
        self, logger: logging.Logger | logging.LoggerAdapter[logging.Logger], lines: int = 40
    ) -> None:
        self._logger = logger
        self._lines: collections.deque[str] = collections.deque(maxlen=lines)

    async def pump(self, stream: trio.abc.ReceiveStream) -> None:
        """Read ``stream`` to its end, keeping its last lines."""
        partial = b""
        async for data in stream:
            *lines, partial = (partial + data).split(b"\n")
            for line in lines:
                self.add(line.decode(errors="replace"))
            if len(partial) > 4096:
                self.add(partial.decode(errors="replace"))
                partial = b""
        if partial:
            self.add(partial.decode(errors="replace"))

    def add(self, line: str) -> None:
        self._lines.append(line)
        self._logger.debug("%s", line)

    def text(self) -> str:
        return "\n".join(self._lines)
