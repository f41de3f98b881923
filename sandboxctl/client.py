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

import itertools
import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandboxd.errors import DaemonUnavailable, SandboxError
from sandboxd.framing import LineBuffer, encode, receive_line
from sandboxd.result import ExecutionResult

DEFAULT_SOCKET = "/run/sandboxd.sock"
MAX_LINE = 256 * 1024 * 1024
OutputCallback = Callable[[str, str, str], None]  # (stream, data, stage)

_ids = itertools.count(1)


def default_socket() -> Path:
    return Path(os.environ.get("SANDBOXD_SOCKET") or DEFAULT_SOCKET)


def _unavailable(path: Path, exc: OSError) -> DaemonUnavailable:
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
    return DaemonUnavailable(why, socket=str(path))


def execute_params(
    language: str,
    code: str,
    *,
    stdin: str | None = None,
    args: list[str] | None = None,
    files: list[dict[str, str]] | None = None,
    timeout: float | None = None,
    limits: dict[str, float] | None = None,
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
    }
    return {key: value for key, value in params.items() if value is not None}


@dataclass
class _Call:
    """One request and what comes back for it (sans-IO: both clients drive it)."""

    method: str
    params: dict[str, Any]
    on_notification: Callable[[dict[str, Any]], None] | None = None

    def __post_init__(self) -> None:
        self.id = next(_ids)

    def request(self) -> bytes:
        return encode(
            {"jsonrpc": "2.0", "method": self.method, "params": self.params, "id": self.id}
        )

    def feed(self, line: bytes) -> tuple[bool, Any]:
        """(done, result) for one line; raises the daemon's error as its class."""
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise DaemonUnavailable(
                f"sandboxd sent something that is not JSON: {line[:80]!r}"
            ) from exc
        if not isinstance(message, dict):
            raise DaemonUnavailable(f"sandboxd sent an unexpected message: {line[:80]!r}")
        if "method" in message:
            if self.on_notification and isinstance(message.get("params"), dict):
                self.on_notification(message["params"])
            return False, None
        if "error" in message:
            raise SandboxError.from_wire(message["error"])
        return True, message.get("result")

    def closed(self) -> DaemonUnavailable:
        return DaemonUnavailable(f"sandboxd closed the connection before answering {self.method}")


def _output_relay(on_output: OutputCallback | None) -> Callable[[dict[str, Any]], None] | None:
    if on_output is None:
        return None

    def relay(params: dict[str, Any]) -> None:
        on_output(str(params.get("stream")), str(params.get("data", "")), str(params.get("stage")))

    return relay


class Client:
    """Blocking client. ``timeout`` bounds each call (None: wait as long as the job runs)."""

    def __init__(
        self, socket_path: str | Path | None = None, *, timeout: float | None = None
    ) -> None:
        self.socket_path = Path(socket_path) if socket_path else default_socket()
        self.timeout = timeout

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        on_notification: Callable[[dict[str, Any]], None] | None = None,
    ) -> Any:
        call = _Call(method, params or {}, on_notification)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(self.timeout)
            try:
                sock.connect(str(self.socket_path))
                sock.sendall(call.request())
            except OSError as exc:
                raise _unavailable(self.socket_path, exc) from exc
            buffer = LineBuffer(MAX_LINE)
            while True:
                line = buffer.next_line()
                if line is None:
                    try:
                        data = sock.recv(65536)
                    except OSError as exc:
                        raise _unavailable(self.socket_path, exc) from exc
                    if not data:
                        raise call.closed()
                    buffer.feed(data)
                    continue
                done, result = call.feed(line)
                if done:
                    return result

    def health(self) -> dict[str, Any]:
        return self.call("health")

    def languages(self) -> dict[str, Any]:
        return self.call("languages")

    def status(self) -> dict[str, Any]:
        return self.call("status")

    def execute(
        self, language: str, code: str, *, on_output: OutputCallback | None = None, **options: Any
    ) -> ExecutionResult:
        """Run ``code``; ``on_output(stream, data, stage)`` sees the output as it comes.

        ``options``: stdin, args, files, timeout, limits (see docs/api.md).
        """
        record = self.call(
            "execute", execute_params(language, code, **options), _output_relay(on_output)
        )
        return ExecutionResult.from_dict(record)


class AsyncClient:
    """The same calls for trio programs; cancel a call to stop its job."""

    def __init__(self, socket_path: str | Path | None = None) -> None:
        self.socket_path = Path(socket_path) if socket_path else default_socket()

    async def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        on_notification: Callable[[dict[str, Any]], None] | None = None,
    ) -> Any:
        import trio  # here, not at the top: `sandboxctl` starts 0.1 s faster without it

        call = _Call(method, params or {}, on_notification)
        try:
            stream = await trio.open_unix_socket(str(self.socket_path))
        except OSError as exc:
            raise _unavailable(self.socket_path, exc) from exc
        async with stream:
            try:
                await stream.send_all(call.request())
                buffer = LineBuffer(MAX_LINE)
                while (line := await receive_line(stream, buffer)) is not None:
                    done, result = call.feed(line)
                    if done:
                        return result
            except trio.BrokenResourceError as exc:
                raise call.closed() from exc
            raise call.closed()

    async def health(self) -> dict[str, Any]:
        return await self.call("health")

    async def languages(self) -> dict[str, Any]:
        return await self.call("languages")

    async def status(self) -> dict[str, Any]:
        return await self.call("status")

    async def execute(
        self, language: str, code: str, *, on_output: OutputCallback | None = None, **options: Any
    ) -> ExecutionResult:
        record = await self.call(
            "execute", execute_params(language, code, **options), _output_relay(on_output)
        )
        return ExecutionResult.from_dict(record)
