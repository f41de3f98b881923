"""What one client can make the root daemon hold, attacked: a stdin flood nobody reads,
stalled and idle connections, a client that reads nothing, too many connections,
pipelined and batched requests, and results with megabytes of output.

Each attack must leave the daemon's memory within a fixed bound and the daemon serving
everyone else; every load loop here is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sandboxd import errors
from sandboxd.framing import parsed_size
from sandboxd.protocol import MAX_REQUEST_VALUES
from tests.daemon_process import receive_json_line
from tests.host_state import program_processes, wait_for

MiB = 2**20


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


class PeakMemory:
    """The highest RSS of a process while the block runs, sampled every 20 ms."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = rss_mib(pid)
        self.peak = self.start
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.wait(0.02):
            self.peak = max(self.peak, rss_mib(self.pid))

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    @property
    def growth(self) -> float:
        return self.peak - self.start


def connect(path: Path, timeout: float = 30) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(path))  # blocking: it waits while the listening backlog is full
    sock.settimeout(timeout)
    return sock


def request(method: str, params: dict | None = None, id_: int = 1) -> bytes:
    message = {"jsonrpc": "2.0", "method": method, "params": params or {}, "id": id_}
    return json.dumps(message).encode() + b"\n"


def test_a_stdin_flood_nobody_reads_is_held_back_by_the_socket(make_daemon):
    daemon = make_daemon()
    sock = connect(daemon.socket)
    params = {
        "language": "python",
        "code": "while True: print('x' * 1000)",  # reads no stdin; its output is not read
        "interactive": True,
        "timeout": 20,
    }
    sock.sendall(request("execute", params))
    chunk = {"jsonrpc": "2.0", "method": "execute.stdin", "params": {"id": 1, "data": "y" * MiB}}
    line = json.dumps(chunk).encode() + b"\n"
    sent = 0
    sock.settimeout(0.2)
    with PeakMemory(daemon.process.pid) as memory:
        end = time.monotonic() + 3
        while time.monotonic() < end:
            try:
                sock.sendall(line)
                sent += len(line)
            except TimeoutError:
                break  # the daemon stopped taking it: that is the point
    sock.close()
    # Before the bound, the daemon took all of it: 1.4 GiB in 4 s.
    assert sent < 32 * MiB
    assert memory.growth < 48, memory.peak
    assert wait_for(lambda: not program_processes(daemon.uid_base))
    assert daemon.client.health()["status"] == "healthy"


def test_stalled_request_lines_hold_little_and_time_out(make_daemon):
    daemon = make_daemon(daemon={"request_timeout": 2.0})
    partial = b'{"jsonrpc":"2.0","id":1,"method":"execute","params":{"code":"' + b"x" * MiB
    socks = []
    with PeakMemory(daemon.process.pid) as memory:
        for _ in range(200):
            sock = connect(daemon.socket)
            sock.setblocking(False)
            socks.append([sock, 0])
        end = time.monotonic() + 3
        while time.monotonic() < end and any(sent < len(partial) for _, sent in socks):
            for entry in socks:
                with contextlib.suppress(BlockingIOError, BrokenPipeError, ConnectionResetError):
                    entry[1] += entry[0].send(partial[entry[1] :])
            time.sleep(0.01)
        codes = []
        for sock, _ in socks:
            sock.setblocking(True)
            sock.settimeout(10)
            try:
                codes.append(receive_json_line(sock)["error"]["code"])
            except (ConnectionResetError, json.JSONDecodeError):
                codes.append(None)
            sock.close()
    # One uid gets 64 connections; those time out, with what they sent dropped.
    assert codes.count(errors.TooManyConnections.code) == 136
    assert codes.count(errors.RequestTimeout.code) == 64
    assert memory.growth < 100, memory.peak  # before: 200 lines took 165 MiB and kept it
    assert daemon.client.health()["status"] == "healthy"


