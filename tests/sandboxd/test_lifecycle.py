"""What the daemon leaves behind: nothing, whether a client leaves mid-job, the daemon is
stopped, or it crashes and starts again."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from sandboxctl.client import Client
from sandboxd.errors import DaemonUnavailable
from sandboxd.host.cgroups import CgroupLayout
from tests.daemon_process import start_daemon, start_gateway, start_holding_job
from tests.host_state import (
    mounts,
    program_processes,
    sandbox_cgroups,
    sandbox_processes,
    wait_for,
)


def busy_sandboxes(daemon) -> int:
    return daemon.client.health()["pool"]["busy"]


def test_a_client_that_leaves_mid_job_gets_its_sandbox_killed(make_daemon):
    daemon = make_daemon(pool={"size": 1})
    before = set(sandbox_cgroups(daemon.name))
    sock, _ = start_holding_job(daemon.socket)
    assert busy_sandboxes(daemon) == 1
    job_cgroups = set(sandbox_cgroups(daemon.name)) - before
    assert job_cgroups or before  # the job's sandbox was one of the ready ones
    # The program forks twice after its first line: wait for the forks (a loaded host
    # runs them late).
    assert wait_for(lambda: len(program_processes(daemon.uid_base)) == 4)
    sock.close()
    assert wait_for(lambda: busy_sandboxes(daemon) == 0)
    assert wait_for(lambda: not program_processes(daemon.uid_base))
    # The job's cgroup went away with it; only fresh pool sandboxes remain.
    live = {path.name for path in sandbox_cgroups(daemon.name)}
    assert len(live) <= 2
    assert daemon.client.execute("python", "print('next')").stdout == "next\n"


def test_after_the_daemon_stops_nothing_of_it_remains(make_daemon):
    mounts_before = mounts()
    daemon = make_daemon(pool={"size": 3})
    sock, _ = start_holding_job(daemon.socket)  # a job still running when the signal comes
    assert sandbox_processes(daemon.uid_base)
    assert sandbox_cgroups(daemon.name)
    started = time.monotonic()
    sock.close()
    assert daemon.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 30
    assert sandbox_processes(daemon.uid_base) == {}
    assert not any(parent.exists() for parent in CgroupLayout.detect().parents(daemon.name))
    assert mounts() == mounts_before
    assert not daemon.socket.exists()
    assert not (daemon.run_dir / daemon.name).exists()
    assert list(daemon.run_dir.iterdir()) == []
    assert "stopped; everything removed" in daemon.log()


# Starts a daemon for a test, says which, and waits to be killed (a pytest killed mid-run).
STARTER = (
    "import sys, time\n"
    "from pathlib import Path\n"
    "from tests.daemon_process import start_daemon\n"
    "daemon = start_daemon(Path(sys.argv[1]))\n"
    "print(daemon.process.pid, daemon.name, daemon.uid_base, flush=True)\n"
    "time.sleep(600)\n"
)


def test_a_daemon_started_for_tests_ends_and_cleans_up_when_its_tests_are_killed(tmp_path):
    starter = subprocess.Popen(
        [sys.executable, "-c", STARTER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    with starter:
        assert starter.stdout is not None
        pid, name, uid_base = starter.stdout.readline().split()
        assert sandbox_cgroups(name)
        starter.kill()
    # Its parent gone, it is this machine's PID 1's to reap, and it may stay a zombie.
    assert wait_for(lambda: int(pid) not in alive_processes(), timeout=60)
    assert not sandbox_cgroups(name)
    assert sandbox_processes(int(uid_base)) == {}
    assert "stopped; everything removed" in (tmp_path / "daemon.log").read_text()


def alive_processes() -> set[int]:
    alive = set()
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, IndexError):
            if entry.name.isdigit() and (entry / "stat").read_text().split(") ")[1][0] != "Z":
                alive.add(int(entry.name))
    return alive


def test_a_crashed_daemons_leftovers_are_removed_at_the_next_start(make_daemon, tmp_path):
    daemon = make_daemon(pool={"size": 2})
    sock, _ = start_holding_job(daemon.socket)
    leftovers = {path.name for path in sandbox_cgroups(daemon.name)}
    assert leftovers
    daemon.stop(signal.SIGKILL)
    sock.close()
    # --die-with-parent takes the jails down with the daemon...
    assert wait_for(lambda: sandbox_processes(daemon.uid_base) == {})
    # ...but its cgroups stay until a daemon of the same name starts again.
    assert leftovers <= {path.name for path in sandbox_cgroups(daemon.name)}
    again = tmp_path / "again"
    again.mkdir()
    restarted = start_daemon(
        again,
        daemon={"name": daemon.name, "run_dir": str(daemon.run_dir)},
        backend={"uid_base": daemon.uid_base},
    )
    try:
        assert not leftovers & {path.name for path in sandbox_cgroups(daemon.name)}
        assert "left by an earlier daemon" in restarted.log()
        assert restarted.client.execute("python", "print(1)").stdout == "1\n"
    finally:
        assert restarted.stop() == 0


def test_cleanup_removes_what_a_dead_daemon_left_and_never_touches_a_live_one(make_daemon):
    daemon = make_daemon(pool={"size": 2})
    refused = daemon.clean_up()
    assert refused.returncode == 1
    assert f"another sandboxd named {daemon.name!r} is running" in refused.stderr
    assert daemon.client.health()["pool"]["ready"] == 2

    daemon.stop(signal.SIGKILL)
    assert sandbox_cgroups(daemon.name) and daemon.socket.exists()
    cleaned = daemon.clean_up()
    assert cleaned.returncode == 0, cleaned.stderr
    assert "removed 2 sandbox(es) with their processes and cgroups" in cleaned.stdout
    assert f"removed the socket {daemon.socket}" in cleaned.stdout
    assert not sandbox_cgroups(daemon.name) and not daemon.socket.exists()
    assert not any(parent.exists() for parent in CgroupLayout.detect().parents(daemon.name))
    assert daemon.clean_up().stdout == "nothing was left behind\n"


def test_two_daemons_with_one_name_cannot_run(make_daemon, tmp_path):
    daemon = make_daemon(pool={"size": 2})
    ready = {path.name for path in sandbox_cgroups(daemon.name)}
    other = tmp_path / "other"
    other.mkdir()
    # Its own run directory and uids: only the name is shared (that once let it take
    # the live daemon's sandboxes for a dead one's and remove them).
    with pytest.raises(RuntimeError) as refused:
        start_daemon(
            other, daemon={"name": daemon.name}, backend={"uid_base": daemon.uid_base + 50_000}
        )
    assert f"Error: another sandboxd named {daemon.name!r} is running (pid " in str(refused.value)
    assert "left by an earlier daemon" not in str(refused.value)
    assert {path.name for path in sandbox_cgroups(daemon.name)} == ready
    assert daemon.client.execute("python", "print('untouched')").stdout == "untouched\n"


def test_daemons_with_overlapping_uids_cannot_run(make_daemon, tmp_path):
    daemon = make_daemon()
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(RuntimeError) as refused:
        start_daemon(other, backend={"uid_base": daemon.uid_base + 5})
    low, high = daemon.uid_base + 5, daemon.uid_base + 5 + 31  # pool.max_sandboxes = 32
    assert (
        f"Error: backend.uid_base: uids {low}-{high} overlap those of the running sandboxd "
        f"{daemon.name!r} ({daemon.uid_base}-{daemon.uid_base + 31}): give each daemon a "
        "range of its own"
    ) in str(refused.value)


def test_with_socket_activation_a_restart_refuses_nobody(tmp_path):
    """systemd holds sandboxd.socket across a restart: clients that connect in between
    wait in its backlog and the next daemon answers them."""
    path = tmp_path / "activated.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(4096)
    name = f"sbxact{os.getpid() % 10000}"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    daemon = start_daemon(tmp_path / "a", listener=listener, daemon={"name": name})
    outcomes: dict[str, int] = {}
    lock = threading.Lock()
    end = time.monotonic() + 10

    def load(worker: int) -> None:
        for turn in range(1000):
            if time.monotonic() > end:
                return
            nonce = f"{worker}-{turn}"
            try:
                result = Client(path, timeout=60).execute("python", f"print({nonce!r})")
                outcome = "right" if result.stdout == f"{nonce}\n" else "wrong"
            except DaemonUnavailable as exc:
                outcome = "refused" if "refuses connections" in exc.message else "lost"
            with lock:
                outcomes[outcome] = outcomes.get(outcome, 0) + 1

    workers = [threading.Thread(target=load, args=(n,)) for n in range(4)]
    for worker in workers:
        worker.start()
    try:
        time.sleep(2)
        assert daemon.stop(signal.SIGTERM) == 0  # drains: its running jobs finish
        assert path.exists()  # systemd's socket stays, and so do the clients on it
        daemon = start_daemon(tmp_path / "b", listener=listener, daemon={"name": name})
        for worker in workers:
            worker.join(90)
    finally:
        daemon.stop()
        listener.close()
    assert outcomes.get("right", 0) > 20, outcomes
    assert set(outcomes) == {"right"}, outcomes  # none refused, lost or wrong


def test_jobs_in_flight_when_the_daemon_dies_get_a_clear_error(make_daemon, tmp_path):
    daemon = make_daemon()
    gateway = start_gateway(tmp_path, daemon.socket)
    code = "import time\nprint('started', flush=True)\ntime.sleep(60)"
    cli = subprocess.Popen(
        [sys.executable, "-m", "sandboxctl", "--socket", str(daemon.socket),
         "exec", "-l", "python", "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    answers: list[httpx.Response] = []
    http = threading.Thread(
        target=lambda: answers.append(
            httpx.post(
                f"{gateway.url}/execute", json={"language": "python", "code": code}, timeout=60
            )
        )
    )
    http.start()
    try:
        assert wait_for(lambda: len(program_processes(daemon.uid_base)) == 2)
        assert cli.stdout is not None and cli.stdout.readline() == "started\n"
        daemon.stop(signal.SIGKILL)
        out, err = cli.communicate(timeout=30)
        http.join(30)
    finally:
        gateway.stop()
    went_away = (
        "sandboxd went away before answering execute (it stopped or restarted; "
        "a job it was running did not finish)"
    )
    assert (cli.returncode, out, err) == (125, "", f"Error: {went_away}\n")
    [answer] = answers
    assert answer.status_code == 503
    assert answer.json()["error"] == f"Service unavailable: {went_away}"
