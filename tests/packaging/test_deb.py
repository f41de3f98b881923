"""The Debian package: what it holds, and that it installs on a bare Debian and runs.

The install test bootstraps a minimal Debian with mmdebstrap (from the host's apt
sources), installs the package there with apt (its postinst runs), and then runs the
packaged daemon, CLI and gateway with that root as their / against the host's kernel,
with the namespaces backend and the host's built image.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sandboxd.config import DEFAULT_SOCKET
from sandboxd.images import host_apt_sources
from tests.conftest import IS_ROOT
from tests.daemon_process import free_port

TOP = Path(__file__).resolve().parents[2]
# The program the daemon runs as root to start each jail, built by make deb.
LAUNCHER = "./usr/lib/sandboxd/python/sandboxd/host/enter-jail"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deb")
    built = subprocess.run(
        [TOP / "packaging/build-deb", out, sys.executable],
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    (path,) = out.glob("sandboxd_*_amd64.deb")
    assert built.stdout.strip().endswith(str(path))
    return path


def dpkg_deb(*args: str | Path) -> str:
    return subprocess.run(["dpkg-deb", *args], capture_output=True, text=True, check=True).stdout


def test_the_package_holds_the_commands_units_config_and_docs(deb):
    fields = {
        name: dpkg_deb("-f", deb, name).strip()
        for name in ("Package", "Version", "Architecture", "Depends")
    }
    assert fields["Package"] == "sandboxd"
    assert fields["Version"] == "0.1.0-1"
    assert fields["Architecture"] == "amd64"
    for dependency in ("python3 (>= 3.11)", "python3 (<< 3.12)", "bubblewrap", "mmdebstrap"):
        assert dependency in fields["Depends"]
    files = {line.split()[-1] for line in dpkg_deb("-c", deb).splitlines()}
    for path in (
        "./usr/bin/sandboxd",
        "./usr/bin/sandboxctl",
        "./usr/bin/sandboxd-gateway",
        "./usr/bin/sandboxd-mcp",
        "./lib/systemd/system/sandboxd.service",
        "./lib/systemd/system/sandboxd.socket",
        "./lib/systemd/system/sandboxd-gateway.service",
        "./etc/sandboxd/sandboxd.toml",
        "./usr/lib/sandboxd/python/guest/agent/__main__.py",
        "./usr/lib/sandboxd/python/guest/init.sh",
        "./usr/lib/sandboxd/python/guest/reaper.c",  # built by the image's cc at start
        "./usr/lib/sandboxd/python/sandboxctl/gateway/playground.html",
        "./usr/lib/sandboxd/python/fastapi_offline/static/swagger-ui-bundle.js",
        "./usr/share/doc/sandboxd/README.md",
        "./usr/share/doc/sandboxd/examples/haproxy.cfg",
        "./var/lib/sandboxd/",
        LAUNCHER,
    ):
        assert path in files
    (launcher,) = [line for line in dpkg_deb("-c", deb).splitlines() if line.endswith(LAUNCHER)]
    assert launcher.split()[:2] == ["-rwxr-xr-x", "root/root"]  # root runs it: only root writes


# lintian's warnings that stay, each for a reason (packaging/README.md says which).
ACCEPTED_WARNINGS = {
    "initial-upload-closes-no-bugs",  # not uploaded to Debian: no ITP bug to close
    "maintainer-script-calls-systemctl",  # --no-block: the first start builds the image
    "no-manual-page",  # each command's --help is its manual
    "script-not-executable",  # guest/init.sh: the VMs' /init, run by busybox in a VM
    "unusual-interpreter",  # that init.sh, and bundled modules' own shebang lines
}


@pytest.mark.skipif(shutil.which("lintian") is None, reason="needs lintian (make deps)")
def test_lintian_finds_no_error_and_only_the_warnings_explained(deb):
    checked = subprocess.run(
        ["lintian", "--tag-display-limit", "0", deb], capture_output=True, text=True
    )
    tags = [line.split()[:3] for line in checked.stdout.splitlines() if line[:2] in ("E:", "W:")]
    assert [t for t in tags if t[0] == "E:"] == []
    assert {t[2] for t in tags} <= ACCEPTED_WARNINGS, checked.stdout
    assert "libc6" in dpkg_deb("-f", deb, "Depends")  # what the bundled wheels link


def test_the_package_names_no_path_of_the_machine_it_was_built_on(deb, tmp_path):
    subprocess.run(["dpkg-deb", "-R", deb, tmp_path], check=True)
    assert (tmp_path / "DEBIAN/conffiles").read_text().split() == ["/etc/sandboxd/sandboxd.toml"]
    unit = (tmp_path / "lib/systemd/system/sandboxd.service").read_text()
    assert "ExecStart=/usr/bin/sandboxd run" in unit
    assert "ExecStartPre=/usr/bin/sandboxd image build" in unit
    assert "Requires=sandboxd.socket" in unit  # held by systemd across restarts
    socket_unit = (tmp_path / "lib/systemd/system/sandboxd.socket").read_text()
    assert f"ListenStream={DEFAULT_SOCKET}\n" in socket_unit
    found = subprocess.run(
        ["grep", "-rlF", "-e", str(TOP), "-e", "/tmp/tmp", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert found.stdout == ""
    assert (tmp_path / "usr/bin/sandboxd").read_text().startswith("#!/usr/bin/python3 -I\n")


# Run in the installed root, as its /: the packaged daemon on the host's image, then its
# CLI as root and its gateway as the package's own sandboxd-gateway user.
RUN_INSTALLED = r"""
set -eu
port=$1
sandboxd run --config /etc/sandboxd/test.toml >/tmp/daemon.log 2>&1 &
daemon=$! gateway=
trap 'kill $daemon $gateway 2>/dev/null || true; wait; cat /tmp/*.log >&2' EXIT
for _ in $(seq 300); do sandboxctl health >/dev/null 2>&1 && break; sleep 0.2; done
answer=$(sandboxctl exec -l python -c 'print(6 * 7)')
echo "cli: $answer"
setpriv --reuid sandboxd-gateway --regid sandboxd-gateway --init-groups --inh-caps=-all \
    sandboxd-gateway --bind "127.0.0.1:$port" >/tmp/gateway.log 2>&1 &
