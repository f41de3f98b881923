#!/usr/bin/env python3
"""sandboxd's guest agent: runs exactly one job inside a sandbox and reports on it.

It runs on the image's own python3 and uses only the standard library. Every backend
starts it the same way; only the channel differs (the jail's stdin/stdout pipes, a
virtio-serial port or vsock), and it never needs a network interface.

Wire protocol: one JSON object per line, UTF-8, in both directions.

    host → agent   {"type": "sync", "nonce": N, "entropy": base64, "time": unix seconds,
                    "warm": {"argv": [...], "env": {...}, "source": "main.py"} | null}
    agent → host   {"type": "hello", "protocol": 1, "pid": N, "nonce": N}
                   (a VM restored from a snapshot meets a new host: it syncs again,
                   reseeding its random pool and setting its clock from the host's;
                   the warm runtime, if any, starts after that: see WarmRuntime)
    host → agent   {"type": "job",
                    "files":  [{"path": "main.py", "content": "...", "encoding": "utf-8"|"base64"}],
                    "compile": {"argv": [...], "file_size_bytes": n} | null,
                    "run":     {"argv": [...]},
                    "env":    {"NAME": "value"},
                    "stdin":  "...",
                    "stdin_stream": false,    (true: stdin stays open for "stdin" messages)
                    "limits": {"wall_time": s, "cpu_time": s, "compile_time": s,
                               "memory_bytes": n, "processes": n, "output_bytes": n,
                               "file_size_bytes": n}}
    host → agent   {"type": "stdin", "data": "...", "eof": bool}  (during the run, if streamed)
    agent → host   {"type": "stage", "stage": "compile"|"run"}     (as each stage starts)
    agent → host   {"type": "output", "stage": "compile"|"run", "stream": "stdout"|"stderr",
                    "data": "..."}                                   (any number of these)
    agent → host   {"type": "result", "status": ..., "message": ..., "exit_code": n|null,
                    "signal": n|null, "truncated": {"stdout": bool, "stderr": bool},
                    "compile": {"exit_code", "signal", "truncated", "time"}|null,
                    "timings": {"compile": s, "run": s},
                    "usage": {"cpu_time": s, "memory_bytes": n},
                    "warm": bool}  (the run was the warm runtime's)

The agent exits after the result: a sandbox serves one job. Output is streamed as it is
produced, up to ``output_bytes`` per stream (the prefix); a program that writes more is
stopped. The host keeps what was streamed: the result does not carry it again, and the
agent holds none of it (its memory counts against the job's). With ``--isolated`` the
agent knows it is alone in its pid namespace (it is PID 1 there) and removes every
process the program left behind.
"""

from __future__ import annotations

# Each sandbox starts this afresh: only what serving a job needs is imported at start
# (no argparse, subprocess or typing; what only VMs or some jobs use, where it is used).
# json, signal, selectors, contextlib and ctypes would pull in re, enum, collections,
# functools and more, some 15 ms of CPU per sandbox together: their C halves do.
import _ctypes
import _json
import _signal as signal
import codecs
import math
import os
import resource
import select
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import IO, Any

PROTOCOL = 1
CHUNK = 65536
# Streamed stdin the agent holds for a program that has not read it yet, at most.
STDIN_BACKLOG = 1024 * 1024
CPU_CHECK_MIN = 0.02  # seconds between looks at the job's CPU time, at least
# Every signal the program could send to the agent: ignored, as PID 1 must (SIGCHLD has
# a handler of its own; SIGKILL and SIGSTOP cannot be caught, nor sent by the program).
IGNORED_SIGNALS = sorted(
    set(signal.valid_signals()) - {signal.SIGCHLD, signal.SIGKILL, signal.SIGSTOP}
)
# After the program is killed, how long to wait for pipes that a stray process might hold.
DRAIN_GRACE = 2.0
BASE_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/tmp",
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
}


class ignoring:  # named and used as contextlib.suppress is
    """contextlib.suppress, without what contextlib imports."""

    def __init__(self, *errors: type[BaseException]) -> None:
        self.errors = errors

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> bool:
        return kind is not None and issubclass(kind, self.errors)


class JobError(Exception):
    """The job cannot be carried out (bad message, a file that cannot be written)."""


