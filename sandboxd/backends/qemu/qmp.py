"""A small QMP client (QEMU's JSON control protocol) for trio, over a connected stream.

One command at a time, like QEMU's own python/qemu/qmp: a command's answer is the next
``return`` or ``error``; events that come in between are kept for whoever asks.
"""

from __future__ import annotations

import array
import json
import logging
import socket
from collections.abc import Callable
from typing import Any

import trio

from sandboxd.errors import LaunchError
from sandboxd.framing import LineBuffer, encode, receive_line

log = logging.getLogger(__name__)


class QMPError(LaunchError):
    """QEMU refused a command or the monitor went away."""


class QMPClient:
    def __init__(self, stream: trio.SocketStream) -> None:  # a socket: send_fd needs it
        self._stream = stream
        self._buffer = LineBuffer(16 * 1024 * 1024)
        self._lock = trio.Lock()
        self.events: list[dict[str, Any]] = []

    async def _receive(self) -> dict[str, Any]:
        try:
            line = await receive_line(self._stream, self._buffer)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise QMPError(f"QEMU's monitor went away: {exc}") from exc
        if line is None:
            raise QMPError("QEMU's monitor closed")
        message: dict[str, Any] = json.loads(line)
        return message

    async def start(self) -> dict[str, Any]:
        """Read the greeting and leave capabilities negotiation; the greeting."""
        greeting = await self._receive()
        if "QMP" not in greeting:
            raise QMPError(f"not a QMP greeting: {greeting}")
        await self.execute("qmp_capabilities")
        return greeting

    async def send_fd(self, name: str, fd: int) -> None:
        """Give QEMU a file descriptor under ``name`` (``getfd`` with SCM_RIGHTS)."""
        request = encode({"execute": "getfd", "arguments": {"fdname": name}})
        sock = self._stream.socket
        async with self._lock:
            await sock.sendmsg(
                [request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
            )
            while "event" in (message := await self._receive()):
                self.events.append(message)
        if "error" in message:
            raise QMPError(f"QMP getfd: {message['error'].get('desc')}")

    async def wait_event(
        self, name: str, matches: Callable[[dict[str, Any]], bool] = lambda data: True
    ) -> dict[str, Any]:
        """The first event ``name`` (kept or still to come) whose data ``matches``."""
        async with self._lock:
            while True:
                for index, event in enumerate(self.events):
                    if event["event"] == name and matches(event.get("data", {})):
                        return self.events.pop(index)
                message = await self._receive()
                if "event" in message:
                    self.events.append(message)

    async def execute(self, command: str, **arguments: Any) -> Any:
        """Run one command; its return value, or QMPError with QEMU's description."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        async with self._lock:
            log.debug("qmp> %s", request)
            try:
                await self._stream.send_all(encode(request))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise QMPError(f"QEMU's monitor went away: {exc}") from exc
            while True:
                message = await self._receive()
                if "event" in message:
                    self.events.append(message)
                    continue
                if "error" in message:
                    error = message["error"]
                    raise QMPError(f"QMP {command}: {error.get('class')}: {error.get('desc')}")
                return message.get("return")