def test_idle_connections_are_closed_but_not_while_a_job_runs(make_daemon):
    daemon = make_daemon(daemon={"idle_timeout": 1.0})
    with connect(daemon.socket, timeout=10) as idle:
        started = time.monotonic()
        assert idle.recv(1) == b""  # closed by the daemon
        assert 0.9 <= time.monotonic() - started < 5
    with connect(daemon.socket, timeout=20) as busy:
        code = "import time; time.sleep(2.5)"
        busy.sendall(request("execute", {"language": "python", "code": code}))
        assert receive_json_line(busy)["result"]["status"] == "ok"
        started = time.monotonic()
        assert busy.recv(1) == b""  # idle again once answered
        assert time.monotonic() - started < 5


def test_a_client_that_reads_nothing_is_let_go(make_daemon):
    daemon = make_daemon(daemon={"send_timeout": 1.0})
    sock = connect(daemon.socket)
    # Output that fills the socket, then a result that cannot be delivered.
    sock.sendall(request("execute", {"language": "python", "code": "print('y' * 10**7)"}))
    with PeakMemory(daemon.process.pid) as memory:
        assert wait_for(lambda: bool(program_processes(daemon.uid_base)), timeout=10)
        assert wait_for(lambda: not program_processes(daemon.uid_base), timeout=20)
        time.sleep(2)  # past the send timeout: the daemon has let the connection go
    data = b""
    while chunk := sock.recv(MiB):  # what was sent before the daemon gave up, then EOF
        data += chunk
    sock.close()
    assert b'"result"' not in data
    assert memory.growth < 64
    assert daemon.client.health()["status"] == "healthy"


RAW_HEALTH = (
    "import json, socket, sys\n"
    "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
    's.sendall(b\'{"jsonrpc":"2.0","method":"health","id":1}\\n\')\n'
    "print(json.loads(s.makefile().readline())['result']['status'])\n"
)


def test_one_uid_at_its_connection_cap_leaves_other_uids_served(
    make_daemon, local_users, public_tmp_path
):
    daemon = make_daemon(
        daemon={
            "socket": str(public_tmp_path / "sandboxd.sock"),
            "socket_group": local_users.group,
            "max_connections_per_uid": 8,
        }
    )
    held = [connect(daemon.socket) for _ in range(8)]
    ninth = connect(daemon.socket)
    refusal = receive_json_line(ninth)["error"]
    assert refusal["code"] == errors.TooManyConnections.code
    assert refusal["message"] == "uid 0 already has 8 connections open (at most 8)"
    other = local_users.run(
        local_users.member, ["/usr/bin/python3", "-c", RAW_HEALTH, str(daemon.socket)]
    )
    assert other.stdout == "healthy\n", other.stderr
    for sock in [*held, ninth]:
        sock.close()
    assert wait_for(lambda: served(daemon))


def served(daemon) -> bool:
    try:
        return daemon.client.health()["status"] == "healthy"
    except errors.TooManyConnections:
        return False  # the daemon has not seen the others go yet


def test_pipelined_requests_beyond_the_cap_wait_their_turn(daemon):
    with connect(daemon.socket) as sock:
        sock.sendall(b"".join(request("health", id_=n) for n in range(20)))
        ids = {receive_json_line(sock)["id"] for _ in range(20)}
    assert ids == set(range(20))


def test_a_batch_larger_than_the_cap_is_refused(daemon):
    batch = [{"jsonrpc": "2.0", "method": "health", "id": n} for n in range(9)]
    with connect(daemon.socket) as sock:
        sock.sendall(json.dumps(batch).encode() + b"\n")
        error = receive_json_line(sock)["error"]
    assert error == {
        "code": errors.InvalidRequest.code,
        "message": "a batch may hold at most 8 requests",
    }


