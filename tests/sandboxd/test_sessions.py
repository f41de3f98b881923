"""Sessions on a real daemon (namespaces backend): the flow an agent loop uses, through
the library and the CLI, ownership across local users, reaping, and attacks from the
programs a session runs on the session's own file operations."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest

from sandboxd import errors
from sandboxd.protocol import Status
from tests.host_state import program_processes, sandbox_cgroups, wait_for

# A program that draws a PNG (a 16x16 gradient) from the CSV it was given, standard
# library only; the test makes the same PNG here to compare byte for byte.
DRAW_PNG = """
import csv, struct, zlib

def png(width, height, rows):
    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))
    raw = b"".join(b"\\0" + bytes(row) for row in rows)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    png = b"\\x89PNG\\r\\n\\x1a\\n" + chunk(b"IHDR", header)
    return png + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")

scale = {name: int(value) for name, value in csv.reader(open("data/scale.csv"))}
rows = [[(x * scale["x"] + y * scale["y"]) % 256 for x in range(16)] for y in range(16)]
open("plot.png", "wb").write(png(16, 16, rows))
print("drew", len(rows), "rows")
"""


def expected_png() -> bytes:
    namespace: dict = {}
    exec(DRAW_PNG.split("scale = ")[0], namespace)
    rows = [[(x * 3 + y * 5) % 256 for x in range(16)] for y in range(16)]
    return namespace["png"](16, 16, rows)


def assert_session_gone(daemon, sandbox_id: str) -> None:
    assert wait_for(lambda: not any(p.name == sandbox_id for p in sandbox_cgroups(daemon.name)))
    assert wait_for(lambda: not program_processes(daemon.uid_base))


def agent_loop(client, **limits) -> str:
    """An agent's loop through the library: a CSV in, a program that draws a PNG from
    it, the PNG back byte for byte, a variable from one cell used in the next, closed.
    The id of the sandbox it had, which must then be gone."""
    with client.session("python", **limits) as session:
        session.write_file("data/scale.csv", "x,3\ny,5\n")
        drew = session.exec(DRAW_PNG, timeout=60)
        assert (drew.status, drew.stdout) == (Status.OK, "drew 16 rows\n"), drew.stderr
        assert session.read_file("plot.png") == expected_png()
        assert zlib.crc32(session.read_file("data/scale.csv")) == zlib.crc32(b"x,3\ny,5\n")
        defined = session.exec("x = 41", cell=True, timeout=60)
        assert defined.ok and defined.cell.kept, defined.stderr
        used = session.exec("print(x + 1)", cell=True, timeout=60)
        assert (used.status, used.stdout) == (Status.OK, "42\n")
        sandbox_id = session.refresh()["sandbox_id"]
    with pytest.raises(errors.SessionNotFound):
        session.exec("print(1)")
    return sandbox_id


def test_an_agent_loop_through_the_library(daemon, client):
    sandbox_id = agent_loop(client)
    assert_session_gone(daemon, sandbox_id)


def sandboxctl(daemon, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "sandboxctl", "--socket", str(daemon.socket), *args],
        input=stdin,
        capture_output=True,
        timeout=60,
    )


def test_an_agent_loop_through_the_cli(daemon, tmp_path):
    created = sandboxctl(daemon, "session", "create", "-l", "python")
    assert created.returncode == 0, created.stderr
    session_id = created.stdout.decode().strip()
    (tmp_path / "scale.csv").write_text("x,3\ny,5\n")
    steps = [
        ("session", "put", session_id, str(tmp_path / "scale.csv"), "data/scale.csv"),
        ("session", "exec", session_id, "-c", DRAW_PNG),
        ("session", "get", session_id, "plot.png", "-o", str(tmp_path / "plot.png")),
        ("session", "exec", session_id, "--cell", "-c", "x = 41"),
    ]
    for step in steps:
        done = sandboxctl(daemon, *step)
        assert done.returncode == 0, (step, done.stderr)
    assert (tmp_path / "plot.png").read_bytes() == expected_png()
    cell = sandboxctl(daemon, "session", "exec", session_id, "--cell", "-c", "print(x + 1)\nx")
    assert (cell.returncode, cell.stdout) == (0, b"42\n41\n")
    listed = sandboxctl(daemon, "session", "ls", session_id)
    assert b"plot.png" in listed.stdout and b"data" in listed.stdout
    failed = sandboxctl(daemon, "session", "exec", session_id, "-c", "raise SystemExit(3)")
    assert failed.returncode == 3
    assert sandboxctl(daemon, "session", "close", session_id).returncode == 0
    again = sandboxctl(daemon, "session", "close", session_id)
    assert again.returncode == 2
    assert again.stderr.decode().strip() == f"Error: no session '{session_id}'"


def test_the_shell_reads_blocks_as_python_does_and_keeps_what_they_define(daemon, client):
    typed = "x = 41\ndef f(n):\n    return n + 1\n\nprint(f(x))\nf(x) * 2\nundefined\n"
    shell = sandboxctl(daemon, "shell", stdin=typed.encode())
    assert shell.returncode == 0, shell.stderr
    assert shell.stdout.replace(b">>> ", b"").replace(b"... ", b"") == b"42\n84\n"
    assert b"NameError: name 'undefined' is not defined" in shell.stderr
    session_id = shell.stderr.decode().split()[1].rstrip(":")
    ended = next(s for s in client.sessions() if s["id"] == session_id)
    assert ended["ended"] == "closed by its owner"


# As another local user: every call on the session of uid 0, by its id, and a list.
OTHER_USER = """
import json, socket, sys
path, session_id = sys.argv[1], sys.argv[2]
calls = [
    ("session.exec", {"id": session_id, "code": "print('in')"}),
    ("session.exec", {"id": session_id, "code": "x", "cell": True}),
    ("session.read_file", {"id": session_id, "path": "secret.txt"}),
    ("session.write_file", {"id": session_id, "path": "secret.txt", "content": "theirs"}),
    ("session.list_files", {"id": session_id}),
    ("session.remove_file", {"id": session_id, "path": "secret.txt"}),
    ("session.info", {"id": session_id}),
    ("session.close", {"id": session_id}),
    ("session.info", {"id": "0" * 24}),
    ("session.list", {}),
]
answers = []
for number, (method, params) in enumerate(calls):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        request = {"jsonrpc": "2.0", "method": method, "params": params, "id": number}
        s.sendall(json.dumps(request).encode() + b"\\n")
        answers.append(json.loads(s.makefile().readline()))
