"""The host's end of the agent protocol (the wire format is in guest/agent/__init__.py).

The link only speaks the protocol over whatever byte streams the backend gives it. It
keeps a transcript of the output it relayed, which is the output of the result: the
agent streams it once and keeps none of it, and a run whose agent died still returns
everything the program wrote before.
"""

from __future__ import annotations

import base64
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from guest.agent.files import MAX_ENTRIES
from sandboxd.errors import AgentError
from sandboxd.framing import LineBuffer, LineTooLong, TooManyValues, decode, encode, receive_line
from sandboxd.protocol import AGENT_PROTOCOL, STAGES, STREAMS
from sandboxd.stdin_stream import StdinStream

WarmRuntime = dict[str, Any]  # from sandboxd.job.warm_runtime
OutputHandler = Callable[[str, str, str], Awaitable[None]]  # OUTPUT_FIELDS' order
StageHandler = Callable[[str], None]  # a stage ("compile", "run") starts
# The longest line an agent sends: an output message of 64 KiB, JSON-escaped (up to six
# bytes per byte), with room to spare. Its result carries no output.
MAX_AGENT_LINE = 1024 * 1024
# The largest message, a directory listing: seven values an entry.
MAX_AGENT_VALUES = 8 * MAX_ENTRIES
STDIN_SLICE = 65536  # characters of streamed stdin per message to the agent
FINAL_REPLIES = ("result", "done", "error")  # the last message of the agent's answers
CUT_OFF_TIMEOUT = 5.0  # for a message begun as its run ended to go out whole


