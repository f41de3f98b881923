"""A job run without an agent: the namespaces jail's PID 1 is the reaper
(guest/reaper.c), which started the warm runtime, and the daemon does what the agent
would for a job that fits that runtime. Such a job costs the jail and the program's own
interpreter, not a second one for the agent (about 12 ms of CPU per job).

The steps are the agent's (guest/agent/warm.py, stage.py): the runtime's rlimits set
(from inside the jail, by the reaper), the files written as the job's uid, its source
put in place of the FIFO last and written to it, stdin fed, output captured up to its
cap and streamed, wall time watched; the outcome classified and the record made by the
agent's own code (guest.agent.capture, guest.agent.job), so both paths give the same
record. A job that
does not fit has the reaper exec the agent (:meth:`DirectRuntime.become_agent`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import select
import socket
import struct
import termios
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import trio

from guest.agent.capture import Capture, StageOutcome
from guest.agent.common import CHUNK, JobError
from guest.agent.files import Workdir
from guest.agent.job import classify, failed_result, run_result
from guest.agent.limits import job_rlimits
from guest.agent.warm import has_coding_cookie
from sandboxd.agent_link import OutputHandler, StageHandler, Transcript, WarmRuntime
from sandboxd.errors import AgentError, LaunchError
from sandboxd.host import proc
from sandboxd.stdin_stream import StdinStream

# The reaper's records: type, pid, wait status, utime and stime (µs), maxrss (KiB).
RECORD = struct.Struct("<c3xiiqqq")
# Its rlimits message: "L" and a count, then each (resource, soft, hard).
LIMITS, LIMIT = struct.Struct("<c3xi"), struct.Struct("<i4xQQ")
# A direct job's files, its source included, in all. The daemon writes them (and the
# source through the FIFO), so their memory is charged to its cgroup, not the job's:
# a job with more goes to the agent.
MAX_FILE_BYTES = 1024 * 1024
# After the program is killed, how long to wait for pipes a stray process might hold.
DRAIN_GRACE = 2.0
HANDOFF_TIMEOUT = 5.0  # for the reaper to exec the agent
_libc = ctypes.CDLL(None)  # setfsuid, setfsgid


RLimits = list[tuple[int, tuple[int, int]]]  # (resource, (soft, hard)), as job_rlimits


def first_rlimits(limits: dict[str, Any]) -> RLimits:
    """The rlimits of a job with ``limits``: a warm runtime's, until a job sets its own."""
    return job_rlimits(limits, float(limits["cpu_time"]))


def queue_first_rlimits(control: socket.socket, rlimits: RLimits) -> None:
    """Queue ``rlimits`` to a reaper not started yet, on the daemon's end of its socket:
    its first message, which it applies to the runtime before it reports it started."""
    control.send(_limits_message(rlimits))


def _limits_message(rlimits: RLimits) -> bytes:
    message = LIMITS.pack(b"L", len(rlimits))
    return message + b"".join(LIMIT.pack(which, *values) for which, values in rlimits)


def fits(job: dict[str, Any], warm: WarmRuntime) -> bool:
    """Whether ``job`` is what the warm runtime ``warm`` runs as it is: its command
    without arguments, no compile step, no cell, its source in UTF-8 without an
    encoding cookie (CPython seeks in such a file; a FIFO cannot), as WarmRuntime.serves
    asks in the agent; and its files no larger than MAX_FILE_BYTES in all."""
    run, files = job["run"], job["files"]
    if job.get("compile") or "cell" in run:
        return False
    if run["argv"] != warm["argv"] or job.get("env") != warm["env"]:
        return False
    main = [f for f in files if f["path"] == warm["source"]]
    return (
        len(main) == 1
        and main[0].get("encoding", "utf-8") == "utf-8"
        and not has_coding_cookie(main[0]["content"].encode())
        and sum(len(f["content"]) for f in files) <= MAX_FILE_BYTES
    )


