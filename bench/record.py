"""The benchmark of record: what a job costs through sandboxd, against the runtime bare and
against a bubblewrap jail per run, all measured side by side in one run.

A daemon (namespaces backend unless ``BENCH_BACKEND`` says otherwise) and a gateway of
its own are started. For each language, a hello-world by every method, taking turns:

- ``bare``: the runtime on the host (``python3 -c``, ``deno run``; for Rust the image's
  own rustc, in a chroot of the image: the host's toolchain would be another compiler);
- ``bwrap``: bubblewrap with every namespace the jails use, as an unprivileged uid,
  around the same runtime on the image root: the floor of a jail per job;
- ``library``, ``sandboxctl``, ``http``: sandboxd through its client library, its CLI,
  and ``POST /execute`` on the gateway (keep-alive).

Printed and written to ``bench/results/<name>.json``: p50/p95 latency at low load (one
job at a time); throughput at concurrency 1, 8 and 16 over a fixed number of jobs, with
the machine's CPU per job from ``/proc/stat`` (for sandboxd counted until the pool has
refilled what the jobs took); the memory a ready sandbox holds. Each as a ratio to bare.
Nothing is asserted: these are measurements for people to read.

``python -m bench.record --quick`` measures the python line only, in under a minute;
``python -m bench.record --markdown FILE`` prints the README's table from a result file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from bench.stats import Samples, interleave
from sandboxctl.client import Client
from sandboxd.host.jail import BWRAP
from tests.daemon_process import Daemon, start_daemon, start_gateway
from tests.host_state import sandbox_processes

RESULTS = Path(__file__).parent / "results"
HELLO = {
    "python": 'print("hello")',
    "typescript": 'console.log("hello")',
    "rust": 'fn main() { println!("hello"); }',
}
SOURCE = {"python": "main.py", "typescript": "main.ts", "rust": "main.rs"}
# In the image (and for bare Deno on the host): the commands sandboxd runs.
RUN = {
    "python": ["python3", "main.py"],
    "typescript": ["deno", "run", "--quiet", "--no-prompt", "--no-config", "--no-lock", "main.ts"],
    "rust": ["sh", "-c", "rustc --edition=2021 -O -o main main.rs && ./main"],
}
CONCURRENCY = (1, 8, 16)
BENCH_UID = 65533  # the bwrap floor runs unprivileged, as the jails do
Job = Callable[[], object]


def busy_jiffies() -> int:
    """CPU time the whole machine has spent running something, in clock ticks. Not its
    steal time: on a VM that is the host running others while this one waited, which
    comes and goes with the neighbours, not with the jobs."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    return user + nice + system + irq + softirq


def checked(argv: list[str], **options: Any) -> Job:
    def job() -> None:
        done = subprocess.run(argv, capture_output=True, **options)
        if done.stdout != b"hello\n":
            raise RuntimeError(f"{argv[:3]}... printed {done.stdout!r}: {done.stderr[-300:]!r}")

    return job


