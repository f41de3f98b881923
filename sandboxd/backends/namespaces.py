"""The namespaces backend: no VM, a bubblewrap jail and a cgroup per sandbox.

Each sandbox is bubblewrap started as its own unprivileged host uid (so nothing in it
is root anywhere, even outside its namespaces) with every namespace unshared (its only
network interface is lo), no capabilities, no further user namespaces, a seccomp
filter (sandboxd.host.seccomp), a new session, the image's root tree read-only, and a private
tmpfs as working directory. The agent
talks over the jail's stdin/stdout. This is weaker than a VM: sandboxes share the host
kernel. It exists so the product works, and tests fast, on hosts without usable KVM.

A sandbox kept warm starts with the reaper as its PID 1 instead of the agent (built by
the image's cc at start; sandboxd.backends.direct_run): a job that fits its runtime is
run by the daemon without an agent, any other has the reaper exec the agent first.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

import trio

from guest.agent.common import BASE_ENV
from sandboxd.agent_link import AgentLink, OutputHandler, StageHandler, Transcript, WarmRuntime
from sandboxd.backends.agent_bundle import agent_command
from sandboxd.backends.base import JailedBackend, JailedSandbox, Sandbox
from sandboxd.backends.direct_run import (
    DirectRuntime,
    RLimits,
    first_rlimits,
    fits,
    queue_first_rlimits,
)
from sandboxd.errors import AgentError, LaunchError
from sandboxd.host import seccomp
from sandboxd.host.cgroups import Cgroup, CgroupLimits
from sandboxd.host.jail import BWRAP, data_fd
from sandboxd.host.process import ChildProcess
from sandboxd.limits import Limits
from sandboxd.stdin_stream import StdinStream

log = logging.getLogger(__name__)

GUEST_DIR = "/opt/sandboxd"  # where the agent appears inside the jail...
AGENT = f"{GUEST_DIR}/agent"  # ...as its bundle (a zip) of bytecode, or of its sources
# Run by the image's python: the agent's bundle of sources on stdin, the same bundle of
# bytecode on stdout, whose tracebacks name the files as in the bundle under AGENT.
COMPILE_AGENT = """
import io, os, py_compile, sys, zipfile
sources = zipfile.ZipFile(io.BytesIO(sys.stdin.buffer.read()))
out = io.BytesIO()
with zipfile.ZipFile(out, "w") as compiled:
    for info in sources.infolist():
        path = os.path.join("/tmp", info.filename)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as source:
            source.write(sources.read(info))
        py_compile.compile(
            path, path + "c", os.path.join(sys.argv[1], info.filename), doraise=True,
            invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
        )
        with open(path + "c", "rb") as code:
            compiled.writestr(zipfile.ZipInfo(info.filename + "c", info.date_time), code.read())