class DirectRuntime:
    """The daemon's end of one jail's reaper and of the warm runtime it started: the
    control socket and the runtime's stdin, stdout and stderr."""

    def __init__(
        self,
        warm: WarmRuntime,
        control: trio.socket.SocketType,
        pipes: tuple[int, int, int],
        jail_pid: Callable[[], int],
        owner: int,
        workdir: str,
        rlimits: RLimits,
    ) -> None:
        """``rlimits``: what the runtime starts with, queued to the reaper
        (:func:`queue_first_rlimits`)."""
        self.warm = warm
        self.control = control
        self.stdin, self.stdout, self.stderr = (trio.lowlevel.FdStream(fd) for fd in pipes)
        self._jail_pid = jail_pid  # the host pid of the jail's PID 1 (the reaper)
        self.owner = owner  # the host uid of the jail's files
        self.workdir = workdir  # where they go, in the jail
        self.root = ""  # that directory as the host reaches it, once the reaper runs
        self.rlimits = rlimits  # the runtime's, as set

    async def _record(self) -> tuple[bytes, int, float, int]:
        """The reaper's next record: its type, a wait status, CPU seconds, memory bytes."""
        try:
            data = await self.control.recv(RECORD.size)
        except OSError as exc:
            raise AgentError(f"the jail's PID 1 went away: {exc}") from exc
        if len(data) != RECORD.size:
            raise AgentError("the jail's PID 1 went away")
        kind, _, status, utime, stime, maxrss = RECORD.unpack(data)
        return kind, status, (utime + stime) / 1e6, maxrss * 1024

    async def _send(self, message: bytes) -> None:
        try:
            await self.control.send(message)
        except OSError as exc:
            raise AgentError(f"the jail's PID 1 went away: {exc}") from exc

    async def started(self) -> None:
        """Wait for the reaper to have started the runtime with the rlimits queued for
        it (:func:`first_rlimits`): a job with those then waits for no answer of the
        reaper's before its source goes in (the sandbox is ready)."""
        kind, error, _, _ = await self._record()
        if kind != b"R":
            raise AgentError(f"the jail's PID 1 sent {kind!r} before it started the runtime")
        if error:
            raise AgentError(f"cannot limit the warm runtime: {os.strerror(error)}")
        try:
            self.root = f"/proc/{self._jail_pid()}/root{self.workdir}"
        except LaunchError as exc:
            raise AgentError(exc.message) from exc

    async def become_agent(self) -> None:
        """Have the reaper kill the runtime and exec the agent (its channel is the jail's
        stdin and stdout, as for a jail started with the agent)."""
        try:
            await self._send(b"A")
            # Until its exec closes its end, reading what it sent before (an answer to
            # rlimits that came after an exit): a socket closed with unread data resets
            # its peer, whose next read would then fail before it reads "A".
            with trio.move_on_after(HANDOFF_TIMEOUT):
                while await self.control.recv(RECORD.size):
                    pass
        except OSError as exc:
            raise AgentError(f"the jail's PID 1 went away: {exc}") from exc
        finally:
            self.close()

    def close(self) -> None:
        self.control.close()
        for stream in (self.stdin, self.stdout, self.stderr):
            stream.close()

    async def run(
        self,
        job: dict[str, Any],
        on_output: OutputHandler,
        transcript: Transcript,
        stdin: StdinStream | None,
        on_stage: StageHandler | None,
        kill_program: Callable[[], None],
    ) -> dict[str, Any] | None:
        """Run a job that :func:`fits` the runtime and that it took (:meth:`take`); its
        record, as the agent makes it. None if the runtime died waiting after all (its
        exit came before it read the job's source: the job then goes to the agent,
        cold). AgentError if the jail's PID 1 goes away first."""
        try:
            workdir, staged, source_text = self._write_files(job)
            published = self._publish(workdir, staged)
        except (OSError, JobError) as exc:
            return failed_result(exc)  # as the agent answers a file it cannot write
        if published is None:
            self._unpublish(workdir, staged)
            return None
        fifo, unread, at_fifo = published
        if on_stage is not None:
            on_stage("run")
        limits = job["limits"]
        outcome = StageOutcome()
        pending: deque[tuple[str, str]] = deque()
        cap = int(limits["output_bytes"])
        outcome.captures = {
            name: Capture(name, cap, lambda stream, data: pending.append((stream, data)))
            for name in ("stdout", "stderr")
        }
        # The source goes into the FIFO now, before any other task of the daemon's runs
        # (the pool's next sandbox, whose start holds the event loop for a millisecond
        # or two): only what the pipe cannot take yet is left to a task.
        fed = _write_now(fifo, source_text)
        source_fed = fed == len(source_text)
        if source_fed:
            os.close(fifo)  # the runtime reads it to its end
        killed = False

        def kill() -> None:
            nonlocal killed
            killed = True
            kill_program()

        async def relay() -> None:
            """Pass on what the captures let through, each piece once, in order."""
            while pending:
                stream, data = pending.popleft()
                transcript.add("run", stream, data)
                await on_output("run", stream, data)

        async def pump(stream: trio.lowlevel.FdStream, name: str) -> None:
            while chunk := await stream.receive_some(CHUNK):
                if not outcome.captures[name].add(chunk) and not killed:
                    outcome.output_limited = name
                    kill()
                await relay()
            stream.close()

        async def feed_source() -> None:
            nonlocal source_fed
            await _feed(trio.lowlevel.FdStream(fifo), source_text[fed:])
            source_fed = True

        start = trio.current_time()
        failure: AgentError | None = None
        try:
            async with trio.open_nursery() as nursery:
                if not source_fed:
                    nursery.start_soon(feed_source)
                stdin_data = str(job.get("stdin") or "").encode()
                nursery.start_soon(_feed, self.stdin, stdin_data, stdin)
                async with trio.open_nursery() as pipes:
                    pipes.start_soon(pump, self.stdout, "stdout")
                    pipes.start_soon(pump, self.stderr, "stderr")
                    try:
                        with trio.move_on_at(start + float(limits["wall_time"])) as wall:
                            status, cpu, memory = await self._exit()
                        if wall.cancelled_caught:
                            outcome.timed_out = True
                            kill()
                            status, cpu, memory = await self._exit()
                    except AgentError as exc:
                        failure = exc  # raised below, not through the nurseries (no group)
                    # Whatever the program left running is dying (the reaper kills it
                    # before it reports the exit; the kernel, if the reaper is gone),
                    # and the pipes close as it goes. What is in them is read to the end, but after
                    # a kill a process that could not be reached may hold them (as the
                    # agent waits, stage.py).
                    if killed:
                        pipes.cancel_scope.deadline = trio.current_time() + DRAIN_GRACE
                nursery.cancel_scope.cancel()  # input nobody read
            # A runtime that waited on its FIFO reads its source from it (see _publish),
            # and Python reads all of it before the first line runs: if some is still
            # in the FIFO, the program never ran.
            never_ran = at_fifo and (not source_fed or _buffered(unread) > 0)
        finally:
            os.close(unread)
        if failure is not None:
            raise failure
        returncode = os.waitstatus_to_exitcode(status)
        if never_ran and returncode < 0 and not killed and _untouched(outcome, stdin):
            return None
        for capture in outcome.captures.values():
            if not capture.truncated:
                capture.finish()
        await relay()
        outcome.wall = trio.current_time() - start
        outcome.cpu, outcome.memory_bytes = cpu, memory
        if returncode < 0:
            outcome.signal = -returncode
        else:
            outcome.exit_code = returncode
        status_name, message = classify(outcome, "run", limits)
        return {"type": "result", **run_result(outcome, status_name, message, warm=True)}

    async def take(self, limits: dict[str, Any]) -> bool:
        """Have the runtime's rlimits be those of a job that :func:`fits` it (before its
        program's first line); False if the runtime died waiting (its exit came first:
        the job then goes to the agent, cold). AgentError if that fails."""
        rlimits = first_rlimits(limits)
        if rlimits != self.rlimits:
            return await self._limit(rlimits)
        return not self._exit_reported() or await self._limit(rlimits)

    def _exit_reported(self) -> bool:
        """Whether the reaper has sent something not read yet: the runtime's exit, once
        it is waiting."""
        pending = select.poll()
        pending.register(self.control.fileno(), select.POLLIN)
        return bool(pending.poll(0))

    async def _limit(self, rlimits: RLimits) -> bool:
        """Have the reaper set the runtime's ``rlimits``; False if its exit came first."""
        await self._send(_limits_message(rlimits))
        kind, error, _, _ = await self._record()
        if kind == b"X":
            return False
        if kind != b"L":
            raise AgentError(f"the jail's PID 1 answered the rlimits with {kind!r}")
        if error:
            raise AgentError(f"cannot limit the warm runtime: {os.strerror(error)}")
        self.rlimits = rlimits
        return True

    def _publish(self, workdir: Workdir, staged: str) -> tuple[int, int, bool] | None:
        """Put the staged source in place of the FIFO; the FIFO to write the source to,
        a reader of it that reads nothing (to see what is left unread in it), and
        whether the runtime was waiting on the FIFO. If it was, it holds the FIFO, not
        the file that replaces it, and reads its source from us; one still starting
        opens the FIFO or that file, whichever is there then. None if the runtime is
        dead (it died waiting; its exit is on its way)."""
        with _acting_as(self.owner):
            root = os.open(workdir.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            opened: list[int] = []
            try:
                name = self.warm["source"]
                flags = os.O_NONBLOCK | os.O_NOFOLLOW
                at_fifo = True
                try:
                    # A non-blocking writer opens a FIFO only while a reader has it: the
                    # runtime, blocked opening it.
                    opened.append(os.open(name, os.O_WRONLY | flags, dir_fd=root))
                except OSError as exc:
                    if exc.errno != errno.ENXIO:
                        raise
                    if not self._runtime_alive():
                        return None
                    at_fifo = False
                    opened.append(os.open(name, os.O_RDWR | flags, dir_fd=root))
                opened.append(os.open(name, os.O_RDONLY | flags, dir_fd=root))
                # The source appears last: a runtime slower than its job opens it at once.
                os.rename(staged, name, src_dir_fd=root, dst_dir_fd=root)
            except OSError:
                for fd in opened:
                    os.close(fd)
                raise
            finally:
                os.close(root)
        fifo, unread = opened
        return fifo, unread, at_fifo

    def _runtime_alive(self) -> bool:
        """Whether the runtime (the jail's PID 1's child) lives and will go on: not
        reaped, a zombie nor dying (:func:`proc.ending`). True if that cannot be known
        (a kernel without /proc's children)."""
        try:
            reaper = self._jail_pid()
        except LaunchError:
            return False  # the whole jail is gone
        children = proc.children(reaper)
        if children is None:
            return True
        return not all(proc.ending(child) for child in children)

    def _unpublish(self, workdir: Workdir, staged: str) -> None:
        """Remove the staged source of a job that goes to the agent instead."""
        with _acting_as(self.owner), contextlib.suppress(OSError):
            os.unlink(os.path.join(workdir.path, staged))

    def _write_files(self, job: dict[str, Any]) -> tuple[Workdir, str, bytes]:
        """Write the job's files, its source beside the FIFO (:meth:`_publish` puts it
        in place); the working directory, where the source is, and the source."""
        source_name = self.warm["source"]
        source = next(f for f in job["files"] if f["path"] == source_name)
        content = source["content"].encode()
        workdir = Workdir(self.root)
        staged = f".{source_name}.sandboxd"
        # Written as the job's uid, as the agent writes them: the jail's tmpfs takes no
        # file of a uid its user namespace does not map (root's, EOVERFLOW).
        with _acting_as(self.owner):
            workdir.write_all([f for f in job["files"] if f is not source])
            workdir.write(staged, content)
        return workdir, staged, content

    async def _exit(self) -> tuple[int, float, int]:
        kind, status, cpu, memory = await self._record()
        if kind != b"X":
            raise AgentError(f"the jail's PID 1 sent {kind!r}, not the runtime's exit")
        return status, cpu, memory


@contextmanager
def _acting_as(uid: int) -> Iterator[None]:
    """Touch files as ``uid`` (and its gid) on this thread only: the fs ids, which
    setfsuid changes for the calling thread alone (the daemon's others stay root)."""
    _libc.setfsuid(uid)
    _libc.setfsgid(uid)
    try:
        yield
    finally:
        _libc.setfsgid(0)
        _libc.setfsuid(0)


def _write_now(fd: int, data: bytes) -> int:
    """Write what the non-blocking pipe ``fd`` takes of ``data`` at once; how much."""
    written = 0
    with contextlib.suppress(BlockingIOError):
        while written < len(data):
            written += os.write(fd, data[written:])
    return written


def _buffered(fd: int) -> int:
    """How many bytes the pipe ``fd`` holds unread."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]


def _untouched(outcome: StageOutcome, stdin: StdinStream | None) -> bool:
    """Whether a run left nothing that running it again would lose or repeat: no
    output, and no streamed input taken."""
    return all(c.size == 0 for c in outcome.captures.values()) and not (stdin and stdin.taken)


async def _feed(
    stream: trio.lowlevel.FdStream, data: bytes, more: StdinStream | None = None
) -> None:
    """Write ``data`` (and then what the client streams, if ``more``) and close: the
    program's stdin, or its source through the FIFO."""
    try:
        if data:
            await stream.send_all(data)
        if more is not None:
            async for piece, eof in more:
                await stream.send_all(piece.encode())
                if eof:
                    break
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # it closed its end: it wants no more
    finally:
        await stream.aclose()
