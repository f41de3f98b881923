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
import json
import logging
import math
import select
import socket
import struct
import uuid
from collections.abc import Awaitable, Callable
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

from sandboxd.agent_link import StdinChunk
from sandboxd.errors import InternalError, InvalidParams, RequestTooLarge, SandboxError
from sandboxd.framing import LineBuffer, LineTooLong, encode, receive_line
from sandboxd.job import unicode_text
from sandboxd.service import Service

log = logging.getLogger(__name__)

OUTPUT_NOTIFICATION = "execute.output"
STDIN_METHOD = "execute.stdin"
# Input may arrive before its execute request is dispatched; how much is kept for it.
MAX_EARLY_STDIN_IDS = 8
MAX_EARLY_STDIN_BYTES = 1024 * 1024


def _feed_stdin(connection: Connection, params: Any) -> None:
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
    connection.feed_stdin(request_id, data, eof)


def _stdin_notification(connection: Connection, line: bytes) -> bool:
    """Take an ``execute.stdin`` notification right in the reading loop, so that input
    keeps its order (tasks would race); False for any other line."""
    if STDIN_METHOD.encode() not in line:
        return False
    try:
        message = json.loads(line)
    except ValueError:
        return False
    if not isinstance(message, dict) or message.get("method") != STDIN_METHOD or "id" in message:
        return False
    try:
        _feed_stdin(connection, message.get("params", {}))
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
    """One client: serialised writes, and a scope that ends all its work when it leaves."""

    def __init__(self, stream: trio.SocketStream, scope: trio.CancelScope) -> None:
        self.stream = stream
        self.scope = scope
        self.peer = Peer.of(stream.socket)
        self._send_lock = trio.Lock()
        # Interactive executions running on this connection: request id → their stdin;
        # and input that arrived before its execute request was dispatched.
        self._stdin: dict[Any, trio.MemorySendChannel[StdinChunk]] = {}
        self._early_stdin: dict[Any, list[StdinChunk]] = {}

    async def send(self, message: Any) -> None:
        async with self._send_lock:
            try:
                await self.stream.send_all(encode(message))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.scope.cancel()  # the peer is gone: stop everything it asked for

    def feed_stdin(self, request_id: Any, data: str, eof: bool) -> None:
        """Input for an interactive execution, kept in order; InvalidParams if the
        connection holds too much input for executions that have not started."""
        sink = self._stdin.get(request_id)
        if sink is not None:
            sink.send_nowait((data, eof))
            return
        early = self._early_stdin.get(request_id)
        if early is None and len(self._early_stdin) >= MAX_EARLY_STDIN_IDS:
            raise InvalidParams.field("id", "no interactive execution with this id here")
        early = self._early_stdin.setdefault(request_id, [])
        if sum(len(chunk) for chunk, _ in early) + len(data) > MAX_EARLY_STDIN_BYTES:
            raise InvalidParams.field("data", "too much input before its execution started")
        early.append((data, eof))

    def open_stdin(self, request_id: Any) -> trio.MemoryReceiveChannel[StdinChunk]:
        if request_id is NOID or request_id in self._stdin:
            raise InvalidParams.field("interactive", "needs a request id unique on the connection")
        send, receive = trio.open_memory_channel[StdinChunk](math.inf)
        for chunk in self._early_stdin.pop(request_id, []):
            send.send_nowait(chunk)
        self._stdin[request_id] = send
        return receive

    def close_stdin(self, request_id: Any) -> None:
        self._stdin.pop(request_id).close()

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


@dataclass(frozen=True)
class RequestContext:
    """Passed to every method: who asked, under which id, and how to stream to them."""

    request_id: Any
    connection: Connection

    async def notify(self, method: str, params: dict[str, Any]) -> None:
        if self.request_id is not NOID:
            await self.connection.send({"jsonrpc": "2.0", "method": method, "params": params})


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

    exposed.__signature__ = inspect.signature(method)  # type: ignore[attr-defined]
    return exposed


