"""JSON-RPC 2.0 on the daemon's Unix socket: one JSON document per line, each way.

This is the only module that knows jsonrpcserver. Its ``async_dispatch`` gathers with
asyncio, which trio refuses, so we parse and validate with its helpers and await
``dispatch_request`` ourselves (a nursery for a batch). It is also the one place where
errors become wire errors: a SandboxError keeps its code, anything else becomes an
internal error with a log id, and the traceback stays in the log.

Output of a running job reaches the caller as ``execute.output`` notifications before the
response. A connection's requests run concurrently; when its peer hangs up, whatever it
still had running is cancelled, and the sandboxes go with it.
"""

from __future__ import annotations

import inspect
import logging
import math
import select
import socket
import struct
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio
from jsonrpcserver.async_dispatcher import dispatch_request
from jsonrpcserver.dispatcher import (
    create_request,
    deserialize_request,
    to_response,
    validate_request,
)
from jsonrpcserver.main import default_validator
from jsonrpcserver.response import to_serializable_one
from jsonrpcserver.result import Error, Result, Success
from jsonrpcserver.sentinels import NODATA, NOID
from oslash.either import Left  # type: ignore[import-untyped]

from sandboxd.errors import (
    InternalError,
    InvalidParams,
    InvalidRequest,
    RequestTimeout,
    RequestTooLarge,
    SandboxError,
    TooManyConnections,
)
from sandboxd.framing import (
    LineBuffer,
    LineTooLong,
    TooManyValues,
    check_values,
    decode,
    encode,
    encode_chunks,
    parse_json,
    parsed_size,
)
from sandboxd.job import flag, unicode_text
from sandboxd.peers import PAST_BUDGET_BYTES, PeerAccount, PeerTable, SocketLimits
from sandboxd.protocol import MAX_REQUEST_VALUES, OUTPUT_FIELDS, OUTPUT_NOTIFICATION, Method
from sandboxd.service import Service
from sandboxd.sessions import Owner, Reserve, Sessions
from sandboxd.stdin_stream import StdinStream, held_size

log = logging.getLogger(__name__)

STDIN_METHOD = Method.STDIN
# Input may arrive before its execute request is dispatched; how much is kept for it.
MAX_EARLY_STDIN_IDS = 64
MAX_EARLY_STDIN_BYTES = 1024 * 1024
# What a request costs the daemon beyond its bytes (its task, what it parses into),
# counted against its uid like them: a flood of tiny requests is bounded too.
REQUEST_OVERHEAD = 4096


async def _feed_stdin(connection: Connection, params: Any) -> None:
    """Check ``execute.stdin`` params and pass the input on; InvalidParams if wrong."""
    if not isinstance(params, dict):
        raise InvalidParams.field("params", "expected an object with id, data and eof")
    unknown = sorted(set(params) - {"id", "data", "eof"})
    if unknown:
        raise InvalidParams.field(unknown[0], "unknown field (known: id, data, eof)")
    request_id = params.get("id")
    if isinstance(request_id, bool) or not isinstance(request_id, str | int):
        raise InvalidParams.field("id", "expected the id (string or integer) of an execute")
    data, eof = unicode_text(params.get("data", ""), "data"), params.get("eof", False)
    if not isinstance(eof, bool):
        raise InvalidParams.field("eof", "expected true or false")
    await connection.feed_stdin(request_id, data, eof)


def _take_line(connection: Connection, buffer: LineBuffer) -> tuple[bytes, int] | None:
    """The next complete line of ``buffer`` and its parsed size, at which
    ``connection`` now holds it (it was held as part of what was arriving); None if
    none is complete."""
    line = buffer.next_line()
    if line is None:
        return None
    size = parsed_size(line, MAX_REQUEST_VALUES)
    connection.hold(size)
    connection.arriving_holds(buffer.pending_size)
    return line, size


async def _stdin_notification(connection: Connection, line: bytes) -> bool:
    """Take an ``execute.stdin`` notification right in the reading loop, so that input
    keeps its order (tasks would race); False for any other line."""
    if STDIN_METHOD.encode() not in line:
        return False
    try:
        message = decode(line, MAX_REQUEST_VALUES)
    except ValueError:
        return False  # answered as any other line that is not a request
    if not isinstance(message, dict) or message.get("method") != STDIN_METHOD or "id" in message:
        return False
    try:
        await _feed_stdin(connection, message.get("params", {}))
    except InvalidParams as exc:
        log.info("dropped execute.stdin notification: %s", exc.message)
    return True


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int

    @classmethod
    def of(cls, sock: trio.socket.SocketType) -> Peer:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return cls(*struct.unpack("3i", raw))