PINGER = (
    "import json, socket, sys, time\n"
    "path, seconds = sys.argv[1], float(sys.argv[2])\n"
    "took, end = [], time.monotonic() + seconds\n"
    "while time.monotonic() < end:\n"
    "    t = time.perf_counter()\n"
    "    with socket.socket(socket.AF_UNIX) as s:\n"
    "        s.connect(path)\n"
    '        s.sendall(b\'{"jsonrpc":"2.0","method":"health","id":1}\\n\')\n'
    "        s.makefile().readline()\n"
    "    took.append(time.perf_counter() - t)\n"
    "    time.sleep(0.01)\n"
    "print(json.dumps(sorted(took)))\n"
)
FLOOD = (
    "import sys\nb = b'\\x01' * (16 * 2**20)\n"
    "sys.stdout.buffer.write(b); sys.stdout.flush(); sys.stderr.buffer.write(b)"
)


RESULT = b'{"jsonrpc":"2.0","result":{"status":"'


def _result_status(sock: socket.socket) -> str:
    """Read an execute's answer to its end without decoding it (it is ~200 MB of JSON
    escapes): the status is the first field of the result, which comes last."""
    seen, status = b"", None
    while True:
        chunk = sock.recv(4 * MiB)
        assert chunk, "the daemon closed the connection"
        if status is None:
            seen += chunk
            start = seen.find(RESULT)
            if start < 0 or b'"' not in seen[start + len(RESULT) :]:
                seen = seen[max(0, start) :] if start >= 0 else seen[-len(RESULT) :]
                continue
            chunk = seen[start + len(RESULT) :]
            status = chunk.split(b'"')[0].decode()
        if b"\n" in chunk:
            return status


def test_large_outputs_keep_the_daemon_responsive_and_its_memory_bounded(make_daemon):
    daemon = make_daemon()
    params = {"language": "python", "code": FLOOD, "limits": {"output_bytes": 16 * MiB}}
    socks = [connect(daemon.socket, timeout=120) for _ in range(2)]
    pinger = subprocess.Popen(
        [sys.executable, "-c", PINGER, str(daemon.socket), "8"], stdout=subprocess.PIPE, text=True
    )
    with PeakMemory(daemon.process.pid) as memory:
        for sock in socks:
            sock.sendall(request("execute", params))
        statuses = [_result_status(sock) for sock in socks]
        took = json.loads(pinger.communicate(timeout=60)[0])
    for sock in socks:
        sock.close()
    # Before: "memory_limit" (the agent held the output in the job's memory), a 500 MiB
    # daemon for one such job, and health answering in 1.1 s.
    assert statuses == ["ok", "ok"]
    # Two cores run both jobs, their agents, the daemon and these readers: the slowest
    # answer or two measure the scheduler; the daemon's own loop never stalls for long.
    assert took[int(0.99 * len(took))] < 0.05, took[-10:]
    assert took[-1] < 0.25, took[-10:]
    output = 2 * 2 * 16  # MiB: two jobs, two full streams each
    assert memory.growth < 4 * output, memory.peak


def test_input_still_flows_to_running_jobs_when_a_connection_has_its_most(daemon):
    """Nine interactive jobs on one connection, which runs eight at once: the ninth
    waits, and the input of the eight still reaches them (it once stopped the reading)."""
    code = "import sys\nprint('echo', sys.stdin.readline().strip())"
    params = {"language": "python", "code": code, "interactive": True, "timeout": 20}
    with connect(daemon.socket, timeout=60) as sock:
        sock.sendall(b"".join(request("execute", params, n) for n in range(1, 10)))
        for n in range(1, 10):
            stdin = {"id": n, "data": f"job{n}\n", "eof": True}
            message = {"jsonrpc": "2.0", "method": "execute.stdin", "params": stdin}
            sock.sendall(json.dumps(message).encode() + b"\n")
        results = {}
        while len(results) < 9:
            message = receive_json_line(sock)
            if "result" in message:
                results[message["id"]] = message["result"]
    assert {n: r["stdout"] for n, r in results.items()} == {
        n: f"echo job{n}\n" for n in range(1, 10)
    }


