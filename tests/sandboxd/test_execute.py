"""Jobs through a real daemon: results, streaming, concurrency and isolation."""

from __future__ import annotations

import json
import socket
import threading

import trio

from sandboxctl.client import AsyncClient
from sandboxd.protocol import Status


def test_hello(client):
    result = client.execute("python", "print(2 + 2)")
    assert (result.status, result.exit_code, result.stdout, result.stderr) == (
        Status.OK,
        0,
        "4\n",
        "",
    )
    assert result.timings["total"] >= result.timings["run"] > 0
    assert result.sandbox_id


def test_exit_code_and_stderr_are_kept(client):
    result = client.execute("python", 'import sys; print("x", file=sys.stderr); sys.exit(3)')
    assert (result.status, result.exit_code, result.stderr) == (Status.RUNTIME_ERROR, 3, "x\n")
    assert result.message == "process exited with code 3"


def test_stdin_args_and_files(client):
    code = (
        "import sys, pathlib\n"
        "print(sys.stdin.read().strip(), sys.argv[1:], pathlib.Path('data/in.txt').read_text())"
    )
    result = client.execute(
        "py",
        code,
        stdin="from stdin\n",
        args=["a", "b c"],
        files=[{"path": "data/in.txt", "content": "hello file"}],
    )
    assert result.stdout == "from stdin ['a', 'b c'] hello file\n"


def test_uncaught_exception_keeps_its_traceback(client):
    result = client.execute("python", "print('before')\nraise ValueError('boom')")
    assert result.status == Status.RUNTIME_ERROR
    assert result.stdout == "before\n"
    assert "ValueError: boom" in result.stderr


def test_output_streams_before_the_response(daemon):
    """Notifications carry the output, in order, before the final response."""
    request = {
        "jsonrpc": "2.0",
        "method": "execute",
        "id": "job-1",
        "params": {
            "language": "python",
            "code": "import sys, time\nprint('one')\ntime.sleep(0.2)\n"
            "print('two', file=sys.stderr)",
        },
    }
    *notes, response = exchange(daemon.socket, request)
    assert {n["method"] for n in notes} == {"execute.output"}
    # An unbuffered print may arrive as more than one chunk; the order of streams holds.
    merged: list[list[str]] = []
    for note in notes:
        stream, data = note["params"]["stream"], note["params"]["data"]
        if merged and merged[-1][0] == stream:
            merged[-1][1] += data
        else:
            merged.append([stream, data])
    assert merged == [["stdout", "one\n"], ["stderr", "two\n"]]
    assert all(n["params"]["id"] == "job-1" and n["params"]["stage"] == "run" for n in notes)
    assert response["id"] == "job-1"
    assert response["result"]["stdout"] == "one\n"