def bare_job(language: str, rootfs: Path, workdir: Path) -> Job:
    """A hello-world run bare, its source in ``workdir``: the host's python3 and deno;
    for Rust, the image's rustc in a chroot of the image (a mount namespace of its own
    for a private /tmp): no other namespace, seccomp or cgroup."""
    source = workdir / SOURCE[language]
    source.write_text(HELLO[language])
    if language == "python":
        return checked(["/usr/bin/python3", "-c", HELLO["python"]])
    if language == "typescript":
        deno = shutil.which("deno", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
        if deno is None:
            raise RuntimeError("no deno on the host to compare with")
        env = {**os.environ, "DENO_DIR": str(workdir / "deno"), "NO_COLOR": "1"}
        return checked([deno, *RUN["typescript"][1:]], cwd=workdir, env=env)
    script = (
        f"mount -t tmpfs tmpfs {rootfs}/tmp && cp {source} {rootfs}/tmp/ && "
        f"exec chroot {rootfs} /bin/sh -c 'cd /tmp && {RUN['rust'][2]}'"
    )
    return checked(["unshare", "--mount", "--propagation", "private", "sh", "-c", script])


class Methods:
    """One hello-world job of each method, for one language."""

    def __init__(
        self, language: str, rootfs: Path, workdir: Path, client: Client, http: Any
    ) -> None:
        self.language = language
        self.rootfs = rootfs
        self.workdir = workdir / language
        self.workdir.mkdir()
        os.chmod(self.workdir, 0o755)
        (self.workdir / SOURCE[language]).write_text(HELLO[language])
        os.chmod(self.workdir / SOURCE[language], 0o644)  # bwrap's uid reads it
        self.client = client
        self.http = http

    def bare(self) -> Job:
        return bare_job(self.language, self.rootfs, self.workdir)

    def bwrap(self) -> Job:
        argv = [
            "setpriv", f"--reuid={BENCH_UID}", f"--regid={BENCH_UID}", "--clear-groups",
            *BWRAP,
            "--ro-bind", str(self.rootfs), "/",
            "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
            "--tmpfs", "/work", "--ro-bind", str(self.workdir / SOURCE[self.language]),
            f"/work/{SOURCE[self.language]}",
            "--chdir", "/work", "--clearenv",
            "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin", "--setenv", "HOME", "/tmp",
            "--setenv", "DENO_DIR", "/tmp/deno", "--setenv", "NO_COLOR", "1",
            "--",
        ]  # fmt: skip
        python = ["python3", "-c", HELLO["python"]]
        run = python if self.language == "python" else RUN[self.language]
        return checked([*argv, *run])

    def library(self) -> Job:
        def job() -> None:
            result = self.client.execute(self.language, HELLO[self.language])
            if result.stdout != "hello\n":
                raise RuntimeError(f"library: {result}")

        return job

    def sandboxctl(self, socket: Path) -> Job:
        cli = shutil.which("sandboxctl", path=str(Path(sys.executable).parent))
        if cli is None:
            raise RuntimeError("sandboxctl is not installed beside this python")
        return checked(
            [cli, "--socket", str(socket), "exec", "-l", self.language, "-c", HELLO[self.language]]
        )

    def over_http(self) -> Job:
        def job() -> None:
            body = {"language": self.language, "code": HELLO[self.language]}
            answer = self.http.post("/execute", json=body).json()
            if answer.get("output") != "hello\n":
                raise RuntimeError(f"http: {answer}")

        return job


def wait_for_refill(client: Client, size: int, timeout: float = 120) -> None:
    """Until the pool is back to ``size`` ready sandboxes, nothing starting or busy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pool = client.health()["pool"]
        if pool["ready"] >= size and not pool["starting"] and not pool["busy"]:
            return
        time.sleep(0.05)
    raise RuntimeError(f"the pool did not refill to {size} within {timeout} s")


def throughput(job: Job, jobs: int, concurrency: int, settle: Callable[[], None]) -> dict:
    """``jobs`` jobs by ``concurrency`` workers: jobs per second, and the machine's CPU
    per job counted until ``settle`` returns (for sandboxd: the pool has refilled)."""
    ticks = os.sysconf("SC_CLK_TCK")
    busy = busy_jiffies()
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as workers:
        for future in [workers.submit(job) for _ in range(jobs)]:
            future.result()
    wall = time.perf_counter() - start
    settle()
    cpu = (busy_jiffies() - busy) / ticks
    return {"jobs_per_second": jobs / wall, "cpu_per_job": cpu / jobs}


def resident(pid: int) -> int:
    """A process's resident memory now (VmRSS), in bytes; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def waiting_runtime_rss(language: str) -> int | None:
    """What the bare runtime holds, started and waiting for input (None: no runtime
    to wait, as for Rust, whose sandboxes hold none)."""
    argv = {
        "python": ["/usr/bin/python3", "-c", "import sys; sys.stdin.read()"],
        "typescript": [
            shutil.which("deno", path=str(Path(sys.executable).parent)) or "deno",
            "eval",
            "await new Response(Deno.stdin.readable).text()",
        ],
    }.get(language)
    if argv is None:
        return None
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL) as process:
        time.sleep(1)
        held = resident(process.pid)
        assert process.stdin is not None
        process.stdin.close()
    return held


