"""The client library for sandboxd's socket, sync (:class:`Client`) and trio
(:class:`AsyncClient`), for the CLI, the gateway and your own programs::

    from sandboxctl.client import Client

    result = Client().execute("python", "print(2 + 2)")
    print(result.status, result.stdout)

Each call opens its own connection, so one client object serves any number of
concurrent calls, and closing a connection (or cancelling the call) stops the job.
Daemon errors arrive as the classes of :mod:`sandboxd.errors`; a daemon that cannot
be reached raises :class:`DaemonUnavailable` with a one-line explanation.
"""

from __future__ import annotations

import base64
import itertools
import json
import math
import os
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from typing import Any

from sandboxd.errors import DaemonUnavailable, SandboxError, SessionNotFound
from sandboxd.framing import LineBuffer, encode, receive_line
from sandboxd.protocol import DEFAULT_SOCKET, OUTPUT_FIELDS, Method
from sandboxd.result import ExecutionResult

MAX_LINE = 256 * 1024 * 1024
OutputCallback = Callable[[str, str, str], None]  # OUTPUT_FIELDS: (stage, stream, data)

_ids = itertools.count(1)


def default_socket() -> str:
    return os.environ.get("SANDBOXD_SOCKET") or DEFAULT_SOCKET


def _unavailable(path: str, exc: OSError) -> DaemonUnavailable:
    if isinstance(exc, FileNotFoundError):
        why = f"sandboxd is not running (no socket at {path})"
    elif isinstance(exc, ConnectionRefusedError):
        why = f"sandboxd is not running ({path} refuses connections)"
    elif isinstance(exc, PermissionError):
        why = (
            f"no permission to use {path}: add yourself to the sandboxd group "
            "(sudo adduser $USER sandboxd, then log in again) or use sudo"
        )
    else:
        why = f"cannot reach sandboxd at {path}: {exc.strerror or exc}"
    return DaemonUnavailable(why, socket=path)


def execute_params(
    language: str,
    code: str,
    *,
    stdin: str | None = None,
    args: list[str] | None = None,
    files: list[dict[str, str]] | None = None,
    timeout: float | None = None,
    limits: dict[str, float] | None = None,
    interactive: bool | None = None,
    network: bool | None = None,
    stream_output: bool | None = None,
) -> dict[str, Any]:
    """The params of an ``execute`` request, leaving out what was not given."""
    params = {
        "language": language,
        "code": code,
        "stdin": stdin,
        "args": args,
        "files": files,
        "timeout": timeout,
        "limits": limits,
        "interactive": interactive,
        "network": network,
        "stream_output": stream_output,
    }
    return {key: value for key, value in params.items() if value is not None}


def session_exec_params(session_id: str, code: str, options: dict[str, Any]) -> dict[str, Any]:
    """The params of ``session.exec``: execute's, in the session ``session_id``, whose
    language is the default."""
    language, cell = options.pop("language", None), options.pop("cell", None)
    params = execute_params(language or "", code, **options)
    if not language:
        del params["language"]
    return {"id": session_id, **params, **({"cell": True} if cell else {})}


WRITE_PIECE = 1024 * 1024  # bytes of a file per session.write_file (a request is capped)


def file_writes(session_id: str, path: str, content: str | bytes) -> list[dict[str, Any]]:
    """The ``session.write_file`` params that put ``content`` at ``path``: the first
    creates (or replaces) the file, the others append to it, each piece small enough
    for the daemon's request cap whatever the file's size."""
    data = content.encode() if isinstance(content, str) else content
    pieces = [data[start : start + WRITE_PIECE] for start in range(0, len(data), WRITE_PIECE)]
    return [
        {
            "id": session_id,
            "path": path,
            "content": base64.b64encode(piece).decode(),
            "encoding": "base64",
            **({"append": True} if number else {}),
        }
        for number, piece in enumerate(pieces or [b""])
    ]


def file_content(answer: dict[str, Any]) -> bytes:
    """The bytes of a ``session.read_file`` answer."""
    return base64.b64decode(answer["content"])


