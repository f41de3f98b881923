"""What the daemon leaves behind: nothing, whether a client leaves mid-job, the daemon is
stopped, or it crashes and starts again."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from sandboxd.cgroups import CgroupLayout
from tests.daemon_process import start_daemon, start_holding_job
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


def clean_up(daemon) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sandboxd", "cleanup", "--config", str(daemon.config_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cleanup_removes_what_a_dead_daemon_left_and_never_touches_a_live_one(make_daemon):
    daemon = make_daemon(pool={"size": 2})
    refused = clean_up(daemon)
    assert refused.returncode == 1
    assert f"another sandboxd named {daemon.name!r} is running" in refused.stderr
    assert daemon.client.health()["pool"]["ready"] == 2

    daemon.stop(signal.SIGKILL)
    assert sandbox_cgroups(daemon.name) and daemon.socket.exists()
    cleaned = clean_up(daemon)
    assert cleaned.returncode == 0, cleaned.stderr
    assert "removed 2 sandbox(es) with their processes and cgroups" in cleaned.stdout
    assert f"removed the socket {daemon.socket}" in cleaned.stdout
    assert not sandbox_cgroups(daemon.name) and not daemon.socket.exists()
    assert not any(parent.exists() for parent in CgroupLayout.detect().parents(daemon.name))
    assert clean_up(daemon).stdout == "nothing was left behind\n"
