"""A small QMP client (QEMU's JSON control protocol) for trio, over a connected stream.

One command at a time, like QEMU's own python/qemu/qmp: a command's answer is the next
``return`` or ``error``; events that come in between are kept for whoever asks.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import trio

from sandboxd.errors import LaunchError
from sandboxd.framing import LineBuffer, encode, receive_line

log = logging.getLogger(__name__)


class QMPError(LaunchError):
    """QEMU refused a command or the monitor went away."""


class QMPClient:
    def __init__(self, stream: trio.abc.Stream) -> None:
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
