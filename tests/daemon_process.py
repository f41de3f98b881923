"""A real sandboxd started as its own process, with its own socket, run directory,
cgroup name and uid range, so tests and benchmarks never touch an installed service."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sandboxctl.client import Client
from sandboxd.backends.vm.snapshots import RESTORE_ATTEMPTS
from sandboxd.errors import DaemonUnavailable
from sandboxd.host.netns import in_netns

PR_SET_PDEATHSIG = 1


@dataclass
class Daemon:
    """A sandboxd process under test."""

    process: subprocess.Popen[bytes]
    socket: Path
    run_dir: Path
    name: str
    uid_base: int
    config_file: Path
    log_file: Path

    @property
    def client(self) -> Client:
        return Client(self.socket)

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)

    def clean_up(self) -> subprocess.CompletedProcess[str]:
        """``sandboxd cleanup`` with this daemon's config: what a killed daemon left."""
        return subprocess.run(
            [sys.executable, "-m", "sandboxd", "cleanup", "--config", str(self.config_file)],
            capture_output=True,
            text=True,
            timeout=60,
        )


_counter = 0
INSTANCE_PREFIX = f"sbxtest{os.getpid() % 10000}n"  # every test daemon's name starts so


def write_config(path: Path, settings: dict[str, dict[str, object]]) -> Path:
    lines = []
    for section, values in settings.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def launch(
    argv: list[str], log_file: Path, pass_fds: list[int] | None = None
) -> subprocess.Popen[bytes]:
    """Start a service of ours with its output in ``log_file`` and none of our SANDBOXD_*.
    Started from the main thread, it gets SIGTERM (and cleans up after itself) if we die
    first: a pytest killed in the middle leaves no daemon running as root with its
    jails. The kernel sends that signal when the starting *thread* ends, so one started
    from another thread (the soak restarts its services from its faults' thread) goes
    without."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOXD_")}
    with log_file.open("wb") as log:
        return subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            pass_fds=pass_fds or (),
            preexec_fn=(
                _terminate_with_parent
                if threading.current_thread() is threading.main_thread()
                else None
            ),
        )


def _terminate_with_parent() -> None:
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


# How systemd starts a daemon from sandboxd.socket: the listening socket as fd 3,
# LISTEN_FDS=1 and LISTEN_PID the daemon's own pid (exec keeps it).
ACTIVATE = (
    "import os, sys\n"
    "os.dup2(int(sys.argv[1]), 3)\n"
    "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid()))\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])\n"
)


def start_daemon(
    tmp_path: Path, *, listener: socket.socket | None = None, **sections: dict[str, object]
) -> Daemon:
    """Start ``sandboxd run`` with a config of its own; wait until it answers health.
    With ``listener``, it is started as systemd's socket activation would."""
    global _counter
    _counter += 1
    name = f"{INSTANCE_PREFIX}{_counter}"
    uid_base = 700_000 + (os.getpid() % 1000) * 4096 + _counter * 64
    run_dir = tmp_path / "run"
    settings: dict[str, dict[str, object]] = {
        "daemon": {
            "socket": str(tmp_path / "sandboxd.sock"),
            "run_dir": str(run_dir),
            "name": name,
            "log_level": "debug",
        },
        "pool": {"size": 2, "max_sandboxes": 32, "queue_timeout": 30},
        "backend": {"name": "namespaces", "uid_base": uid_base},
    }
    for section, values in sections.items():
        settings.setdefault(section, {}).update(values)
    config_file = write_config(tmp_path / "sandboxd.toml", settings)
    log_file = tmp_path / "daemon.log"
    argv = ["-m", "sandboxd", "run", "--config", str(config_file)]
    if listener is None:
        process = launch([sys.executable, *argv], log_file)
        socket_path = Path(str(settings["daemon"]["socket"]))
    else:
        fd = str(listener.fileno())
        process = launch([sys.executable, "-c", ACTIVATE, fd, *argv], log_file, [listener.fileno()])
        socket_path = Path(listener.getsockname())
    daemon = Daemon(process, socket_path, run_dir, name, uid_base, config_file, log_file)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"sandboxd exited with {process.returncode}:\n{daemon.log()}")
        try:
            if daemon.client.health()["pool"]["ready"] >= min(1, int(settings["pool"]["size"])):
                return daemon
        except DaemonUnavailable:
            pass
        time.sleep(0.05)
    try:
        daemon.stop()  # SIGTERM: it removes what it made
    except subprocess.TimeoutExpired:
        daemon.stop(signal.SIGKILL)
    raise RuntimeError(f"sandboxd did not become ready:\n{daemon.log()}")


