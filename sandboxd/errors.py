"""The one error tree of sandboxd, shared by the daemon and every client.

Each error that can cross the socket has a stable JSON-RPC code; the daemon raises these
classes, the RPC server turns them into JSON-RPC errors in one place, the client library
turns the codes back into the same classes, and the gateway maps them to HTTP statuses in
one table::

    SandboxError
    ├── RequestError                the request cannot be served as asked (caller's fault)
    │   ├── ParseError              -32700  the line was not JSON
    │   ├── InvalidRequest          -32600  not a JSON-RPC 2.0 request
    │   ├── MethodNotFound          -32601  data: method
    │   ├── InvalidParams           -32602  data: field, reason
    │   ├── UnsupportedLanguage     -32001  data: language, known
    │   ├── LimitAboveMaximum       -32002  data: limit, requested, maximum
    │   ├── RequestTooLarge         -32003  data: maximum
    │   ├── RequestTimeout          -32004  data: seconds (a request line stalled)
    │   ├── SessionNotFound         -32005  data: id (none of the caller's has it)
    │   ├── Unauthorized            HTTP gateway only: no or a wrong API key
    │   ├── Forbidden               HTTP gateway only: a local user who may not use the socket
    │   └── RateLimited             HTTP gateway only: data: retry_after (seconds)
    ├── NoCapacity                  -32010  data: waited (seconds)
    │   ├── TooManyConnections      -32011  data: maximum (of the peer uid's connections)
    │   └── TooManySessions         -32012  data: maximum (the owner's, or the server's)
    ├── ServiceError                the daemon could not do its part
    │   ├── LaunchError             -32020  data: argv, exit_code, log_tail
    │   │   └── StartTimeout        -32021  data: phase, seconds
    │   ├── AgentError              -32022  the guest agent broke its protocol
    │   └── InternalError           -32603  data: log_id (the traceback is only in the log)
    ├── DaemonUnavailable           client side only: the socket cannot be reached
    └── ConfigError                 daemon side only: a bad configuration value
"""

from __future__ import annotations

from typing import Any, ClassVar


class SandboxError(Exception):
    """Root of every error sandboxd raises on purpose."""

    code: ClassVar[int] = -32000

    def __init__(self, message: str, **data: Any) -> None:
        super().__init__(message)
        self.message = message
        self.data = data

    def to_wire(self) -> dict[str, Any]:
        """The JSON-RPC ``error`` object for this error."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data:
            error["data"] = self.data
        return error

    @staticmethod
    def from_wire(error: dict[str, Any]) -> SandboxError:
        """Rebuild the error a daemon sent, as the class it was raised as."""
        code = error.get("code")
        message = str(error.get("message", "unknown error"))
        data = error.get("data")
        cls = _BY_CODE.get(code, SandboxError) if isinstance(code, int) else SandboxError
        return cls(message, **(data if isinstance(data, dict) else {}))


class RequestError(SandboxError):
    """The request itself is wrong; sending it again unchanged will fail again."""


class ParseError(RequestError):
    code = -32700


class InvalidRequest(RequestError):
    code = -32600


class MethodNotFound(RequestError):
    code = -32601


class InvalidParams(RequestError):
    code = -32602

    @classmethod
    def field(cls, field: str, reason: str) -> InvalidParams:
        """The usual way to raise it: which field and why."""
        return cls(f"invalid params: {field}: {reason}", field=field, reason=reason)


class UnsupportedLanguage(RequestError):
    code = -32001


class LimitAboveMaximum(RequestError):
    code = -32002


class RequestTooLarge(RequestError):
    code = -32003


class RequestTimeout(RequestError):
    """A request began to arrive and stopped before its end."""

    code = -32004


class SessionNotFound(RequestError):
    """No session of the caller has this id: it never existed, it ended, or it is
    somebody else's (the error does not say which)."""

    code = -32005


class Unauthorized(RequestError):
    """The HTTP gateway wants an API key and got none, or a wrong one."""


class Forbidden(RequestError):
    """Without API keys, the HTTP gateway admits only who may use the daemon's socket."""


class RateLimited(RequestError):
    """An API key is over its request rate or its concurrent requests."""


class NoCapacity(SandboxError):
    """No sandbox became free within the queue timeout; retrying later may work."""

    code = -32010


class TooManyConnections(NoCapacity):
    """The connecting uid already has as many connections open as it may."""

    code = -32011


class TooManySessions(NoCapacity):
    """The owner, or the server, has as many sessions open as it may."""

    code = -32012


class ServiceError(SandboxError):
    """The daemon failed at its own part of the work."""


class LaunchError(ServiceError):
    """A sandbox could not be started; carries the command line and its log tail."""

    code = -32020


class StartTimeout(LaunchError):
    code = -32021


class AgentError(ServiceError):
    code = -32022


class InternalError(ServiceError):
    code = -32603


class DaemonUnavailable(SandboxError):
    """The client cannot reach the daemon (not running, or no permission)."""


class ConfigError(SandboxError):
    """A configuration value is missing or wrong; the message names where and why."""


_BY_CODE: dict[int, type[SandboxError]] = {
    cls.code: cls
    for cls in (
        ParseError,
        InvalidRequest,
        MethodNotFound,
        InvalidParams,
        UnsupportedLanguage,
        LimitAboveMaximum,
        RequestTooLarge,
        RequestTimeout,
        SessionNotFound,
        NoCapacity,
        TooManyConnections,
        TooManySessions,
        LaunchError,
        StartTimeout,
        AgentError,
        InternalError,
    )
}
