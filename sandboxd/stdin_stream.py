"""Input a client streams to an interactive job, held in the daemon up to a byte budget.

The connection's reading loop puts chunks in as ``execute.stdin`` messages arrive; the
agent link takes them out as fast as the agent accepts them. When the budget is used up,
``put`` waits: the connection stops reading, so a client that sends faster than the
program reads is held back by its own socket instead of being buffered in the daemon.
What waits here also counts against the sending uid's budget (sandboxd.peers).
"""

from __future__ import annotations

import sys
from collections import deque

import trio

from sandboxd.peers import PeerAccount

StdinChunk = tuple[str, bool]  # (data, end of input)
# What a chunk held costs beside its text (its tuple, its string's header, its slot in
# the queue), counted with it: a flood of tiny chunks meets the budget as large ones do.
CHUNK_OVERHEAD = 128


def held_size(data: str) -> int:
    """What a chunk of ``data`` counts against a budget while it is held: what the
    string takes (up to four bytes a character: its widest decides), and the rest."""
    return sys.getsizeof(data) + CHUNK_OVERHEAD


class StdinStream:
    def __init__(self, max_bytes: int, account: PeerAccount) -> None:
        self.max_bytes = max_bytes
        self.account = account
        self._chunks: deque[StdinChunk] = deque()
        self._size = 0
        self._closed = False
        self._ended = False  # the end of input came: what follows it is dropped
        self.taken = False  # whether a chunk has gone to the program
        self._lot = trio.lowlevel.ParkingLot()  # woken when a chunk comes or goes

    def offer(self, data: str, eof: bool) -> bool:
        """Add a chunk if the budget has room for it now; False (nothing added) if not."""
        if self._dropped(data, eof):
            return True
        if self._size + held_size(data) > self.max_bytes:
            return False
        self._add(data, eof)
        return True

    async def put(self, data: str, eof: bool) -> None:
        """Add a chunk once the budget has room for it (a chunk larger than the whole
        budget waits for an empty buffer); dropped if the job has ended."""
        size = held_size(data)
        while self._size and self._size + size > self.max_bytes and not self._dropped(data, eof):
            await self._lot.park()
        if not self._dropped(data, eof):
            self._add(data, eof)

    def _dropped(self, data: str, eof: bool) -> bool:
        """Whether a chunk is not kept: the job or its input has ended, or it brings
        nothing."""
        return self._closed or self._ended or not (data or eof)

    def _add(self, data: str, eof: bool) -> None:
        self._ended = eof
        self._chunks.append((data, eof))
        self._size += held_size(data)
        self.account.hold(held_size(data))
        self._lot.unpark_all()

    def close(self) -> None:
        """The job ended: drop what is held and what may still come."""
        self._closed = True
        self._chunks.clear()
        self.account.release(self._size)
        self._size = 0
        self._lot.unpark_all()

    def __aiter__(self) -> StdinStream:
        return self

    async def __anext__(self) -> StdinChunk:
        while not self._chunks:
            if self._closed:
                raise StopAsyncIteration
            await self._lot.park()
        data, eof = self._chunks.popleft()
        self.taken = True
        self._size -= held_size(data)
        self.account.release(held_size(data))
        self._lot.unpark_all()
        return data, eof
