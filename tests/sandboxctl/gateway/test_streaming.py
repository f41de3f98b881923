"""Streaming through the gateway: Server-Sent Events and the WebSocket (with stdin)."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from tests.host_state import program_processes, wait_for
from tests.sandboxctl.gateway.ws_client import WebSocketClosed, connect

SSE = {"Accept": "text/event-stream"}


def parse_sse(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


def test_sse_streams_output_then_the_result(http):
    code = (
        "import sys, time\nprint('one', flush=True)\ntime.sleep(0.3)\nprint('two', file=sys.stderr)"
    )
    with http.stream(
        "POST", "/execute", json={"language": "python", "code": code}, headers=SSE
    ) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        text = "".join(answer.iter_text())
    events = parse_sse(text)
    *outputs, (last, result) = events
    assert {name for name, _ in outputs} == {"output"}
    assert "".join(e["data"] for _, e in outputs if e["stream"] == "stdout") == "one\n"
    assert "".join(e["data"] for _, e in outputs if e["stream"] == "stderr") == "two\n"
    assert last == "result"
    assert (result["success"], result["output"]) == (True, "one\ntwo\n")


def test_sse_errors_before_any_output_keep_their_status(http):
    answer = http.post("/execute", json={"language": "go", "code": ""}, headers=SSE)
    assert answer.status_code == 400
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.json()["error"].startswith("Unsupported language: go")


def test_sse_client_leaving_stops_the_job(gateway, daemon):
    code = "import time\nwhile True:\n    print('tick', flush=True)\n    time.sleep(0.1)"
    with (
        httpx.Client(base_url=gateway.url, timeout=30) as client,
        client.stream(
            "POST", "/execute", json={"language": "python", "code": code}, headers=SSE
        ) as answer,
    ):
        for chunk in answer.iter_text():
            if "tick" in chunk:
                break
    end = time.monotonic() + 20
    while daemon.client.health()["pool"]["busy"] and time.monotonic() < end:
        time.sleep(0.05)
    assert daemon.client.health()["pool"]["busy"] == 0


SILENT = "import time\ntime.sleep(30)"  # no output: the client leaves before any
LEAVING = {
    "json": ("/execute", {}, {"language": "python", "code": SILENT}),
    "sse": ("/execute", SSE, {"language": "python", "code": SILENT}),
    "piston": (
        "/api/v2/execute",
        {},
        {
            "language": "python",
            "version": "*",
            "files": [{"content": SILENT}],
            "run_timeout": 30000,
        },
    ),
    "session": ("/sessions/{session}/exec", {}, {"code": SILENT}),
}


@pytest.mark.parametrize("kind", LEAVING)
def test_a_client_leaving_before_any_output_stops_the_job(gateway, daemon, kind):
    path, headers, body = LEAVING[kind]
    if "{session}" in path:
        created = httpx.post(f"{gateway.url}/sessions", json={"language": "python"})
        path = path.format(session=created.json()["id"])
    content = json.dumps(body).encode()
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    port = int(gateway.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"{head}Content-Length: {len(content)}\r\n\r\n".encode()
            + content
        )
        assert wait_for(lambda: program_processes(daemon.uid_base), timeout=20)
    # Before: the job ran to its end (here 30 s) for a client long gone.
    assert wait_for(lambda: not program_processes(daemon.uid_base), timeout=10)


async def test_websocket_streams_output_and_takes_stdin(gateway):
    url = gateway.url.replace("http://", "ws://") + "/execute/ws"
    code = (
        "import sys\nfor line in sys.stdin:\n    print('echo', line.strip(), flush=True)\n"
        "print('done')"
    )
    async with connect(url) as ws:
        await ws.send({"language": "python", "code": code})
        await ws.send({"type": "stdin", "data": "hello\n"})
        seen = ""
        messages = []
        while True:
            message = await ws.receive()
            messages.append(message)
            if message["type"] != "output":
                break
            seen += message["data"]
            if seen == "echo hello\n":  # answered: now end its input
                await ws.send({"type": "stdin", "data": "", "eof": True})
    result = messages[-1]
    assert result["type"] == "result"
    assert result["output"] == "echo hello\ndone\n"
    assert result["success"] is True


async def test_websocket_bad_first_message_gets_an_error(gateway):
    url = gateway.url.replace("http://", "ws://") + "/execute/ws"
    async with connect(url) as ws:
        await ws.send({"language": "python"})
        message = await ws.receive()
    assert (message["type"], message["status"]) == ("error", 400)
    assert message["error"] == "Invalid request: code: is required"  # as the socket says


async def test_websocket_needs_a_key_when_keys_are_configured(keyed_gateway):
    from tests.sandboxctl.gateway.conftest import KEYS

    upgrade = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    }
    refused = httpx.get(f"{keyed_gateway.url}/execute/ws", headers=upgrade)
    assert refused.status_code == 403
    url = keyed_gateway.url.replace("http://", "ws://") + "/execute/ws"
    async with connect(url, [("X-API-Key", KEYS["bob"])]) as ws:
        await ws.send({"language": "python", "code": "print(7)"})
        while (message := await ws.receive())["type"] == "output":
            pass
    assert message["stdout"] == "7\n"


@pytest.mark.parametrize(
    "message",
    [
        b"not json",
        b'{"type": "stdin", "data": "x", "eof": "false"}',
        b'{"type": "stdin", "data": 1}',
    ],
    ids=["not-json", "eof-not-boolean", "data-not-a-string"],
)
async def test_a_websocket_message_that_is_not_stdin_ends_it_with_an_error(
    gateway, daemon, message
):
    url = gateway.url.replace("http://", "ws://") + "/execute/ws"
    async with connect(url) as ws:
        await ws.send({"language": "python", "code": "import sys; print(sys.stdin.read())"})
        await ws.send_text(message.decode())
        answer = await ws.receive()
        with pytest.raises(WebSocketClosed) as closed:
            await ws.receive()
    assert (answer["type"], answer["status"], closed.value.code) == ("error", 400, 1008)
    assert answer["error"].startswith("Invalid request: ")
    assert wait_for(lambda: not program_processes(daemon.uid_base))