@dataclass
class _Call:
    """One request and what comes back for it (sans-IO: both clients drive it)."""

    method: str
    params: dict[str, Any]

    def __post_init__(self) -> None:
        self.id = next(_ids)

    def request_message(self) -> dict[str, Any]:
        return {"jsonrpc": "2.0", "method": self.method, "params": self.params, "id": self.id}

    def feed(self, line: bytes) -> tuple[bool, Any]:
        """(True, result) for the response, (False, params) for a notification; raises
        the daemon's error as its class."""
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise DaemonUnavailable(
                f"sandboxd sent something that is not JSON: {line[:80]!r}"
            ) from exc
        if not isinstance(message, dict):
            raise DaemonUnavailable(f"sandboxd sent an unexpected message: {line[:80]!r}")
        if "method" in message:
            params = message.get("params")
            return False, params if isinstance(params, dict) else {}
        if "error" in message:
            raise SandboxError.from_wire(message["error"])
        return True, message.get("result")

    def closed(self) -> DaemonUnavailable:
        return DaemonUnavailable(
            f"sandboxd went away before answering {self.method} (it stopped or restarted; "
            "a job it was running did not finish)"
        )


def _streaming(on_output: OutputCallback | None, options: dict[str, Any]) -> dict[str, Any]:
    """``options``, and without a callback to see the output as it comes, the daemon
    spared from sending it but in the answer."""
    return options if on_output is not None else {"stream_output": False, **options}


def _output_relay(on_output: OutputCallback | None) -> Callable[[dict[str, Any]], None] | None:
    if on_output is None:
        return None

    def relay(params: dict[str, Any]) -> None:
        on_output(*(str(params.get(name, "")) for name in OUTPUT_FIELDS))

    return relay


WAIT_POLL = 0.25  # seconds between a blocking call's ``while_waiting`` checks


class _Waiter:
    """One call waiting for a connection (waiters of one caller are told apart by
    identity: ``list.remove`` would take the first equal one)."""

    __slots__ = ("caller",)

    def __init__(self, caller: str | None) -> None:
        self.caller = caller


class _Slots:
    """The connections a blocking client may open at once, shared by the callers it
    acts for (:meth:`Client.for_caller`: a gateway's keys) so that none waits long
    behind another: one caller holds all of them but one (which is then there for
    another at once), and a free one goes to the waiting caller that holds fewest (the
    first of those to come)."""

    def __init__(self, total: int) -> None:
        import threading  # here: the CLI, which never needs it, starts faster

        self.total = total
        self.per_caller = max(1, total - 1)
        self._held: dict[str | None, int] = {}
        self._waiting: list[_Waiter] = []
        self._changed = threading.Condition()

    def _turn(self, waiter: _Waiter) -> bool:
        if sum(self._held.values()) >= self.total:
            return False
        held = self._held.get
        may = [other for other in self._waiting if held(other.caller, 0) < self.per_caller]
        return bool(may) and min(may, key=lambda other: held(other.caller, 0)) is waiter

    @contextmanager
    def held(self, caller: str | None, check: Callable[[], None] | None) -> Iterator[None]:
        """Hold one for ``caller``, once it is its turn; ``check`` is called every
        WAIT_POLL seconds meanwhile, and what it raises gives up the wait."""
        waiter = _Waiter(caller)
        with self._changed:
            self._waiting.append(waiter)
        try:
            while True:
                with self._changed:
                    if self._turn(waiter):
                        self._held[caller] = self._held.get(caller, 0) + 1
                        break
                    self._changed.wait(WAIT_POLL if check else None)
                if check is not None:
                    check()
        finally:
            with self._changed:
                self._waiting = [other for other in self._waiting if other is not waiter]
                self._changed.notify_all()
        try:
            yield
        finally:
            with self._changed:
                self._held[caller] -= 1
                if not self._held[caller]:
                    del self._held[caller]
                self._changed.notify_all()


