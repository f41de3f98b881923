"""One JSON document per line over a byte stream, with a cap on the length of a line.

Both of sandboxd's links use this framing: clients ⇄ daemon (JSON-RPC) and daemon ⇄ guest
agent. The buffer is sans-IO so the sync client, the trio client and the daemon share it;
a line over the cap is refused as soon as the cap is passed, without reading it whole.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the sync client must not pay for importing trio
    import trio


class LineTooLong(Exception):
    """More than ``max_line`` bytes arrived without a newline."""


class LineBuffer:
    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._data = bytearray()
        self._scanned = 0  # bytes already known to hold no newline

    def feed(self, data: bytes) -> None:
        self._data += data

    def next_line(self) -> bytes | None:
        """The next complete line without its newline, or None if none is complete yet."""
        end = self._data.find(b"\n", self._scanned)
        if end < 0:
            self._scanned = len(self._data)
            if self._scanned > self.max_line:
                raise LineTooLong(f"a line is longer than {self.max_line} bytes")
            return None
        if end > self.max_line:
            raise LineTooLong(f"a line is longer than {self.max_line} bytes")
        line = bytes(self._data[:end])
        del self._data[: end + 1]
        self._scanned = 0
        return line

    @property
    def pending(self) -> bool:
        """Whether bytes of an unfinished line are buffered."""
        return bool(self._data)


def encode(message: Any) -> bytes:
    return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


async def receive_line(stream: trio.abc.ReceiveStream, buffer: LineBuffer) -> bytes | None:
    """The next line from ``stream``, or None at a clean end of stream.

    Raises LineTooLong; an end of stream in the middle of a line counts as clean (the
    caller sees the partial line as the last one).
    """
    while (line := buffer.next_line()) is None:
        data = await stream.receive_some(65536)
        if not data:
            if buffer.pending:
                buffer.feed(b"\n")
                continue
            return None
        buffer.feed(data)
    return line