def exchange(path, request: dict) -> list[dict]:
    """Send one request on a connection kept open; every message up to its response."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(path))
        sock.sendall(json.dumps(request).encode() + b"\n")
        messages = []
        for line in sock.makefile("rb"):
            messages.append(json.loads(line))
            if "result" in messages[-1] or "error" in messages[-1]:
                return messages
    raise AssertionError(f"the connection closed without a response: {messages}")


def test_half_closed_client_still_gets_its_answer(daemon):
    request = {
        "jsonrpc": "2.0",
        "method": "execute",
        "id": 1,
        "params": {"language": "python", "code": "print('still here')"},
    }
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(daemon.socket))
        sock.sendall(json.dumps(request).encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)
        *_, response = [json.loads(line) for line in sock.makefile("rb")]
    assert response["result"]["stdout"] == "still here\n"


async def test_twenty_concurrent_executes(daemon):
    client = AsyncClient(daemon.socket)
    results = {}

    async def one(index: int) -> None:
        results[index] = await client.execute(
            "python", f"import time; time.sleep(0.3); print({index} * 2)"
        )

    async with trio.open_nursery() as nursery:
        for index in range(20):
            nursery.start_soon(one, index)
    assert {i: (r.status, r.stdout) for i, r in results.items()} == {
        i: (Status.OK, f"{i * 2}\n") for i in range(20)
    }
    assert len({r.sandbox_id for r in results.values()}) == 20


def test_a_second_sandbox_cannot_see_what_the_first_wrote(client):
    first = client.execute(
        "python",
        (
            "import os\n"
            "for path in ('/work/secret', '/tmp/secret', '/dev/shm/secret'):\n"
            "    try:\n"
            "        open(path, 'w').write('mine')\n"
            "    except OSError as e:\n"
            "        print(path, e)\n"
            "print(sorted(os.listdir('/work')))"
        ),
    )
    assert "secret" in first.stdout
    second = client.execute(
        "python",
        (
            "import os\n"
            "paths = ('/work/secret', '/tmp/secret', '/dev/shm/secret')\n"
            "print([p for p in paths if os.path.exists(p)])\n"
            "print(sorted(os.listdir('/work')))"
        ),
    )
    assert second.stdout == "[]\n['main.py']\n"
    assert first.sandbox_id != second.sandbox_id


def test_sandboxes_do_not_see_each_other_running(client):
    """While one job runs, another sees only its own processes."""
    seen = {}

    def sleeper() -> None:
        seen["sleeper"] = client.execute("python", "import time; time.sleep(2)")

    thread = threading.Thread(target=sleeper)
    thread.start()
    probe = client.execute(
        "python", ("import os\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))")
    )
    thread.join()
    pids = json.loads(probe.stdout)
    assert len(pids) <= 4  # bubblewrap's init, the agent and the program itself
    assert seen["sleeper"].status == Status.OK


def test_the_jail_has_no_network_but_loopback(client):
    result = client.execute(
        "python", "import socket; print(sorted(n for _, n in socket.if_nameindex()))"
    )
    assert result.stdout == "['lo']\n"


def test_the_program_runs_unprivileged(client):
    result = client.execute(
        "python",
        (
            "import os\n"
            "print(os.getuid(), os.getgid())\n"
            "print(open('/proc/self/status').read().split('CapEff:')[1].split()[0])"
        ),
    )
    assert result.stdout == "65534 65534\n0000000000000000\n"


async def test_interactive_stdin_streams_to_the_program(daemon):
    client = AsyncClient(daemon.socket)
    code = (
        "import sys\n"
        "for line in sys.stdin:\n"
        "    print('echo', line.strip(), flush=True)\n"
        "print('bye')"
    )
    seen = []
    async with client.open_execution("python", code, interactive=True, stdin="zero\n") as run:
        async for event in run:
            seen.append(event.data)
            if "".join(seen).endswith("echo zero\n"):
                await run.send_stdin("one\n")
            if "".join(seen).endswith("echo one\n"):
                await run.close_stdin()
    assert run.result.status == Status.OK
    assert run.result.stdout == "echo zero\necho one\nbye\n"


async def test_input_streamed_while_a_program_compiles_reaches_it(daemon):
    client = AsyncClient(daemon.socket)
    code = (
        "use std::io::Read;\n"
        "fn main() { let mut s = String::new(); std::io::stdin().read_to_string(&mut s)"
        '.unwrap(); print!("got {}", s); }'
    )
    async with client.open_execution("rust", code, interactive=True, timeout=20) as run:
        await run.send_stdin("sent during the compile\n", eof=True)  # it compiles still
        async for _ in run:
            pass
    assert run.result.compile is not None and run.result.compile.time > 0
    assert (run.result.status, run.result.stdout) == (Status.OK, "got sent during the compile\n")


async def test_stdin_before_its_execute_is_kept_but_bounded(daemon):
    """Input may arrive before its execute is dispatched: kept for a few ids, in order."""
    from sandboxd.errors import InvalidParams
    from sandboxd.rpc_server import MAX_EARLY_STDIN_IDS

    stream = await trio.open_unix_socket(str(daemon.socket))
    async with stream:
        for n in range(MAX_EARLY_STDIN_IDS):  # notifications: taken in order, no answer
            note = {
                "jsonrpc": "2.0",
                "method": "execute.stdin",
                "params": {"id": f"not-yet-{n}", "data": "x"},
            }
            await stream.send_all(json.dumps(note).encode() + b"\n")
        request = {
            "jsonrpc": "2.0",
            "method": "execute.stdin",
            "id": "over",
            "params": {"id": "one-too-many", "data": "x"},
        }
        await stream.send_all(json.dumps(request).encode() + b"\n")
        reply = b""
        while not reply.endswith(b"\n"):
            reply += await stream.receive_some(65536)
    answer = json.loads(reply)
    assert answer["id"] == "over"
    assert (answer["error"]["code"], answer["error"]["data"]["field"]) == (InvalidParams.code, "id")


async def test_leaving_an_execution_early_stops_the_job(daemon):
    client = AsyncClient(daemon.socket)
    code = "import time\nprint('tick', flush=True)\ntime.sleep(60)"
    async with client.open_execution("python", code) as run:
        async for event in run:
            assert event.data.startswith("tick")
            break
    with trio.fail_after(20):
        while (await client.health())["pool"]["busy"]:
            await trio.sleep(0.05)


def test_output_callbacks_take_stage_stream_and_data(client, daemon):
    """The client library's callbacks, sync and trio, take what the daemon's does, in
    the contract's order."""
    code = "import sys; print('out'); print('err', file=sys.stderr)"

    def joined(chunks: list[tuple[str, str, str]]) -> dict[tuple[str, str], str]:
        streams: dict[tuple[str, str], str] = {}
        for stage, stream, data in chunks:  # a print may come in more than one chunk
            streams[stage, stream] = streams.get((stage, stream), "") + data
        return streams

    seen: list[tuple[str, str, str]] = []
    client.execute("python", code, on_output=lambda *chunk: seen.append(chunk))
    assert joined(seen) == {("run", "stdout"): "out\n", ("run", "stderr"): "err\n"}

    async def main() -> list[tuple[str, str, str]]:
        chunks: list[tuple[str, str, str]] = []
        await AsyncClient(daemon.socket).execute(
            "python", code, on_output=lambda *chunk: chunks.append(chunk)
        )
        return chunks

    assert joined(trio.run(main)) == joined(seen)