@dataclass
class Gateway:
    """A sandboxd-gateway process under test."""

    process: subprocess.Popen[bytes]
    url: str
    log_file: Path

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_gateway(
    tmp_path: Path,
    daemon_socket: Path,
    *,
    extra_args: list[str] = (),
    listener: socket.socket | None = None,
    netns: str | None = None,
    daemon: dict[str, object] | None = None,
    **gateway: object,
) -> Gateway:
    """Start ``sandboxd-gateway`` on a free loopback port, or as systemd's socket
    activation would on ``listener``, in the network namespace whose file is ``netns``
    (None: ours), with ``daemon`` settings besides the socket; wait until it answers."""
    port = listener.getsockname()[1] if listener is not None else free_port()
    config = write_config(
        tmp_path / "gateway.toml",
        {
            "daemon": {"socket": str(daemon_socket), **(daemon or {})},
            "gateway": {"api_port": port, "bind": "127.0.0.1", **gateway},
        },
    )
    log_file = tmp_path / "gateway.log"
    argv = ["-m", "sandboxctl.gateway", "--config", str(config), *extra_args]
    enter = ["nsenter", f"--net={netns}"] if netns else []
    if listener is None:
        process = launch([*enter, sys.executable, *argv], log_file)
    else:
        fd = str(listener.fileno())
        argv = [*enter, sys.executable, "-c", ACTIVATE, fd, *argv]
        process = launch(argv, log_file, [listener.fileno()])
    running = Gateway(process, f"http://127.0.0.1:{port}", log_file)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gateway exited with {process.returncode}:\n{running.log()}")
        try:  # an HTTP answer: a socket held for it accepts before the gateway serves
            if in_netns(netns, lambda: _answers_http(port)):
                return running
        except OSError:
            pass
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"gateway did not come up:\n{running.log()}")


def _answers_http(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as probe:
        probe.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        return probe.recv(16).startswith(b"HTTP/")


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def receive_json_line(sock: socket.socket) -> dict:
    """One JSON line from a raw socket (a makefile() would keep the socket alive)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return json.loads(data)


HOLDING_CODE = (
    "import os, time\nprint(os.getpid(), flush=True)\nos.fork(); os.fork()\ntime.sleep(3600)"
)


def start_holding_job(socket_path: Path, code: str = HOLDING_CODE) -> tuple[socket.socket, str]:
    """Start a job that runs until its connection closes (by default: forks, then sleeps);
    return the connection and its first output, which shows it is running."""
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(socket_path))
    request = {
        "jsonrpc": "2.0",
        "method": "execute",
        "id": 1,
        "params": {"language": "python", "code": code},
    }
    sock.sendall(json.dumps(request).encode() + b"\n")
    note = receive_json_line(sock)
    assert note["method"] == "execute.output", note
    return sock, note["params"]["data"]


def assert_jobs_outlive_a_broken_snapshot(daemon: Daemon) -> None:
    """With its VM snapshot damaged, a VM daemon still runs every job (their VMs
    cold-boot), and after a few failed restores in a row gives snapshots up, saying so."""
    for _ in range(RESTORE_ATTEMPTS):
        result = daemon.client.execute("python", "print('still runs')")
        assert result.stdout == "still runs\n", result.message
    deadline = time.monotonic() + 60
    while not daemon.client.status()["backend"]["snapshot"].startswith("restore failed"):
        assert time.monotonic() < deadline, daemon.client.status()["backend"]
        time.sleep(0.2)


def wait_for_warm(client: Client, language: str, timeout: float = 60) -> None:
    """Until a ready sandbox holds ``language``'s runtime (the pool refills in the
    background, after each job, in the shares its recent demand gives)."""
    deadline = time.monotonic() + timeout
    while client.health()["pool"]["ready_by_kind"].get(language, 0) < 1:
        assert time.monotonic() < deadline, f"no warm {language} sandbox in {timeout} s"
        time.sleep(0.02)
