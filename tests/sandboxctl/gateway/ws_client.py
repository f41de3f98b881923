"""A small WebSocket client for the tests, on wsproto and trio, that always closes its
socket (trio-websocket sometimes left one open when the server closed first)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)


class WebSocketClosed(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"closed with code {code}")
        self.code = code


class WebSocket:
    def __init__(self, stream: trio.SocketStream, connection: WSConnection) -> None:
        self._stream = stream
        self._connection = connection
        self._pending: list[Any] = []
        self._text = ""

    async def _pump(self) -> None:
        data = await self._stream.receive_some(65536)
        self._connection.receive_data(data or None)
        self._pending.extend(self._connection.events())

    async def send(self, message: dict[str, Any]) -> None:
        await self.send_text(json.dumps(message))

    async def send_text(self, text: str) -> None:
        await self._stream.send_all(self._connection.send(TextMessage(text)))

    async def receive(self) -> dict[str, Any]:
        while True:
            while not self._pending:
                await self._pump()
            event = self._pending.pop(0)
            if isinstance(event, Message):
                self._text += event.data
                if event.message_finished:
                    text, self._text = self._text, ""
                    return json.loads(text)
            elif isinstance(event, Ping):
                await self._stream.send_all(self._connection.send(event.response()))
            elif isinstance(event, CloseConnection):
                await self._stream.send_all(self._connection.send(event.response()))
                raise WebSocketClosed(event.code)


@asynccontextmanager
async def connect(url: str, headers: list[tuple[str, str]] = ()) -> AsyncIterator[WebSocket]:
    """Open a WebSocket; RuntimeError with the status if the handshake is refused."""
    parts = urlsplit(url)
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    async with stream:
        connection = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(
            connection.send(
                Request(
                    host=f"{parts.hostname}:{parts.port}",
                    target=parts.path,
                    extra_headers=[(k.encode(), v.encode()) for k, v in headers],
                )
            )
        )
        socket = WebSocket(stream, connection)
        while not socket._pending:
            await socket._pump()
        answer = socket._pending.pop(0)
        if isinstance(answer, RejectConnection):
            raise RuntimeError(f"handshake refused with {answer.status_code}")
        assert isinstance(answer, AcceptConnection)
        yield socket