class Connection:
    """One client: serialised writes, a scope that ends all its work when it leaves, and
    the bytes it holds in the daemon, counted against its uid (sandboxd.peers)."""

    def __init__(
        self,
        stream: trio.SocketStream,
        scope: trio.CancelScope,
        peer: Peer,
        account: PeerAccount,
        limits: SocketLimits,
    ) -> None:
        self.stream = stream
        self.scope = scope
        self.peer = peer
        self.account = account
        self.limits = limits
        self.held = 0  # what its request lines read and not yet answered take (parsed_size)
        self.unfinished = 0  # of that, its lines still arriving
        self.requests = 0  # read and not yet answered
        self.running = trio.Semaphore(limits.requests_per_connection)  # of those, at once
        self.read_scope = trio.CancelScope()  # the deadline of the read in progress
        self.draining = False  # the daemon stops: read no further request
        self.reading_ahead = False  # what it reads now is past its uid's budget
        self.took_ahead = False  # it took a request read past the budget, since it was in it
        self._send_lock = trio.Lock()
        # Interactive executions running on this connection: request id → their stdin;
        # and input that arrived before its execute request was dispatched.
        self._stdin: dict[Any, StdinStream] = {}
        self._early_stdin: dict[Any, StdinStream] = {}

    def hold(self, size: int) -> None:
        self.held += size
        self.account.hold(size)

    def release(self, size: int) -> None:
        self.held -= size
        self.account.release(size)

    def arriving_holds(self, size: int) -> None:
        """What its unfinished lines hold is now ``size`` (sandboxd.peers: unfinished)."""
        change, self.unfinished = size - self.unfinished, size
        self.account.unfinished += change
        if change >= 0:
            self.hold(change)
        else:
            self.release(-change)

    def request_read(self) -> None:
        """A request line (already held) will be answered: its task counts too."""
        self.requests += 1
        self.hold(REQUEST_OVERHEAD)

    def request_done(self, size: int) -> None:
        """A request line that held ``size`` was answered; with nothing left running,
        the connection's idle time starts now."""
        self.requests -= 1
        self.release(size + REQUEST_OVERHEAD)
        if not self.requests and self.read_scope.deadline == math.inf:
            self.read_scope.deadline = trio.current_time() + self.limits.idle_timeout

    async def wait_to_read(self, pending: int) -> None:
        """Return once it may read on (``pending``: what its unfinished lines hold):
        while its uid is within its budget; past it, while what it has read past it is
        small and holds nothing yet (no request, no input for a job not started), if
        one of its interactive jobs may wait for that input, or if it has no request
        running (a health check gets in); else once the uid has room (sandboxd.peers)."""
        account = self.account
        self.reading_ahead = False
        if account.held < account.budget:
            self.took_ahead = False
            return

        def may_read_ahead() -> bool:
            return (
                bool(self._stdin or not self.requests)
                and not self.took_ahead
                and pending < PAST_BUDGET_BYTES
            )

        await account.wait_for_room(self, unless=may_read_ahead)
        self.reading_ahead = account.held >= account.budget and may_read_ahead()

    def stop_reading(self) -> None:
        """Read no request after the one arriving now (the daemon is draining)."""
        self.draining = True
        if not self.account.is_arriving(self):
            self.read_scope.cancel()

    async def send(self, message: Any) -> None:
        """Send one message, encoded piece by piece as it goes out (a result can hold
        megabytes of output, and other connections are served in between)."""
        async with self._send_lock:
            try:
                for chunk in encode_chunks(message):
                    with trio.move_on_after(self.limits.send_timeout) as stalled:
                        await self.stream.send_all(chunk)
                    if stalled.cancelled_caught:
                        log.info(
                            "closing a connection of uid %d: it took nothing for %g s",
                            self.peer.uid,
                            self.limits.send_timeout,
                        )
                        self.scope.cancel()
                        return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.scope.cancel()  # the peer is gone: stop everything it asked for

    async def feed_stdin(self, request_id: Any, data: str, eof: bool) -> None:
        """Input for an interactive execution, kept in order (waiting while its stream is
        full); InvalidParams if the connection holds too much input for executions that
        have not started."""
        sink = self._stdin.get(request_id)
        if sink is not None:
            await sink.put(data, eof)
            return
        early = self._early_stdin.get(request_id)
        new = early is None
        if early is None:
            if len(self._early_stdin) >= MAX_EARLY_STDIN_IDS:
                raise InvalidParams.field("id", "no interactive execution with this id here")
            # Its id is held too, as long as its input waits (an id can be megabytes).
            early = StdinStream(MAX_EARLY_STDIN_BYTES - held_size(str(request_id)), self.account)
        if not early.offer(data, eof):
            raise InvalidParams.field("data", "too much input before its execution started")
        # Held until its job starts: read past the budget, it is the one thing read so.
        self.took_ahead |= self.reading_ahead
        if new:
            self._early_stdin[request_id] = early
            self.hold(held_size(str(request_id)))

    def open_stdin(self, request_id: Any) -> StdinStream:
        if request_id is NOID or request_id in self._stdin:
            raise InvalidParams.field("interactive", "needs a request id unique on the connection")
        stream = self._early_stdin.pop(request_id, None)
        if stream is None:
            stream = StdinStream(self.limits.stdin_buffer_bytes, self.account)
        else:  # what its id held is what its early budget left out
            self.release(MAX_EARLY_STDIN_BYTES - stream.max_bytes)
            stream.max_bytes = self.limits.stdin_buffer_bytes
        self._stdin[request_id] = stream
        self.account.wake()  # its reader, past the budget, may read this job's input now
        return stream

    def close_stdin(self, request_id: Any) -> None:
        self._stdin.pop(request_id).close()

    def close(self) -> None:
        """Give back whatever the connection still held (it has ended)."""
        for stream in [*self._stdin.values(), *self._early_stdin.values()]:
            stream.close()
        self.account.arriving(self, None)
        self.arriving_holds(0)
        self.release(self.held)

    async def watch_hangup(self) -> None:
        """Cancel the connection's work once the peer has closed its end entirely.

        A peer that only shut down its writing side still gets its answers. An epoll set
        holding just this socket with no events asked for becomes readable on hang-up
        alone (EPOLLHUP is always reported).
        """
        with select.epoll() as poller:
            poller.register(self.stream.socket.fileno(), 0)
            await trio.lowlevel.wait_readable(poller.fileno())
        log.debug("peer pid=%d uid=%d hung up", self.peer.pid, self.peer.uid)
        self.scope.cancel()