class _StandardJson:
    """What json's C scanner reads of a decoder: plain JSON, as json.loads parses it."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}.__getitem__


def _unserializable(value: object) -> None:
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


_scan_json = _json.make_scanner(_StandardJson())  # type: ignore[arg-type]  # duck-typed: it reads these attributes only
# As json.dumps(ensure_ascii=False, separators=(",", ":")) encodes.
_encode_json = _json.make_encoder(
    None, _unserializable, _json.encode_basestring, None, ":", ",", False, False, True
)


def to_json(value: object) -> str:
    return "".join(_encode_json(value, 0))


def from_json(data: bytes) -> object:
    """A JSON document; ValueError if it is not one."""
    text = data.decode().strip()
    try:
        value, end = _scan_json(text, 0)
    except StopIteration as exc:
        raise ValueError(f"not JSON at character {exc.value}") from None
    if end != len(text):
        raise ValueError(f"extra data after JSON at character {end}")
    return value


class Channel:
    """The agent's line-delimited JSON link to the host, read from a raw fd so that the
    run loop can also wait for host messages (streamed stdin) with its poll."""

    def __init__(self, read_fd: int, writer: IO[bytes]) -> None:
        self.fd = read_fd
        self._writer = writer
        self._buffer = b""
        self.closed = False

    def send(self, message: dict[str, Any]) -> None:
        self._writer.write(to_json(message).encode() + b"\n")
        self._writer.flush()

    def _parse(self, line: bytes) -> dict[str, Any]:
        message = from_json(line)
        if not isinstance(message, dict):
            raise JobError("a message from the host was not a JSON object")
        return message

    def receive(self) -> dict[str, Any] | None:
        """The next message, waiting for it; None once the host closed the channel."""
        while b"\n" not in self._buffer:
            data = os.read(self.fd, CHUNK)
            if not data:
                self.closed = True
                return self._parse(self._buffer) if self._buffer.strip() else None
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return self._parse(line)

    def receive_ready(self, read: bool = True) -> list[dict[str, Any]]:
        """The complete messages buffered, after one read if the fd polled readable."""
        if read:
            data = os.read(self.fd, CHUNK)
            if not data:
                self.closed = True
            self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        return [self._parse(line) for line in lines if line.strip()]


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


class Confinement:
    """Where the program runs beyond its rlimits. In a jail the host holds the cgroup and
    the uid, so there is nothing more to do here."""

    def prepare(self, workdir: str, limits: dict[str, Any]) -> None:
        """Before a stage: set the stage's limits."""

    def enter(self) -> None:
        """In the program's process, before it starts (pre-exec)."""

    def oom_kills(self) -> int:
        return 0

    def cpu_seconds(self) -> float | None:
        """CPU time used so far by every process of the job, where the agent can see
        it; None in a jail, whose cgroup the host watches."""
        return None


class VmConfinement(Confinement):
    """As PID 1 of a VM the agent is root: the program gets a cgroup of its own for
    memory and processes, and runs as an unprivileged uid."""

    CGROUP = "/sys/fs/cgroup/job"
    UID = 65534

    def __init__(self, memory_reserve: int) -> None:
        self.memory_reserve = memory_reserve
        if not os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
            os.makedirs("/sys/fs/cgroup", exist_ok=True)
            _mount("cgroup2", "/sys/fs/cgroup", "cgroup2")
        with open("/sys/fs/cgroup/cgroup.subtree_control", "w") as control:
            control.write("+memory +pids")
        os.makedirs(self.CGROUP, exist_ok=True)

    def prepare(self, workdir: str, limits: dict[str, Any]) -> None:
        os.chown(workdir, self.UID, self.UID)
        for entry in os.listdir(workdir):
            os.chown(os.path.join(workdir, entry), self.UID, self.UID, follow_symlinks=False)
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        memory = min(int(limits["memory_bytes"]), max(total - self.memory_reserve, 2**24))
        for name, value in (
            ("memory.max", memory),
            ("memory.swap.max", 0),
            ("pids.max", int(limits["processes"])),
        ):
            path = os.path.join(self.CGROUP, name)
            if os.path.exists(path):
                with open(path, "w") as control:
                    control.write(str(value))

    def enter(self) -> None:
        with open(os.path.join(self.CGROUP, "cgroup.procs"), "w") as procs:
            procs.write(str(os.getpid()))
        os.setgroups([])
        os.setresgid(self.UID, self.UID, self.UID)
        os.setresuid(self.UID, self.UID, self.UID)

    def oom_kills(self) -> int:
        return self._counter("memory.events", "oom_kill")

    def cpu_seconds(self) -> float:
        return self._counter("cpu.stat", "usage_usec") / 1e6

    def _counter(self, name: str, key: str) -> int:
        # As sandboxd.host.cgroups reads it on the host: the agent ships alone, stdlib only.
        try:
            with open(os.path.join(self.CGROUP, name)) as counters:
                for line in counters:
                    found, _, value = line.partition(" ")
                    if found == key:
                        return int(value)
        except OSError:
            pass
        return 0