sys.stdout.buffer.write(out.getvalue())
"""
REAPER = f"{GUEST_DIR}/reaper"  # a warm sandbox's PID 1 (guest/reaper.c)
AGENT_START_TIMEOUT = 30.0  # for the agent a reaper became to say hello
# Run by the image's sh: the reaper's source on stdin, the program on stdout. Linked
# dynamically: each jail gets a copy of it (--ro-bind-data), and a static one would be
# 740 KB to copy twice per sandbox and hold in its tmpfs, against 18 KB (the CPU its
# copies cost was more than the dynamic loader's work it saved).
COMPILE_REAPER = "cc -O2 -o /tmp/reaper -x c - && cat /tmp/reaper"
WORKDIR = "/work"
JAIL_ID = 65534  # the uid/gid the program sees: nobody/nogroup
# What bubblewrap and the agent take beside the program, added to the job's limits: the
# program may use all of its own, and the agent still has room to report on it.
OVERHEAD_PROCESSES = 8
AGENT_MEMORY = 32 * 1024 * 1024
# A session's tmpfs mounts, each a share of its memory (one-shot jobs keep theirs larger:
# their sandbox is gone with them, whatever its files took).
SESSION_DISK = ((WORKDIR, 0.75), ("/tmp", 0.25))


def jail_limits(limits: Limits, cpus: float) -> CgroupLimits:
    """The cgroup limits of a jail whose job has ``limits``."""
    return {
        "memory_bytes": limits.memory_bytes + AGENT_MEMORY,
        "processes": limits.processes + OVERHEAD_PROCESSES,
        "cpus": cpus,
    }


class NamespacesSandbox(JailedSandbox):
    def __init__(
        self, sandbox_id: str, link: AgentLink, child: ChildProcess, cgroup: Cgroup, cpus: float
    ) -> None:
        super().__init__(sandbox_id, link, child, cgroup, log)
        self.cpus = cpus
        self.memory_limit = 0  # of the cgroup, as set for the job (or the session)
        self.direct: DirectRuntime | None = None  # while its PID 1 is the reaper

    async def _run_job(
        self,
        job: dict[str, Any],
        on_output: OutputHandler,
        transcript: Transcript,
        stdin: StdinStream | None,
        on_stage: StageHandler | None,
    ) -> dict[str, Any]:
        direct = self.direct
        if direct is not None and fits(job, direct.warm) and await direct.take(job["limits"]):
            self.direct = None
            kill = self.kill_program
            record = await direct.run(job, on_output, transcript, stdin, on_stage, kill)
            if record is not None:
                return record
            self.direct = direct  # it died waiting: the reaper becomes the agent
        await self._agent()
        return await super()._run_job(job, on_output, transcript, stdin, on_stage)

    async def open_session(self, limits: Limits) -> None:
        try:
            await self._agent()
        except AgentError:
            self.kill()
            raise
        await super().open_session(limits)

    async def _agent(self) -> None:
        """Have the reaper, if it is PID 1, become the agent, and greet it."""
        direct, self.direct = self.direct, None
        if direct is not None:
            await direct.become_agent()
            try:
                with trio.fail_after(AGENT_START_TIMEOUT):
                    await self.link.handshake()
            except trio.TooSlowError:
                raise AgentError(f"agent not ready within {AGENT_START_TIMEOUT:g} s") from None

    def network_namespace(self) -> str:
        return f"/proc/{self._agent_pid('give a network')}/ns/net"

    def jail_pid(self) -> int:
        """The host pid of the jail's PID 1."""
        return self._agent_pid("reach")

    def _agent_pid(self, why: str) -> int:
        # The jail's processes (the agent and its program); the outer bubblewrap stays
        # in the host's namespaces.
        inside = sorted(self.cgroup.pids() - {self.child.pid})
        if not inside:
            raise LaunchError(f"sandbox {self.id} has no process left to {why}")
        return inside[0]

    async def size_disk(self, limits: Limits) -> None:
        # Its tmpfs mounts are memory of its cgroup: together no larger than the job's
        # memory, so that files never take the room the agent has beside it.
        pid = self._agent_pid("size the disk of")
        for mount, share in SESSION_DISK:
            size = int(limits.memory_bytes * share)
            options = f"remount,nosuid,nodev,size={size}"
            done = await trio.run_process(
                ["mount", "-N", str(pid), "-o", options, mount], capture_stderr=True, check=False
            )
            if done.returncode != 0:
                error = done.stderr.decode(errors="replace").strip()
                raise LaunchError(f"cannot size {mount} of sandbox {self.id}: {error}")

    def apply_limits(self, limits: Limits) -> None:
        settings = jail_limits(limits, self.cpus)
        self.memory_limit = settings["memory_bytes"]
        try:
            self.cgroup.set_limits(**settings)
        except OSError as exc:
            raise LaunchError(f"cannot set the limits of sandbox {self.id}: {exc}") from exc

    def memory_room(self) -> int | None:
        # The working directory is a tmpfs: its files are charged to the cgroup too.
        return self.memory_limit - self.cgroup.working_memory() if self.memory_limit else None

    host_counts_cpu = True

    def cpu_seconds(self) -> float:
        return self.cgroup.cpu_seconds()

    def kill_program(self) -> None:
        # All but bubblewrap outside and the agent inside, the jail's PID 1.
        agent = {pid for pid in self.cgroup.pids() if _first_of_its_namespace(pid)}
        self.kill({self.child.pid, *agent})