class Transcript:
    """The output relayed so far, per stage and stream, capped like the agent caps it."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._text: dict[tuple[str, str], list[str]] = {}
        self._sizes: dict[tuple[str, str], int] = {}

    def add(self, stage: str, stream: str, data: str) -> None:
        key = (stage, stream)
        size = self._sizes.get(key, 0)
        if size < self.cap:
            self._text.setdefault(key, []).append(data)
            self._sizes[key] = size + len(data.encode())

    def text(self, stage: str, stream: str) -> str:
        return "".join(self._text.get((stage, stream), []))

    def truncated(self, stage: str, stream: str) -> bool:
        return self._sizes.get((stage, stream), 0) >= self.cap


class AgentLink:
    """The protocol over the backend's streams to one agent: given at once, or attached
    once the backend has connected to an agent that had to start listening first."""

    def __init__(
        self,
        send: trio.abc.SendStream | None = None,
        receive: trio.abc.ReceiveStream | None = None,
    ) -> None:
        self._buffer = LineBuffer(MAX_AGENT_LINE)
        self._send_lock = trio.Lock()
        self._sending = False  # a message is on its way (cut off, if a call was cancelled)
        self._answering = False  # the agent owes the answer to a request sent whole
        if send is not None and receive is not None:
            self.attach(send, receive)

    def attach(self, send: trio.abc.SendStream, receive: trio.abc.ReceiveStream) -> None:
        self._send = send
        self._receive = receive

    async def _next(self) -> dict[str, Any] | None:
        try:
            line = await receive_line(self._receive, self._buffer)
        except LineTooLong as exc:
            raise AgentError(f"agent sent an oversized message: {exc}") from exc
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise AgentError(f"agent channel broke: {exc}") from exc
        if line is None:
            return None
        try:
            message = decode(line, MAX_AGENT_VALUES)
        except TooManyValues as exc:
            raise AgentError(f"agent sent an oversized message: {exc}") from exc
        except ValueError as exc:
            raise AgentError(f"agent sent a line that is not JSON: {line[:200]!r}") from exc
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            raise AgentError(f"agent sent a message without a type: {line[:200]!r}")
        return message

    async def handshake(self, warm: WarmRuntime | None = None) -> dict[str, Any]:
        """Sync with the agent and wait for its hello; AgentError if anything else comes.

        The sync carries fresh host entropy and the time: a VM restored from a snapshot
        shares its random pool and clock with every other clone until it takes them.
        ``warm`` is the runtime the agent starts then, waiting for its job.
        """
        nonce = secrets.randbits(63)
        await self._send_message(
            {
                "type": "sync",
                "nonce": nonce,
                "entropy": base64.b64encode(os.urandom(64)).decode(),
                "time": time.time(),
                "warm": warm,
            }
        )
        message = await self._next()
        if message is None:
            raise AgentError("agent exited before saying hello")
        if message["type"] != "hello" or message.get("protocol") != AGENT_PROTOCOL:
            raise AgentError(f"expected hello for protocol {AGENT_PROTOCOL}, got {message}")
        if message.get("nonce") != nonce:
            raise AgentError("agent answered an earlier sync")
        return message

    async def _send_message(self, message: dict[str, Any]) -> None:
        async with self._send_lock:
            self._sending = True
            try:
                await self._send.send_all(encode(message))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise AgentError(f"agent went away: {exc}") from exc
            self._sending = False

    async def _send_whole(self, message: dict[str, Any]) -> None:
        """Send a message that may be cancelled as the run ends: once begun, it is sent
        whole (an agent back to reading takes it), or left cut off if that takes longer
        than the bound (``owes_answer`` then says the link is broken)."""
        async with self._send_lock:
            pass  # wait for our turn while cancellable; the send itself is shielded below
        with trio.CancelScope(shield=True), trio.move_on_after(CUT_OFF_TIMEOUT):
            await self._send_message(message)

    async def _request(self, message: dict[str, Any]) -> None:
        """Send a job or a file request: the agent owes its answer from now on."""
        await self._send_message(message)
        self._answering = True

    def _answered(self, reply: dict[str, Any]) -> dict[str, Any]:
        self._answering = False
        return reply

    @property
    def owes_answer(self) -> bool:
        """Whether a message is cut off on its way, or a request not answered yet."""
        return self._sending or self._answering

    async def settle(self) -> None:
        """After a call was cancelled: read the rest of the agent's answer to it, so that
        the next request of a session starts clean. AgentError if it cannot (a message
        cut off on its way, the agent gone)."""
        if self._sending:
            raise AgentError("a message to the agent was cut off")
        if self._answering:
            await self._send_message({"type": "cancel"})  # the agent stops what it runs
        while self._answering:
            reply = await self._next()
            if reply is None:
                raise AgentError("agent exited without answering")
            if reply["type"] in FINAL_REPLIES:
                self._answered(reply)

    async def run(
        self,
        job: dict[str, Any],
        on_output: OutputHandler,
        transcript: Transcript,
        stdin: StdinStream | None = None,
        on_stage: StageHandler | None = None,
    ) -> dict[str, Any]:
        """Send one job, relay its output (and streamed stdin), return the agent's result.

        Raises AgentError if the agent breaks the protocol or goes away first.
        """
        await self._request(job)
        if stdin is None:
            return await self._collect(on_output, transcript, on_stage)
        failure: AgentError | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._forward_stdin, stdin)
            try:
                record = await self._collect(on_output, transcript, on_stage)
            except AgentError as exc:
                failure = exc  # raised below, not through the nursery (no exception group)
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return record

    async def open_session(self) -> None:
        """Make the agent serve request after request (see guest/agent/session.py)."""
        await self._send_message({"type": "session"})

    async def request(
        self, message: dict[str, Any], max_data: int = 0
    ) -> tuple[dict[str, Any], bytes]:
        """One file request of a session: the agent's last reply (``done`` or ``error``)
        and the data it sent before it, at most ``max_data`` bytes.

        Raises AgentError if the agent breaks the protocol or goes away first.
        """
        await self._request(message)
        data = bytearray()
        while (reply := await self._next()) is not None:
            if reply["type"] in FINAL_REPLIES:
                return self._answered(reply), bytes(data)
            chunk = reply.get("data")
            if reply["type"] != "file.data" or not isinstance(chunk, str):
                raise AgentError(f"unexpected agent message type {reply['type']!r}")
            try:
                data += base64.b64decode(chunk, validate=True)
            except ValueError as exc:
                raise AgentError("agent sent file data that is not base64") from exc
            if len(data) > max_data:
                raise AgentError(f"agent sent more than the {max_data} bytes asked for")
        raise AgentError("agent exited without answering")

    async def _forward_stdin(self, stdin: StdinStream) -> None:
        try:
            async for data, eof in stdin:
                # In slices: the agent reads a message whole, in the job's memory.
                for start in range(0, max(len(data), 1), STDIN_SLICE):
                    last = start + STDIN_SLICE >= len(data)
                    piece = data[start : start + STDIN_SLICE]
                    await self._send_whole({"type": "stdin", "data": piece, "eof": eof and last})
                if eof:
                    return
            await self._send_whole({"type": "stdin", "data": "", "eof": True})
        except AgentError:
            pass  # the agent is gone; collecting its output says so

    async def _collect(
        self, on_output: OutputHandler, transcript: Transcript, on_stage: StageHandler | None
    ) -> dict[str, Any]:
        while (message := await self._next()) is not None:
            if message["type"] == "result":
                return self._answered(message)
            if message["type"] == "stage":
                if on_stage is not None and message.get("stage") in STAGES:
                    on_stage(message["stage"])
                continue
            if message["type"] != "output":
                raise AgentError(f"unexpected agent message type {message['type']!r}")
            stage, stream, data = message.get("stage"), message.get("stream"), message.get("data")
            # Only the protocol's names: each new (stage, stream) would be a transcript of
            # its own, each up to the cap, so an agent that made up names could grow us.
            if stage not in STAGES or stream not in STREAMS or not isinstance(data, str):
                raise AgentError("agent sent a malformed output message")
            transcript.add(stage, stream, data)
            await on_output(stage, stream, data)
        raise AgentError("agent exited without a result")