def _mount(source: str, target: str, fstype: str) -> None:
    import ctypes  # in a VM only

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(source.encode(), target.encode(), fstype.encode(), 0, None) != 0:
        raise OSError(ctypes.get_errno(), f"mount {fstype} on {target}")


def cpu_rlimit(cpu_time: float) -> tuple[int, int]:
    """RLIMIT_CPU for a CPU-time limit: SIGXCPU at the soft limit, SIGKILL a second later."""
    soft = max(1, int(cpu_time + 0.999))
    return soft, soft + 1


def cpu_time_of(pid: int) -> float:
    """The CPU time a process has used so far (utime + stime), in seconds; 0 if it is
    gone (its run then reports how it ended)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def job_rlimits(limits: dict[str, Any], cpu_time: float) -> list[tuple[int, tuple[int, int]]]:
    """The rlimits a stage's process runs under."""
    size = int(limits["file_size_bytes"])
    nproc = int(limits["processes"])
    return [
        (resource.RLIMIT_CPU, cpu_rlimit(cpu_time)),
        (resource.RLIMIT_FSIZE, (size, size)),
        (resource.RLIMIT_NPROC, (nproc, nproc)),
        (resource.RLIMIT_CORE, (0, 0)),
    ]


def _confine(
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
    argv: list[str], *, cwd: str, env: dict[str, str], preexec: Callable[[], None]
) -> tuple[int, int, int, int]:
    """Start ``argv`` in a new session with pipes for its stdin, stdout and stderr, after
    ``preexec`` in the child; (pid, stdin, stdout, stderr) or JobError if it cannot
    start. (subprocess would cost every sandbox its import; the agent has one thread.)"""
    stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
    stdout_r, stdout_w = os.pipe2(os.O_CLOEXEC)
    stderr_r, stderr_w = os.pipe2(os.O_CLOEXEC)
    report_r, report_w = os.pipe2(os.O_CLOEXEC)  # the child's exec error, if any
    pid = os.fork()
    if pid == 0:  # the child: nothing here may return
        try:
            for fd, target in ((stdin_r, 0), (stdout_w, 1), (stderr_w, 2)):
                os.dup2(fd, target)
            os.closerange(3, report_w)
            os.closerange(report_w + 1, 1 << 16)
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


class StdinWriter:
    """The program's stdin, written by the run loop whenever the pipe has room, so that a
    program that does not read it cannot block the agent: the job's stdin first, then
    what the host streams. It is ``full`` when the host should wait (the run loop then
    stops reading the channel, and the host's side holds the rest)."""

    def __init__(self, fd: int, poller: select.poll) -> None:
        self._fd = fd
        os.set_blocking(fd, False)
        self._poller = poller
        self._pending = bytearray()
        self._eof = False
        self._watched = False
        self.finished = False

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
            os.close(self._fd)


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
                continue
            self.exits[pid] = (status, usage)
        return self.exits.pop(pid)


