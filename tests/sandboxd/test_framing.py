"""Line framing with caps on a line's length and its JSON values, shared by every link."""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing

from sandboxd.framing import (
    LineBuffer,
    LineTooLong,
    TooManyValues,
    _within,
    check_values,
    decode,
    parsed_size,
    receive_line,
)


def test_lines_split_across_feeds():
    buffer = LineBuffer(100)
    buffer.feed(b'{"a":')
    assert buffer.next_line() is None
    buffer.feed(b'1}\n{"b":2}\n{"c"')
    assert buffer.next_line() == b'{"a":1}'
    assert buffer.next_line() == b'{"b":2}'
    assert buffer.next_line() is None
    assert buffer.pending


def test_too_long_is_refused_before_the_newline_arrives():
    buffer = LineBuffer(10)
    buffer.feed(b"x" * 11)
    with pytest.raises(LineTooLong):
        buffer.next_line()


def test_too_long_even_when_the_newline_is_there():
    buffer = LineBuffer(10)
    buffer.feed(b"x" * 20 + b"\n")
    with pytest.raises(LineTooLong):
        buffer.next_line()


async def test_receive_line_over_a_stream():
    send, receive = trio.testing.memory_stream_pair()
    buffer = LineBuffer(100)
    await send.send_all(b"one\ntw")
    assert await receive_line(receive, buffer) == b"one"
    await send.send_all(b"o\n")
    assert await receive_line(receive, buffer) == b"two"
    await send.send_all(b"partial")
    await send.aclose()
    assert await receive_line(receive, buffer) == b"partial"
    assert await receive_line(receive, buffer) is None


def _values(document: object) -> int:
    """How many values ``document`` holds, itself and its keys included."""
    if isinstance(document, dict):
        return 1 + sum(1 + _values(item) for item in document.values())
    if isinstance(document, list):
        return 1 + sum(_values(item) for item in document)
    return 1


DOCUMENTS = [
    {'a"b,,:[{': 1, "c": ["x,\\", 2, [], {}], "d": 'q\\"\\\\,:"', "e": None},
    [[], [[]], {"": ""}, "\\", '\\\\"', 1.5, True],
    {"code": 'x = {1: [2, "3"]},\n' * 2000, "files": [{"path": "a", "content": "x"}] * 50},
    "just a string, with: [marks] {inside}",
]


@pytest.mark.parametrize("document", DOCUMENTS)
def test_a_line_holds_as_many_values_as_its_reader_takes_and_no_more(document):
    line = json.dumps(document).encode()
    values = _values(document)
    # Counted as one more than the marks outside strings: never fewer than there are,
    # and more only by the empty containers (a bracket with no value after it).
    empties = line.count(b"[]") + line.count(b"{}")
    assert _within(line, values + empties)
    assert decode(line, values + empties) == document
    with pytest.raises(TooManyValues):
        check_values(line, min(values - 1, len(line)))