class NamespacesBackend(JailedBackend):
    name = "namespaces"
    has_network = True
    shares_host_kernel = True
    isolation = "namespaces (bubblewrap, seccomp, cgroup; weaker than a VM: shares the host kernel)"

    def __init__(
        self,
        *,
        rootfs: Path,
        agent: bytes,
        instance: str,
        uid_base: int,
        cpus: float,
        workdir_bytes: int,
        default_limits: Limits,
    ) -> None:
        super().__init__(instance, uid_base)
        self.default_limits = default_limits  # a ready jail's, until a job sets its own
        self.first_rlimits = first_rlimits(default_limits.to_dict())  # its runtime's
        self.rootfs = rootfs
        self.agent_sources = agent  # the bundle (sandboxd.backends.agent_bundle)
        self.agent = b""  # what sandboxes run: the bundle compiled at start()
        self.reaper = b""  # a warm sandbox's PID 1, built at start() if the image can
        self.direct_runs = "direct: the daemon runs a job that fits a warm runtime"
        self.cpus = cpus
        self.workdir_bytes = workdir_bytes

    @staticmethod
    def probe(uid: int) -> str:
        """Why this backend can run here; LaunchError saying why not."""
        bwrap = shutil.which("bwrap")
        if bwrap is None:
            raise LaunchError("bubblewrap is not installed (apt install bubblewrap)")
        check = subprocess.run(
            [bwrap, *BWRAP[1:], "--ro-bind", "/", "/", "--", "/bin/true"],
            preexec_fn=partial(os.setresuid, uid, uid, uid),
            capture_output=True,
            text=True,
        )
        if check.returncode != 0:
            raise LaunchError(
                "bubblewrap cannot create namespaces as an unprivileged user here: "
                + check.stderr.strip(),
                argv=check.args,
                exit_code=check.returncode,
            )
        version = subprocess.run([bwrap, "--version"], capture_output=True, text=True)
        return f"{version.stdout.strip()} runs unprivileged jails here"

    async def start(self) -> None:
        if not (self.rootfs / "usr/bin/python3").exists():
            raise LaunchError(f"image root {self.rootfs} has no usr/bin/python3 for the agent")
        self.agent = await self._compiled_agent()
        self.reaper = await self._compiled_reaper()
        await super().start()

    async def _in_build_jail(self, argv: Sequence[str], stdin: bytes) -> tuple[bytes, str]:
        """Run ``argv`` on the image's root in a jail as an unprivileged uid, ``stdin``
        given; its output, or b"" and why not."""
        jail = [
            *BWRAP,
            "--ro-bind", str(self.rootfs), "/",
            "--tmpfs", "/tmp", "--proc", "/proc", "--dev", "/dev",
            "--clearenv", "--setenv", "PATH", BASE_ENV["PATH"], "--",
        ]  # fmt: skip
        uid = self.uid_base
        done = await trio.run_process(
            [*jail, *argv],
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            preexec_fn=partial(os.setresuid, uid, uid, uid),
        )
        if done.returncode != 0 or not done.stdout:
            return b"", done.stderr.decode(errors="replace").strip()[-300:]
        return bytes(done.stdout), ""

    async def _compiled_agent(self) -> bytes:
        """The agent's bundle as bytecode of the image's own python, compiled once:
        each sandbox then skips compiling it (about 10 ms of CPU). Its sources, if that
        fails (the log says why)."""
        python = ["/usr/bin/python3", "-I", "-S", "-c", COMPILE_AGENT, AGENT]
        compiled, why = await self._in_build_jail(python, self.agent_sources)
        if not compiled:
            log.warning("sandboxes run the agent from source: compiling it failed: %s", why)
            return self.agent_sources
        return compiled

    async def _compiled_reaper(self) -> bytes:
        """The reaper (guest/reaper.c) built by the image's own cc, for its libc; b"" if
        the image has none (warm jobs then go through the agent, as the log says)."""
        if not (self.rootfs / "usr/bin/cc").exists():
            self.direct_runs = "through the agent: the image has no C compiler for the reaper"
            log.info("warm jobs run %s", self.direct_runs.removeprefix("through "))
            return b""
        source = resources.files("guest").joinpath("reaper.c").read_bytes()
        built, why = await self._in_build_jail(["/bin/sh", "-c", COMPILE_REAPER], source)
        if not built:
            self.direct_runs = f"through the agent: the reaper did not build: {why}"
            log.warning("warm jobs run %s", self.direct_runs)
        return built

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "warm_jobs": self.direct_runs}

    def argv(self, agent_fd: int, seccomp_fd: int | None, reaper: ReaperJail | None) -> list[str]:
        """The jail's command line: the agent as its PID 1, or the ``reaper`` that
        starts the warm runtime and may exec the agent's command later."""
        return [
            *BWRAP,
            *(["--seccomp", str(seccomp_fd)] if seccomp_fd is not None else []),
            "--uid", str(JAIL_ID), "--gid", str(JAIL_ID),
            "--hostname", "sandbox",
            "--ro-bind", str(self.rootfs), "/",
            "--tmpfs", GUEST_DIR,
            "--ro-bind-data", str(agent_fd), AGENT,
            *(reaper.files() if reaper else []),
            "--remount-ro", GUEST_DIR,
            "--proc", "/proc",
            "--dev", "/dev",
            "--size", str(self.workdir_bytes), "--tmpfs", "/tmp",
            "--size", str(self.workdir_bytes), "--perms", "0755", "--tmpfs", WORKDIR,
            "--chdir", WORKDIR,
            "--clearenv", "--setenv", "PATH", BASE_ENV["PATH"],
            *(reaper.environment() if reaper else []),
            "--",
            *(reaper.command() if reaper else []),
            *agent_command("/usr/bin/python3", AGENT),
            "--workdir", WORKDIR, "--isolated",
        ]  # fmt: skip

    @asynccontextmanager
    async def open_sandbox(
        self, slot: int, start_timeout: float, warm: WarmRuntime | None = None
    ) -> AsyncIterator[Sandbox]:
        reaper = (
            ReaperJail(warm, self.reaper, self.first_rlimits)
            if warm is not None and self.reaper
            else None
        )
        try:
            fds = [data_fd(self.agent, "sandboxd-agent")]
            seccomp_fd = None
            if seccomp.supported():
                seccomp_fd = data_fd(seccomp.filter_program(), "sandboxd-seccomp")
                fds.append(seccomp_fd)
        except BaseException:
            if reaper:
                reaper.abandon()
            raise
        argv = self.argv(fds[0], seccomp_fd, reaper)
        jail = self.jail(
            slot,
            argv,
            limits=jail_limits(self.default_limits, self.cpus),
            pass_fds=[*fds, *(reaper.jail_ends if reaper else [])],
            stdin=True,
            stdout=True,
            stderr=True,
        )
        try:
            async with jail as (child, cgroup):
                assert child.stdin and child.stdout
                link = AgentLink(child.stdin, child.stdout)
                sandbox = NamespacesSandbox(cgroup.name, link, child, cgroup, self.cpus)
                start: Callable[[], Awaitable[object]] = partial(link.handshake, warm)
                if reaper:
                    sandbox.direct = reaper.runtime(sandbox.jail_pid, self.uid_base + slot)
                    start = sandbox.direct.started
                async with sandbox.serving(start, argv, start_timeout):
                    yield sandbox
        finally:
            if reaper:
                reaper.close()


