"""Errors to HTTP, in one table: each class of :mod:`sandboxd.errors` has its status and
the text the original service's clients know ("Invalid request: ...", "No available VMs").
A test fails if an error class is left out.
"""

from __future__ import annotations

from sandboxd import errors

HTTP_STATUS: dict[type[errors.SandboxError], int] = {
    errors.ParseError: 400,
    errors.InvalidRequest: 400,
    errors.InvalidParams: 400,
    errors.UnsupportedLanguage: 400,
    errors.LimitAboveMaximum: 400,
    errors.MethodNotFound: 500,  # the gateway asked the daemon for something it lacks
    errors.RequestTooLarge: 413,
    errors.RequestTimeout: 408,
    errors.SessionNotFound: 404,
    errors.Unauthorized: 401,
    errors.Forbidden: 403,
    errors.RateLimited: 429,
    errors.NoCapacity: 503,
    errors.TooManyConnections: 503,  # the gateway's own uid, at the daemon's cap
    errors.TooManySessions: 429,
    errors.DaemonUnavailable: 503,
    errors.LaunchError: 503,
    errors.StartTimeout: 503,
    errors.AgentError: 500,
    errors.InternalError: 500,
    errors.ConfigError: 500,
    errors.RequestError: 400,
    errors.ServiceError: 500,
    errors.SandboxError: 500,
}


def http_status(error: errors.SandboxError) -> int:
    for cls in type(error).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 500


def error_text(error: errors.SandboxError) -> str:
    """The ``error`` field: the original's wording where it had one."""
    if isinstance(error, errors.InvalidParams | errors.InvalidRequest | errors.ParseError):
        return f"Invalid request: {error.message.removeprefix('invalid params: ')}"
    if isinstance(error, errors.NoCapacity) and not isinstance(error, errors.TooManyConnections):
        return f"No available VMs ({error.message})"
    if isinstance(error, errors.DaemonUnavailable | errors.TooManyConnections):
        return f"Service unavailable: {error.message}"
    return error.message


def error_body(
    request_id: str, error: errors.SandboxError
) -> tuple[int, dict[str, object], dict[str, str]]:
    """(status, body, headers) of the HTTP answer to ``error``."""
    headers = {}
    if isinstance(error, errors.RateLimited):
        headers["Retry-After"] = str(error.data.get("retry_after", 1))
    body = {
        "request_id": request_id,
        "success": False,
        "error": error_text(error),
        "execution_time": 0,
    }
    return http_status(error), body, headers