class Client:
    """Blocking client. ``timeout`` bounds each call (None: wait as long as the job runs).

    ``max_connections`` caps the connections its calls open at once, from any thread
    (calls beyond it wait), as for :class:`AsyncClient`, shared fairly by the callers
    of :meth:`for_caller`. ``while_waiting`` is called
    every WAIT_POLL seconds while a call waits for a connection or for the daemon's
    answer, and what it raises ends the call with its connection, which stops the
    daemon's work for it: how a call in a worker thread notices that its caller was
    cancelled (``anyio.from_thread.check_cancelled``).
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        timeout: float | None = None,
        on_behalf_of: str | None = None,
        max_connections: int | None = None,
        while_waiting: Callable[[], None] | None = None,
    ) -> None:
        self.socket_path = os.fspath(socket_path) if socket_path else default_socket()
        self.timeout = timeout
        # A delegate's (the gateway's) caller, whose sessions these are (docs/api.md).
        self.on_behalf_of = on_behalf_of
        self._while_waiting = while_waiting
        self._slots = None if max_connections is None else _Slots(max_connections)

    def for_caller(self, on_behalf_of: str) -> Client:
        """The same client, its connections counted with these, acting for a delegate's
        caller (whose calls wait their turn among the other callers', :class:`_Slots`)."""
        other = Client(
            self.socket_path,
            timeout=self.timeout,
            on_behalf_of=on_behalf_of,
            while_waiting=self._while_waiting,
        )
        other._slots = self._slots
        return other

    @contextmanager
    def _slot(self) -> Iterator[None]:
        if self._slots is None:
            yield
            return
        with self._slots.held(self.on_behalf_of, self._while_waiting):
            yield

    def _receive(self, sock: socket.socket) -> bytes:
        """The daemon's next bytes, within the call's timeout (polling while_waiting)."""
        if self._while_waiting is None:
            return sock.recv(65536)
        waited = 0.0
        while True:
            try:
                return sock.recv(65536)
            except TimeoutError:
                waited += WAIT_POLL
                if self.timeout is not None and waited >= self.timeout:
                    raise
                if self._while_waiting is not None:
                    self._while_waiting()

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        on_notification: Callable[[dict[str, Any]], None] | None = None,
    ) -> Any:
        params = params or {}
        if self.on_behalf_of is not None and method.startswith("session."):
            params = {**params, "on_behalf_of": self.on_behalf_of}
        with self._slot():
            return self._call(_Call(method, params), on_notification)

    def _call(self, call: _Call, on_notification: Callable[[dict[str, Any]], None] | None) -> Any:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.socket_path)
            except OSError as exc:
                raise _unavailable(self.socket_path, exc) from exc
            # Refused before it arrived whole (too large): the answer says why.
            with suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(encode(call.request_message()))
            if self._while_waiting is not None:
                sock.settimeout(WAIT_POLL)  # to look in between (_receive)
            buffer = LineBuffer(MAX_LINE)
            while True:
                line = buffer.next_line()
                if line is None:
                    try:
                        data = self._receive(sock)
                    except OSError as exc:
                        raise _unavailable(self.socket_path, exc) from exc
                    if not data:
                        raise call.closed()
                    buffer.feed(data)
                    continue
                done, value = call.feed(line)
                if done:
                    return value
                if on_notification is not None:
                    on_notification(value)

    def health(self) -> dict[str, Any]:
        return self.call(Method.HEALTH)

    def languages(self) -> dict[str, Any]:
        return self.call(Method.LANGUAGES)

    def status(self) -> dict[str, Any]:
        return self.call(Method.STATUS)

    def execute(
        self, language: str, code: str, *, on_output: OutputCallback | None = None, **options: Any
    ) -> ExecutionResult:
        """Run ``code``; ``on_output(stage, stream, data)`` sees the output as it comes.

        ``options``: stdin, args, files, timeout, limits, network (see docs/api.md).
        """
        params = execute_params(language, code, **_streaming(on_output, options))
        record = self.call(Method.EXECUTE, params, _output_relay(on_output))
        return ExecutionResult.from_dict(record)

    def session(self, language: str = "python", **options: Any) -> Session:
        """Open a session (a sandbox kept across calls; close it, or use ``with``).

        ``options``: limits, timeout, ttl, idle_timeout, network (see docs/api.md).
        """
        params = {"language": language, **{k: v for k, v in options.items() if v is not None}}
        return Session(self, self.call(Method.SESSION_CREATE, params))

    def sessions(self) -> list[dict[str, Any]]:
        """The caller's sessions: the open ones, then the last that ended (with why)."""
        return self.call(Method.SESSION_LIST)["sessions"]


