"""One JSON document per line over a byte stream, with a cap on the length of a line.

Both of sandboxd's links use this framing: clients ⇄ daemon (JSON-RPC) and daemon ⇄ guest
agent. The buffer is sans-IO so the sync client, the trio client and the daemon share it;
a line over the cap is refused as soon as the cap is passed, without reading it whole.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the sync client must not pay for importing trio
    import trio


class LineTooLong(Exception):
    """More than ``max_line`` bytes arrived without a newline."""


VALUE_BYTES = 72  # what a parsed value may take beyond its text: an empty dict and its slot
_SCANNED_LINE = 65536  # longer lines are charged for the most values a line may hold

# Python keeps a string at one, two or four bytes a character, the widest of its
# characters deciding: past U+00FF two, past U+FFFF four. In UTF-8 (which is all a line
# may be: parse_json) the lead byte of a character tells its width; in an escape, its
# first hex digits. Lines and their strings are charged at the widest width they hold.
# The bytes no character of width 2, of width 4, starts with:
_BELOW_LEAD = (bytes(range(0xC4)), bytes(range(0xF0)))
_ASTRAL_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # half of a surrogate pair


def _widths(text: bytes | bytearray, escapes: bytes | bytearray | None = None) -> tuple[bool, bool]:
    """Whether ``text`` may make a string parse two, four bytes a character, by its
    raw characters and by the escapes in ``escapes`` (``text`` itself by default), in
    a few passes in C (a reversed-regex scan took 140 ms of the event loop for 4 MiB of
    ``\\u00e9``)."""
    leads = b"" if text.isascii() else text.translate(None, _BELOW_LEAD[0])
    two, four = bool(leads), bool(leads.translate(None, _BELOW_LEAD[1]))
    escaped = text if escapes is None else escapes
    if b"\\u" in escaped:
        two = two or escaped.count(b"\\u") != escaped.count(b"\\u00")
        four = four or (
            (b"\\ud" in escaped or b"\\uD" in escaped)
            and _ASTRAL_ESCAPE.search(escaped) is not None
        )
    return two, four


def _width(wide: tuple[object, object]) -> int:
    return 4 if wide[1] else 2 if wide[0] else 1


def parsed_size(line: bytes, max_values: int) -> int:
    """What a line (and its newline) may take once parsed: its bytes, each as wide as
    its widest character, decoded and again in its strings, and VALUE_BYTES for each
    value it may hold (counted by its marks, in lines short enough to count at once;
    for longer ones, the most a line may hold, :func:`check_values`)."""
    values = 1 + _marks(line) if len(line) <= _SCANNED_LINE else max_values
    return (len(line) + 1) * _width(_widths(line)) + VALUE_BYTES * min(values, max_values)


def _marks(text: bytes) -> int:
    return sum(text.count(mark) for mark in (b",", b":", b"[", b"{"))


class LineBuffer:
    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._data = bytearray()
        self._scanned = 0  # bytes already known to hold no newline
        # One past the last piece buffered that may parse 2, 4 wide (all of a piece
        # counts: it may hold the end of one line and others after it).
        self._wide = (0, 0)
        self._unseen = b""  # the end of the last piece, an escape it may cut in two

    def feed(self, data: bytes | bytearray) -> None:
        text = self._unseen + data if self._unseen else data
        cut = text.rfind(b"\\", max(0, len(text) - 5))  # an escape is 6 bytes: look at it whole
        seen, self._unseen = (text[:cut], bytes(text[cut:])) if cut >= 0 else (text, b"")
        two, four = _widths(data, seen)
        self._data += data
        end = len(self._data)
        self._wide = (end if two else self._wide[0], end if four else self._wide[1])

    @property
    def pending_size(self) -> int:
        """What the buffered bytes of unfinished lines may take parsed, as strings
        (parsed_size counts their values once they are whole)."""
        return len(self._data) * _width(self._wide)

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
        self._wide = (max(0, self._wide[0] - end - 1), max(0, self._wide[1] - end - 1))
        return line

    @property
    def pending(self) -> bool:
        """Whether bytes of an unfinished line are buffered."""
        return bool(self._data)


class TooManyValues(ValueError):
    """A line holds more JSON values than its reader takes."""


# A mark comes before every value but the first: a comma, a colon (a key is a value) or
# an opening bracket; a string, its escaped quotes taken out first, is skipped whole.
_TOKEN = re.compile(rb'[,:\[{]|"[^"]*"')


def _within(line: bytes, max_values: int) -> bool:
    """Whether the JSON text ``line`` holds at most ``max_values`` values, counted as
    one more than its marks. Valid JSON has no more strings than values, so this takes
    at most about twice ``max_values`` steps, however the line is made."""
    if len(line) < max_values:
        return True  # each value but the first takes a byte of its own
    text = line.replace(b"\\\\", b"").replace(b'\\"', b"") if b"\\" in line else line
    marks = strings = 0
    for token in _TOKEN.finditer(text):
        if text[token.start()] == ord('"'):
            strings += 1
        else:
            marks += 1
        if marks >= max_values or strings > max_values:
            return False
    return True


def check_values(line: bytes, max_values: int) -> None:
    """TooManyValues if the JSON text ``line`` holds more than ``max_values`` values, to
    be refused before it is parsed: parsed, each value costs tens of bytes (an empty
    object, two bytes of JSON, takes 64), so a line of the allowed length could make its
    reader hold twenty-five times its length."""
    if not _within(line, max_values):
        raise TooManyValues(f"a message may hold at most {max_values} JSON values")


def parse_json(line: bytes) -> Any:
    """The JSON document of ``line``, which must be UTF-8 (RFC 8259): ValueError if it
    is not. Bytes that are not UTF-8 are refused, not replaced, since what a line is
    charged parsed is worked out from its UTF-8 (:func:`parsed_size`)."""
    try:
        return json.loads(line.decode())
    except RecursionError:  # nested deeper than the parser goes: not JSON it takes
        raise ValueError("nested too deeply") from None


def decode(line: bytes, max_values: int) -> Any:
    """The JSON document of ``line``: ValueError if it is not JSON, TooManyValues if it
    holds more than ``max_values`` values (:func:`check_values`)."""
    check_values(line, max_values)
    return parse_json(line)


# Big strings are encoded in slices of this many characters (see encode_chunks).
CHUNK_CHARS = 65536
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _utf8(text: str) -> bytes:
    # A lone surrogate (which JSON can carry) can only sit inside a JSON string, where
    # its backslash escape means the same: the receiver decides what to make of it.
    return text.encode("utf-8", "backslashreplace")


def encode(message: Any) -> bytes:
    return _utf8(_dumps(message)) + b"\n"


def _has_big_string(value: Any) -> bool:
    if isinstance(value, str):
        return len(value) > CHUNK_CHARS
    if isinstance(value, dict):
        return any(_has_big_string(item) for item in value.values())
    if isinstance(value, list | tuple):
        return any(_has_big_string(item) for item in value)
    return False


def _pieces(value: Any) -> Iterator[str]:
    """The JSON text of ``value`` in pieces, big strings sliced."""
    if not _has_big_string(value):
        yield _dumps(value)
    elif isinstance(value, str):
        yield '"'
        for start in range(0, len(value), CHUNK_CHARS):
            yield _dumps(value[start : start + CHUNK_CHARS])[1:-1]
        yield '"'
    elif isinstance(value, dict):
        for index, (key, item) in enumerate(value.items()):
            yield ("{" if index == 0 else ",") + _dumps(str(key)) + ":"
            yield from _pieces(item)
        yield "}"
    else:
        for index, item in enumerate(value):
            yield "[" if index == 0 else ","
            yield from _pieces(item)
        yield "]"


def encode_chunks(message: Any) -> Iterator[bytes]:
    """The line :func:`encode` makes, in pieces of about ``CHUNK_CHARS``: a result with
    megabytes of output is sent while it is encoded, never built whole (as JSON, control
    characters grow up to six times), and the sender can let others run in between."""
    pending: list[str] = []
    size = 0
    for piece in _pieces(message):
        pending.append(piece)
        size += len(piece)
        if size >= CHUNK_CHARS:
            yield _utf8("".join(pending))
            pending, size = [], 0
    pending.append("\n")
    yield _utf8("".join(pending))


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
