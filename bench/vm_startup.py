"""QEMU microVMs on this machine: cold boot vs snapshot restore to agent-ready, and a
hello-world per language on a ready VM (its runtime warm where the language has one)
beside the bare runtime on the host.

Uses the qemu backend in-process (root, built image); KVM where the host has it,
software emulation otherwise — the header says which. Nothing is asserted.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import trio

from bench.record import HELLO, bare_job
from bench.stats import Samples, table
from sandboxd.backends import choose_backend
from sandboxd.config import load_config
from sandboxd.daemon import current_image
from sandboxd.job import parse_job, warm_runtime
from sandboxd.languages import LanguageTable

RUNS = int(os.environ.get("BENCH_VM_RUNS", "5"))


async def nothing(stage: str, stream: str, data: str) -> None:
    """Output is not looked at here."""


async def main() -> None:
    with tempfile.TemporaryDirectory(prefix="sandboxd-bench-") as tmp:
        config = load_config(
            environ={},
            overrides={
                "backend.name": ("qemu", "bench"),
                "daemon.name": (f"sbxbench{os.getpid()}", "bench"),
                "daemon.run_dir": (tmp, "bench"),
            },
        )
        image = current_image(config)
        backend, reason = choose_backend(config, image)
        started = trio.current_time()
        await backend.start()
        print(
            f"QEMU microVMs: {reason}\n{backend.describe()['snapshot']} "
            f"(start with snapshot: {trio.current_time() - started:.1f} s), {RUNS} runs each\n"
        )
        try:
            snapshot = backend.snapshot  # type: ignore[attr-defined]
            cold, restored = Samples("cold boot"), Samples("snapshot restore → ready")
            for _ in range(RUNS):
                for samples, source in ((cold, None), (restored, snapshot)):
                    backend.snapshot = source  # type: ignore[attr-defined]
                    start = trio.current_time()
                    async with backend.open_sandbox(1, 180):
                        samples.seconds.append(trio.current_time() - start)
            rows = [("snapshot restore → agent ready", restored, cold)]
            languages = LanguageTable(image.languages)
            for language, code in HELLO.items():
                workdir = Path(tmp) / language
                workdir.mkdir()
                bare = bare_job(language, image.path / "rootfs", workdir)
                job = parse_job(
                    {"language": language, "code": code, "limits": {"compile_time": 120}},
                    languages,
                    config.limits,
                )
                warm, baseline = Samples(f"{language} hello, ready VM"), Samples(f"bare {language}")
                for _ in range(RUNS):
                    runtime = warm_runtime(languages.resolve(language))
                    async with backend.open_sandbox(1, 180, runtime) as sandbox:
                        sandbox.claim()
                        start = trio.current_time()
                        run = await sandbox.run(job.agent_message(), job.limits, nothing)
                        warm.seconds.append(trio.current_time() - start)
                        assert run.record and run.record["status"] == "ok", run
                    baseline.time(bare)
                rows.append((warm.name, warm, baseline))
            print(table(rows))
        finally:
            await backend.aclose()


if __name__ == "__main__":
    trio.run(main)