print(json.dumps(answers))
"""


def test_another_local_user_can_neither_see_nor_use_a_session(
    make_daemon, local_users, public_tmp_path
):
    daemon = make_daemon(
        daemon={"socket": str(public_tmp_path / "sock"), "socket_group": local_users.group}
    )
    with daemon.client.session() as session:
        session.write_file("secret.txt", "mine")
        session.exec("x = 'mine'", cell=True)
        done = local_users.run(
            local_users.member,
            ["/usr/bin/python3", "-c", OTHER_USER, str(daemon.socket), session.id],
        )
        assert done.returncode == 0, done.stderr
        *refused, unknown, listed = json.loads(done.stdout)
        for answer in refused:
            assert answer["error"] == {
                "code": errors.SessionNotFound.code,
                "message": f"no session '{session.id}'",
                "data": {"id": session.id},
            }
        # Somebody else's session and one that never existed look the same.
        assert unknown["error"]["message"] == f"no session '{'0' * 24}'"
        assert listed["result"] == {"sessions": []}
        assert session.read_file("secret.txt") == b"mine"
        assert session.exec("print(x)", cell=True).stdout == "mine\n"
        [mine] = daemon.client.sessions()
        assert mine["id"] == session.id and mine["execs"] == 2


def test_an_idle_session_is_reaped_and_says_so(daemon, client):
    session = client.session(idle_timeout=1)
    session.exec("print(1)")
    sandbox_id = session.refresh()["sandbox_id"]
    assert_session_gone(daemon, sandbox_id)
    with pytest.raises(errors.SessionNotFound):
        session.exec("print(2)")
    listed = next(s for s in client.sessions() if s["id"] == session.id)
    assert (listed["state"], listed["ended"]) == ("ended", "idle for 1 s")
    assert f"session {session.id} of uid 0 ended: idle for 1 s" in daemon.log()


def test_calls_queued_past_a_sessions_time_to_live_find_it_ended(daemon, client):
    """Ten one-second calls queued at once on a session that lives three seconds:
    before, every one ran, the last at ten seconds; now those whose turn comes after
    the three find no session."""
    session = client.session(ttl=3)
    started = time.monotonic()

    def call(_: int) -> str:
        try:
            session.exec("import time; time.sleep(1)")
        except errors.SessionNotFound:
            return "ended"
        return f"ran by {time.monotonic() - started:.0f} s"

    with ThreadPoolExecutor(10) as calls:
        outcomes = list(calls.map(call, range(10)))
    assert 1 <= sum(outcome != "ended" for outcome in outcomes) <= 4, outcomes
    assert time.monotonic() - started < 8, outcomes
    listed = next(s for s in client.sessions() if s["id"] == session.id)
    assert (listed["state"], listed["ended"]) == ("ended", "its time to live of 3 s was up")


def test_stopping_the_daemon_ends_every_session(make_daemon):
    daemon = make_daemon()
    sessions = [daemon.client.session() for _ in range(2)]
    sessions[0].exec("import time; time.sleep(0.2)")
    assert daemon.stop() == 0
    log = daemon.log()
    for session in sessions:
        assert f"session {session.id} of uid 0 ended: the daemon stopped" in log
    assert sandbox_cgroups(daemon.name) == []


# --- attacks by the programs a session runs ----------------------------------------------


# The live processes in the sandbox but the agent (PID 1), the lister and a session's
# interpreter (a zombie it never waited for is its own, as in any long-lived Python).
LIVE_OTHERS = """
import os
def live(pid):
    return open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[0] != "Z"