class Session:
    """A session of the blocking client: ``with client.session() as session: ...``."""

    def __init__(self, client: Client, info: dict[str, Any]) -> None:
        self.client = client
        self.id: str = info["id"]
        self.info = info

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def exec(
        self, code: str, *, on_output: OutputCallback | None = None, **options: Any
    ) -> ExecutionResult:
        """Run ``code`` in the session (``execute``'s options but network); with
        ``cell=True``, a Python cell in the session's interpreter kept alive."""
        params = session_exec_params(self.id, code, _streaming(on_output, options))
        record = self.client.call(Method.SESSION_EXEC, params, _output_relay(on_output))
        return ExecutionResult.from_dict(record)

    def write_file(self, path: str, content: str | bytes) -> None:
        for params in file_writes(self.id, path, content):
            self.client.call(Method.SESSION_WRITE_FILE, params)

    def read_file(self, path: str) -> bytes:
        return file_content(
            self.client.call(Method.SESSION_READ_FILE, {"id": self.id, "path": path})
        )

    def list_files(self, path: str = ".") -> list[dict[str, Any]]:
        return self.client.call(Method.SESSION_LIST_FILES, {"id": self.id, "path": path})["entries"]

    def remove_file(self, path: str) -> None:
        self.client.call(Method.SESSION_REMOVE_FILE, {"id": self.id, "path": path})

    def refresh(self) -> dict[str, Any]:
        """The session's info now (limits, execs, when it expires)."""
        self.info = self.client.call(Method.SESSION_INFO, {"id": self.id})
        return self.info

    def close(self) -> None:
        """End the session: its sandbox, processes and files are gone (idempotent)."""
        with suppress(SessionNotFound):  # it had already ended
            self.client.call(Method.SESSION_CLOSE, {"id": self.id})


@dataclass(frozen=True)
class OutputEvent:
    """A chunk of a running program's output."""

    stream: str  # stdout | stderr
    data: str
    stage: str  # compile | run


class Execution:
    """A call in progress on a connection of its own — above all ``execute``: iterate it
    for the output as it comes; ``result`` is there once it ended.
    See :meth:`AsyncClient.open_execution`.
    """

    def __init__(self, stream: Any, call: _Call) -> None:
        import trio

        self._stream = stream
        self._call = call
        self._buffer = LineBuffer(MAX_LINE)
        self._send_lock = trio.Lock()
        self.done = False
        self.value: Any = None  # the response's result, as sent

    @property
    def result(self) -> ExecutionResult:
        if not self.done:
            raise RuntimeError("the execution has not ended yet")
        return ExecutionResult.from_dict(self.value)

    async def _send(self, message: dict[str, Any]) -> None:
        import trio

        async with self._send_lock:
            try:
                await self._stream.send_all(encode(message))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise self._call.closed() from exc

    async def send_stdin(self, data: str, *, eof: bool = False) -> None:
        """Input for an interactive execution (``interactive=True``)."""
        params = {"id": self._call.id, "data": data, "eof": eof}
        await self._send({"jsonrpc": "2.0", "method": Method.STDIN, "params": params})

    async def close_stdin(self) -> None:
        await self.send_stdin("", eof=True)

    def __aiter__(self) -> Execution:
        return self

    async def __anext__(self) -> OutputEvent:
        """The next chunk of output; StopAsyncIteration once the result is in."""
        import trio

        while not self.done:
            try:
                line = await receive_line(self._stream, self._buffer)
            except trio.BrokenResourceError as exc:
                raise self._call.closed() from exc
            if line is None:
                raise self._call.closed()
            self.done, value = self._call.feed(line)
            if self.done:
                self.value = value
            else:
                return OutputEvent(
                    str(value.get("stream")), str(value.get("data", "")), str(value.get("stage"))
                )
        raise StopAsyncIteration


