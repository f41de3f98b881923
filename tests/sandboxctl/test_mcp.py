"""sandboxd-mcp, driven by the official MCP SDK's own client over stdio, against a real
daemon: every language, compile errors, timeouts, refusals, and a session."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from mcp import ClientSession, StdioServerParameters, stdio_client

from sandboxd.protocol import Status
from tests.host_state import program_processes, wait_for


@asynccontextmanager
async def mcp_client(daemon) -> AsyncIterator[ClientSession]:
    server = StdioServerParameters(
        command=sys.executable,
        args=["-m", "sandboxctl.mcp_server", "--socket", str(daemon.socket)],
    )
    async with stdio_client(server) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        yield session


async def call(session: ClientSession, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await session.call_tool(tool, arguments)
    assert not result.is_error, result.content
    return result.structured_content


async def test_the_tools_run_every_language_and_say_how_it_went(daemon):
    async with mcp_client(daemon) as session:
        tools = {tool.name for tool in (await session.list_tools()).tools}
        assert {"run_code", "list_languages", "open_session", "run_in_session"} <= tools
        languages = await call(session, "list_languages")
        assert {entry["name"] for entry in languages["result"]} == {"python", "typescript", "rust"}
        for language, code in (
            ("python", "import sys; print(sys.stdin.read()[::-1]); sys.exit(3)"),
            ("typescript", "console.log('ts'); Deno.exit(3)"),
            ("rust", 'fn main() { println!("rs"); std::process::exit(3); }'),
        ):
            ran = await call(session, "run_code", language=language, code=code, stdin="yp")
            assert (ran["status"], ran["exit_code"]) == (Status.RUNTIME_ERROR, 3), ran
            assert ran["stdout"] in ("py\n", "ts\n", "rs\n")
        broken = await call(session, "run_code", language="rust", code="fn main() { nope }")
        assert broken["status"] == Status.COMPILE_ERROR and "error" in broken["compile_output"]
        slow = await call(
            session, "run_code", language="python", code="while True: pass", timeout=1
        )
        assert (slow["status"], slow["message"]) == (
            Status.TIMEOUT,
            "wall time limit of 1 s exceeded",
        )
        refused = await session.call_tool("run_code", {"language": "go", "code": "x"})
        assert refused.is_error and "Unsupported language: go" in refused.content[0].text


async def test_a_session_keeps_files_and_python_state_and_ends_with_the_host(daemon):
    async with mcp_client(daemon) as session:
        opened = await call(session, "open_session", language="python")
        session_id = opened["session_id"]
        await call(session, "write_file", session_id=session_id, path="in.txt", content="41")
        defined = await call(
            session,
            "run_in_session",
            session_id=session_id,
            code="x = int(open('in.txt').read())",
            cell=True,
        )
        assert defined["status"] == Status.OK and defined["state_kept"]
        used = await call(session, "run_in_session", session_id=session_id, code="x + 1", cell=True)
        assert used["value"] == "42"
        await call(
            session,
            "run_in_session",
            session_id=session_id,
            code="open('out.bin', 'wb').write(bytes([0, 255]))",
        )
        binary = await call(session, "read_file", session_id=session_id, path="out.bin")
        assert (binary["encoding"], binary["content"]) == ("base64", "AP8=")
        names = {
            e["name"] for e in (await call(session, "list_files", session_id=session_id))["result"]
        }
        assert {"in.txt", "out.bin", "main.py"} <= names
        second = (await call(session, "open_session"))["session_id"]
        await call(session, "close_session", session_id=second)
        gone = await session.call_tool("run_in_session", {"session_id": second, "code": "1"})
        assert gone.is_error and f"no session '{second}'" in gone.content[0].text
    # The host went away: the server closed the session it had left open.
    listed = {s["id"]: s for s in daemon.client.sessions()}
    assert listed[session_id]["ended"] == "closed by its owner"


async def test_a_call_the_host_cancels_stops_its_program(daemon):
    """The host gives up on run_code (it sends MCP's cancellation) but stays: the
    program is stopped, not left to run to its time limit."""
    async with mcp_client(daemon) as session:
        with trio.move_on_after(3):
            await call(session, "run_code", language="python", code="import time; time.sleep(30)")
        assert program_processes(daemon.uid_base), "the program was not running yet"
        gone = await trio.to_thread.run_sync(  # the client's tasks run meanwhile
            lambda: wait_for(lambda: not program_processes(daemon.uid_base), timeout=10)
        )
        assert gone
        ran = await call(session, "run_code", language="python", code="print('still here')")
        assert ran["stdout"] == "still here\n"