def measure(
    language: str,
    methods: Methods,
    daemon: Daemon,
    client: Client,
    pool_size: int,
    quick: bool,
) -> dict[str, Any]:
    compiled = language == "rust"
    runs = int(os.environ.get("BENCH_RUNS", 6 if compiled else 20 if quick else 40))
    jobs = int(os.environ.get("BENCH_JOBS", 8 if compiled else 48 if quick else 96))
    rounds = 1 if quick or compiled else 2
    latency_jobs = {
        "bare": methods.bare(),
        "bwrap": methods.bwrap(),
        "library": methods.library(),
        "sandboxctl": methods.sandboxctl(daemon.socket),
        "http": methods.over_http(),
    }
    for job in latency_jobs.values():  # caches, and the pool's demand for this language
        job()
    samples = {name: Samples(name) for name in latency_jobs}
    print(f"{language}: latency, {runs} rounds of every method in turn", flush=True)
    interleave(runs, *((samples[name], job) for name, job in latency_jobs.items()))
    record: dict[str, Any] = {
        "latency": {
            name: {"p50": s.median, "p95": s.p95, "runs": len(s.seconds)}
            for name, s in samples.items()
        },
        "throughput": {},
    }

    def refill() -> None:
        wait_for_refill(client, pool_size)

    settles = {"bare": lambda: None, "bwrap": lambda: None, "library": refill}
    for concurrency in CONCURRENCY:
        print(f"{language}: {jobs} jobs at concurrency {concurrency}", flush=True)
        figures: dict[str, list[dict]] = {name: [] for name in settles}
        for _ in range(rounds):
            for name, settle in settles.items():
                figures[name].append(throughput(latency_jobs[name], jobs, concurrency, settle))
        record["throughput"][str(concurrency)] = {
            name: {key: sorted(f[key] for f in runs_of)[len(runs_of) // 2] for key in runs_of[0]}
            | {"jobs": jobs, "rounds": rounds}
            for name, runs_of in figures.items()
        }
    refill()
    pool = client.health()["pool"]
    uid_base = daemon.uid_base
    ready = max(1, pool["ready"])  # the pool is at rest: every sandbox process is a ready one
    rss = sum(resident(pid) for pid in sandbox_processes(uid_base, pool["max"]))
    record["memory"] = {
        "ready_sandbox_cgroup_bytes": pool["ready_memory_bytes"] / ready,
        "ready_sandbox_rss_bytes": rss / ready,
        "ready_by_kind": pool["ready_by_kind"],
        "bare_waiting_rss_bytes": waiting_runtime_rss(language),
    }
    return record


def ratio(value: float, baseline: float) -> float:
    return value / baseline if baseline else float("nan")


def report(results: dict[str, Any]) -> str:
    lines = [
        f"{results['machine']['cpus']} CPUs, backend {results['backend']}, "
        f"pool size {results['pool_size']}, {results['date']}",
        "",
        f"{'':22} {'p50':>8} {'p95':>8} {'x bare':>7}   "
        + "   ".join(f"{f'c={c} jobs/s':>12} {'x bare':>6}" for c in CONCURRENCY)
        + f"   {'CPU/job c=8':>11} {'x bare':>6}",
    ]
    for language, record in results["languages"].items():
        bare = record["latency"]["bare"]["p50"]
        for name, latency in record["latency"].items():
            line = (
                f"{language + ' ' + name:22} {latency['p50'] * 1e3:6.1f}ms "
                f"{latency['p95'] * 1e3:6.1f}ms {ratio(latency['p50'], bare):6.2f}x   "
            )
            if name in record["throughput"]["1"]:
                cells = []
                for c in CONCURRENCY:
                    row = record["throughput"][str(c)]
                    rate = row[name]["jobs_per_second"]
                    cells.append(
                        f"{rate:12.1f} {ratio(rate, row['bare']['jobs_per_second']):5.2f}x"
                    )
                eight = record["throughput"]["8"]
                cpu = eight[name]["cpu_per_job"]
                bare_cpu = eight["bare"]["cpu_per_job"]
                line += "   ".join(cells) + f"   {cpu * 1e3:9.1f}ms {ratio(cpu, bare_cpu):5.2f}x"
            lines.append(line.rstrip())
        memory = record["memory"]
        bare_rss = memory["bare_waiting_rss_bytes"]
        lines.append(
            f"{language + ' ready sandbox':22} {memory['ready_sandbox_rss_bytes'] / 2**20:.1f} MiB"
            f" resident ({memory['ready_sandbox_cgroup_bytes'] / 2**20:.1f} MiB charged to its"
            " cgroup)"
            + (f"; a bare runtime waiting: {bare_rss / 2**20:.1f} MiB" if bare_rss else "")
            + f"; ready by kind {memory['ready_by_kind']}"
        )
        lines.append("")
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    """The README's table: one row per language and method."""
    rows = [
        "| | p50 | × bare | jobs/s c=1 | c=8 | × bare | c=16 | CPU/job (c=8) | × bare |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for language, record in results["languages"].items():
        bare = record["latency"]["bare"]["p50"]
        for name, latency in record["latency"].items():
            cells = [
                f"{language} {name}",
                f"{latency['p50'] * 1e3:.1f} ms",
                f"{ratio(latency['p50'], bare):.2f}×",
            ]
            if name in record["throughput"]["1"]:
                t = {c: record["throughput"][str(c)] for c in CONCURRENCY}
                cells += [
                    f"{t[1][name]['jobs_per_second']:.1f}",
                    f"{t[8][name]['jobs_per_second']:.1f}",
                    f"{ratio(t[8][name]['jobs_per_second'], t[8]['bare']['jobs_per_second']):.2f}×",
                    f"{t[16][name]['jobs_per_second']:.1f}",
                    f"{t[8][name]['cpu_per_job'] * 1e3:.1f} ms",
                    f"{ratio(t[8][name]['cpu_per_job'], t[8]['bare']['cpu_per_job']):.2f}×",
                ]
            else:
                cells += [""] * 6
            rows.append("| " + " | ".join(cells) + " |")
    rows += ["", "| ready sandbox | resident | charged to its cgroup | a bare runtime waiting |"]
    rows.append("|---|---|---|---|")
    for language, record in results["languages"].items():
        memory = record["memory"]
        bare = memory["bare_waiting_rss_bytes"]
        rows.append(
            f"| {language} | {memory['ready_sandbox_rss_bytes'] / 2**20:.1f} MiB"
            f" | {memory['ready_sandbox_cgroup_bytes'] / 2**20:.1f} MiB"
            f" | {f'{bare / 2**20:.1f} MiB' if bare else '(none: compiled per job)'} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the python line only")
    parser.add_argument("--markdown", type=Path, help="print the README table of a result file")
    options = parser.parse_args()
    if options.markdown:
        print(markdown(json.loads(options.markdown.read_text())))
        return
    languages = ["python"] if options.quick else list(HELLO)
    backend = os.environ.get("BENCH_BACKEND", "namespaces")
    pool_size = int(os.environ.get("BENCH_POOL_SIZE", "8"))
    with tempfile.TemporaryDirectory(prefix="sandboxd-bench-") as tmp:
        os.chmod(tmp, 0o755)
        daemon = start_daemon(
            Path(tmp),
            pool={"size": pool_size, "max_sandboxes": pool_size + 24},
            backend={"name": backend},
            daemon={"log_level": "warning"},
        )
        gateway = None
        try:  # a gateway that fails to start must not leave the daemon running
            gateway = start_gateway(
                Path(tmp), daemon.socket, rate_per_minute=10**6, rate_burst=10**4,
                concurrent_per_key=64,
            )  # fmt: skip
            client = Client(daemon.socket)
            status = client.status()
            rootfs = Path(status["image"]["path"]) / "rootfs"
            results: dict[str, Any] = {
                "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "backend": status["backend"]["name"],
                "pool_size": pool_size,
                "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
                "languages": {},
            }
            limits = httpx.Limits(max_connections=max(CONCURRENCY))
            with httpx.Client(base_url=gateway.url, timeout=120, limits=limits) as http:
                for language in languages:
                    methods = Methods(language, rootfs, Path(tmp), client, http)
                    results["languages"][language] = measure(
                        language, methods, daemon, client, pool_size, options.quick
                    )
        finally:
            if gateway is not None:
                gateway.stop()
            daemon.stop()
    RESULTS.mkdir(exist_ok=True)
    name = f"{'quick-' if options.quick else ''}{results['backend']}.json"
    (RESULTS / name).write_text(json.dumps(results, indent=1) + "\n")
    print()
    print(report(results))
    print(f"\nwritten to {RESULTS / name}")


if __name__ == "__main__":
    main()
