"""Line framing with a cap, shared by every link."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from sandboxd.framing import LineBuffer, LineTooLong, receive_line


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
