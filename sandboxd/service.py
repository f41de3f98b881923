"""What the daemon does for its clients, independent of how they reach it: the
``health``, ``languages``, ``status`` and ``execute`` methods.

The RPC server (and nothing else) exposes these over the socket; they take and return
plain JSON-able values and raise errors from :mod:`sandboxd.errors`.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import trio

from sandboxd import __version__
from sandboxd.backends.base import Backend, JobRun
from sandboxd.errors import InvalidParams
from sandboxd.host.network import Egress
from sandboxd.images import Image
from sandboxd.job import Job, parse_job
from sandboxd.languages import LanguageTable
from sandboxd.limits import LimitBounds
from sandboxd.pool import Pool
from sandboxd.protocol import STREAMS, Status
from sandboxd.result import CompileResult, ExecutionResult
from sandboxd.stdin_stream import StdinStream

log = logging.getLogger(__name__)

OutputSink = Callable[[str, str, str], Awaitable[None]]  # (stage, stream, data)


def _no_params(params: Mapping[str, Any]) -> None:
    if params:
        raise InvalidParams.field(next(iter(params)), "this method takes no parameters")


def result_of(run: JobRun, job: Job, sandbox_id: str) -> ExecutionResult:
    """The result record of a job from what its sandbox saw: the agent's record, if it
    came, with the output the host kept, corrected by what only the host knows (the
    sandbox's cgroup counts OOM kills and, in jails, the job's CPU time)."""
    transcript = run.transcript
    if run.record is not None:
        result = ExecutionResult.from_dict(run.record)
        # The stage that ended the job: the compile, if it failed, else the run.
        failed = result.status in (Status.RUNTIME_ERROR, Status.KILLED, Status.COMPILE_ERROR)
        if run.cpu is not None and run.cpu.exceeded and failed:
            result.status = Status.TIMEOUT
            result.message = f"CPU time limit of {run.cpu.limit:g} s exceeded"
        elif run.oom_kills and failed:
            result.status = Status.MEMORY_LIMIT
            result.message = f"memory limit of {job.limits.memory_bytes // 2**20} MiB exceeded"
    else:
        if run.cpu is not None and run.cpu.exceeded:
            status, message = Status.TIMEOUT, f"CPU time limit of {run.cpu.limit:g} s exceeded"
        elif run.deadline_hit:
            status, message = Status.TIMEOUT, run.lost
        elif run.oom_kills:
            mib = job.limits.memory_bytes // 2**20
            status, message = (
                Status.MEMORY_LIMIT,
                f"memory limit of {mib} MiB exceeded ({run.lost})",
            )
        else:
            status, message = Status.KILLED, f"the sandbox was killed: {run.lost}"
        result = ExecutionResult(
            status=status,
            message=message,
            signal=signal.SIGKILL,
            truncated={s: transcript.truncated("run", s) for s in STREAMS},
        )
        if job.language.compiled:
            result.compile = CompileResult()
    result.stdout = transcript.text("run", "stdout")
    result.stderr = transcript.text("run", "stderr")
    if result.compile is not None:
        result.compile.stdout = transcript.text("compile", "stdout")
        result.compile.stderr = transcript.text("compile", "stderr")
    if run.cpu is not None and run.cpu.stage:
        # The cgroup's count covers every process, from when the daemon saw the stage
        # start (which can be late for a short one); the agent's, the program's own.
        result.usage["cpu_time"] = round(max(run.cpu.used, result.usage["cpu_time"]), 6)
    result.sandbox_id = sandbox_id
    return result


class Service:
    def __init__(
        self,
        *,
        pool: Pool,
        backend: Backend,
        backend_reason: str,
        image: Image,
        limits: Mapping[str, LimitBounds],
        egress: Egress | None = None,
    ) -> None:
        self.pool = pool
        self.egress = egress  # None: no sandbox gets a network
        self.backend = backend
        self.backend_reason = backend_reason
        self.image = image
        self.languages_table = LanguageTable(image.languages)
        self.limits = limits
        self.started = time.time()

    async def health(self, **params: Any) -> dict[str, Any]:
        _no_params(params)
        healthy = self.pool.can_serve()
        answer: dict[str, Any] = {
            "status": "healthy" if healthy else "unhealthy",
            "time": int(time.time()),
            "version": __version__,
            "backend": self.backend.name,
            "pool": self.pool.stats(),
        }
        if not healthy:
            answer["reason"] = f"sandboxes fail to start: {self.pool.last_error}"
        return answer

    async def languages(self, **params: Any) -> dict[str, Any]:
        _no_params(params)
        return {
            "languages": self.languages_table.names(),
            "details": self.languages_table.describe(),
        }

    def egress_for(self, network: bool) -> Egress | None:
        """The egress of a job (or session) that asked for ``network``; InvalidParams if
        this server cannot give it."""
        if not network:
            return None
        if self.egress is None:
            raise InvalidParams.field(
                "network", "this server gives sandboxes no network ([network] allow is empty)"
            )
        if not self.backend.has_network:
            raise InvalidParams.field(
                "network", f"the {self.backend.name} backend gives sandboxes no network yet"
            )
        return self.egress

    async def status(self, **params: Any) -> dict[str, Any]:
        _no_params(params)
        return {
            "version": __version__,
            "uptime": round(time.time() - self.started, 3),
            "backend": {**self.backend.describe(), "reason": self.backend_reason},
            "network": self.egress.describe() if self.egress else "off",
            "pool": self.pool.stats(),
            "image": self.image.describe(),
            "limits": {
                name: {"default": bound.default, "maximum": bound.maximum}
                for name, bound in self.limits.items()
            },
        }

    async def execute(
        self,
        params: Mapping[str, Any],
        on_output: OutputSink,
        stdin: StdinStream | None = None,
        *,
        wait_to_start: Callable[[], Awaitable[None]] | None = None,
    ) -> dict[str, Any]:
        """Run one job in a fresh sandbox; the result record as a dict.

        ``stdin`` carries what the client streams to an interactive job; the job waits
        for ``wait_to_start`` before it takes a sandbox. Raises InvalidParams,
        UnsupportedLanguage, LimitAboveMaximum or NoCapacity.
        """
        start = trio.current_time()
        job = parse_job(params, self.languages_table, self.limits)
        egress = self.egress_for(job.network)
        if wait_to_start is not None:
            await wait_to_start()
        async with self.pool.sandbox(job.language.name) as sandbox:
            queued = trio.current_time() - start
            async with (
                egress.attached(sandbox.network_namespace()) if egress else contextlib.nullcontext()
            ):
                run = await sandbox.run(
                    job.agent_message(), job.limits, on_output, stdin if job.interactive else None
                )
        result = result_of(run, job, sandbox.id)
        result.timings["queue"] = round(queued, 6)
        result.timings["total"] = round(trio.current_time() - start, 6)
        log.info(
            "job sandbox=%s language=%s status=%s exit=%s signal=%s queue=%.3fs total=%.3fs",
            sandbox.id,
            job.language.name,
            result.status,
            result.exit_code,
            result.signal,
            queued,
            result.timings["total"],
        )
        return result.to_dict()
