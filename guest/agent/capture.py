"""What flows through a stage's pipes: its output, streamed to the host up to the cap,
and its stdin, fed without ever blocking the agent."""

from __future__ import annotations

import codecs
import os
import select

from .common import CHUNK

TYPE_CHECKING = False  # typing costs every sandbox its import
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

# Streamed stdin the agent holds for a program that has not read it yet, at most.
STDIN_BACKLOG = 1024 * 1024


class Capture:
    """One output stream of a process: streams its prefix up to the cap to the host,
    which keeps it (the agent keeps nothing: its memory is the program's budget too)."""

    def __init__(self, name: str, cap: int, emit: Callable[[str, str], None]) -> None:
        self.name = name
        self.cap = cap
        self.size = 0
        self.truncated = False
        self._emit = emit
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, chunk: bytes) -> bool:
        """Pass on what fits; return False once the stream went over its cap."""
        room = self.cap - self.size
        kept = chunk[: max(room, 0)]
        if kept:
            self.size += len(kept)
            text = self._decoder.decode(kept)
            if text:
                self._emit(self.name, text)
        if len(chunk) > room:
            self.truncated = True
            self.finish()
            return False
        return True

    def finish(self) -> None:
        """The stream ended: pass on what an unfinished UTF-8 sequence decodes to."""
        tail = self._decoder.decode(b"", final=True)
        if tail:
            self._emit(self.name, tail)


class StageOutcome:
    """What happened to one process run (compile or run stage)."""

    def __init__(self) -> None:
        self.exit_code: int | None = None
        self.signal: int | None = None
        self.timed_out = False
        self.cpu_limited = False  # the stage's processes together used up the CPU time
        self.output_limited: str | None = None  # the stream that went over its cap
        self.oom_killed = False  # seen by the agent's own cgroup (in a VM)
        self.captures: dict[str, Capture] = {}
        self.wall = 0.0
        self.cpu = 0.0
        self.memory_bytes = 0

    def record(self) -> dict[str, Any]:
        return {
            "exit_code": self.exit_code,
            "signal": self.signal,
            "truncated": {name: c.truncated for name, c in self.captures.items()},
            "time": round(self.wall, 6),
        }


class StdinWriter:
    """The program's stdin, written by the run loop whenever the pipe has room, so that a
    program that does not read it cannot block the agent: the job's stdin first, then
    what the host streams. It is ``full`` when the host should wait (the run loop then
    stops reading the channel, and the host's side holds the rest)."""

    def __init__(self, fd: int, poller: select.poll, owned: bool = True) -> None:
        """``fd`` is closed once all is written, if ``owned``; -1: a process without a
        stdin pipe, to which nothing is written."""
        self._fd = fd
        self._owned = owned
        self._poller = poller
        self._pending = bytearray()
        self._eof = self.finished = fd < 0
        self._watched = False
        if fd >= 0:
            os.set_blocking(fd, False)

    @property
    def full(self) -> bool:
        return len(self._pending) >= STDIN_BACKLOG

    def owns(self, fd: int) -> bool:
        return self._watched and fd == self._fd

    def feed(self, data: bytes) -> None:
        if not self._eof:
            self._pending += data
            self._update()

    def close(self) -> None:
        """No more input: the pipe closes once what is pending is written."""
        self._eof = True
        self._update()

    def abandon(self) -> None:
        """The stage is over: drop what the program did not read."""
        self._pending.clear()
        self.close()

    def write(self) -> None:
        try:
            written = os.write(self._fd, self._pending[:CHUNK])
        except BlockingIOError:
            return
        except OSError:  # the program closed its stdin: it wants no more
            self._pending.clear()
            self._eof = True
        else:
            del self._pending[:written]
        self._update()

    def _update(self) -> None:
        if self.finished:
            return
        wanted = bool(self._pending)
        if wanted != self._watched:
            if wanted:
                self._poller.register(self._fd, select.POLLOUT)
            else:
                self._poller.unregister(self._fd)
            self._watched = wanted
        if self._eof and not self._pending:
            self.finished = True
            if self._owned:
                os.close(self._fd)
