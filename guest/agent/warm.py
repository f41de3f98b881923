"""The warm runtime: a job's own command started before the job, waiting for its source."""

from __future__ import annotations

import os

from .common import BASE_ENV, JobError
from .processes import confine, kill_group, spawn

TYPE_CHECKING = False  # typing costs every sandbox its import
if TYPE_CHECKING:
    from typing import Any

    from .files import Workdir
    from .limits import Confinement
    from .processes import Reaper


def has_coding_cookie(source: bytes) -> bool:
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
        self, spec: dict[str, Any], workdir: Workdir, confinement: Confinement, reaper: Reaper
    ) -> None:
        self.argv = [str(arg) for arg in spec["argv"]]
        self.env = {**BASE_ENV, **{str(k): str(v) for k, v in spec.get("env", {}).items()}}
        self.source = str(spec["source"])
        if "/" in self.source or self.source in ("", ".", ".."):
            raise JobError(f"refusing warm source path {self.source!r}")
        self.workdir = workdir
        self.reaper = reaper
        self.confinement = confinement
        self.isolated = confinement.isolate_network  # as it started
        self.path = os.path.join(workdir.path, self.source)
        os.mkfifo(self.path, 0o644)
        # Open for reading and writing: the runtime's open never blocks, and what the
        # agent writes stays in the FIFO however little of it the runtime has read.
        self.fifo = os.open(self.path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        self.process = spawn(
            self.argv, cwd=workdir.path, env=self.env, preexec=confine(confinement, [])
        )
        self.content = b""  # the source of the job that took it

    def serves(self, argv: list[str], env: dict[str, str], files: list[dict[str, Any]]) -> bool:
        """Whether a job that runs ``argv`` with ``env`` and ``files`` can take it."""
        if argv != self.argv or env != self.env:
            return False
        if self.confinement.isolate_network != self.isolated:
            return False  # it started in (or out of) a network namespace of its own
        self.reaper.reap()
        if self.process[0] in self.reaper.exits:
            return False  # it died waiting (the log of the next job will not say why)
        main = [f for f in files if f.get("path") == self.source]
        return (
            len(main) == 1
            and main[0].get("encoding", "utf-8") == "utf-8"
            and not has_coding_cookie(str(main[0].get("content", "")).encode())
        )

    def take(self, files: list[dict[str, Any]]) -> None:
        """Write the job's files for the waiting process: all but its source, and that
        beside the FIFO, to :meth:`publish` once the process's limits are set. A runtime
        slower to start than its job opens the real file, not the FIFO, and runs at
        once: nothing may be missing or unlimited by then."""
        source = next(f for f in files if f.get("path") == self.source)
        self.workdir.write_all([f for f in files if f is not source])
        self.workdir.write(self._staged, str(source["content"]).encode())
        self.content = str(source["content"]).encode()

    @property
    def _staged(self) -> str:
        return f".{self.source}.sandboxd"

    def publish(self) -> tuple[int, bytes]:
        """Put the source file in place of the FIFO; the FIFO and what to write to it
        (the caller's now), for a process that opened the FIFO first."""
        os.rename(os.path.join(self.workdir.path, self._staged), self.path)
        return self.fifo, self.content

    def discard(self) -> None:
        """Kill the waiting process (a job that cannot take it): a cold start follows."""
        pid, *fds = self.process
        kill_group(pid)
        self.reaper.wait(pid)
        for fd in (*fds, self.fifo):
            os.close(fd)
        os.unlink(self.path)
