"""Streamed input (``execute.stdin``) meets its bounds however it is cut: a flood of tiny
or empty chunks, or a huge id, holds no more of the daemon than the budgets say
(before its execution starts, and while it runs), through the real RPC server with
local sandboxes (tests/fast/stack.py)."""

from __future__ import annotations

import json
from typing import Any

import trio

from sandboxd.errors import InvalidParams
from sandboxd.peers import PeerAccount
from sandboxd.rpc_server import MAX_EARLY_STDIN_BYTES
from sandboxd.stdin_stream import StdinStream, held_size
from tests.fast.stack import local_stack

MiB = 1024 * 1024
MAX_REQUESTS = 20_000  # bounds every flood here, far above what a bound lets through


class Wire:
    """JSON lines over the daemon's socket, as a client without our library sends them."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def send(self, *messages: dict[str, Any]) -> None:
        await self.stream.send_all(b"".join(json.dumps(m).encode() + b"\n" for m in messages))

    async def receive(self) -> dict[str, Any]:
        while b"\n" not in self.buffer:
            self.buffer += await self.stream.receive_some(65536)
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)


def stdin_request(n: int, target: Any, data: str) -> dict[str, Any]:
    params = {"id": target, "data": data}
    return {"jsonrpc": "2.0", "method": "execute.stdin", "id": n, "params": params}


async def early_chunks_taken(wire: Wire, target: str, data: str) -> int:
    """How many chunks of ``data`` for an execution not started the daemon keeps before
    it refuses them (for their size); about MAX_REQUESTS if it never does."""
    batch, taken = 500, 0
    for first in range(0, MAX_REQUESTS, batch):
        await wire.send(*(stdin_request(first + n, target, data) for n in range(batch)))
        answers = [await wire.receive() for _ in range(batch)]
        refused = [a for a in answers if "error" in a]
        taken += batch - len(refused)
        if refused:
            assert refused[0]["error"]["code"] == InvalidParams.code
            assert refused[0]["error"]["data"]["field"] == "data"
            break
    return taken


async def test_tiny_early_input_meets_its_bound_as_large_input_does(tmp_path):
    """Each chunk held counts its overhead too: a byte at a time, the input kept for an
    execution not started yet is bounded in chunks (it once counted only their text, so
    a million one-byte chunks fitted in its megabyte)."""
    async with local_stack(tmp_path) as stack:
        wire = Wire(await trio.open_unix_socket(str(stack.client.socket_path)))
        async with wire.stream:
            taken = await early_chunks_taken(wire, "later", "x")
    id_size = held_size("later")
    assert taken == (MAX_EARLY_STDIN_BYTES - id_size) // held_size("x")


async def test_empty_chunks_of_input_are_not_kept(tmp_path):
    """An empty chunk that does not end the input brings nothing: it is dropped, not
    held (they once piled up, counted as nothing)."""
    async with local_stack(tmp_path) as stack:
        wire = Wire(await trio.open_unix_socket(str(stack.client.socket_path)))
        async with wire.stream:
            await wire.send(*(stdin_request(n, "later", "") for n in range(5000)))
            answers = [await wire.receive() for _ in range(5000)]
            assert not [a for a in answers if "error" in a]
            taken = await early_chunks_taken(wire, "later", "x")
    assert taken == (MAX_EARLY_STDIN_BYTES - held_size("later")) // held_size("x")


async def test_a_huge_id_counts_against_the_input_kept_for_it(tmp_path):
    """The id of an execution not started yet is held with its input: one of a megabyte
    leaves no room (64 such ids were once kept per connection, uncounted)."""
    async with local_stack(tmp_path) as stack:
        wire = Wire(await trio.open_unix_socket(str(stack.client.socket_path)))
        async with wire.stream:
            await wire.send(stdin_request(1, "i" * MAX_EARLY_STDIN_BYTES, "x"))
            answer = await wire.receive()
    assert answer["error"]["code"] == InvalidParams.code
    assert answer["error"]["data"]["field"] == "data"


async def test_a_running_job_s_input_buffer_counts_each_chunk_s_overhead():
    """While a job runs, its input waits in a buffer that holds back the connection once
    full: a byte at a time, it fills after its size over a chunk's cost (it once took a
    chunk per byte of its budget), and then a sender waits."""
    stream = StdinStream(MiB, PeerAccount(1000, 2**30))
    taken = 0
    while taken < MAX_REQUESTS and stream.offer("x", False):
        taken += 1
    assert taken == MiB // held_size("x")
    with trio.move_on_after(0.1) as waited:
        await stream.put("x", False)
    assert waited.cancelled_caught


async def test_input_after_its_end_is_dropped():
    """What a client sends after it ended the input is nobody's: it is not held."""
    account = PeerAccount(1000, 2**30)
    stream = StdinStream(MiB, account)
    await stream.put("last", True)
    for _ in range(MAX_REQUESTS):
        await stream.put("more", False)
    assert account.held == held_size("last")
    assert await anext(stream) == ("last", True)
    assert account.held == 0
