"""A soak with faults: a bounded mixed workload through the socket and the gateway while
the daemon is SIGKILLed and restarted, sandboxes are killed from outside and the
gateway is restarted. Printed: jobs answered / right / wrong / lost / refused, daemon
and gateway memory at start and end, and what was left on the host.

Every job checks its own answer (hellos carry a nonce), and every job's outcome is one
of: right; killed (answered, in a sandbox the soak killed from outside); wrong (an
answer that is not what the job must get: never acceptable); lost (no answer:
acceptable only for a job in flight when the daemon was SIGKILLed); refused (the
connection was refused). The daemon and the gateway are started as systemd starts them
from socket units, so their restarts refuse nobody.

    SOAK_JOBS=10000 SOAK_CONCURRENCY=16 SOAK_SECONDS=3600 python -m bench.soak
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import signal
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio

from sandboxctl.client import AsyncClient, Client
from sandboxd.errors import DaemonUnavailable, SandboxError
from sandboxd.result import ExecutionResult
from tests.daemon_process import Daemon, Gateway, start_daemon, start_gateway
from tests.host_state import (
    mounts,
    sandbox_cgroups,
    sandbox_processes,
    wait_for,
)


@dataclass(frozen=True)
class Kind:
    """One kind of job: how to ask for it, and whether an answer is the right one."""

    name: str
    weight: int
    params: Callable[[str], dict]  # from a nonce
    right: Callable[[ExecutionResult, str], bool]
    interactive: bool = False


def _hello(language: str, code: str) -> Kind:
    return Kind(
        f"hello {language}",
        6 if language == "python" else 2,
        lambda nonce: {"language": language, "code": code.replace("NONCE", nonce)},
        lambda result, nonce: result.status == "ok" and result.stdout == f"{nonce}\n",
    )


KINDS = [
    _hello("python", "print('NONCE')"),
    _hello("typescript", "console.log('NONCE')"),
    _hello("rust", 'fn main() { println!("NONCE"); }'),
    Kind(
        "timeout",
        1,
        lambda nonce: {"language": "python", "code": "import time; time.sleep(60)", "timeout": 1},
        lambda result, _: result.status == "timeout",
    ),
    Kind(
        "memory bomb",
        1,
        lambda _: {
            "language": "python",
            "code": "a = []\nwhile True: a.append(bytearray(10**7))",
            "limits": {"memory_bytes": 128 * 2**20},
        },
        lambda result, _: result.status == "memory_limit",
    ),
    Kind(
        "fork bomb",
        1,
        lambda _: {
            "language": "python",
            "code": "import os\nwhile True:\n    try: os.fork()\n    except OSError: pass",
            "limits": {"processes": 32, "wall_time": 2},
        },
        lambda result, _: result.status == "timeout",
    ),
    Kind(
        "output flood",
        1,
        lambda _: {
            "language": "python",
            "code": "while True: print('y' * 100)",
            "limits": {"output_bytes": 100_000},
        },
        lambda result, _: result.status == "output_limit" and len(result.stdout) == 100_000,
    ),
    Kind(
        "large stdin",
        1,
        lambda nonce: {
            "language": "python",
            "code": "import sys\ndata = sys.stdin.read()\nprint(len(data), data[-8:])",
            "stdin": "x" * 2**20 + nonce[-8:].rjust(8, "0"),
        },
        lambda result, nonce: result.stdout == f"{2**20 + 8} {nonce[-8:].rjust(8, '0')}\n",
    ),
    Kind(
        "syntax error",
        1,
        lambda _: {"language": "python", "code": "def broken(:\n    pass"},
        lambda result, _: result.status == "runtime_error" and "SyntaxError" in result.stderr,
    ),
    Kind(
        "interactive stdin",
        1,
        lambda nonce: {
            "language": "python",
            "code": "import sys\nfor line in sys.stdin:\n    print('echo', line.strip())",
            "nonce": nonce,
        },
        lambda result, nonce: result.status == "ok" and result.stdout == f"echo {nonce}\n",
        interactive=True,
    ),
]


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    wrong: list[str] = field(default_factory=list)
    lost_unexplained: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, outcome: str, detail: str = "") -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            if outcome == "wrong":
                self.wrong.append(detail)
            elif outcome == "lost?":
                self.lost_unexplained.append(detail)


class Soak:
    def __init__(self, directory: Path, jobs: int, concurrency: int, seconds: float) -> None:
        self.directory = directory
        self.jobs = jobs
        self.concurrency = concurrency
        self.deadline = time.monotonic() + seconds
        self.tally = Tally()
        self.next_job = itertools.count()
        self.done = 0
        self.path = directory / "sandboxd.sock"
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(self.path))
        self.listener.listen(4096)
        self.name = f"sbxsoak{os.getpid() % 10000}"
        self.starts = itertools.count()
        self.kills: list[float] = []  # when the daemon was SIGKILLed
        self.killed_sandboxes: set[str] = set()
        self.daemon = self._start_daemon()
        # The gateway too is started as systemd would from a socket unit: its restarts
        # refuse nobody either.
        self.http_listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
        self.gateway_port = self.http_listener.getsockname()[1]
        self.gateway = self._start_gateway()
        self.memory: dict[str, list[float]] = {"daemon": [], "gateway": []}

    def _start_daemon(self) -> Daemon:
        directory = self.directory / f"daemon{next(self.starts)}"
        directory.mkdir()
        return start_daemon(
            directory,
            listener=self.listener,
            daemon={"name": self.name, "log_level": "warning"},
            pool={"size": 4, "max_sandboxes": 16, "queue_timeout": 120},
        )

    def _start_gateway(self) -> Gateway:
        directory = self.directory / f"gateway{next(self.starts)}"
        directory.mkdir()
        return start_gateway(
            directory,
            self.path,
            listener=self.http_listener,
            rate_per_minute=10**6,
            rate_burst=10**6,
            concurrent_per_key=64,
        )

    # The jobs.

    def worker(self, number: int) -> None:
        rng = random.Random(number)
        weights = [kind.weight for kind in KINDS]
        # One connection per request, as curl makes: a kept-alive connection that sits
        # idle when the gateway restarts is closed under a request the client may be
        # sending on it at that moment (HTTP/1.1 leaves that race to the client).
        with httpx.Client(timeout=180, headers={"Connection": "close"}) as http:
            while time.monotonic() < self.deadline:
                index = next(self.next_job)
                if index >= self.jobs:
                    return
                kind = rng.choices(KINDS, weights)[0]
                nonce = f"n{index}x{rng.randrange(10**9)}"
                via_gateway = not kind.interactive and index % 2 == 1
                started = time.monotonic()
                try:
                    if kind.interactive:
                        result = trio.run(self._interactive, kind.params(nonce))
                    elif via_gateway:
                        result = self._via_gateway(http, kind.params(nonce))
                    else:
                        result = Client(self.path, timeout=180).execute(**kind.params(nonce))
                except _Refused:
                    self.tally.add("refused")
                except (DaemonUnavailable, _Lost) as exc:
                    explained = any(started <= kill <= time.monotonic() for kill in self.kills)
                    self.tally.add("lost" if explained else "lost?", f"{kind.name}: {exc}")
                except SandboxError as exc:
                    self.tally.add("wrong", f"{kind.name}: {type(exc).__name__}: {exc}")
                else:
                    if kind.right(result, nonce):
                        self.tally.add("right")
                    elif result.sandbox_id in self.killed_sandboxes:
                        self.tally.add("killed")  # answered: the soak killed its sandbox
                    else:
                        detail = (
                            f"{kind.name}: {result.status} {result.message} {result.stdout[:80]!r}"
                        )
                        self.tally.add("wrong", detail)
                with self.tally.lock:
                    self.done += 1

    def _via_gateway(self, http: httpx.Client, params: dict) -> ExecutionResult:
        url = f"http://127.0.0.1:{self.gateway_port}/execute"
        try:
            answer = http.post(url, json=params)
        except httpx.ConnectError as exc:
            raise _Refused() from exc
        except httpx.TransportError as exc:
            raise _Lost(f"the gateway went away: {exc!r}") from exc
        body = answer.json()
        if answer.status_code == 503 and "went away" in body.get("error", ""):
            raise _Lost(body["error"])
        if answer.status_code != 200:
            raise SandboxError(f"HTTP {answer.status_code}: {body.get('error')}")
        return ExecutionResult.from_dict(body)

    async def _interactive(self, params: dict) -> ExecutionResult:
        nonce = params.pop("nonce")
        try:
            async with AsyncClient(self.path).open_execution(
                **params, interactive=True, timeout=30
            ) as execution:
                await execution.send_stdin(f"{nonce}\n", eof=True)
                async for _ in execution:
                    pass
        except DaemonUnavailable as exc:
            if "refuses connections" in exc.message:
                raise _Refused() from exc
            raise
        return execution.result

    # The faults.

    def faults(self) -> None:
        """At set shares of the run: kill sandboxes from outside, SIGKILL and restart
        the daemon, restart the gateway."""
        # The daemon is killed early: the one that ends the run has served most of it.
        plan = [
            (0.05, self.kill_a_sandbox),
            (0.10, self.kill_the_daemon),
            (0.20, self.kill_the_daemon),
            (0.35, self.restart_the_gateway),
            (0.50, self.kill_a_sandbox),
            (0.65, self.restart_the_gateway),
            (0.80, self.kill_a_sandbox),
        ]
        for share, fault in plan:
            while self.done < share * self.jobs and time.monotonic() < self.deadline:
                if self.done >= self.jobs:
                    return
                time.sleep(0.05)
            if time.monotonic() >= self.deadline:
                return
            fault()

    def kill_a_sandbox(self) -> None:
        """SIGKILL every process of one busy sandbox, its agent too, from the host."""
        busy = {}
        for cgroup in sandbox_cgroups(self.name):
            with contextlib.suppress(OSError):
                pids = (cgroup / "cgroup.procs").read_text().split()
                if len(pids) > 2:  # more than a ready jail's bubblewrap and agent
                    busy[cgroup.name] = pids
        if not busy:
            print("  fault: no busy sandbox to kill")
            return
        sandbox = random.choice(sorted(busy))
        self.killed_sandboxes.add(sandbox)
        for pid in busy[sandbox]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        print(f"  fault at {self.done} jobs: killed sandbox {sandbox} from outside")

    def kill_the_daemon(self) -> None:
        self.kills.append(time.monotonic())
        self.daemon.stop(signal.SIGKILL)
        self.kills.append(time.monotonic())
        print(f"  fault at {self.done} jobs: SIGKILL of the daemon, restarting it")
        self.daemon = self._start_daemon()
        self.memory["daemon"] = [rss_mib(self.daemon.process.pid)]

    def restart_the_gateway(self) -> None:
        print(f"  fault at {self.done} jobs: restarting the gateway")
        self.gateway.stop()
        self.gateway = self._start_gateway()
        self.memory["gateway"] = [rss_mib(self.gateway.process.pid)]

    def run(self) -> None:
        self.memory = {
            "daemon": [rss_mib(self.daemon.process.pid)],
            "gateway": [rss_mib(self.gateway.process.pid)],
        }
        workers = [threading.Thread(target=self.worker, args=(n,)) for n in range(self.concurrency)]
        faults = threading.Thread(target=self.faults)
        for thread in [*workers, faults]:
            thread.start()
        for thread in [*workers, faults]:
            thread.join()
        self.memory["daemon"].append(rss_mib(self.daemon.process.pid))
        self.memory["gateway"].append(rss_mib(self.gateway.process.pid))

    def stop(self) -> dict[str, object]:
        """Stop everything; what it left on the host."""
        self.gateway.stop()
        uid_base = self.daemon.uid_base
        self.daemon.stop()
        self.listener.close()
        self.http_listener.close()
        wait_for(lambda: not sandbox_processes(uid_base, 16), 10)
        return {
            "processes": len(sandbox_processes(uid_base, 16)),
            "cgroups": len(sandbox_cgroups(self.name)),
        }


class _Refused(Exception):
    pass


class _Lost(Exception):
    pass


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def links() -> int:
    return len(os.listdir("/sys/class/net"))


@dataclass
class Report:
    jobs: int
    seconds: float
    outcomes: Counter[str]
    memory: dict[str, list[float]]  # "daemon"/"gateway": MiB at the start, at the end
    left: dict[str, int]  # what remained on the host, by kind
    problems: list[str]  # the wrong and the unexplained lost, described

    def lines(self) -> list[str]:
        tally = self.outcomes
        answered = tally["right"] + tally["killed"] + tally["wrong"]
        lines = [
            f"{self.jobs} jobs in {self.seconds:.0f} s ({self.jobs / self.seconds:.1f} jobs/s)",
            f"answered {answered}: right {tally['right']}, in a sandbox killed from outside "
            f"{tally['killed']}, wrong {tally['wrong']}; lost {tally['lost'] + tally['lost?']} "
            f"(not in flight at a SIGKILL: {tally['lost?']}); refused {tally['refused']}",
        ]
        for what, (start, end) in self.memory.items():
            lines.append(f"{what} memory: {start:.0f} MiB at its start, {end:.0f} MiB at the end")
        lines.append("left on the host: " + ", ".join(f"{k} {v}" for k, v in self.left.items()))
        return lines + ["  " + problem for problem in self.problems[:20]]


def run_soak(jobs: int, concurrency: int, seconds: float) -> Report:
    before = {"mounts": mounts(), "links": links()}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sandboxd-soak-") as tmp:
        directory = Path(tmp)
        directory.chmod(0o755)
        soak = Soak(directory, jobs, concurrency, seconds)
        try:
            soak.run()
        finally:
            left = soak.stop()
    left["mounts"] = len(set(mounts()) ^ set(before["mounts"]))
    left["links"] = links() - int(before["links"])
    return Report(
        jobs=soak.done,
        seconds=time.monotonic() - started,
        outcomes=soak.tally.outcomes,
        memory=soak.memory,
        left=left,
        problems=soak.tally.wrong + soak.tally.lost_unexplained,
    )


def main() -> None:
    jobs = int(os.environ.get("SOAK_JOBS", "10000"))
    concurrency = int(os.environ.get("SOAK_CONCURRENCY", "16"))
    seconds = float(os.environ.get("SOAK_SECONDS", "3600"))
    print(f"soak: {jobs} jobs at concurrency {concurrency}, at most {seconds:g} s")
    print("\n".join(run_soak(jobs, concurrency, seconds).lines()))


if __name__ == "__main__":
    main()