class AsyncClient:
    """The same calls for trio programs; cancel a call to stop its job.

    ``max_connections`` caps the connections open at once (calls beyond it wait): the
    daemon allows each uid only so many, and a client serving many callers (the
    gateway) should wait its turn rather than be refused.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        max_connections: int | None = None,
    ) -> None:
        self.socket_path = os.fspath(socket_path) if socket_path else default_socket()
        self.max_connections = max_connections
        self._limiter: Any = None  # a trio.CapacityLimiter, made once trio runs

    @asynccontextmanager
    async def _open(self, call: _Call) -> AsyncIterator[Execution]:
        import trio  # here, not at the top: `sandboxctl` starts 0.1 s faster without it

        if self._limiter is None:
            self._limiter = trio.CapacityLimiter(self.max_connections or math.inf)
        async with self._limiter:
            try:
                stream = await trio.open_unix_socket(self.socket_path)
            except OSError as exc:
                raise _unavailable(self.socket_path, exc) from exc
            async with stream:
                running = Execution(stream, call)
                with suppress(DaemonUnavailable):  # refused before it arrived whole (too
                    await running._send(call.request_message())  # large): the answer says why
                yield running

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """One request; its result."""
        async with self._open(_Call(method, params or {})) as running:
            async for _ in running:
                pass
        return running.value

    async def health(self) -> dict[str, Any]:
        return await self.call(Method.HEALTH)

    async def languages(self) -> dict[str, Any]:
        return await self.call(Method.LANGUAGES)

    async def status(self) -> dict[str, Any]:
        return await self.call(Method.STATUS)

    def open_call(
        self, method: str, params: dict[str, Any]
    ) -> AbstractAsyncContextManager[Execution]:
        """Start any call whose output streams (``execute``, ``session.exec``) on a
        connection of its own, as :meth:`open_execution` does."""
        return self._open(_Call(method, params))

    def open_execution(
        self, language: str, code: str, **options: Any
    ) -> AbstractAsyncContextManager[Execution]:
        """Start ``execute`` and hand over the running call; leaving the block early (or
        being cancelled) closes the connection, which stops the job.

        ``options``: stdin, args, files, timeout, limits, interactive (see docs/api.md).
        """
        return self._open(_Call(Method.EXECUTE, execute_params(language, code, **options)))

    async def execute(
        self, language: str, code: str, *, on_output: OutputCallback | None = None, **options: Any
    ) -> ExecutionResult:
        async with self.open_execution(
            language, code, **_streaming(on_output, options)
        ) as execution:
            async for event in execution:
                if on_output is not None:
                    on_output(event.stage, event.stream, event.data)
        return execution.result

    async def session(self, language: str = "python", **options: Any) -> AsyncSession:
        """Open a session; ``async with await client.session() as session: ...``."""
        params = {"language": language, **{k: v for k, v in options.items() if v is not None}}
        return AsyncSession(self, await self.call(Method.SESSION_CREATE, params))

    async def sessions(self) -> list[dict[str, Any]]:
        return (await self.call(Method.SESSION_LIST))["sessions"]


class AsyncSession:
    """A session of the trio client (see :class:`Session`)."""

    def __init__(self, client: AsyncClient, info: dict[str, Any]) -> None:
        self.client = client
        self.id: str = info["id"]
        self.info = info

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        import trio

        with trio.CancelScope(shield=True):  # even a cancelled caller closes it
            await self.close()

    async def exec(
        self, code: str, *, on_output: OutputCallback | None = None, **options: Any
    ) -> ExecutionResult:
        params = session_exec_params(self.id, code, _streaming(on_output, options))
        async with self.client.open_call(Method.SESSION_EXEC, params) as execution:
            async for event in execution:
                if on_output is not None:
                    on_output(event.stage, event.stream, event.data)
        return execution.result

    async def write_file(self, path: str, content: str | bytes) -> None:
        for params in file_writes(self.id, path, content):
            await self.client.call(Method.SESSION_WRITE_FILE, params)

    async def read_file(self, path: str) -> bytes:
        answer = await self.client.call(Method.SESSION_READ_FILE, {"id": self.id, "path": path})
        return file_content(answer)

    async def list_files(self, path: str = ".") -> list[dict[str, Any]]:
        params = {"id": self.id, "path": path}
        return (await self.client.call(Method.SESSION_LIST_FILES, params))["entries"]

    async def remove_file(self, path: str) -> None:
        await self.client.call(Method.SESSION_REMOVE_FILE, {"id": self.id, "path": path})

    async def refresh(self) -> dict[str, Any]:
        self.info = await self.client.call(Method.SESSION_INFO, {"id": self.id})
        return self.info

    async def close(self) -> None:
        with suppress(SessionNotFound):  # it had already ended
            await self.client.call(Method.SESSION_CLOSE, {"id": self.id})
