"""``/mcp/``: sandboxd-mcp's tools over MCP's streamable HTTP, behind the gateway's access
control, driven by the official SDK's own HTTP client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import httpx2
import trio
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from tests.host_state import program_processes, wait_for
from tests.sandboxctl.gateway.conftest import KEYS
from tests.sandboxctl.test_mcp import call


@asynccontextmanager
async def mcp_over_http(url: str, key: str | None = None) -> AsyncIterator[ClientSession]:
    headers = {"X-API-Key": key} if key else {}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=60) as http,
        streamable_http_client(f"{url}/mcp/", http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


async def test_the_tools_run_code_and_sessions_over_http(gateway):
    async with mcp_over_http(gateway.url) as session:
        tools = {tool.name for tool in (await session.list_tools()).tools}
        assert {"run_code", "open_session", "run_in_session", "close_session"} <= tools
        ran = await call(session, "run_code", language="python", code="print(6 * 7)")
        assert (ran["status"], ran["stdout"]) == ("ok", "42\n")
        opened = await call(session, "open_session")
        session_id = opened["session_id"]
        await call(session, "run_in_session", session_id=session_id, code="x = 41", cell=True)
        cell = await call(session, "run_in_session", session_id=session_id, code="x + 1", cell=True)
        assert cell["value"] == "42"
        await call(session, "close_session", session_id=session_id)


async def test_it_needs_a_key_and_its_sessions_are_that_key_s(keys_gateway):
    url = keys_gateway.url
    assert httpx.post(f"{url}/mcp/", json={}).status_code == 401
    async with mcp_over_http(url, KEYS["alice"]) as alice:
        session_id = (await call(alice, "open_session"))["session_id"]

        def listed(key: str) -> set[str]:
            answer = httpx.get(f"{url}/sessions", headers={"X-API-Key": key}).json()
            return {entry["id"] for entry in answer["sessions"] if not entry.get("ended")}

        assert session_id in listed(KEYS["alice"])
        assert session_id not in listed(KEYS["bob"])
        async with mcp_over_http(url, KEYS["bob"]) as bob:
            refused = await bob.call_tool(
                "run_in_session", {"session_id": session_id, "code": "print(1)"}
            )
            assert refused.is_error and "no session" in refused.content[0].text.lower()
        await call(alice, "close_session", session_id=session_id)


async def test_a_host_leaving_mid_call_stops_the_program(gateway, daemon):
    """The MCP host goes while run_code runs (its HTTP request closed): the program is
    stopped, as for any HTTP caller that leaves."""
    with trio.move_on_after(3):
        async with mcp_over_http(gateway.url) as session:
            await call(session, "run_code", language="python", code="import time; time.sleep(30)")
    assert program_processes(daemon.uid_base), "the program was not running yet"
    assert wait_for(lambda: not program_processes(daemon.uid_base), timeout=10)
