"""The agent's end of the wire protocol (see the package's docstring): JSON lines on a
channel, encoded and decoded by json's C half."""

from __future__ import annotations

import _json
import math
import os

from .common import CHUNK, JobError

TYPE_CHECKING = False  # typing costs every sandbox its import
if TYPE_CHECKING:
    from typing import IO, Any

PROTOCOL = 2


class _StandardJson:
    """What json's C scanner reads of a decoder: plain JSON, as json.loads parses it."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}.__getitem__


def _unserializable(value: object) -> None:
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


_scan_json = _json.make_scanner(_StandardJson())  # type: ignore[arg-type]  # duck-typed: it reads these attributes only
# As json.dumps(ensure_ascii=False, separators=(",", ":")) encodes.
_encode_json = _json.make_encoder(
    None, _unserializable, _json.encode_basestring, None, ":", ",", False, False, True
)


def to_json(value: object) -> str:
    return "".join(_encode_json(value, 0))


def from_json(data: bytes) -> object:
    """A JSON document; ValueError if it is not one."""
    text = data.decode().strip()
    try:
        value, end = _scan_json(text, 0)
    except StopIteration as exc:
        raise ValueError(f"not JSON at character {exc.value}") from None
    if end != len(text):
        raise ValueError(f"extra data after JSON at character {end}")
    return value


class Channel:
    """The agent's line-delimited JSON link to the host, read from a raw fd so that the
    run loop can also wait for host messages (streamed stdin) with its poll."""

    def __init__(self, read_fd: int, writer: IO[bytes]) -> None:
        self.fd = read_fd
        self._writer = writer
        self._buffer = bytearray()
        self._scanned = 0  # of the buffer, the bytes known to hold no newline
        self.closed = False

    def send(self, message: dict[str, Any]) -> None:
        self._writer.write(to_json(message).encode() + b"\n")
        self._writer.flush()

    def _parse(self, line: bytes) -> dict[str, Any]:
        message = from_json(line)
        if not isinstance(message, dict):
            raise JobError("a message from the host was not a JSON object")
        return message

    def receive(self) -> dict[str, Any] | None:
        """The next message, waiting for it; None once the host closed the channel."""
        while (end := self._buffer.find(b"\n", self._scanned)) < 0:
            self._scanned = len(self._buffer)  # a long line is searched once, not per read
            data = os.read(self.fd, CHUNK)
            if not data:
                self.closed = True
                rest, self._buffer = bytes(self._buffer), bytearray()
                return self._parse(rest) if rest.strip() else None
            self._buffer += data
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        self._scanned = 0
        return self._parse(line)

    def receive_ready(self, read: bool = True) -> list[dict[str, Any]]:
        """The complete messages buffered, after one read if the fd polled readable."""
        if read:
            data = os.read(self.fd, CHUNK)
            if not data:
                self.closed = True
            self._buffer += data
        *lines, rest = bytes(self._buffer).split(b"\n")
        self._buffer, self._scanned = bytearray(rest), 0
        return [self._parse(line) for line in lines if line.strip()]
