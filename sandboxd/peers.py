"""What each client of the socket may hold in the daemon, counted per peer uid.

Only root and the socket's group can connect, but any of them must not be able to grow
the root daemon without bound. So every uid has a cap on its open connections and a
budget of bytes: the requests it has sent that are not answered yet (a line still
arriving, a request running) and the input it streamed that no program has taken yet.
A uid over its budget is not refused: its connections stop reading until its own
requests finish, so the socket holds it back. Past the budget a connection still reads
a little (PAST_BUDGET_BYTES), and at most one request: the input of its interactive
jobs (which would otherwise wait out their time for it, holding the budget), or one
small request if it has none running (a health check). Requests are counted at what
they may take parsed (sandboxd.framing.parsed_size), and parsed only as the budget has
room, but for small ones.
Its jobs' output, which their results carry until sent, has a budget of the same size:
past it, its next jobs wait to start.
The other uids are not affected.

Timeouts bound the rest in time: a request line must arrive whole once it has begun, a
connection with nothing running must not sit idle, and a client must take what it is
sent (a client that reads nothing would otherwise keep its answers here forever).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from sandboxd.errors import TooManyConnections

# What a connection may read past its uid's budget, and the parsed size of a request
# parsed whatever the uid's others take: with at most one such request per connection,
# and a cap on connections, what a uid holds past its budget stays a few megabytes.
PAST_BUDGET_BYTES = 65536


@dataclass(frozen=True)
class SocketLimits:
    max_request_bytes: int  # one request line
    stdin_buffer_bytes: int  # streamed input waiting for one interactive job
    request_timeout: float  # a request line must arrive whole within this, once started
    idle_timeout: float  # a connection with nothing running and nothing arriving is closed
    send_timeout: float  # a client that takes nothing of what it is sent for this long
    connections_per_uid: int
    requests_per_connection: int  # running at once; more wait until one is answered
    pending_bytes_per_uid: int


class PeerAccount:
    """One uid's connections and held bytes."""

    def __init__(self, uid: int, budget: int) -> None:
        self.uid = uid
        self.budget = budget
        self.connections = 0
        self.held = 0
        self.output = 0  # of its jobs, what is not yet sent (a job's result carries it)
        self.parsed = 0  # what its parsed requests take (sandboxd.framing.parsed_size)
        self.unfinished = 0  # of what it holds, its request lines still arriving
        self._arriving: dict[object, float] = {}  # whose request line is arriving, since when
        self._lot = trio.lowlevel.ParkingLot()

    def hold(self, size: int) -> None:
        self.held += size

    def release(self, size: int) -> None:
        self.held -= size
        if self.held - self.unfinished < self.budget:  # room, or for the oldest line
            self._lot.unpark_all()

    def arriving(self, reader: object, since: float | None) -> None:
        """``reader`` (a connection) has a request line arriving since ``since``, or none."""
        if since is None:
            self._arriving.pop(reader, None)
            self._lot.unpark_all()
        else:
            self._arriving.setdefault(reader, since)

    def hold_output(self, size: int) -> None:
        self.output += size

    def release_output(self, size: int) -> None:
        self.output -= size
        if self.output < self.budget:
            self._lot.unpark_all()

    async def wait_for_output_room(self) -> None:
        """Return once the uid's jobs hold less unsent output than its budget (the jobs
        holding it are running or sending, so they end on their own)."""
        while self.output >= self.budget:
            await self._lot.park()

    @asynccontextmanager
    async def parsing(self, size: int) -> AsyncIterator[None]:
        """Hold a request of that parsed size while it is parsed and answered, once the
        uid's parsed requests leave room for it (or there are none). Its bytes, held
        while they arrived, were counted as narrow strings until a wide character came,
        maybe in its last piece, and its values only once it was whole: without this,
        lines read in that time could all be parsed at once. A small one is parsed at
        once: its connection read it whole, at most one past the budget."""
        while size > PAST_BUDGET_BYTES and self.parsed and self.parsed + size > self.budget:
            await self._lot.park()
        self.parsed += size
        try:
            yield
        finally:
            self.parsed -= size
            self._lot.unpark_all()

    def is_arriving(self, reader: object) -> bool:
        return reader in self._arriving

    def wake(self) -> None:
        """Something a waiting reader may read on for has changed (``unless``)."""
        self._lot.unpark_all()

    async def wait_for_room(
        self, reader: object, unless: Callable[[], bool] = lambda: False
    ) -> None:
        """Return once the uid holds less than its budget, once ``unless()`` is true, or
        once ``reader``'s line is the uid's oldest arriving one while what the uid holds
        but unfinished lines is within its budget: that one goes on, so a uid whose
        budget is all in unfinished lines cannot stall itself for good. (It went on
        whatever else was held: a client writing its requests back to back was never
        held back, nor one sending input for jobs that had not started.)"""
        while (
            self.held >= self.budget
            and not unless()
            and not (self.held - self.unfinished < self.budget and self._oldest(reader))
        ):
            await self._lot.park()

    def _oldest(self, reader: object) -> bool:
        return (
            reader in self._arriving
            and min(self._arriving, key=self._arriving.__getitem__) is reader
        )


class PeerTable:
    def __init__(self, limits: SocketLimits) -> None:
        self.limits = limits
        self._accounts: dict[int, PeerAccount] = {}

    def connect(self, uid: int) -> PeerAccount:
        """Count a new connection of ``uid``; TooManyConnections if it has its maximum."""
        account = self._accounts.get(uid)
        if account is None:
            account = self._accounts[uid] = PeerAccount(uid, self.limits.pending_bytes_per_uid)
        if account.connections >= self.limits.connections_per_uid:
            raise TooManyConnections(
                f"uid {uid} already has {account.connections} connections open "
                f"(at most {self.limits.connections_per_uid})",
                maximum=self.limits.connections_per_uid,
            )
        account.connections += 1
        return account

    def disconnect(self, account: PeerAccount) -> None:
        account.connections -= 1
        if account.connections == 0 and account.held == 0 and account.output == 0:
            del self._accounts[account.uid]  # a uid that comes and goes leaves nothing
