"""Every bad input gets its documented JSON-RPC error from a real daemon."""

from __future__ import annotations

import json
import socket
import time

import pytest

from sandboxd import errors
from sandboxd.errors import (
    InvalidParams,
    LimitAboveMaximum,
    NoCapacity,
    UnsupportedLanguage,
)
from tests.daemon_process import receive_json_line, start_holding_job


def raw_exchange(path, payload: bytes, *, replies: int = 1, timeout: float = 30) -> list:
    """Send raw bytes, read ``replies`` lines back (notifications included)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(payload)
        data = b""
        while data.count(b"\n") < replies:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


def test_parse_error(daemon):
    [reply] = raw_exchange(daemon.socket, b"{not json\n")
    assert reply["error"]["code"] == errors.ParseError.code
    assert reply["id"] is None


def test_a_line_that_is_not_utf8_is_a_parse_error_not_a_guess(daemon):
    """JSON between systems is UTF-8 (RFC 8259): a Latin-1 byte in the code was
    replaced by U+FFFD and the job ran; what a line is charged is worked out from its
    UTF-8, so it is refused, saying where."""
    line = b'{"jsonrpc":"2.0","method":"execute","params":{"language":"python",'
    line += b'"code":"print(\'caf\xe9\')"},"id":1}\n'
    [reply] = raw_exchange(daemon.socket, line)
    assert reply["error"]["code"] == errors.ParseError.code
    assert "can't decode byte 0xe9 in position 84" in reply["error"]["data"]


def test_invalid_request(daemon):
    [reply] = raw_exchange(daemon.socket, b'{"jsonrpc": "1.0", "method": 5, "id": 1}\n')
    assert reply["error"]["code"] == errors.InvalidRequest.code


def test_unknown_method(daemon):
    [reply] = raw_exchange(daemon.socket, b'{"jsonrpc": "2.0", "method": "nope", "id": 7}\n')
    assert reply == {
        "jsonrpc": "2.0",
        "error": {
            "code": errors.MethodNotFound.code,
            "message": "Method not found",
            "data": "nope",
        },
        "id": 7,
    }


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"language": "python"}, "code"),
        ({"code": "print(1)"}, "language"),
        ({"language": "python", "code": 5}, "code"),
        ({"language": "python", "code": "", "stdin": ["x"]}, "stdin"),
        ({"language": "python", "code": "", "args": "a b"}, "args"),
        ({"language": "python", "code": "", "args": ["ok", 3]}, "args[1]"),
        ({"language": "python", "code": "", "colour": "red"}, "colour"),
        ({"language": "python", "code": "", "timeout": "10"}, "timeout"),
        ({"language": "python", "code": "", "limits": {"memory_bytes": -1}}, "limits.memory_bytes"),
        (
            {"language": "python", "code": "", "limits": {"wall_time": 1.5, "cpus": 2}},
            "limits.cpus",
        ),
        (
            {"language": "python", "code": "", "files": [{"path": "../x", "content": ""}]},
            "files[0].path",
        ),
        (
            {"language": "python", "code": "", "files": [{"path": "/etc/x", "content": ""}]},
            "files[0].path",
        ),
        (
            {"language": "python", "code": "", "files": [{"path": "main.py", "content": ""}]},
            "files[0].path",
        ),
        (
            {
                "language": "python",
                "code": "",
                "files": [{"path": "a", "content": "!", "encoding": "base64"}],
            },
            "files[0].content",
        ),
    ],
)
def test_invalid_params_name_the_field(client, params, field):
    with pytest.raises(InvalidParams) as caught:
        client.call("execute", params)
    assert caught.value.data["field"] == field
    assert caught.value.data["reason"]


def test_positional_params_are_invalid(daemon):
    request = b'{"jsonrpc": "2.0", "method": "execute", "params": ["python", "1"], "id": 1}\n'
    [reply] = raw_exchange(daemon.socket, request)
    assert reply["error"]["code"] == InvalidParams.code


def test_unsupported_language_lists_the_known_ones(client):
    with pytest.raises(UnsupportedLanguage) as caught:
        client.execute("go", "package main")
    assert caught.value.message.startswith("Unsupported language: go")
    assert "python" in caught.value.data["known"]


def test_limit_above_maximum(client):
    with pytest.raises(LimitAboveMaximum) as caught:
        client.execute("python", "", limits={"memory_bytes": 64 * 2**30})
    assert caught.value.data == {
        "limit": "memory_bytes",
        "requested": 64 * 2**30,
        "maximum": 4 * 2**30,
    }
    with pytest.raises(LimitAboveMaximum) as caught:
        client.execute("python", "", timeout=100_000)
    assert caught.value.data["limit"] == "wall_time"


def test_oversized_request_is_refused_unread(daemon):
    # The cap is 4 MiB; send the start of a 64 MiB line and see the refusal arrive while
    # most of it has not even been written.
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(daemon.socket))
        sent = 0
        chunk = b'{"jsonrpc": "2.0", "method": "execute", "params": {"code": "' + b"x" * 65536
        try:
            while sent < 64 * 2**20:
                sent += sock.send(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = receive_json_line(sock)
    assert reply["error"]["code"] == errors.RequestTooLarge.code
    assert sent < 16 * 2**20
    assert daemon.client.health()["status"] == "healthy"


def test_no_capacity_after_the_queue_timeout(make_daemon):
    daemon = make_daemon(pool={"size": 1, "max_sandboxes": 1, "queue_timeout": 0.5})
    holder, _ = start_holding_job(daemon.socket)  # the job is running
    started = time.monotonic()
    with pytest.raises(NoCapacity) as caught:
        daemon.client.execute("python", "print(1)")
    assert time.monotonic() - started >= 0.5
    assert "within 0.5 s" in caught.value.message
    holder.close()  # its job is cancelled; capacity comes back
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            assert daemon.client.execute("python", "print(1)").stdout == "1\n"
            break
        except NoCapacity:
            continue
    else:
        pytest.fail("capacity never came back after the holding client left")


def test_batch_requests_are_answered_together(daemon):
    batch = [
        {"jsonrpc": "2.0", "method": "health", "id": "a"},
        {"jsonrpc": "2.0", "method": "nope", "id": "b"},
        {"jsonrpc": "2.0", "method": "health"},  # a notification: no answer
    ]
    [reply] = raw_exchange(daemon.socket, json.dumps(batch).encode() + b"\n")
    assert [r["id"] for r in reply] == ["a", "b"]
    assert reply[0]["result"]["status"] == "healthy"
    assert reply[1]["error"]["code"] == errors.MethodNotFound.code


@pytest.mark.parametrize(
    "request_id",
    ["x" * 257, 2**64, -(2**63) - 1],
    ids=["long-string", "above-64-bits", "below-64-bits"],
)
@pytest.mark.parametrize("batched", [False, True], ids=["alone", "in-a-batch"])
def test_an_id_too_big_to_echo_is_refused_before_anything_runs(daemon, request_id, batched):
    """Each output notification carries the request's id: a megabyte id would make every
    one a megabyte."""
    request = {"jsonrpc": "2.0", "method": "execute", "id": request_id,
               "params": {"language": "python", "code": "print('ran')"}}  # fmt: skip
    payload = [{"jsonrpc": "2.0", "method": "health", "id": 1}, request] if batched else request
    [reply] = raw_exchange(daemon.socket, json.dumps(payload).encode() + b"\n")
    assert (reply["id"], reply["error"]["code"]) == (None, errors.InvalidRequest.code)
    assert "at most 256 characters" in reply["error"]["message"]
    fits = {**request, "id": "x" * 256, "params": {**request["params"], "stream_output": False}}
    [answer] = raw_exchange(daemon.socket, json.dumps(fits).encode() + b"\n")
    assert (answer["id"], answer["result"]["stdout"]) == ("x" * 256, "ran\n")


def test_methods_without_params_refuse_params(client):
    with pytest.raises(InvalidParams) as caught:
        client.call("health", {"verbose": True})
    assert caught.value.data["field"] == "verbose"


@pytest.mark.parametrize(
    "line",
    [
        b'{"jsonrpc": "2.0", "method": "execute.stdin", "params": {"id": [1], "data": "x"}}',
        b'{"jsonrpc": "2.0", "method": "execute.stdin", "params": {"id": {"a": 1}}}',
        b'{"jsonrpc": "2.0", "method": "execute.stdin", "params": [1, 2]}',
        b'{"jsonrpc": "2.0", "method": "execute.stdin", "params": "x"}',
        b'{"jsonrpc": "2.0", "method": "execute.stdin", "params": {"id": 1, "data": 5}}',
        b'{"jsonrpc": "2.0", "method": "execute", "params": {"language": ["py"], "code": ""}, '
        b'"id": 1}',
        b'{"jsonrpc": "2.0", "method": "execute", "params": {"language": "py", "code": "", '
        b'"timeout": NaN}, "id": 1}',
        b'{"jsonrpc": "2.0", "method": "execute", "params": {"language": "py", "code": "", '
        b'"limits": {"memory_bytes": 1e400}}, "id": 1}',
        b'{"jsonrpc": "2.0", "method": "execute", "id": {"not": "an id"}}',
        b'[{"jsonrpc": "2.0"}, 7, null, []]',
        b'"just a string"',
        b"\xff\xfe\x00garbage",
        b"[" * 100_000,
    ],
)
def test_malformed_messages_never_take_the_daemon_down(daemon, line):
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(daemon.socket))
        sock.sendall(line + b"\n")
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass
    assert daemon.client.health()["status"] == "healthy"