@dataclass
class RequestContext:
    """Passed to every method: who asked, under which id, and how to stream to them."""

    request_id: Any
    connection: Connection
    output: int = 0  # of the program's output, what its answer will carry
    streams_output: bool = True  # sent as execute.output notifications, as it comes

    async def notify(self, method: str, params: dict[str, Any]) -> None:
        if self.request_id is not NOID:
            await self.connection.send({"jsonrpc": "2.0", "method": method, "params": params})

    async def reserve(self, size: int) -> None:
        """The answer will carry up to ``size`` bytes (a file): once the uid has room,
        it holds them until the answer is sent."""
        await self.connection.account.wait_for_output_room()
        self.connection.account.hold_output(size)
        self.output += size

    async def relay_output(self, stage: str, stream: str, data: str) -> None:
        """Stream output to the client (unless it asked for the answer alone); its uid
        holds it until the answer is sent."""
        self.connection.account.hold_output(len(data))
        self.output += len(data)
        if not self.streams_output:
            return
        await self.notify(
            OUTPUT_NOTIFICATION,
            {"id": self.request_id, **dict(zip(OUTPUT_FIELDS, (stage, stream, data), strict=True))},
        )


def _expose(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Result]]:
    """Wrap a service method: its errors become JSON-RPC errors here and only here."""

    async def exposed(context: RequestContext, *args: Any, **kwargs: Any) -> Result:
        try:
            return Success(await method(context, *args, **kwargs))
        except SandboxError as exc:
            return Error(exc.code, exc.message, exc.data or NODATA)
        except Exception:
            log_id = uuid.uuid4().hex[:8]
            log.exception("internal error, log id %s", log_id)
            error = InternalError(f"internal error (log id {log_id})", log_id=log_id)
            return Error(error.code, error.message, error.data)

    # jsonrpcserver checks params against it; functions do not declare the attribute.
    exposed.__signature__ = inspect.signature(method)  # type: ignore[attr-defined]
    return exposed