def test_a_uid_that_does_not_take_its_output_waits_to_start_more_jobs(make_daemon):
    daemon = make_daemon(daemon={"pending_bytes_per_uid": "8MiB"})
    big = {
        "language": "python",
        "code": "import sys\nsys.stdout.write('z' * (9 * 2**20))",
        "limits": {"output_bytes": 16 * MiB},
    }
    hoarder = connect(daemon.socket, timeout=60)
    hoarder.sendall(request("execute", big))
    seen = 0
    buffer = b""
    while seen < 9 * MiB:  # all the output as it streams, then nothing of the result
        buffer += hoarder.recv(MiB)
        *lines, buffer = buffer.split(b"\n")
        notes = [json.loads(line) for line in lines if line.startswith(b'{"jsonrpc":"2.0","m')]
        seen += sum(len(note["params"]["data"]) for note in notes)
    with connect(daemon.socket, timeout=60) as other:
        other.sendall(request("execute", {"language": "python", "code": "print(1)"}))
        other.settimeout(3)
        with contextlib.suppress(TimeoutError):
            other.recv(1)
            raise AssertionError("a job of that uid started while 9 MiB waited for it")
        hoarder.close()  # its output goes: the uid may run jobs again
        other.settimeout(30)
        while "result" not in (answer := receive_json_line(other)):
            pass
        assert answer["result"]["stdout"] == "1\n"


def sixteen_at_once(daemon, line: bytes) -> tuple[list[dict], PeakMemory]:
    """Send ``line`` on sixteen connections at once; their answers, and the daemon's
    memory meanwhile."""
    socks = [connect(daemon.socket, timeout=120) for _ in range(16)]
    with PeakMemory(daemon.process.pid) as memory:
        senders = [threading.Thread(target=sock.sendall, args=(line,)) for sock in socks]
        for sender in senders:
            sender.start()
        answers = [receive_json_line(sock) for sock in socks]
        for sender in senders:
            sender.join()
    for sock in socks:
        sock.close()
    return answers, memory


