"""``sandboxd-mcp``: sandboxd as a Model Context Protocol server, on the official ``mcp``
SDK: over stdio, and over streamable HTTP at the gateway's ``/mcp/``.

An MCP host (the app an AI agent runs in) starts it as a subprocess. Its tools run code
through the daemon's socket, as the user who started it: it is an unprivileged client
like the CLI, and the sessions it opens are that user's. Those still open when the host
goes away are closed (else they would wait for their idle timeout). Behind the gateway
(``per_caller``) each call acts for the API key of its HTTP request, as the gateway's own
endpoints do: its sessions are that key's, and its idle timeout ends them.

Tools: ``run_code`` (a fresh sandbox per call), ``list_languages``, and for work that
spans calls ``open_session``, ``run_in_session`` (a program, or a Python cell whose
variables stay), ``write_file``, ``read_file``, ``list_files``, ``close_session``. Every
result carries the status, stdout, stderr and exit code; a refusal or a failure of the
service is a tool error with the daemon's one-line message.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Literal, TypeVar

import anyio.from_thread
import anyio.to_thread
import click
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel, Field

from sandboxctl.app import socket_option
from sandboxctl.client import Client, Session
from sandboxd import __version__
from sandboxd.errors import SandboxError
from sandboxd.protocol import Method
from sandboxd.result import ExecutionResult

T = TypeVar("T")
INSTRUCTIONS = (
    "Runs untrusted Python, TypeScript and Rust in throw-away sandboxes (no network). "
    "run_code for one program; for work over several steps (files to write, then run, "
    "then read back; Python state to keep), open_session, then run_in_session and the "
    "file tools, and close_session when done."
)


class RunResult(BaseModel):
    status: str = Field(description="ok, compile_error, runtime_error, timeout, memory_limit, …")
    message: str = Field(description="why it did not succeed, in one line (empty when ok)")
    exit_code: int | None
    signal: int | None
    stdout: str
    stderr: str
    compile_output: str = Field(description="the compiler's output, for Rust")
    value: str | None = Field(default=None, description="a Python cell's last expression")
    state_kept: bool | None = Field(
        default=None, description="a Python cell: whether its variables are kept for the next"
    )
    seconds: float = Field(description="wall time of the run")

    @classmethod
    def of(cls, result: ExecutionResult) -> RunResult:
        compiled = result.compile
        return cls(
            status=str(result.status),
            message=result.message,
            exit_code=result.exit_code,
            signal=result.signal,
            stdout=result.stdout,
            stderr=result.stderr,
            compile_output=(compiled.stdout + compiled.stderr) if compiled else "",
            value=result.cell.value if result.cell else None,
            state_kept=result.cell.kept if result.cell else None,
            seconds=result.timings.get("run", 0.0),
        )


class Language(BaseModel):
    name: str
    version: str
    aliases: list[str]


class SessionInfo(BaseModel):
    session_id: str
    language: str
    expires: float = Field(description="unix time: when it ends at the latest")
    idle_timeout: float = Field(description="seconds without a call after which it ends")
    limits: dict[str, float]


class FileContent(BaseModel):
    path: str
    size: int
    encoding: Literal["utf-8", "base64"]
    content: str


class FileEntry(BaseModel):
    name: str
    type: str
    size: int


def _answer(call: Callable[[], T]) -> T:
    """The daemon's answer; its refusal or failure as the tool's error, in its words."""
    try:
        return call()
    except SandboxError as exc:
        raise ToolError(exc.message) from exc


def build_server(
    client: Client, *, per_caller: bool = False, spend: Callable[[str], None] | None = None
) -> MCPServer:
    """The server, whose tools call the daemon with ``client``; with ``per_caller``, for
    the API key its gateway found for each HTTP request (``key_id`` in its state), and
    ``spend`` takes one of that key's tokens for each tool call that runs a program."""
    opened: dict[str, Session] = {}  # over stdio, to close when the host goes

    @contextlib.asynccontextmanager
    async def closing_sessions(server: MCPServer) -> AsyncIterator[None]:
        try:
            yield
        finally:
            for session in list(opened.values()):
                with contextlib.suppress(SandboxError):
                    await anyio.to_thread.run_sync(session.close)

    server = MCPServer(
        "sandboxd",
        instructions=INSTRUCTIONS,
        version=__version__,
        lifespan=None if per_caller else closing_sessions,
    )

    def key_of(ctx: Context) -> str | None:
        """The gateway's key for this HTTP request; None over stdio."""
        request = ctx.request_context.request if per_caller else None
        return None if request is None else request.state.key_id

    def client_of(ctx: Context) -> Client:
        """Who calls: the gateway's key for this HTTP request, or whoever started us."""
        key = key_of(ctx)
        return client if key is None else client.for_caller(key)

    def session_of(ctx: Context, session_id: str) -> Session:
        return Session(client_of(ctx), {"id": session_id})

    def running(ctx: Context) -> Client:
        """client_of, for a call that runs a program: paid for first with one of its
        key's tokens on a gateway (RateLimited if it is over its rate)."""
        key = key_of(ctx)
        if key is not None and spend is not None:
            spend(key)
        return client_of(ctx)

    @server.tool()
    def run_code(
        ctx: Context,
        language: str,
        code: str,
        stdin: str | None = None,
        args: list[str] | None = None,
        files: dict[str, str] | None = None,
        timeout: float | None = None,
        limits: dict[str, float] | None = None,
    ) -> RunResult:
        """Run a program in a fresh sandbox that is gone afterwards. language: python,
        typescript or rust. files: path → text, put beside the program. timeout: wall
        seconds. limits: e.g. {"memory_bytes": 268435456}."""
        extra = [{"path": path, "content": text} for path, text in (files or {}).items()]
        result = _answer(
            lambda: running(ctx).execute(
                language,
                code,
                stdin=stdin,
                args=args,
                files=extra or None,
                timeout=timeout,
                limits=limits,
            )
        )
        return RunResult.of(result)

    @server.tool()
    def list_languages(ctx: Context) -> list[Language]:
        """The languages the service runs, with their versions."""
        details = _answer(client_of(ctx).languages)["details"]
        return [
            Language(name=d["name"], version=d["version"], aliases=d["aliases"]) for d in details
        ]

    @server.tool()
    def open_session(
        ctx: Context,
        language: str = "python",
        idle_timeout: float | None = None,
        ttl: float | None = None,
        limits: dict[str, float] | None = None,
    ) -> SessionInfo:
        """Open a session: one sandbox kept across calls, whose files stay and whose
        Python cells keep their variables. Close it with close_session."""
        session = _answer(
            lambda: client_of(ctx).session(
                language, idle_timeout=idle_timeout, ttl=ttl, limits=limits
            )
        )
        if not per_caller:
            opened[session.id] = session
        info = session.info
        return SessionInfo(
            session_id=session.id,
            language=info["language"],
            expires=info["expires"],
            idle_timeout=info["idle_timeout"],
            limits=info["limits"],
        )

    @server.tool()
    def run_in_session(
        ctx: Context,
        session_id: str,
        code: str,
        cell: bool = False,
        language: str | None = None,
        stdin: str | None = None,
        timeout: float | None = None,
    ) -> RunResult:
        """Run a program in the session (its files are there). cell=true: run it as a
        Python cell of the session's interpreter, which keeps variables, imports and
        functions from one cell to the next; the value of its last expression comes back."""
        result = _answer(
            lambda: Session(running(ctx), {"id": session_id}).exec(
                code, cell=cell or None, language=language, stdin=stdin, timeout=timeout
            )
        )
        return RunResult.of(result)

    @server.tool()
    def write_file(
        ctx: Context,
        session_id: str,
        path: str,
        content: str,
        encoding: Literal["utf-8", "base64"] = "utf-8",
    ) -> FileEntry:
        """Create or replace a file in the session's working directory (a relative path).
        encoding base64 for binary content."""
        data = base64.b64decode(content) if encoding == "base64" else content.encode()
        _answer(lambda: session_of(ctx, session_id).write_file(path, data))
        return FileEntry(name=path, type="file", size=len(data))

    @server.tool()
    def read_file(ctx: Context, session_id: str, path: str) -> FileContent:
        """A file of the session: as text if it is UTF-8, else in base64."""
        data = _answer(lambda: session_of(ctx, session_id).read_file(path))
        try:
            return FileContent(path=path, size=len(data), encoding="utf-8", content=data.decode())
        except UnicodeDecodeError:
            encoded = base64.b64encode(data).decode()
            return FileContent(path=path, size=len(data), encoding="base64", content=encoded)

    @server.tool()
    def list_files(ctx: Context, session_id: str, path: str = ".") -> list[FileEntry]:
        """The entries of a directory of the session (its working directory by default)."""
        entries = _answer(lambda: session_of(ctx, session_id).list_files(path))
        return [FileEntry(**entry) for entry in entries]

    @server.tool()
    def close_session(ctx: Context, session_id: str) -> str:
        """End the session: its sandbox, processes and files are gone."""
        opened.pop(session_id, None)
        _answer(lambda: client_of(ctx).call(Method.SESSION_CLOSE, {"id": session_id}))
        return f"session {session_id} closed"

    return server


@click.command()
@socket_option
@click.version_option(__version__, prog_name="sandboxd-mcp")
def main(socket_path: str | None) -> None:
    """sandboxd's tools for an MCP host, over stdio (an MCP host starts this)."""
    # A call the host cancels ends its daemon call (the tools run in worker threads).
    client = Client(socket_path, while_waiting=anyio.from_thread.check_cancelled)
    build_server(client).run("stdio")


if __name__ == "__main__":
    main()
