"""``/mcp/``: sandboxd-mcp's tools over the Model Context Protocol's streamable HTTP, for
MCP hosts that reach a server by URL rather than start it.

The same server as ``sandboxd-mcp`` on stdio (sandboxctl.mcp_server), behind the
gateway's own access control (``/mcp`` is a protected path: an API key, or on a keyless
gateway a local user who may use the daemon's socket) and its limits per key. Each call
acts for its request's key, so the sessions it opens are that key's, as with
``/sessions``. Stateless, with JSON answers: every MCP request is one HTTP request, and
no stream stays open to hold a key's concurrency.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from typing import Any

import trio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sandboxctl.client import Client
from sandboxctl.gateway.runs import unless_client_leaves
from sandboxctl.mcp_server import build_server


def mcp_endpoint(
    client: Client, host: str, spend: Callable[[str], None]
) -> tuple[ASGIApp, Callable[[Any], AbstractAsyncContextManager[None]]]:
    """The ASGI app to mount at ``/mcp`` (on a gateway bound to ``host``), whose tools
    call the daemon with ``client`` (the MCP share of the gateway's connections), and
    the lifespan the gateway must run it in (its session manager). Each HTTP request
    holds one of its key's slots (the gateway's middleware); ``spend`` takes one of its
    tokens for a tool call that runs a program (the handshake and the other calls take
    none)."""
    server = build_server(client, per_caller=True, spend=spend)
    # On a loopback bind the SDK also refuses foreign Host and Origin headers (DNS
    # rebinding: a web page the local user opens must not reach it).
    sdk_app = server.streamable_http_app(
        streamable_http_path="/", stateless_http=True, json_response=True, host=host
    )

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        """The SDK's, cancelled if its client leaves (it reads nothing after the body):
        then its tool calls are, and their daemon calls end with them (the client's
        ``while_waiting``, DaemonConnections)."""
        if scope["type"] != "http":
            await sdk_app(scope, receive, send)
            return
        body = [message := await receive()]
        while message["type"] == "http.request" and message.get("more_body"):
            body.append(message := await receive())

        async def replay() -> Message:
            if body:
                return body.pop(0)
            await trio.sleep_forever()
            raise AssertionError("unreachable")

        await unless_client_leaves(receive, partial(sdk_app, scope, replay, send))

    @asynccontextmanager
    async def running(_app: Any) -> AsyncIterator[None]:
        async with server.session_manager.run():
            yield

    return app, running