gateway=$!
python3 - "$port" <<'EOF'
import json, sys, time, urllib.error, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/execute"
body = json.dumps({"language": "python", "code": "print(2 + 2)"}).encode()
request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
for _ in range(100):
    try:
        answer = json.load(urllib.request.urlopen(request, timeout=60))
    except urllib.error.URLError as exc:  # not listening yet
        if isinstance(exc, urllib.error.HTTPError):
            raise
        time.sleep(0.2)
    else:
        print("gateway:", answer["stdout"].strip())
        break
EOF
"""


def as_root_of(root: Path) -> list[str]:
    """bubblewrap (as root, keeping its capabilities) making ``root`` the / of what it
    runs, with the host's kernel interfaces and image store. Not a chroot: the daemon's
    jails could not make user namespaces in one."""
    return [
        "bwrap", "--cap-add", "ALL", "--die-with-parent",
        "--bind", str(root), "/",
        "--bind", "/proc", "/proc", "--dev-bind", "/dev", "/dev", "--bind", "/sys", "/sys",
        "--tmpfs", "/run", "--tmpfs", "/tmp",
        "--ro-bind", "/var/lib/sandboxd/images", "/var/lib/sandboxd/images",
    ]  # fmt: skip


def run_in_own_session(argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in a session of its own: on a timeout, what it started in the
    background (the daemon, the gateway) is killed with it."""
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
            pytest.fail(f"timed out after {timeout} s: {err[-3000:]}")
    return subprocess.CompletedProcess(argv, process.returncode, out, err)


@pytest.mark.skipif(not IS_ROOT, reason="needs root: mmdebstrap, bubblewrap, jails")
@pytest.mark.image
def test_installs_on_bare_debian_and_runs_jobs_from_cli_and_gateway(deb, tmp_path):
    root = tmp_path / "root"
    bootstrap = subprocess.run(
        [
            "mmdebstrap",
            "--mode=root",
            "--variant=apt",
            "--aptopt=APT::Install-Recommends false",
            f"--include={deb}",
            "--hook-dir=/usr/share/mmdebstrap/hooks/file-mirror-automount",
            "bookworm",
            root,
            *host_apt_sources("bookworm"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bootstrap.returncode == 0, bootstrap.stderr[-3000:]

    def in_root(*argv: str) -> str:
        return subprocess.run(
            [*as_root_of(root), *argv], capture_output=True, text=True, check=True
        ).stdout

    # The postinst made the socket's group and the gateway's user, a member of it.
    assert "sandboxd" in in_root("id", "-nG", "sandboxd-gateway").split()
    # ... and the bytecode the commands' users could not write (the package holds none).
    lib = root / "usr/lib/sandboxd/python"
    for module in ("sandboxctl/cli", "sandboxd/rpc_server", "click/core"):
        folder, name = module.rsplit("/", 1)
        assert list((lib / folder / "__pycache__").glob(f"{name}.cpython-*.pyc")), module
    assert in_root("sandboxd", "--version").strip() == "sandboxd, version 0.1.0"
    # The MCP server's SDK came with the package, and imports there.
    assert in_root("sandboxd-mcp", "--version").strip() == "sandboxd-mcp, version 0.1.0"
    (root / "etc/sandboxd/test.toml").write_text(
        '[daemon]\nname = "sbxdeb"\n[pool]\nsize = 1\n'
        f'[backend]\nname = "namespaces"\nuid_base = {600_000 + os.getpid() % 1000 * 64}\n'
    )
    port = free_port()
    ran = run_in_own_session([*as_root_of(root), "sh", "-c", RUN_INSTALLED, "sh", str(port)])
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stdout.splitlines() == ["cli: 42", "gateway: 4"], ran.stderr[-3000:]
