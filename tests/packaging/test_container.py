"""The container image: ``make docker-build`` builds it from Debian packages only, and
``contrib/container/run`` runs it with the privileges contrib/container/README.md lists;
inside, the gateway answers /health and runs a Python hello-world, and a stop ends
both cleanly, leaving no cgroup of it on the host."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import IS_ROOT

REPO = Path(__file__).resolve().parents[2]
IMAGES = Path("/var/lib/sandboxd/images")  # the host's, built by make build

pytestmark = [
    pytest.mark.skipif(not IS_ROOT, reason="needs root: a container with a jail-making daemon"),
    pytest.mark.skipif(shutil.which("podman") is None, reason="needs podman (apt install podman)"),
]


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    runtime = ["--runtime", "runc"] if Path("/sys/fs/cgroup/unified").is_dir() else []
    return subprocess.run(
        ["podman", *runtime, *args], capture_output=True, text=True, timeout=120, check=check
    )


def test_the_image_builds_answers_health_and_runs_a_hello_world():
    built = subprocess.run(
        ["make", "-s", "--no-print-directory", "docker-build"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    name = f"sandboxd-test-{os.getpid()}"
    # No network at all: the host's images mounted, the gateway asked from inside.
    started = subprocess.run(
        [REPO / "contrib/container/run", "-d", "--name", name, "--network=none",
         "-v", f"{IMAGES}:{IMAGES}:ro"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    try:
        deadline = time.monotonic() + 60
        health: dict = {}
        while time.monotonic() < deadline and health.get("status") != "healthy":
            asked = podman("exec", name, "curl", "-s", "localhost:8000/health", check=False)
            health = json.loads(asked.stdout) if asked.stdout.startswith("{") else {}
            time.sleep(0.5)
        assert health.get("status") == "healthy", podman("logs", name).stderr[-2000:]
        job = json.dumps({"language": "python", "code": "print(2 + 2)"})
        ran = podman("exec", name, "curl", "-s", "-X", "POST", "localhost:8000/execute",
                     "-H", "Content-Type: application/json", "-d", job)  # fmt: skip
        answer = json.loads(ran.stdout)
        assert (answer["status"], answer["stdout"]) == ("ok", "4\n"), answer
        podman("stop", "-t", "30", name)
        state = podman("inspect", name, "--format", "{{.State.ExitCode}}").stdout.strip()
        assert state == "0", podman("logs", name).stderr[-2000:]
        assert "stopped; everything removed" in podman("logs", name).stderr
    finally:
        podman("rm", "-f", name, check=False)
    assert not any(Path("/sys/fs/cgroup").glob("*/container")), "the container's cgroups"