class ReaperJail:
    """What a warm sandbox's jail gets for its reaper as PID 1: the program, the
    runtime's command and environment, and the jail's ends of the reaper's socket and
    of the runtime's pipes (the daemon keeps the other ends, for its DirectRuntime)."""

    def __init__(self, warm: WarmRuntime, program: bytes, rlimits: RLimits) -> None:
        self.warm = warm
        self.rlimits = rlimits  # the runtime's first, queued to the reaper
        self.program_fd = data_fd(program, "sandboxd-reaper")
        control, jail_control = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        queue_first_rlimits(control, rlimits)
        stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
        stdout_r, stdout_w = os.pipe2(os.O_CLOEXEC)
        stderr_r, stderr_w = os.pipe2(os.O_CLOEXEC)
        self.control = control
        self.pipes = (stdin_w, stdout_r, stderr_r)
        # Handed to the jail (which closes them here once it holds them).
        self.jail_ends = [self.program_fd, jail_control.detach(), stdin_r, stdout_w, stderr_w]
        self.runtime_made: DirectRuntime | None = None

    def files(self) -> list[str]:
        return ["--perms", "0755", "--ro-bind-data", str(self.program_fd), REAPER]

    def environment(self) -> list[str]:
        """The runtime's environment, as the agent gives a program its own."""
        env = {**BASE_ENV, **self.warm["env"]}
        return [word for name, value in env.items() for word in ("--setenv", name, value)]

    def command(self) -> list[str]:
        """The reaper's command line, up to the agent's command that follows it."""
        ends = map(str, self.jail_ends[1:])  # its socket, the runtime's stdin/out/err
        runtime = self.warm["argv"]
        return [REAPER, *ends, self.warm["source"], str(len(runtime)), *runtime]

    def runtime(self, jail_pid: Callable[[], int], owner: int) -> DirectRuntime:
        """The daemon's end, which from now on owns the socket and the pipes."""
        runtime = DirectRuntime(
            self.warm,
            trio.socket.from_stdlib_socket(self.control),
            self.pipes,
            jail_pid,
            owner,
            WORKDIR,
            self.rlimits,
        )
        self.runtime_made = runtime
        return runtime

    def abandon(self) -> None:
        """No jail is made: close both ends."""
        for fd in self.jail_ends:
            os.close(fd)
        self.close()

    def close(self) -> None:
        """Close the daemon's ends (the jail's were handed over with the jail)."""
        if self.runtime_made is not None:
            self.runtime_made.close()
            return
        self.control.close()
        for fd in self.pipes:
            os.close(fd)


def _first_of_its_namespace(pid: int) -> bool:
    """Whether ``pid`` is PID 1 of a pid namespace below the host's (its NSpid ends in 1)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("NSpid:"):
                    ids = line.split()[1:]
                    return len(ids) > 1 and ids[-1] == "1"
    except OSError:
        pass
    return False
