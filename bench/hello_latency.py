"""Hello-world latency per language through sandboxd, beside the bare runtime on the host.

A daemon of its own is started (root, built image). For each language, in one run and
taking turns: the client library's ``execute``, the ``sandboxctl exec`` command, and the
language run directly as a subprocess on the host (``python3 -c``, ``deno run``,
``rustc`` then the binary). Printed: median and p95 of each, and sandboxd's ratio to
the bare runtime. Nothing is asserted: these are measurements for people to read.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from bench.stats import Samples, interleave, table
from sandboxctl.client import Client
from tests.daemon_process import start_daemon

RUNS = int(os.environ.get("BENCH_RUNS", "30"))
HELLO = {
    "python": 'print("hello")',
    "typescript": 'console.log("hello")',
    "rust": 'fn main() { println!("hello"); }',
}


def bare_runtime(language: str, workdir: Path) -> Callable[[], object] | None:
    """The same program run on the host without sandboxd, or None if the host lacks it."""
    source = workdir / {"python": "main.py", "typescript": "main.ts", "rust": "main.rs"}[language]
    source.write_text(HELLO[language])
    if language == "python":
        # Debian's python3 when the host has it: the image's interpreter, not a shim.
        python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
        return lambda: subprocess.run(
            [python, "-c", HELLO[language]], check=True, capture_output=True
        )
    if language == "typescript":
        deno = shutil.which("deno", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
        if deno is None:
            return None
        env = {**os.environ, "DENO_DIR": str(workdir / "deno"), "NO_COLOR": "1"}
        return lambda: subprocess.run(
            [deno, "run", "--quiet", str(source)], check=True, capture_output=True, env=env
        )
    rustc = shutil.which("rustc", path=f"{os.environ['PATH']}:{Path.home()}/.cargo/bin")
    if rustc is None:
        return None

    def compile_and_run() -> None:
        subprocess.run(
            [rustc, "--edition=2021", "-O", "-o", str(workdir / "main"), str(source)],
            check=True,
            capture_output=True,
        )
        subprocess.run([str(workdir / "main")], check=True, capture_output=True)

    return compile_and_run


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="sandboxd-bench-") as tmp:
        daemon = start_daemon(Path(tmp), pool={"size": 4}, daemon={"log_level": "warning"})
        try:
            client = Client(daemon.socket)
            sandboxctl = [sys.executable, "-m", "sandboxctl", "--socket", str(daemon.socket)]
            rows = []
            print(
                f"hello-world latency, {RUNS} runs each, interleaved; backend "
                f"{client.status()['backend']['name']}, {os.cpu_count()} CPUs\n"
            )
            for language, code in HELLO.items():
                bare = bare_runtime(language, Path(tmp))
                if bare is None:
                    print(f"{language}: no {language} runtime on the host to compare with; skipped")
                    continue

                def library(language: str = language, code: str = code) -> None:
                    assert client.execute(language, code).stdout == "hello\n"

                def cli(language: str = language, code: str = code) -> None:
                    subprocess.run(
                        [*sandboxctl, "exec", "-l", language, "-c", code],
                        check=True,
                        capture_output=True,
                    )

                for action in (library, cli, bare):  # warm caches before measuring
                    action()
                via_library = Samples(f"{language} client library")
                via_cli = Samples(f"{language} sandboxctl exec")
                baseline = Samples(f"bare {language} (host)")
                interleave(RUNS, (via_library, library), (via_cli, cli), (baseline, bare))
                rows += [
                    (via_library.name, via_library, baseline),
                    (via_cli.name, via_cli, baseline),
                ]
            print(table(rows))
        finally:
            daemon.stop()


if __name__ == "__main__":
    main()
