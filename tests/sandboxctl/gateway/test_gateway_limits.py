"""The gateway no wider than the socket, and no easier to balloon than the daemon: who a
keyless gateway lets in, whose rate bucket a request takes, stalled bodies, and a
WebSocket that floods stdin. Every load loop is bounded in count and time."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import httpx
import pytest
import trio

from sandboxctl.gateway.local_peers import CACHE_ENTRIES, SocketUsers
from tests.daemon_process import start_gateway
from tests.host_state import program_processes, wait_for
from tests.sandboxctl.gateway.conftest import KEYS
from tests.sandboxctl.gateway.test_mcp_http import mcp_over_http
from tests.sandboxctl.gateway.ws_client import connect
from tests.sandboxctl.test_mcp import call
from tests.sandboxd.test_socket_limits import MiB, PeakMemory

HELLO = {"language": "python", "code": "print('hi')"}


def curl_execute(local_users, user: str, url: str) -> tuple[int, dict]:
    done = local_users.run(
        user,
        ["curl", "-s", "-w", "\n%{http_code}", "-X", "POST", f"{url}/execute",
         "-H", "Content-Type: application/json", "-d", json.dumps(HELLO)],
    )  # fmt: skip
    body, _, status = done.stdout.rpartition("\n")
    return int(status), json.loads(body)


@pytest.fixture
def group_daemon(make_daemon, local_users, public_tmp_path):
    """A daemon whose socket the local users' group may use."""
    return make_daemon(
        daemon={
            "socket": str(public_tmp_path / "sandboxd.sock"),
            "socket_group": local_users.group,
        }
    )


def test_a_keyless_gateway_admits_exactly_who_may_use_the_socket(
    group_daemon, local_users, tmp_path
):
    gateway = start_gateway(tmp_path, group_daemon.socket)
    try:
        status, body = curl_execute(local_users, local_users.member, gateway.url)
        assert (status, body["output"]) == (200, "hi\n")
        status, body = curl_execute(local_users, local_users.outsider, gateway.url)
        assert status == 403
        nobody = int(local_users.run("nobody", ["id", "-u"]).stdout)
        assert body["error"] == (
            f"uid {nobody} may not use sandboxd: without API keys only root and the members "
            f"of group {local_users.group} are let in, as on its socket"
        )
        assert httpx.post(f"{gateway.url}/execute", json=HELLO, timeout=30).status_code == 200
        # What is not the API of running code stays open, as before.
        open_paths = local_users.run(
            local_users.outsider, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                   f"{gateway.url}/health"],
        )  # fmt: skip
        assert open_paths.stdout == "200"
    finally:
        gateway.stop()


def test_a_flood_of_uids_does_not_grow_the_keyless_gateways_answers(tmp_path):
    # A user with subordinate uids (/etc/subuid) can connect as 65536 of them.
    users = SocketUsers(tmp_path / "sandboxd.sock")
    for uid in range(100_000, 100_000 + 3 * CACHE_ENTRIES):
        assert not users.allows(uid)  # no daemon: nobody
    assert len(users._answers) <= CACHE_ENTRIES


def test_each_local_user_has_a_rate_bucket_of_its_own(group_daemon, local_users, tmp_path):
    gateway = start_gateway(tmp_path, group_daemon.socket, rate_per_minute=1, rate_burst=2)
    try:
        codes = [
            httpx.post(f"{gateway.url}/execute", json=HELLO, timeout=30).status_code
            for _ in range(3)
        ]
        assert codes == [200, 200, 429]  # root has used its bucket up...
        status, _ = curl_execute(local_users, local_users.member, gateway.url)
        assert status == 200  # ...and another user is not held back by it
    finally:
        gateway.stop()


def test_stalled_bodies_take_the_callers_own_slots_and_time_out(daemon, tmp_path):
    gateway = start_gateway(tmp_path, daemon.socket, body_timeout=2.0, concurrent_per_key=16)
    port = int(gateway.url.rsplit(":", 1)[1])
    head = (
        "POST /execute HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {4 * 10**6}\r\n\r\n"
    ).encode()
    body = b'{"language": "python", "code": "' + b"x" * (3 * 10**6)
    codes = []
    try:
        with PeakMemory(gateway.process.pid) as memory, contextlib.ExitStack() as stack:
            socks = []
            for _ in range(100):
                sock = stack.enter_context(socket.create_connection(("127.0.0.1", port)))
                sock.settimeout(0.05)
                with contextlib.suppress(TimeoutError, OSError):
                    sock.sendall(head + body)  # stops where the gateway stops reading
                socks.append(sock)
            for sock in socks:
                sock.settimeout(15)
                try:
                    codes.append(int(sock.recv(64).split()[1]))
                except (OSError, IndexError):
                    codes.append(0)
        # Before: 100 such requests held ~300 MiB of the gateway for as long as they stayed.
        assert memory.growth < 100, memory.peak
        assert set(codes) <= {408, 429}, codes
        assert 0 < codes.count(408) <= 16  # the caller's 16 slots; the rest was refused
        assert httpx.get(f"{gateway.url}/health").status_code == 200
    finally:
        gateway.stop()