def test_requests_that_would_parse_to_far_more_than_their_bytes_are_refused_unparsed(
    make_daemon,
):
    """Sixteen lines of 4 MiB of ``{},``, each of which parses to about 100 MB of
    dicts: refused before they are parsed, the daemon holding little more than their
    bytes (before: 1.7 GB)."""
    daemon = make_daemon()
    empties = b"{}," * ((4 * MiB - 200) // 3)
    line = b'{"jsonrpc":"2.0","method":"health","params":{"x":[' + empties + b'{}]},"id":1}\n'
    answers, memory = sixteen_at_once(daemon, line)
    assert memory.growth < 3 * 16 * 4, memory.peak  # MiB: the lines' bytes, read and copied
    assert {answer["error"]["code"] for answer in answers} == {errors.InvalidRequest.code}
    assert "at most 16384 JSON values" in answers[0]["error"]["message"]


def test_strings_that_parse_wider_than_their_bytes_are_charged_as_wide(make_daemon):
    """A character past the Basic Multilingual Plane makes its whole string four bytes a
    character once parsed: sixteen jobs of 1 MiB of code, each 4 MiB parsed, waiting
    their turn, the wide character last (so each line arrives counted narrow). Parsed
    only as the uid's 16 MiB has room, about four are at once (before: all sixteen,
    88 MB more)."""
    daemon = make_daemon(
        daemon={"pending_bytes_per_uid": 16 * MiB}, pool={"size": 1, "max_sandboxes": 1}
    )
    code = "import time; time.sleep(0.5)\n#" + "x" * MiB + "\U0001f600"
    line = json.dumps(
        {"jsonrpc": "2.0", "id": 1, "method": "execute",
         "params": {"language": "python", "code": code}},
        ensure_ascii=False,
    ).encode() + b"\n"  # fmt: skip
    answers, memory = sixteen_at_once(daemon, line)
    assert [answer["result"]["status"] for answer in answers] == ["ok"] * 16
    # MiB: their 16 MiB of bytes, the budget's worth parsed and one more, and the jobs.
    assert memory.growth < 60, memory.peak


def test_small_requests_waiting_their_turn_are_charged_for_their_values(make_daemon):
    """Eight long jobs take a connection's running slots; then lines of 24 KB, each
    8180 empty objects (within the per-line cap) that parse to 590 KB: charged only
    their bytes, 2342 of them held 1.4 GB parsed while they waited; charged for their
    values, the uid's 64 MiB holds about a hundred."""
    daemon = make_daemon()
    sock = connect(daemon.socket, timeout=2)
    params = {"language": "python", "code": "import time; time.sleep(20)", "timeout": 25}
    for number in range(8):
        sock.sendall(request("execute", params, id_=number))
    assert wait_for(lambda: len(program_processes(daemon.uid_base)) == 8, timeout=30)
    line = request("health", {"x": [{}] * 8180}, id_=100).replace(b" ", b"")
    sent = 0
    with PeakMemory(daemon.process.pid) as memory:
        deadline = time.monotonic() + 10
        with contextlib.suppress(TimeoutError):  # the daemon stopped reading: its budget
            while time.monotonic() < deadline and sent < 3000:
                sock.sendall(line)
                sent += 1
        time.sleep(1)
    sock.close()
    assert memory.growth < 96, (memory.peak, sent)  # MiB: the budget and the jobs
    assert daemon.client.health()["status"] == "healthy"


def test_a_flood_of_blank_lines_does_not_stop_the_daemon_serving_others(make_daemon):
    """Blank lines are read and dropped in the reading loop; 64 KiB of them at a time,
    one ending in an escape that may parse wide, kept the daemon from everyone else for
    about a second a read (each line rescanned the rest of the buffer, and none let
    another task run)."""
    daemon = make_daemon()
    flood = b"\n" * 65534 + b"\\u"
    stop = threading.Event()

    def flooding() -> None:
        with connect(daemon.socket) as sock, contextlib.suppress(OSError):
            deadline = time.monotonic() + 4
            while not stop.is_set() and time.monotonic() < deadline:
                sock.sendall(flood)

    flooder = threading.Thread(target=flooding)
    flooder.start()
    took = []
    try:
        time.sleep(0.5)
        for _ in range(10):
            started = time.monotonic()
            assert daemon.client.health()["status"] == "healthy"
            took.append(time.monotonic() - started)
            time.sleep(0.1)
    finally:
        stop.set()
        flooder.join()
    assert max(took) < 0.5, took  # before: up to 1.2 s each


def execute_line(number: int, **params: object) -> bytes:
    message = {"jsonrpc": "2.0", "id": number, "method": "execute", "params": params}
    return json.dumps(message, ensure_ascii=False).encode() + b"\n"


def test_an_interactive_job_past_its_uids_budget_still_gets_its_input(make_daemon):
    """A long job whose code takes 12 MiB parsed (3 MiB with an emoji), then on a
    connection of its own an interactive job of 4 MiB parsed: together they fit the
    uid's budget parsed, but not with what their requests hold besides. Once the
    daemon had read the second, it stopped reading that connection, so the input the
    job waited for never came and it ran out its time; a health check of the same
    uid waited as long. Past the budget, a connection still reads its jobs' input,
    and one that holds nothing may send a small request."""
    filler = execute_line(
        0,
        language="python",
        code="#"
        + "x" * (3 * MiB)
        + "\U0001f600\nimport time\nprint('on', end='', flush=True)\ntime.sleep(20)",
        timeout=25,
    )
    interactive = execute_line(
        1,
        language="python",
        code="#"
        + "x" * MiB
        + "\U0001f600\nprint('ready', end='', flush=True)\nprint('got', input())",
        interactive=True,
        timeout=15,
    )
    sizes = [parsed_size(line[:-1], MAX_REQUEST_VALUES) for line in (filler, interactive)]
    daemon = make_daemon(daemon={"pending_bytes_per_uid": sum(sizes) + 1024})
    with connect(daemon.socket, timeout=30) as long, connect(daemon.socket, timeout=30) as sock:
        long.sendall(filler)
        assert receive_json_line(long)["params"]["data"] == "on"
        sock.sendall(interactive)
        assert receive_json_line(sock)["params"]["data"] == "ready"
        with connect(daemon.socket, timeout=10) as other:  # a new one: it has read nothing
            other.sendall(request("health"))
            assert receive_json_line(other)["result"]["status"] == "healthy"
        stdin = {"id": 1, "data": "hi\n", "eof": True}
        message = {"jsonrpc": "2.0", "method": "execute.stdin", "params": stdin}
        sock.sendall(json.dumps(message).encode() + b"\n")
        while "result" not in (answer := receive_json_line(sock)):
            pass
    assert (answer["result"]["status"], answer["result"]["stdout"]) == ("ok", "readygot hi\n")


def flood(socks: list[socket.socket], lines: Callable[[int], bytes], seconds: float) -> int:
    """Send the lines ``lines(n)`` on each socket from a thread of its own until the
    daemon stops taking them (or ``seconds`` pass); the bytes it took. Each write ends
    with the first byte of the next line, so that one has always begun arriving."""
    sent = [0] * len(socks)

    def send(index: int) -> None:
        socks[index].settimeout(3)
        deadline = time.monotonic() + seconds
        number = 0
        with contextlib.suppress(TimeoutError, OSError):
            while time.monotonic() < deadline:
                line = lines(number)
                line = (line if number == 0 else line[1:]) + lines(number + 1)[:1]
                socks[index].sendall(line)
                sent[index] += len(line)
                number += 1

    senders = [threading.Thread(target=send, args=(index,)) for index in range(len(socks))]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    return sum(sent)


def test_requests_written_back_to_back_are_held_back_at_the_budget(make_daemon):
    """One connection writing 1 MiB requests back to back, each a job that sleeps: the
    line already arriving behind each one was let on as the uid's oldest, so the
    daemon read all of them whatever its budget."""
    daemon = make_daemon(daemon={"pending_bytes_per_uid": 16 * MiB})
    code = "import time; time.sleep(20)\n#" + "x" * MiB
    with connect(daemon.socket) as sock, PeakMemory(daemon.process.pid) as memory:
        sent = flood([sock], lambda n: execute_line(n, language="python", code=code), 6)
    assert sent < 24 * MiB, sent  # the budget, and the lines in the socket's buffers
    assert memory.growth < 64, memory.peak
    assert daemon.client.health()["status"] == "healthy"


def test_input_for_jobs_that_never_start_is_held_back_at_the_budget(make_daemon):
    """Sixteen connections sending 60 KB of input for ids with no job: as nothing of
    theirs was running, each next line went on as the uid's oldest, and input waiting
    for its job is kept (64 ids of 1 MiB a connection): 1 GiB against a 16 MiB budget."""
    daemon = make_daemon(daemon={"pending_bytes_per_uid": 16 * MiB})

    def stdin_line(number: int) -> bytes:
        stdin = {"id": f"e{number // 16}", "data": "a" * 60_000}
        return (
            json.dumps({"jsonrpc": "2.0", "method": "execute.stdin", "params": stdin}).encode()
            + b"\n"
        )

    socks = [connect(daemon.socket) for _ in range(16)]
    with PeakMemory(daemon.process.pid) as memory:
        sent = flood(socks, stdin_line, 6)
    for sock in socks:
        sock.close()
    # The budget, a line or two past it on each, and what the sockets' buffers hold.
    assert sent < 64 * MiB, sent
    assert memory.growth < 96, memory.peak
    assert daemon.client.health()["status"] == "healthy"