MAX_ID_CHARS = 256  # a request's id comes back in each of its notifications


def _requests(document: Any) -> list[Any]:
    return document if isinstance(document, list) else [document]


def _unfit_id(request: Any) -> bool:
    """Whether the request's id is too long to echo: its every output notification
    carries it (a megabyte id made each one a megabyte)."""
    found = request.get("id") if isinstance(request, dict) else None
    if isinstance(found, str):
        return len(found) > MAX_ID_CHARS
    if isinstance(found, int) and not isinstance(found, bool):
        return not -(2**63) <= found < 2**64
    return False


def _error_line(error: SandboxError) -> dict[str, Any]:
    """An error that belongs to no request (the connection's own)."""
    return {"jsonrpc": "2.0", "error": error.to_wire(), "id": None}


class RpcServer:
    def __init__(self, service: Service, sessions: Sessions, limits: SocketLimits) -> None:
        self.service = service
        self.sessions = sessions
        self.limits = limits
        self.peers = PeerTable(limits)
        self._in_flight = 0  # requests read and not yet answered, on every connection
        self._answered = trio.lowlevel.ParkingLot()
        self._connections: set[Connection] = set()
        self.methods: dict[str, Callable[..., Awaitable[Any]]] = {
            name: _expose(function)
            for name, function in {
                Method.HEALTH: self._health,
                Method.LANGUAGES: self._languages,
                Method.STATUS: self._status,
                Method.EXECUTE: self._execute,
                STDIN_METHOD: self._stdin,
                Method.SESSION_CREATE: self._session_call(sessions.create),
                Method.SESSION_EXEC: self._session_exec,
                Method.SESSION_WRITE_FILE: self._session_call(sessions.write_file),
                Method.SESSION_READ_FILE: self._session_answer_call(sessions.read_file),
                Method.SESSION_LIST_FILES: self._session_answer_call(sessions.list_files),
                Method.SESSION_REMOVE_FILE: self._session_call(sessions.remove_file),
                Method.SESSION_INFO: self._session_call(sessions.info),
                Method.SESSION_LIST: self._session_call(sessions.list),
                Method.SESSION_CLOSE: self._session_call(sessions.close),
            }.items()
        }
        self._accepting = trio.CancelScope()

    async def _health(self, context: RequestContext, **params: Any) -> Any:
        return await self.service.health(**params)

    async def _languages(self, context: RequestContext, **params: Any) -> Any:
        return await self.service.languages(**params)

    async def _status(self, context: RequestContext, **params: Any) -> Any:
        return {**await self.service.status(**params), "sessions": self.sessions.stats()}

    async def _execute(self, context: RequestContext, **params: Any) -> Any:
        # A uid's jobs start only while it has taken the output of those before: a
        # client that reads slowly cannot pile up results in the daemon.
        wait = context.connection.account.wait_for_output_room
        context.streams_output = flag(params, "stream_output", default=True)
        async with self._stdin_of(context, params) as stdin:
            return await self.service.execute(
                params, context.relay_output, stdin, wait_to_start=wait
            )

    @asynccontextmanager
    async def _stdin_of(
        self, context: RequestContext, params: dict[str, Any]
    ) -> AsyncIterator[StdinStream | None]:
        """The streamed stdin of an interactive execution, for as long as it runs."""
        if not params.get("interactive"):
            yield None
            return
        stdin = context.connection.open_stdin(context.request_id)
        try:
            yield stdin
        finally:
            context.connection.close_stdin(context.request_id)

    def _owner(self, context: RequestContext, params: dict[str, Any]) -> Owner:
        """Whose sessions the caller acts on: its peer uid's (for a delegate, those of the
        client it names in ``on_behalf_of``, which the params then lose)."""
        return self.sessions.owner(context.connection.peer.uid, params.pop("on_behalf_of", None))

    def _session_call(
        self, method: Callable[[Owner, Any], Awaitable[Any]]
    ) -> Callable[..., Awaitable[Any]]:
        """A session method, called for the caller's owner with its params."""

        async def call(context: RequestContext, **params: Any) -> Any:
            return await method(self._owner(context, params), params)

        return call

    async def _session_exec(self, context: RequestContext, **params: Any) -> Any:
        owner = self._owner(context, params)
        await context.connection.account.wait_for_output_room()  # as for execute
        context.streams_output = flag(params, "stream_output", default=True)
        async with self._stdin_of(context, params) as stdin:
            return await self.sessions.exec(owner, params, context.relay_output, stdin)

    def _session_answer_call(
        self, method: Callable[[Owner, Any, Reserve], Awaitable[Any]]
    ) -> Callable[..., Awaitable[Any]]:
        """A session method whose answer is large (a file, a listing): it is output too,
        reserved in the uid's budget before it is made (a uid that leaves its answers
        unread waits there)."""

        async def call(context: RequestContext, **params: Any) -> Any:
            return await method(self._owner(context, params), params, context.reserve)

        return call

    async def _stdin(self, context: RequestContext, **params: Any) -> Any:
        """``execute.stdin`` sent as a request (with an id); see :func:`_feed_stdin`."""
        await _feed_stdin(context.connection, params)
        return None

    async def serve(
        self,
        listener: trio.SocketListener,
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept clients until :meth:`stop_accepting`, then wait for those still here."""
        async with trio.open_nursery() as connections:
            with self._accepting:
                await trio.serve_listeners(
                    self._serve_connection,
                    [listener],
                    handler_nursery=connections,
                    task_status=task_status,
                )

    def stop_accepting(self) -> None:
        """Accept no more clients, nor requests from those connected: new ones wait in
        the socket's backlog (for the next daemon, when systemd holds the socket)."""
        self._accepting.cancel()
        for connection in self._connections:
            connection.stop_reading()

    async def wait_answered(self) -> None:
        """Wait until every request read so far has been answered."""
        while self._in_flight:
            await self._answered.park()

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        try:
            await self._serve_connection_unguarded(stream)
        except Exception:
            # No client may take the daemon down: a bug met on one connection ends
            # that connection only (with the traceback in the log).
            log.exception("connection ended by an internal error")

    async def _serve_connection_unguarded(self, stream: trio.SocketStream) -> None:
        async with stream:
            peer = Peer.of(stream.socket)
            try:
                account = self.peers.connect(peer.uid)
            except TooManyConnections as exc:
                log.warning("refused a connection of pid %d: %s", peer.pid, exc.message)
                with trio.move_on_after(1):
                    await stream.send_all(encode(_error_line(exc)))
                return
            log.debug("client connected: pid=%d uid=%d", peer.pid, peer.uid)
            scope = trio.CancelScope()
            connection = Connection(stream, scope, peer, account, self.limits)
            self._connections.add(connection)
            try:
                with scope:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(connection.watch_hangup)
                        async with trio.open_nursery() as requests:
                            await self._read_requests(connection, requests)
                        scope.cancel()  # all answered: stop watching for the hang-up
            finally:
                self._connections.discard(connection)
                connection.close()
                self.peers.disconnect(account)

    async def _read_requests(self, connection: Connection, requests: trio.Nursery) -> None:
        try:
            await self._read_requests_until_done(connection, requests)
        finally:
            connection.account.arriving(connection, None)  # whatever was arriving is given up

    async def _read_requests_until_done(
        self, connection: Connection, requests: trio.Nursery
    ) -> None:
        buffer = LineBuffer(self.limits.max_request_bytes)
        while True:
            try:
                taken = await self._next_line(connection, buffer)
            except LineTooLong:
                error: SandboxError = RequestTooLarge(
                    f"request larger than the limit of {self.limits.max_request_bytes} bytes",
                    maximum=self.limits.max_request_bytes,
                )
                await connection.send(_error_line(error))
                return  # the rest of that line cannot be told from a next request
            except RequestTimeout as exc:
                await connection.send(_error_line(exc))
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if taken is None:
                return
            line, size = taken
            if not line.strip() or await _stdin_notification(connection, line):
                connection.release(size)
                await trio.lowlevel.checkpoint()  # a flood of blank lines: others run too
                continue
            connection.request_read()
            connection.took_ahead |= connection.reading_ahead
            self._in_flight += 1
            requests.start_soon(self._answer, connection, line, size)

    async def _next_line(
        self, connection: Connection, buffer: LineBuffer
    ) -> tuple[bytes, int] | None:
        """The next request line and its parsed size; None at the end of the stream or
        once the connection sat idle (nothing running, nothing arriving) for the idle
        timeout.

        Raises LineTooLong, and RequestTimeout for a line that does not arrive whole
        within the request timeout (time spent waiting for its uid's budget not counted).
        """
        limits, account = self.limits, connection.account
        started, paused = trio.current_time(), 0.0
        while (taken := _take_line(connection, buffer)) is None:
            before = trio.current_time()
            await connection.wait_to_read(buffer.pending_size)
            paused += trio.current_time() - before
            if connection.draining and not buffer.pending:
                return None
            if buffer.pending:
                deadline = started + limits.request_timeout + paused
            elif connection.requests:
                deadline = math.inf  # answers are coming; request_done starts the idle time
            else:
                deadline = trio.current_time() + limits.idle_timeout
            connection.read_scope = trio.CancelScope(deadline=deadline)
            with connection.read_scope:
                data = await connection.stream.receive_some(65536)
            if connection.read_scope.cancelled_caught:
                if connection.draining and not buffer.pending:
                    return None
                if buffer.pending:
                    raise RequestTimeout(
                        f"the request did not arrive whole within {limits.request_timeout:g} s",
                        seconds=limits.request_timeout,
                    )
                log.debug("closing a connection of uid %d: idle", connection.peer.uid)
                return None
            if not data:
                if not buffer.pending:
                    return None
                data = b"\n"  # the peer ended in the middle of a line: take it as the last
            if not buffer.pending:
                started, paused = trio.current_time(), 0.0
                account.arriving(connection, started)
            buffer.feed(data)
            connection.arriving_holds(buffer.pending_size)
        # What follows the line in the buffer is the next one, arriving from now on.
        account.arriving(connection, None)
        if buffer.pending:
            account.arriving(connection, trio.current_time())
        return taken

    async def _answer(self, connection: Connection, line: bytes, size: int) -> None:
        """Answer one line (a request or a batch), which the connection holds at
        ``size`` (its parsed size)."""
        try:
            async with connection.account.parsing(size):
                await self._answer_line(connection, line)
        finally:
            connection.request_done(size)
            self._in_flight -= 1
            self._answered.unpark_all()

    async def _answer_line(self, connection: Connection, line: bytes) -> None:
        try:
            check_values(line, MAX_REQUEST_VALUES)
        except TooManyValues as exc:
            await connection.send(_error_line(InvalidRequest(str(exc))))
            return
        parsed = deserialize_request(parse_json, line).bind(  # type: ignore[arg-type]
            lambda document: validate_request(default_validator, document)
        )
        if isinstance(parsed, Left):
            await connection.send(to_serializable_one(parsed))
            return
        document = parsed._value
        if any(_unfit_id(request) for request in _requests(document)):
            refusal = InvalidRequest(
                f"a request id is a string of at most {MAX_ID_CHARS} "
                "characters or an integer of at most 64 bits"
            )
            await connection.send(_error_line(refusal))
            return
        if not isinstance(document, list):
            context = RequestContext(None, connection)
            try:
                response = await self._dispatch(context, document)
                if response is not None:
                    await connection.send(response)
            finally:
                connection.account.release_output(context.output)
            return
        if len(document) > self.limits.requests_per_connection:
            error = InvalidRequest(
                f"a batch may hold at most {self.limits.requests_per_connection} requests"
            )
            await connection.send(_error_line(error))
            return
        responses: list[Any] = [None] * len(document)
        contexts = [RequestContext(None, connection) for _ in document]

        async def one(index: int, request: dict[str, Any]) -> None:
            responses[index] = await self._dispatch(contexts[index], request)

        try:
            async with trio.open_nursery() as batch:
                for index, request in enumerate(document):
                    batch.start_soon(one, index, request)
            answered = [response for response in responses if response is not None]
            if answered:
                await connection.send(answered)
        finally:
            connection.account.release_output(sum(context.output for context in contexts))

    async def _dispatch(self, context: RequestContext, document: dict[str, Any]) -> Any:
        """Run one request (at most ``requests_per_connection`` of a connection at once,
        batch members included); its serialised response, or None for a notification."""
        connection = context.connection
        request = create_request(document)
        context.request_id = request.id
        if request.id is not NOID:
            log.debug("request %r %s from uid %d", request.id, request.method, connection.peer.uid)
        async with connection.running:
            _, result = await dispatch_request(self.methods, context, request)
        if request.id is NOID:
            return None
        return to_serializable_one(to_response(request, result))
