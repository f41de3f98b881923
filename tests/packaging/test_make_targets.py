"""The original service's make targets, by their names, doing what sandboxd does for them."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import IS_ROOT

REPO = Path(__file__).resolve().parents[2]
ORIGINAL_TARGETS = (
    "help", "deps", "build", "run", "run-dev", "test", "test-api", "dev", "fmt", "status",
    "clean", "quickstart", "install-service", "setup-network", "setup-env", "build-rootfs",
    "download-kernel", "run-agent", "docker-build",
)  # fmt: skip
JOB = {
    "type": "job",
    "files": [{"path": "main.py", "content": "import os\nprint(input() * 2, os.getuid())"}],
    "run": {"argv": ["python3", "main.py"]},
    "stdin": "ab\n",
    "limits": {
        "wall_time": 10, "cpu_time": 10, "compile_time": 10, "memory_bytes": 2**28,
        "processes": 16, "output_bytes": 65536, "file_size_bytes": 2**20,
    },
}  # fmt: skip


def make(*args: str, **options: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "-s", "--no-print-directory", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        **options,  # type: ignore[call-overload]
    )


def test_make_help_lists_the_original_s_targets():
    listed = {line.split()[1] for line in make("help").stdout.splitlines() if line.strip()}
    assert set(ORIGINAL_TARGETS) <= listed, set(ORIGINAL_TARGETS) - listed


def test_run_agent_runs_the_guest_agent_on_its_stdin():
    # Not under tmp_path: nobody must reach the working directory.
    with tempfile.TemporaryDirectory(prefix="sandboxd-run-agent-", dir="/tmp") as work:
        os.chmod(work, 0o755)
        done = make(f"AGENT_WORKDIR={work}/work", "run-agent", input=json.dumps(JOB) + "\n")
    messages = [json.loads(line) for line in done.stdout.splitlines()]
    output = "".join(m["data"] for m in messages if m["type"] == "output")
    assert messages[-1]["status"] == "ok", done.stderr
    # Unjailed, it runs the program as nobody when started as root.
    assert output == f"abab {65534 if IS_ROOT else os.getuid()}\n"
    assert "agent: one job per run" in done.stderr


def test_install_service_writes_the_units_of_this_checkout(tmp_path):
    done = make(f"DESTDIR={tmp_path}", "install-service")
    assert done.returncode == 0, done.stderr
    assert "nothing enabled" in done.stdout
    units = tmp_path / "etc/systemd/system"
    assert sorted(p.name for p in units.iterdir()) == [
        "sandboxd-gateway.service", "sandboxd.service", "sandboxd.socket",
    ]  # fmt: skip
    service = (units / "sandboxd.service").read_text()
    assert f"ExecStart={REPO}/.venv/bin/sandboxd run" in service
    assert "@SANDBOXD@" not in service
    assert f"{REPO}/.venv/bin/sandboxd-gateway" in (units / "sandboxd-gateway.service").read_text()


@pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="no /dev/net/tun here")
def test_setup_network_checks_what_egress_needs_and_shows_its_config():
    done = make("setup-network")
    assert done.returncode == 0, done.stderr
    assert "no bridge" in done.stdout
    assert "allow = []" in done.stdout and "max_connections" in done.stdout