def _kill_group(pid: int) -> None:
    with ignoring(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


Process = tuple[int, int, int, int]  # (pid, stdin, stdout, stderr) as spawn returns them


def _has_coding_cookie(source: bytes) -> bool:
    """Whether the first two lines may declare an encoding (PEP 263): CPython then seeks
    in its source file, which a FIFO cannot do."""
    return any(
        line.lstrip().startswith(b"#") and b"coding" in line for line in source.split(b"\n", 2)[:2]
    )


class WarmRuntime:
    """The job's own command started before the job comes, waiting for its source.

    For ``python3 main.py`` the agent makes ``main.py`` a FIFO and starts the command at
    once: the interpreter starts up as it always does (sys.argv, sys.path, the modules a
    fresh interpreter imports, its own hash seed) and blocks reading the FIFO. A job
    that runs exactly that command gets it: its other files are written, its rlimits
    set on the process, then its real source file replaces the FIFO (so tracebacks and
    the program's own reads find it) and the source is written to the FIFO. Nothing of
    the agent runs in that process, so the program cannot tell it apart from a cold
    start but by its clock. Any other job (other command, arguments, a compile step)
    gets a cold start after this process is killed. The Runner holds a runtime until a
    job takes or discards it; then the job's run owns it.
    """

    def __init__(
        self, spec: dict[str, Any], workdir: str, confinement: Confinement, reaper: Reaper
    ) -> None:
        self.argv = [str(arg) for arg in spec["argv"]]
        self.env = {**BASE_ENV, **{str(k): str(v) for k, v in spec.get("env", {}).items()}}
        self.source = str(spec["source"])
        if "/" in self.source or self.source in ("", ".", ".."):
            raise JobError(f"refusing warm source path {self.source!r}")
        self.workdir = workdir
        self.reaper = reaper
        self.path = os.path.join(workdir, self.source)
        os.mkfifo(self.path, 0o644)
        # Open for reading and writing: the runtime's open never blocks, and what the
        # agent writes stays in the FIFO however little of it the runtime has read.
        self.fifo = os.open(self.path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        self.process = spawn(
            self.argv, cwd=workdir, env=self.env, preexec=_confine(confinement, [])
        )
        self.content = b""  # the source of the job that took it

    def serves(self, argv: list[str], env: dict[str, str], files: list[dict[str, Any]]) -> bool:
        """Whether a job that runs ``argv`` with ``env`` and ``files`` can take it."""
        if argv != self.argv or env != self.env:
            return False
        self.reaper.reap()
        if self.process[0] in self.reaper.exits:
            return False  # it died waiting (the log of the next job will not say why)
        main = [f for f in files if f.get("path") == self.source]
        return (
            len(main) == 1
            and main[0].get("encoding", "utf-8") == "utf-8"
            and not _has_coding_cookie(str(main[0].get("content", "")).encode())
        )

    def take(self, files: list[dict[str, Any]]) -> None:
        """Write the job's files for the waiting process: all but its source, and that
        beside the FIFO, to :meth:`publish` once the process's limits are set. A runtime
        slower to start than its job opens the real file, not the FIFO, and runs at
        once: nothing may be missing or unlimited by then."""
        source = next(f for f in files if f.get("path") == self.source)
        write_files(self.workdir, [f for f in files if f is not source])
        write_files(self.workdir, [{"path": self._staged, "content": source["content"]}])
        self.content = str(source["content"]).encode()

    @property
    def _staged(self) -> str:
        return f".{self.source}.sandboxd"

    def publish(self) -> tuple[int, bytes]:
        """Put the source file in place of the FIFO; the FIFO and what to write to it
        (the caller's now), for a process that opened the FIFO first."""
        os.rename(os.path.join(self.workdir, self._staged), self.path)
        return self.fifo, self.content

    def discard(self) -> None:
        """Kill the waiting process (a job that cannot take it): a cold start follows."""
        pid, *fds = self.process
        _kill_group(pid)
        self.reaper.wait(pid)
        for fd in (*fds, self.fifo):
            os.close(fd)
        os.unlink(self.path)


class Runner:
    """Runs processes for one job under its limits, reporting output as it comes."""

    def __init__(self, workdir: str, isolated: bool, confinement: Confinement) -> None:
        self.workdir = workdir
        self.isolated = isolated
        self.confinement = confinement
        self.reaper = Reaper()
        self.channel: Channel | None = None  # the host's, while serving
        self.warm: WarmRuntime | None = None

    def start_warm(self, spec: dict[str, Any] | None) -> None:
        """(Re)start the warm runtime ``spec`` describes, after each sync: in a VM
        restored from a snapshot, only once the random pool has been reseeded."""
        if self.warm is not None:
            self.warm.discard()
        self.warm = None
        if spec:
            try:
                self.warm = WarmRuntime(spec, self.workdir, self.confinement, self.reaper)
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
        other process but ourselves (what a program detached from its group left)."""
        for target, how in ((pid, os.killpg), (-1, os.kill)):
            if target == -1 and not self.isolated:
                continue
            with ignoring(ProcessLookupError, PermissionError):
                how(target, signal.SIGKILL)

    def _limit_warm(self, pid: int, rlimits: list[tuple[int, tuple[int, int]]]) -> None:
        """Set a warm process's rlimits before its program's first line."""
        try:
            for which, values in rlimits:
                resource.prlimit(pid, which, values)
        except OSError as exc:
            _kill_group(pid)
            self.reaper.wait(pid)
            raise JobError(f"cannot limit the warm runtime: {exc.strerror}") from exc

    def _take_stdin(self, writer: StdinWriter, read: bool = True) -> bool:
        """Pass streamed stdin from the host on to the program; whether more may come."""
        assert self.channel is not None
        for message in self.channel.receive_ready(read):
            if message.get("type") != "stdin":
                raise JobError(f"unexpected message during a run: {message.get('type')!r}")
            writer.feed(str(message.get("data", "")).encode())
            if message.get("eof"):
                writer.close()
                return False
        if self.channel.closed:
            writer.close()
            return False
        return True

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
        assert self.channel is not None
        channel = self.channel
        outcome = StageOutcome()

        def emit(stream: str, data: str) -> None:
            channel.send({"type": "output", "stage": stage, "stream": stream, "data": data})

        cap = int(limits["output_bytes"])
        self.confinement.prepare(self.workdir, limits)
        oom_kills = self.confinement.oom_kills()
        cpu_before = self.confinement.cpu_seconds()
        # The host, which may watch the job's CPU time from outside, starts its count.
        channel.send({"type": "stage", "stage": stage})
        start = time.monotonic()
        rlimits = job_rlimits(limits, cpu_time)
        if warm is None:
            process = spawn(
                argv, cwd=self.workdir, env=env, preexec=_confine(self.confinement, rlimits)
            )
        else:
            process = warm.process
            self._limit_warm(process[0], rlimits)
            if cpu_before is not None:
                # As in a cold start (and as its rlimit counts), the runtime's own start
                # is the job's CPU time too.
                cpu_before -= cpu_time_of(process[0])
            fifo, source = warm.publish()
        pid, stdin_fd, stdout_fd, stderr_fd = process
        poller = select.poll()
        writer = StdinWriter(stdin_fd, poller)
        writer.feed(stdin)
        # The warm process's source, through the FIFO, like its stdin.
        source_writer = StdinWriter(fifo, poller) if warm else None
        if source_writer is not None:
            source_writer.feed(source)
            source_writer.close()
        streams = {stdout_fd: "stdout", stderr_fd: "stderr"}
        pipes = set(streams)  # still open
        outcome.captures = {
            "stdout": Capture("stdout", cap, emit),
            "stderr": Capture("stderr", cap, emit),
        }
        for fd in pipes:
            os.set_blocking(fd, False)
            poller.register(fd, select.POLLIN)
        poller.register(self.reaper.fd, select.POLLIN)
        taking_stdin = stream_stdin and not channel.closed
        if taking_stdin:
            taking_stdin = self._take_stdin(writer, read=False)  # what came with the job
        else:
            writer.close()
        listening = False  # to the channel, for streamed stdin
        deadline = start + wall_time
        next_cpu_check = start
        killed_at: float | None = None
        exit_status: tuple[int, resource.struct_rusage] | None = None
        try:
            while pipes or exit_status is None:
                now = time.monotonic()
                if killed_at is None and now >= deadline:
                    outcome.timed_out = True
                    killed_at = now
                    self.kill_all(pid)
                if cpu_before is not None and killed_at is None and now >= next_cpu_check:
                    left = cpu_time - (self.confinement.cpu_seconds() or 0.0) + cpu_before
                    if left <= 0:
                        outcome.cpu_limited = True
                        killed_at = now
                        self.kill_all(pid)
                    # All CPUs busy is the fastest the job can use up what is left.
                    next_cpu_check = now + max(CPU_CHECK_MIN, left / (os.cpu_count() or 1))
                wanted = taking_stdin and not writer.full
                if wanted != listening:
                    if wanted:
                        poller.register(channel.fd, select.POLLIN)
                    else:
                        poller.unregister(channel.fd)
                    listening = wanted
                limit = deadline if killed_at is None else killed_at + DRAIN_GRACE
                if cpu_before is not None and killed_at is None:
                    limit = min(limit, next_cpu_check)
                if now >= limit and killed_at is not None:
                    if exit_status is not None:
                        break  # a process we cannot reach still holds a pipe; stop waiting
                    wait: float | None = None  # killed: only its exit is left to wait for
                else:
                    wait = max(0.0, limit - now)
                for fd, _ in poller.poll(None if wait is None else math.ceil(wait * 1000)):
                    if fd == self.reaper.fd:
                        self.reaper.reap()
                        if exit_status is None and pid in self.reaper.exits:
                            exit_status = self.reaper.exits.pop(pid)
                            # Whatever the program left running dies with it.
                            self.kill_all(pid)
                        continue
                    if fd == channel.fd and listening:
                        taking_stdin = self._take_stdin(writer)
                        continue
                    if writer.owns(fd):
                        writer.write()
                        continue
                    if source_writer is not None and source_writer.owns(fd):
                        source_writer.write()
                        continue
                    if fd not in pipes:
                        continue  # unregistered by an earlier event of this round
                    try:
                        chunk = os.read(fd, CHUNK)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        poller.unregister(fd)
                        pipes.discard(fd)
                        os.close(fd)
                        continue
                    if not outcome.captures[streams[fd]].add(chunk) and killed_at is None:
                        outcome.output_limited = streams[fd]
                        killed_at = time.monotonic()
                        self.kill_all(pid)
        finally:
            writer.abandon()
            if source_writer is not None:
                source_writer.abandon()
            for fd in pipes:
                os.close(fd)
            if exit_status is None:
                self.kill_all(pid)
                exit_status = self.reaper.wait(pid)
        for capture in outcome.captures.values():
            if not capture.truncated:
                capture.finish()
        outcome.wall = time.monotonic() - start
        outcome.oom_killed = self.confinement.oom_kills() > oom_kills
        status, usage = exit_status
        returncode = os.waitstatus_to_exitcode(status)
        cpu_after = self.confinement.cpu_seconds()
        if cpu_before is not None and cpu_after is not None:
            outcome.cpu = cpu_after - cpu_before  # every process of the stage
        else:
            outcome.cpu = usage.ru_utime + usage.ru_stime
        outcome.memory_bytes = usage.ru_maxrss * 1024
        if returncode < 0:
            outcome.signal = -returncode
        else:
            outcome.exit_code = returncode
        return outcome


def _signal_name(number: int) -> str:
    try:
        import signal as names  # only to name one, once

        return names.Signals(number).name
    except ValueError:
        return f"signal {number}"


def classify(outcome: StageOutcome, stage: str, limits: dict[str, Any]) -> tuple[str, str]:
    """The status and a one-line reason for one stage's outcome."""
    if outcome.output_limited:
        return "output_limit", (
            f"{outcome.output_limited} went over the output limit of {limits['output_bytes']} bytes"
        )
    if outcome.oom_killed and outcome.signal == signal.SIGKILL:
        return (
            "memory_limit",
            f"memory limit of {int(limits['memory_bytes']) // 2**20} MiB exceeded",
        )
    cpu_limit = limits["compile_time"] if stage == "compile" else limits["cpu_time"]
    if outcome.cpu_limited:
        return "timeout", f"CPU time limit of {cpu_limit:g} s exceeded"
    if outcome.timed_out:
        limit = limits["compile_time"] if stage == "compile" else limits["wall_time"]
        what = "compile time" if stage == "compile" else "wall time"
        return "timeout", f"{what} limit of {limit:g} s exceeded"
    if outcome.signal == signal.SIGXCPU or (
        outcome.signal == signal.SIGKILL and outcome.cpu >= cpu_rlimit(cpu_limit)[1] - 0.05
    ):
        return "timeout", f"CPU time limit of {cpu_limit:g} s exceeded"
    if stage == "compile" and (outcome.signal or outcome.exit_code):
        return "compile_error", "compilation failed"
    if outcome.signal == signal.SIGXFSZ:
        return "runtime_error", f"file size limit of {limits['file_size_bytes']} bytes exceeded"
    if outcome.signal:
        return "runtime_error", f"killed by {_signal_name(outcome.signal)}"
    if outcome.exit_code:
        return "runtime_error", f"process exited with code {outcome.exit_code}"
    return "ok", ""


def _open_dir(name: str, dir_fd: int) -> int:
    with ignoring(FileExistsError):
        os.mkdir(name, 0o755, dir_fd=dir_fd)
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)


def write_files(workdir: str, files: list[dict[str, Any]]) -> None:
    """Write the job's files under ``workdir`` without following any link or leaving it."""
    root = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for entry in files:
            path = str(entry["path"])
            parts = path.split("/")
            if any(part in ("", ".", "..") for part in parts) or "\0" in path:
                raise JobError(f"refusing file path {path!r}")
            if entry.get("encoding") == "base64":
                import base64

                content = base64.b64decode(entry["content"], validate=True)
            else:
                content = str(entry["content"]).encode()
            dir_fd = os.dup(root)
            try:
                for part in parts[:-1]:
                    next_fd = _open_dir(part, dir_fd)
                    os.close(dir_fd)
                    dir_fd = next_fd
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                fd = os.open(parts[-1], flags, 0o644, dir_fd=dir_fd)
                with os.fdopen(fd, "wb") as stream:
                    stream.write(content)
            finally:
                os.close(dir_fd)
    except OSError as exc:
        raise JobError(f"cannot write the job's files: {exc.strerror}") from exc
    finally:
        os.close(root)


def run_job(job: dict[str, Any], runner: Runner) -> dict[str, Any]:
    """Carry out one job and return its result record (without the "type" key)."""
    try:
        limits = job["limits"]
        files = job["files"]
        run_argv = [str(arg) for arg in job["run"]["argv"]]
        compile_step = job.get("compile") or {}
        compile_argv = [str(arg) for arg in compile_step.get("argv", [])]
        # The compiler writes its own files (the binary, temporaries): the program's
        # file-size limit is not meant for them.
        compile_limits = {
            **limits,
            "file_size_bytes": compile_step.get("file_size_bytes", limits["file_size_bytes"]),
        }
        env = {**BASE_ENV, **{str(k): str(v) for k, v in job.get("env", {}).items()}}
        stdin = str(job.get("stdin") or "").encode()
        stream_stdin = bool(job.get("stdin_stream"))
    except (KeyError, TypeError, AttributeError) as exc:
        raise JobError(f"malformed job message: {exc!r}") from exc
    warm = runner.take_warm(run_argv, env, files, compiles=bool(compile_argv))
    if warm is None:
        write_files(runner.workdir, files)
    result: dict[str, Any] = {
        "exit_code": None,
        "signal": None,
        "truncated": {"stdout": False, "stderr": False},
        "compile": None,
        "timings": {"compile": 0.0, "run": 0.0},
        "usage": {"cpu_time": 0.0, "memory_bytes": 0},
        "warm": warm is not None,
    }
    if compile_argv:
        compiled = runner.run(
            "compile",
            compile_argv,
            env=env,
            stdin=b"",
            wall_time=float(limits["compile_time"]),
            cpu_time=float(limits["compile_time"]),
            limits=compile_limits,
        )
        result["compile"] = compiled.record()
        result["timings"]["compile"] = round(compiled.wall, 6)
        status, message = classify(compiled, "compile", limits)
        if status != "ok":
            result["usage"] = {
                "cpu_time": round(compiled.cpu, 6),
                "memory_bytes": compiled.memory_bytes,
            }
            return {"status": status, "message": message, **result}
    ran = runner.run(
        "run",
        run_argv,
        env=env,
        stdin=stdin,
        stream_stdin=stream_stdin,
        wall_time=float(limits["wall_time"]),
        cpu_time=float(limits["cpu_time"]),
        limits=limits,
        warm=warm,
    )
    status, message = classify(ran, "run", limits)
    record = ran.record()
    result.update(
        exit_code=record["exit_code"],
        signal=record["signal"],
        truncated=record["truncated"],
        usage={"cpu_time": round(ran.cpu, 6), "memory_bytes": ran.memory_bytes},
    )
    result["timings"]["run"] = record["time"]
    return {"status": status, "message": message, **result}


PR_SET_DUMPABLE = 4
VMADDR_CID_HOST = 2
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207


def synchronise(message: dict[str, Any], in_vm: bool) -> None:
    """A (new) host connection: in a VM, perhaps restored from a snapshot that other VMs
    share, take fresh entropy and the time from the host."""
    if not in_vm:
        return
    import base64
    import fcntl
    import struct

    entropy = base64.b64decode(message.get("entropy", ""))
    if entropy:
        with open("/dev/urandom", "wb") as pool:
            fcntl.ioctl(
                pool, RNDADDENTROPY, struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy
            )
            # Credited entropy only reaches the generator at its next reseed: force it now.
            fcntl.ioctl(pool, RNDRESEEDCRNG)
    if isinstance(message.get("time"), int | float):
        time.clock_settime(time.CLOCK_REALTIME, float(message["time"]))


def next_job(channel: Channel, runner: Runner, in_vm: bool) -> dict[str, Any] | None:
    """Answer every sync with hello, its warm runtime started, until the job comes; None
    if the host left first (closed the channel, or, on vsock, reset the connection)."""
    while True:
        try:
            message = channel.receive()
        except OSError:  # ConnectionError, or ENOTCONN after a vsock reset
            return None
        if message is None:
            return None
        if message.get("type") != "sync":
            if message.get("type") != "job":
                raise JobError(f"expected a job message, got {message.get('type')!r}")
            return message
        synchronise(message, in_vm)
        runner.start_warm(message.get("warm"))
        hello = {"type": "hello", "protocol": PROTOCOL, "nonce": message.get("nonce")}
        try:
            channel.send({**hello, "pid": os.getpid()})
        except OSError:
            return None


def serve(channel: Channel, runner: Runner, in_vm: bool = False) -> bool:
    """Take one job from the host on ``channel`` and answer with its result; False if the
    host went away before sending one (it did not need this sandbox, or, on vsock, a VM
    restored from a snapshot lost the connection it had when it was saved)."""
    runner.channel = channel
    try:
        job = next_job(channel, runner, in_vm)
        if job is None:
            return False
        result = run_job(job, runner)
    except (JobError, ValueError) as exc:
        result = {"status": "internal_error", "message": f"agent: {exc}"}
    channel.send({"type": "result", **result})
    return True


def open_port(name: str) -> int | None:
    """The virtio-serial port called ``name`` (there is no udev to make its link)."""
    base = "/sys/class/virtio-ports"
    for port in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        with open(os.path.join(base, port, "name")) as label:
            if label.read().strip() == name:
                return os.open(f"/dev/{port}", os.O_RDWR | os.O_CLOEXEC)
    return None


def host_connections(
    port_name: str, vsock_port: int, privileged_peer: bool = False
) -> Iterator[Channel]:
    """A VM's links to the host: its virtio-serial port if it has one (one link for the
    VM's life), else every connection the host makes to our vsock port in turn.

    With ``privileged_peer`` only connections from a host port below 1024 count: with
    the host kernel's vhost-vsock any local user can connect to a VM, and only root
    (the daemon) can bind such a port. (Firecracker's vsock is a Unix socket in a jail
    that only the daemon reaches, and its host ports are high.)"""
    fd = open_port(port_name)
    if fd is not None:
        yield Channel(fd, os.fdopen(os.dup(fd), "wb"))
        return
    import socket

    try:
        listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        listener.bind((socket.VMADDR_CID_ANY, vsock_port))
        listener.listen(1)
    except OSError as exc:
        raise JobError(
            f"no virtio-serial port named {port_name!r} and no vsock port {vsock_port}: {exc}"
        ) from exc
    with listener:
        while True:
            connection, (cid, port) = listener.accept()
            if privileged_peer and (cid != VMADDR_CID_HOST or port >= 1024):
                connection.close()
                continue
            with connection:
                fd = connection.fileno()
                with os.fdopen(os.dup(fd), "wb") as writer:
                    yield Channel(fd, writer)


def end_vm() -> None:
    """The end of a VM's one job: nothing to keep, so no clean shutdown to wait for. A
    reboot, which ends the VMM (QEMU runs with -no-reboot, Firecracker's guests with
    reboot=k): a power-off would only halt a Firecracker VM."""
    import ctypes

    os.sync()
    ctypes.CDLL(None).reboot(0x01234567)  # RB_AUTOBOOT


USAGE = """usage: agent.py [--workdir DIR] [--isolated] [--vm] [--port-name NAME]
                [--vsock-port PORT] [--vsock-privileged-peer] [--vm-memory-reserve BYTES]

  --workdir DIR              where the job's files go (/work)
  --isolated                 the agent is alone in its pid namespace: kill leftovers
                             with kill(-1)
  --vm                       run as PID 1 of a VM, talking on its virtio-serial port or
                             its vsock port
  --port-name NAME           the virtio-serial port (sandboxd.agent)
  --vsock-port PORT          the vsock port to listen on (52)
  --vsock-privileged-peer    take vsock connections only from host ports below 1024
                             (the host's root)
  --vm-memory-reserve BYTES  of the VM's memory, what is kept for the agent and the
                             kernel (96 MiB)
"""
OPTIONS: dict[str, str | int] = {
    "workdir": "/work",
    "port_name": "sandboxd.agent",
    "vsock_port": 52,
    "vm_memory_reserve": 96 * 2**20,
}
FLAGS = ("isolated", "vm", "vsock_privileged_peer")


def parse_options(argv: list[str]) -> dict[str, Any]:
    """The agent's command line, which its host writes (argparse would cost every
    sandbox its import); exits 2 with the usage on a mistake."""
    options: dict[str, Any] = {**OPTIONS, **dict.fromkeys(FLAGS, False)}
    words = iter(argv)
    for word in words:
        name = word.removeprefix("--").replace("-", "_")
        if word in ("-h", "--help"):
            sys.stdout.write(USAGE)
            sys.exit(0)
        elif word.startswith("--") and name in FLAGS:
            options[name] = True
        elif word.startswith("--") and name in OPTIONS and (value := next(words, None)):
            kind = type(OPTIONS[name])
            try:
                options[name] = kind(value)
            except ValueError:
                _usage_error(f"{word}: expected {kind.__name__}, got {value!r}")
        else:
            _usage_error(f"cannot make sense of {word!r}")
    return options


def _usage_error(message: str) -> None:
    sys.stderr.write(f"{USAGE}agent.py: {message}\n")
    sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    options = parse_options(sys.argv[1:] if argv is None else argv)
    # Not dumpable: the program (same uid in a jail) can then neither ptrace the agent
    # nor open its /proc files to read or rewrite its memory and forge a result.
    _ctypes.call_function(
        # dlopen(NULL) is the program itself (typeshed allows only paths)
        _ctypes.dlsym(_ctypes.dlopen(None, os.RTLD_NOW), "prctl"),  # type: ignore[arg-type]
        (PR_SET_DUMPABLE, 0),
    )
    for number in IGNORED_SIGNALS:  # a program's kill(1, ...) changes nothing
        signal.signal(number, signal.SIG_IGN)
    workdir = options["workdir"]
    if options["vm"]:
        os.makedirs(workdir, exist_ok=True)
        confinement = VmConfinement(options["vm_memory_reserve"])
        try:
            links = host_connections(
                options["port_name"], options["vsock_port"], options["vsock_privileged_peer"]
            )
            runner = Runner(workdir, True, confinement)
            for channel in links:
                if serve(channel, runner, True):
                    break
        finally:
            end_vm()
        return 0
    channel = Channel(sys.stdin.fileno(), sys.stdout.buffer)
    serve(channel, Runner(workdir, options["isolated"], Confinement()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