@pytest.mark.parametrize("path", ["/execute", "/api/v2/execute", "/mcp/"])
def test_bodies_that_would_parse_to_far_more_than_their_bytes_are_refused(gateway, path):
    """Eight bodies under the size cap, each a hundred MB once parsed (``{},`` again
    and again): refused before any route parses them, with the daemon's own rule."""
    padding = b"{}," * ((4 * MiB - 200) // 3)
    body = b'{"language":"python","code":"print(1)","files":[' + padding + b"{}]}"
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    with PeakMemory(gateway.process.pid) as memory, ThreadPoolExecutor(8) as posting:

        def post(_: int) -> httpx.Response:
            return httpx.post(f"{gateway.url}{path}", content=body, headers=headers, timeout=60)

        answers = list(posting.map(post, range(8)))
    assert memory.growth < 100, memory.peak  # MiB
    assert {answer.status_code for answer in answers} == {400}
    assert "at most 16384 JSON values" in answers[0].json()["error"]


def test_a_file_upload_full_of_commas_is_not_taken_for_json(http):
    """A PUT body is a file, raw: a 2 MiB CSV has far more commas than a request may
    hold values, and is written whole."""
    csv = b"1,2,3,4,5,6,7,8\n" * (2 * MiB // 16)
    base = f"/sessions/{http.post('/sessions', json={'language': 'python'}).json()['id']}"
    try:
        answer = http.put(f"{base}/files/big.csv", content=csv)
        assert answer.status_code == 200, answer.text
        assert http.get(f"{base}/files/big.csv").content == csv
    finally:
        http.delete(base)


async def test_a_websocket_flooding_stdin_is_held_back(gateway, daemon):
    url = gateway.url.replace("http://", "ws://") + "/execute/ws"
    chunk = {"type": "stdin", "data": "y" * MiB}
    sent = 0
    with (
        PeakMemory(gateway.process.pid) as gateway_memory,
        PeakMemory(daemon.process.pid) as daemon_memory,
    ):
        async with connect(url) as ws:
            code = "import time; time.sleep(30)"  # reads nothing
            await ws.send({"language": "python", "code": code, "timeout": 6})
            with trio.move_on_after(3):
                while True:
                    await ws.send(chunk)  # nothing reads it: the sockets fill up
                    sent += MiB
    assert sent < 64 * MiB  # before: the gateway and daemon took it all, 1.4 GiB in 4 s
    assert gateway_memory.growth < 100, gateway_memory.peak
    assert daemon_memory.growth < 48, daemon_memory.peak
    # A gateway blocked on a full stdin cannot see its client go (hypercorn tells only
    # through the messages it queued): the job ends at its own time limit.
    assert wait_for(lambda: not program_processes(daemon.uid_base))


SLEEPY = {"language": "python", "code": "import time; time.sleep(1); print('slept')"}


def gateway_of_eight(make_daemon, tmp_path):
    """A daemon that allows each uid 8 connections, and a gateway that knows it."""
    daemon = make_daemon(daemon={"max_connections_per_uid": 8})
    cap = {"max_connections_per_uid": 8}
    return daemon, start_gateway(tmp_path, daemon.socket, daemon=cap, concurrent_per_key=32)


async def test_mcp_calls_past_their_share_of_connections_wait_their_turn(make_daemon, tmp_path):
    """A gateway allowed 8 daemon connections, and ten MCP calls at once: before, each
    opened one more, and those past the daemon's cap were refused as "No available VMs";
    now MCP has its share (2) and the rest wait, while runs keep theirs."""
    _, gateway = gateway_of_eight(make_daemon, tmp_path)
    results: list[dict] = []
    try:
        async with mcp_over_http(gateway.url) as session, trio.open_nursery() as nursery:

            async def run() -> None:
                results.append(await call(session, "run_code", **SLEEPY))

            for _ in range(10):
                nursery.start_soon(run)
            await trio.sleep(0.5)
            answer = await trio.to_thread.run_sync(
                lambda: httpx.post(f"{gateway.url}/execute", json=HELLO, timeout=30)
            )
            assert answer.json()["output"] == "hi\n"
        assert [result["stdout"] for result in results] == ["slept\n"] * 10
    finally:
        gateway.stop()


async def test_one_keys_mcp_calls_leave_room_in_the_share_for_another_key(make_daemon, tmp_path):
    """MCP's share of the gateway's daemon connections was one pool: Alice's long
    calls took all of it, and Bob's list_languages waited until one ended. Now one key
    holds all but one of them (here 1 of 2), and Bob is answered at once."""
    daemon = make_daemon(daemon={"max_connections_per_uid": 8})
    keys = tmp_path / "keys"
    keys.write_text("".join(f"{name}:{key}\n" for name, key in KEYS.items()))
    gateway = start_gateway(
        tmp_path,
        daemon.socket,
        daemon={"max_connections_per_uid": 8},
        api_keys_file=str(keys),
        concurrent_per_key=32,
    )
    long = {"language": "python", "code": "import time; time.sleep(10)", "timeout": 20}
    try:
        async with (
            mcp_over_http(gateway.url, KEYS["alice"]) as alice,
            mcp_over_http(gateway.url, KEYS["bob"]) as bob,
            trio.open_nursery() as nursery,
        ):
            for _ in range(2):
                nursery.start_soon(partial(call, alice, "run_code", **long))
            running = partial(wait_for, lambda: program_processes(daemon.uid_base), timeout=30)
            assert await trio.to_thread.run_sync(running)
            with trio.fail_after(5):  # before: about 10 s, until one of Alice's ended
                languages = await call(bob, "list_languages")
            assert "python" in json.dumps(languages)
            nursery.cancel_scope.cancel()
    finally:
        gateway.stop()


def test_health_answers_while_every_run_holds_a_connection(make_daemon, tmp_path):
    """Eight jobs of ten seconds on a gateway allowed 8 daemon connections: before,
    health waited behind them (it shared their connections); now it has its own."""
    daemon, gateway = gateway_of_eight(make_daemon, tmp_path)
    long = {"language": "python", "code": "import time; time.sleep(10)"}
    try:
        with ThreadPoolExecutor(8) as posting:
            jobs = [
                posting.submit(httpx.post, f"{gateway.url}/execute", json=long, timeout=60)
                for _ in range(8)
            ]
            assert wait_for(lambda: len(program_processes(daemon.uid_base)) >= 5, timeout=30)
            for path in ("/health", "/languages"):
                assert httpx.get(f"{gateway.url}{path}", timeout=3).status_code == 200
            assert all(job.result().status_code == 200 for job in jobs)
    finally:
        gateway.stop()


@pytest.mark.parametrize("path", ["/execute/ws", "/api/v2/connect"])
async def test_websockets_waiting_for_their_request_take_their_callers_slots(
    daemon, tmp_path, path
):
    """Twelve WebSockets that never send their request, from a caller allowed 4
    requests at once: before, all were accepted (300 such sockets, each with a message
    on its way, held 1.3 GB); now 4 are, the rest are refused at the handshake, and a
    socket that goes gives its slot back."""
    gateway = start_gateway(tmp_path, daemon.socket, concurrent_per_key=4, body_timeout=30)
    url = gateway.url.replace("http://", "ws://") + path
    accepted, refused = 0, 0
    try:
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(12):
                try:
                    await stack.enter_async_context(connect(url))
                    accepted += 1
                except RuntimeError:
                    refused += 1
        assert (accepted, refused) == (4, 8)
        async with connect(url) as ws:  # the slots came back with the sockets
            hello = {"language": "python", "code": "print('hi')"}
            if path == "/api/v2/connect":
                hello = {"type": "init", "version": "*", "files": [{"content": "print('hi')"}],
                         "language": "python"}  # fmt: skip
            await ws.send(hello)
            assert (await ws.receive())["type"] in ("output", "runtime")
    finally:
        gateway.stop()


def test_health_says_unhealthy_when_the_daemon_stops_answering(make_daemon, tmp_path):
    """A daemon that hangs (here stopped): health answers 503 within its timeout, as a
    load balancer needs, rather than hanging with it."""
    daemon = make_daemon()
    gateway = start_gateway(tmp_path, daemon.socket)
    try:
        assert httpx.get(f"{gateway.url}/health").status_code == 200
        os.kill(daemon.process.pid, signal.SIGSTOP)
        try:
            time.sleep(1)  # past the answer the gateway keeps
            for path in ("/health", "/ready"):
                answer = httpx.get(f"{gateway.url}{path}", timeout=15)
                assert answer.status_code == 503, answer.text
                assert "did not answer within 5 s" in answer.text
        finally:
            os.kill(daemon.process.pid, signal.SIGCONT)
        assert wait_for(lambda: httpx.get(f"{gateway.url}/health").status_code == 200)
    finally:
        gateway.stop()