def test_a_line_of_empty_objects_is_refused_before_it_is_parsed():
    """Four MiB of ``{},`` parse to a hundred MB of dicts: refused, within a few steps
    per allowed value, whatever the line's length."""
    line = b"[" + b"{}," * (4 * 2**20 // 3) + b"{}]"
    with pytest.raises(TooManyValues, match="at most 16384 JSON values"):
        decode(line, 16384)
    escaped = b"[" + b'"\\\\\\"",' * 500_000 + b"1]"  # strings that are all escapes
    with pytest.raises(TooManyValues):
        check_values(escaped, 16384)


def test_a_big_string_full_of_marks_is_one_value():
    code = 'print({"a": [1, 2]}, "\\\\", \'"\')\n' * 100_000
    line = json.dumps({"code": code}).encode()
    assert decode(line, 4) == {"code": code}


@pytest.mark.parametrize(
    "pieces",
    [[b'{"a":"x', "\U0001f600".encode(), b'"}\n'], [b'{"a":"x\\', b"ud83d\\ude00", b'"}\n']],
    ids=["raw", "escape-cut-in-two"],
)
def test_a_line_that_may_parse_wide_is_counted_four_times_over(pieces):
    buffer = LineBuffer(100)
    buffer.feed(pieces[0])
    assert buffer.pending_size == len(pieces[0])  # narrow so far
    buffer.feed(pieces[1])
    assert buffer.pending_size == 4 * len(pieces[0] + pieces[1])  # all of it, wide now
    buffer.feed(pieces[2] + b'{"b":1')
    line = buffer.next_line()
    # Its bytes four times over, and 72 bytes for each of its values (one more than
    # its marks: an object, a key, a string).
    assert parsed_size(line, 16384) == 4 * (len(line) + 1) + 72 * 3
    assert buffer.pending_size == len(b'{"b":1')  # the next line is narrow again
    assert parsed_size(b'{"b":1}', 16384) == 8 + 72 * 3


def parsed_width(text: str) -> int:
    """The bytes a character CPython keeps ``text`` at."""
    widest = max(map(ord, text), default=0)
    return 1 if widest < 0x100 else 2 if widest < 0x10000 else 4


@pytest.mark.parametrize(
    ("string", "width"),
    [
        ("plain", 1),
        ("café and naïve stay narrow", 1),
        ("\\u00e9 escaped too", 1),
        ("Ā is the first past latin-1", 2),
        ("€ and 中文", 2),
        ("\\u20ac escaped", 2),
        ("\\\\u20ac is no escape but counted as one", 2),
        ("an emoji \U0001f600", 4),
        ("\\ud83d\\ude00 escaped", 4),
    ],
)
def test_a_line_is_charged_at_the_width_its_widest_character_parses_to(string, width):
    """CPython keeps a string at 1, 2 or 4 bytes a character, its widest deciding: a
    line is charged at that width, no longer four times over for any byte past ASCII
    (which made code with an "é" cost four times its size)."""
    line = b'{"code":"' + string.encode() + b'"}'  # ``string`` is the JSON text
    parsed = json.loads(line)["code"]
    assert parsed_width(parsed) == width or "no escape" in string
    assert parsed_size(line, 16384) == (len(line) + 1) * width + 72 * 3
    buffer = LineBuffer(1000)
    buffer.feed(line[:-4])
    buffer.feed(line[-4:])  # its widest character may come in the last piece
    assert buffer.pending_size == len(line) * width


def test_lines_after_a_wide_one_are_narrow_without_a_rescan():
    """The buffer keeps where the last piece with a wide byte ends: the lines after it
    are each found narrow at once (each one rescanned the rest before)."""
    buffer = LineBuffer(2**20)
    buffer.feed(b"\\ud83d\n{}\n")  # a piece read at once counts wide whole
    buffer.feed(b"{}\n" * 10_000)
    assert buffer.pending_size == 4 * (10 + 30_000)
    assert buffer.next_line() == b"\\ud83d"
    assert buffer.pending_size == 4 * (3 + 30_000)
    assert buffer.next_line() == b"{}"
    assert buffer.pending_size == 30_000
    assert all(buffer.next_line() == b"{}" for _ in range(10_000))
    assert buffer.next_line() is None


def test_a_line_of_escapes_is_charged_in_linear_time():
    """Four MiB of ``\\u00e9`` (json.dumps's default for "é") is narrow: found in a
    few passes in C (the reversed-regex scan took 140 ms on the event loop)."""
    line = b'"' + b"\\u00e9" * (4 * 2**20 // 6) + b'"'
    buffer = LineBuffer(8 * 2**20)
    for start in range(0, len(line), 65536):
        buffer.feed(line[start : start + 65536])
    buffer.feed(b"\n")
    assert buffer.pending_size == len(line) + 1
    assert parsed_size(buffer.next_line(), 16384) == len(line) + 1 + 72 * 16384  # values: the cap