others = {1, os.getpid(), %s}
print([p for p in os.listdir("/proc") if p.isdigit() and int(p) not in others and live(p)])
"""


def test_a_process_that_forks_away_is_gone_before_the_next_call(daemon, client):
    escape = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(3); open('late.txt', 'w').write('still here')\n"
        "    os._exit(0)\n"
        "print('left one behind')\n"
    )
    with client.session() as session:
        assert session.exec(escape).stdout == "left one behind\n"
        assert session.exec(LIVE_OTHERS % 0).stdout == "[]\n"
        assert session.exec(escape, cell=True).stdout == "left one behind\n"
        interpreter = session.exec("import os; os.getpid()", cell=True).cell.value
        assert session.exec(LIVE_OTHERS % interpreter).stdout == "[]\n"
        kept = session.exec("print('time' in globals())", cell=True)
        assert kept.stdout == "True\n"  # the interpreter stayed; what it forked did not
        time.sleep(3.5)
        with pytest.raises(errors.InvalidParams):
            session.read_file("late.txt")


FILL_DISK = (
    "import subprocess\n"
    "for n in range(40):\n"
    "    subprocess.run(['dd', 'if=/dev/zero', f'of=f{n}', 'bs=1M', 'count=8'],"
    " stderr=subprocess.DEVNULL)\n"
)


def test_a_full_disk_leaves_the_session_and_its_file_operations_working(client):
    with client.session(limits={"memory_bytes": 64 * 2**20}) as session:
        filled = session.exec(FILL_DISK + "print(open('/proc/self/mountinfo').read())")
        # Its files are memory (a tmpfs): its disk is three quarters of its memory.
        assert filled.ok, filled.stderr
        work = next(line for line in filled.stdout.splitlines() if " /work " in line)
        assert "nosuid,nodev" in work and "size=49152k" in work
        entries = session.list_files()
        assert 40 * 2**20 < sum(e["size"] for e in entries) <= 48 * 2**20
        with pytest.raises(errors.InvalidParams) as full:
            session.write_file("more.bin", b"x" * 2**20)
        assert "No space left on device" in full.value.message
        assert session.read_file("f0") == b"\0" * 8 * 2**20  # read in pieces
        for entry in entries:
            if entry["name"].startswith("f"):
                session.remove_file(entry["name"])
        session.write_file("more.bin", b"x" * 2**20)
        after = session.exec("import os; print(os.path.getsize('more.bin'))")
        assert (after.status, after.stdout) == (Status.OK, f"{2**20}\n")


def test_an_interpreter_holding_the_memory_leaves_its_agent_room(client):
    with client.session(limits={"memory_bytes": 64 * 2**20}) as session:
        assert session.exec("held = b'x' * (78 * 2**20)", cell=True).cell.kept
        with pytest.raises(errors.InvalidParams) as full:
            session.write_file("big.bin", b"x" * 2**20)
        assert "the session's memory is full" in full.value.message
        assert session.exec("del held", cell=True).ok
        session.write_file("big.bin", b"x" * 5 * 2**20)  # in pieces: a request is capped
        assert session.read_file("big.bin") == b"x" * 5 * 2**20


PLANT = (
    "import os\n"
    "os.symlink('/etc', 'etc')\n"
    "os.symlink('/etc/passwd', 'passwd')\n"
    "os.mkdir('dir'); os.symlink('/', 'dir/root')\n"
    "os.mkfifo('fifo')\n"
    "os.symlink('/proc/self/environ', 'environ')\n"
)


def test_planted_links_and_fifos_lead_nowhere(client):
    with client.session() as session:
        assert session.exec(PLANT).ok
        for path in ("etc/passwd", "passwd", "dir/root/etc/passwd", "fifo", "environ"):
            with pytest.raises(errors.InvalidParams):
                session.read_file(path)
        for path in ("etc/x", "dir/root/tmp/x"):
            with pytest.raises(errors.InvalidParams):
                session.write_file(path, "through the link")
        session.write_file("passwd", "a file of mine")  # replaces the link itself
        check = session.exec(
            "import os; print(os.path.islink('passwd'), open('passwd').read(),"
            " os.path.islink('dir/root'))"
        )
        assert check.stdout == "False a file of mine True\n"
        kinds = {e["name"]: e["type"] for e in session.list_files()}
        assert (kinds["etc"], kinds["fifo"], kinds["passwd"]) == ("link", "other", "file")
        with pytest.raises(errors.InvalidParams):
            session.list_files("etc")
        session.remove_file("dir")  # the tree, not what its link points to
        assert session.exec("import os; print(os.path.exists('/etc/passwd'))").stdout == "True\n"
        assert "dir" not in {e["name"] for e in session.list_files()}


def test_a_cell_that_hits_a_limit_says_its_state_is_lost(client):
    with client.session() as session:
        session.exec("x = 1", cell=True)
        hog = session.exec("while True: pass", cell=True, limits={"cpu_time": 0.5})
        assert hog.status is Status.TIMEOUT and not hog.cell.kept
        fresh = session.exec("print('x' in globals())", cell=True)
        assert (fresh.stdout, fresh.cell.fresh) == ("False\n", True)
        grown = session.exec("b = bytearray(2**30)", cell=True)
        assert grown.status is Status.MEMORY_LIMIT and not grown.cell.kept


def test_a_session_whose_sandbox_dies_between_calls_says_so(daemon, client):
    session = client.session()
    session.exec("print(1)")
    sandbox_id = session.refresh()["sandbox_id"]
    cgroup = next(p for p in sandbox_cgroups(daemon.name) if p.name == sandbox_id)
    for pid in (cgroup / "cgroup.procs").read_text().split():
        os.kill(int(pid), signal.SIGKILL)  # from outside, as the OOM killer would
    assert_session_gone(daemon, sandbox_id)
    assert wait_for(
        lambda: session.id not in {s["id"] for s in client.sessions() if not s["ended"]}
    )
    listed = next(s for s in client.sessions() if s["id"] == session.id)
    assert listed["ended"] == "its sandbox was lost: it died"
    with pytest.raises(errors.SessionNotFound):
        session.exec("print(2)")


def test_a_sessions_memory_and_processes_hold_for_the_whole_session(client):
    limits = {"memory_bytes": 96 * 2**20, "processes": 16}
    with client.session(limits=limits) as session:
        assert {k: session.info["limits"][k] for k in limits} == limits
        spawn = (
            "import subprocess\n"
            "started = []\n"
            "try:\n"
            "    for _ in range(64):\n"
            "        started.append(subprocess.Popen(['sleep', '30']))\n"
            "except OSError as exc:\n"
            "    print('refused after', len(started), type(exc).__name__)\n"
        )
        spawned = session.exec(spawn)
        assert spawned.stdout.startswith("refused after"), spawned.stdout
        assert int(spawned.stdout.split()[2]) < 16
        grown = session.exec("b = b'x' * (200 * 2**20)")
        assert grown.status is Status.MEMORY_LIMIT
        # A session's interpreter holds the same limits as its programs.
        cell = session.exec("held = b'x' * (200 * 2**20)", cell=True)
        assert cell.status is Status.MEMORY_LIMIT and not cell.cell.kept
        assert session.exec("print('after')").stdout == "after\n"
