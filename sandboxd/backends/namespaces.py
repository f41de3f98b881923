"""The namespaces backend: no VM, a bubblewrap jail and a cgroup per sandbox.

Each sandbox is bubblewrap started as its own unprivileged host uid (so nothing in it
is root anywhere, even outside its namespaces) with every namespace unshared (its only
network interface is lo), no capabilities, no further user namespaces, a seccomp
filter (sandboxd.host.seccomp), a new session, the image's root tree read-only, and a private
tmpfs as working directory. The agent
talks over the jail's stdin/stdout. This is weaker than a VM: sandboxes share the host
kernel. It exists so the product works, and tests fast, on hosts without usable KVM.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import trio

from sandboxd.agent_link import AgentLink, WarmRuntime
from sandboxd.backends.agent_bundle import agent_command
from sandboxd.backends.base import JailedBackend, JailedSandbox, Sandbox
from sandboxd.errors import LaunchError
from sandboxd.host import seccomp
from sandboxd.host.cgroups import Cgroup, CgroupLimits
from sandboxd.host.jail import BWRAP, data_fd
from sandboxd.host.process import ChildProcess
from sandboxd.limits import Limits

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
        super().__init__(sandbox_id, link, child, cgroup, log.getChild(sandbox_id))
        self.cpus = cpus
        self.memory_limit = 0  # of the cgroup, as set for the job (or the session)

    def network_namespace(self) -> str:
        return f"/proc/{self._agent_pid('give a network')}/ns/net"

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
        self.rootfs = rootfs
        self.agent_sources = agent  # the bundle (sandboxd.backends.agent_bundle)
        self.agent = b""  # what sandboxes run: the bundle compiled at start()
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
        await super().start()

    async def _compiled_agent(self) -> bytes:
        """The agent's bundle as bytecode of the image's own python, compiled once, in a
        jail as an unprivileged uid: each sandbox then skips compiling it (about 10 ms of
        CPU). Its sources, if that fails (the log says why)."""
        source = self.agent_sources
        argv = [
            *BWRAP,
            "--ro-bind", str(self.rootfs), "/",
            "--tmpfs", "/tmp", "--proc", "/proc", "--dev", "/dev",
            "--clearenv", "--",
            "/usr/bin/python3", "-I", "-S", "-c", COMPILE_AGENT, AGENT,
        ]  # fmt: skip
        uid = self.uid_base
        done = await trio.run_process(
            argv,
            stdin=source,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            preexec_fn=partial(os.setresuid, uid, uid, uid),
        )
        if done.returncode != 0 or not done.stdout:
            log.warning(
                "sandboxes run the agent from source: compiling it failed: %s",
                done.stderr.decode(errors="replace").strip()[-300:],
            )
            return source
        return bytes(done.stdout)

    def argv(self, agent_fd: int, seccomp_fd: int | None) -> list[str]:
        return [
            *BWRAP,
            *(["--seccomp", str(seccomp_fd)] if seccomp_fd is not None else []),
            "--uid", str(JAIL_ID), "--gid", str(JAIL_ID),
            "--hostname", "sandbox",
            "--ro-bind", str(self.rootfs), "/",
            "--tmpfs", GUEST_DIR,
            "--ro-bind-data", str(agent_fd), AGENT,
            "--remount-ro", GUEST_DIR,
            "--proc", "/proc",
            "--dev", "/dev",
            "--size", str(self.workdir_bytes), "--tmpfs", "/tmp",
            "--size", str(self.workdir_bytes), "--perms", "0755", "--tmpfs", WORKDIR,
            "--chdir", WORKDIR,
            "--clearenv", "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin",
            "--",
            *agent_command("/usr/bin/python3", AGENT),
            "--workdir", WORKDIR, "--isolated",
        ]  # fmt: skip

    @asynccontextmanager
    async def open_sandbox(
        self, slot: int, start_timeout: float, warm: WarmRuntime | None = None
    ) -> AsyncIterator[Sandbox]:
        fds = [data_fd(self.agent, "sandboxd-agent")]
        if seccomp.supported():
            fds.append(data_fd(seccomp.filter_program(), "sandboxd-seccomp"))
        argv = self.argv(fds[0], fds[1] if len(fds) > 1 else None)
        jail = self.jail(
            slot,
            argv,
            limits=jail_limits(self.default_limits, self.cpus),
            pass_fds=fds,
            stdin=True,
            stdout=True,
            stderr=True,
        )
        async with jail as (child, cgroup):
            assert child.stdin and child.stdout
            link = AgentLink(child.stdin, child.stdout)
            sandbox = NamespacesSandbox(cgroup.name, link, child, cgroup, self.cpus)
            async with sandbox.serving(partial(link.handshake, warm), argv, start_timeout):
                yield sandbox


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
