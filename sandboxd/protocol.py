"""The wire contract: every name that crosses a process boundary, defined here once.

The daemon, the client library, the CLI and the gateway import these; the gateway's
models are built from them. The agent (guest/agent/) runs inside sandboxes on the
image's python and cannot import this package: tests/guest/test_contract.py checks that
what it says equals what is here.
"""

from __future__ import annotations

import enum

DEFAULT_SOCKET = "/run/sandboxd.sock"  # the daemon's, unless configured otherwise
# The JSON values one request line (a batch, whole) may hold: a batch of the most
# requests a connection runs at once, each with the most files a job takes, needs
# about 6000.
MAX_REQUEST_VALUES = 16384


class Method(enum.StrEnum):
    """The JSON-RPC methods of the daemon's socket (docs/api.md)."""

    HEALTH = "health"
    LANGUAGES = "languages"
    STATUS = "status"
    EXECUTE = "execute"
    STDIN = "execute.stdin"  # interactive input for a running execute
    SESSION_CREATE = "session.create"
    SESSION_EXEC = "session.exec"
    SESSION_WRITE_FILE = "session.write_file"
    SESSION_READ_FILE = "session.read_file"
    SESSION_LIST_FILES = "session.list_files"
    SESSION_REMOVE_FILE = "session.remove_file"
    SESSION_INFO = "session.info"
    SESSION_LIST = "session.list"
    SESSION_CLOSE = "session.close"


OUTPUT_NOTIFICATION = "execute.output"  # the daemon's, while an execute runs
# Its params besides the request's id, in the order every output callback takes them
# (the daemon's and the client library's alike).
OUTPUT_FIELDS = ("stage", "stream", "data")

# The params of execute (and of the gateway's POST /execute, but for interactive and
# stream_output: it makes its responses of the output it streams).
EXECUTE_FIELDS = (
    "language", "code", "stdin", "args", "files", "timeout", "limits", "interactive", "network",
    "stream_output",
)  # fmt: skip

# A session's: what session.create takes, and session.exec (an execute in the session
# named by id: its sandbox's memory, processes, file size and network are the session's).
SESSION_CREATE_FIELDS = ("language", "timeout", "limits", "ttl", "idle_timeout", "network")
SESSION_EXEC_FIELDS = (
    "id", "language", "code", "stdin", "args", "files", "timeout", "limits", "interactive",
    "cell", "stream_output",
)  # fmt: skip
SESSION_LIMITS = ("memory_bytes", "processes", "file_size_bytes")  # for the whole session


class Status(enum.StrEnum):
    """How a job ended: the result record's ``status``."""

    OK = "ok"
    COMPILE_ERROR = "compile_error"
    RUNTIME_ERROR = "runtime_error"
    TIMEOUT = "timeout"
    MEMORY_LIMIT = "memory_limit"
    OUTPUT_LIMIT = "output_limit"
    KILLED = "killed"
    INTERNAL_ERROR = "internal_error"


STREAMS = ("stdout", "stderr")
STAGES = ("compile", "run")

AGENT_PROTOCOL = 2  # the version of the agent protocol, in its hello
# Told to stop, the daemon (and the gateway) answer what they accepted within this long.
DRAIN_TIMEOUT = 30.0