class RpcServer:
    def __init__(self, service: Service, *, max_request_bytes: int) -> None:
        self.service = service
        self.max_request_bytes = max_request_bytes
        self.methods = {
            name: _expose(function)
            for name, function in {
                "health": self._health,
                "languages": self._languages,
                "status": self._status,
                "execute": self._execute,
                STDIN_METHOD: self._stdin,
            }.items()
        }
        self._accepting = trio.CancelScope()

    async def _health(self, context: RequestContext, **params: Any) -> Any:
        return await self.service.health(**params)

    async def _languages(self, context: RequestContext, **params: Any) -> Any:
        return await self.service.languages(**params)

    async def _status(self, context: RequestContext, **params: Any) -> Any:
        return await self.service.status(**params)

    async def _execute(self, context: RequestContext, **params: Any) -> Any:
        async def relay(stage: str, stream: str, data: str) -> None:
            await context.notify(
                OUTPUT_NOTIFICATION,
                {"id": context.request_id, "stage": stage, "stream": stream, "data": data},
            )

        if not params.get("interactive"):
            return await self.service.execute(params, relay)
        stdin = context.connection.open_stdin(context.request_id)
        try:
            return await self.service.execute(params, relay, stdin)
        finally:
            context.connection.close_stdin(context.request_id)

    async def _stdin(self, context: RequestContext, **params: Any) -> Any:
        """``execute.stdin`` sent as a request (with an id); see :func:`_feed_stdin`."""
        _feed_stdin(context.connection, params)
        return None

    async def serve(
        self,
        listener: trio.SocketListener,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
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
        self._accepting.cancel()

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        try:
            await self._serve_connection_unguarded(stream)
        except Exception:
            # No client may take the daemon down: a bug met on one connection ends
            # that connection only (with the traceback in the log).
            log.exception("connection ended by an internal error")

    async def _serve_connection_unguarded(self, stream: trio.SocketStream) -> None:
        async with stream:
            with trio.CancelScope() as scope:
                connection = Connection(stream, scope)
                log.debug(
                    "client connected: pid=%d uid=%d", connection.peer.pid, connection.peer.uid
                )
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(connection.watch_hangup)
                    async with trio.open_nursery() as requests:
                        await self._read_requests(connection, requests)
                    scope.cancel()  # all answered: stop watching for the hang-up

    async def _read_requests(self, connection: Connection, requests: trio.Nursery) -> None:
        buffer = LineBuffer(self.max_request_bytes)
        while True:
            try:
                line = await receive_line(connection.stream, buffer)
            except LineTooLong:
                error = RequestTooLarge(
                    f"request larger than the limit of {self.max_request_bytes} bytes",
                    maximum=self.max_request_bytes,
                )
                await connection.send({"jsonrpc": "2.0", "error": error.to_wire(), "id": None})
                return  # the rest of that line cannot be told from a next request
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if line is None:
                return
            if line.strip() and not _stdin_notification(connection, line):
                requests.start_soon(self._answer, connection, line)

    async def _answer(self, connection: Connection, line: bytes) -> None:
        parsed = deserialize_request(json.loads, line.decode(errors="replace")).bind(
            lambda document: validate_request(default_validator, document)
        )
        if isinstance(parsed, Left):
            await connection.send(to_serializable_one(parsed))
            return
        document = parsed._value
        if not isinstance(document, list):
            response = await self._dispatch(connection, document)
            if response is not None:
                await connection.send(response)
            return
        responses: list[Any] = [None] * len(document)

        async def one(index: int, request: dict[str, Any]) -> None:
            responses[index] = await self._dispatch(connection, request)

        async with trio.open_nursery() as batch:
            for index, request in enumerate(document):
                batch.start_soon(one, index, request)
        answered = [response for response in responses if response is not None]
        if answered:
            await connection.send(answered)

    async def _dispatch(self, connection: Connection, document: dict[str, Any]) -> Any:
        """Run one request; its serialised response, or None for a notification."""
        request = create_request(document)
        context = RequestContext(request.id, connection)
        if request.id is not NOID:
            log.debug("request %r %s from uid %d", request.id, request.method, connection.peer.uid)
        _, result = await dispatch_request(self.methods, context, request)
        if request.id is NOID:
            return None
        return to_serializable_one(to_response(request, result))
