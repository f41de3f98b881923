"""Streaming executions: Server-Sent Events on ``POST /execute`` and the ``/execute/ws``
WebSocket (which also carries stdin to the program).

SSE: ``event: output`` with ``{"stream", "stage", "data"}`` as the program writes, then
one ``event: result`` with the same body as the JSON answer, or ``event: error`` with an
ErrorResponse body. Errors found before the first output (a bad language, no capacity,
a rate limit) are answered as plain JSON with their HTTP status instead.

WebSocket: the client's first message is an ExecuteRequest; the server sends
``{"type": "output", ...}`` messages and ends with ``{"type": "result", ...}`` or
``{"type": "error", "status": N, ...}``; the client may send
``{"type": "stdin", "data": "...", "eof": false}`` at any time. Either side leaving
stops the job.
"""

from __future__ import annotations

import json
from typing import Any

import trio
from fastapi import WebSocket
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocketDisconnect

from sandboxctl.client import AsyncClient, Execution, OutputEvent
from sandboxctl.gateway.access import AccessControl
from sandboxctl.gateway.http_errors import error_body
from sandboxctl.gateway.metrics import Metrics
from sandboxctl.gateway.runs import GatewayRun, unless_client_leaves
from sandboxd.errors import InvalidRequest, RequestTimeout, SandboxError
from sandboxd.framing import decode
from sandboxd.protocol import MAX_REQUEST_VALUES


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def _output(event: OutputEvent) -> dict[str, str]:
    return {"stream": event.stream, "stage": event.stage, "data": event.data}


class EventStream(Response):
    """An SSE answer that runs the execution while it streams."""

    media_type = "text/event-stream"

    def __init__(
        self,
        client: AsyncClient,
        run: GatewayRun,
        metrics: Metrics,
        log_fields: dict[str, Any],
    ) -> None:
        super().__init__(status_code=200, media_type=self.media_type)
        self.client = client
        self.run = run
        self.metrics = metrics
        self.log_fields = log_fields

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stream() -> None:
            async with self.run.open(self.client) as execution:
                first = await anext(execution, None)  # errors before output: plain JSON
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [
                            (b"content-type", b"text/event-stream; charset=utf-8"),
                            (b"cache-control", b"no-cache"),
                        ],
                    }
                )
                await self._relay(send, execution, first)

        try:
            await unless_client_leaves(receive, stream)
        except SandboxError as exc:
            self.metrics.rejected.labels(type(exc).__name__).inc()
            status, body, headers = error_body(self.run.request_id, exc)
            await JSONResponse(body, status, headers)(scope, receive, send)

    async def _relay(self, send: Send, execution: Execution, first: OutputEvent | None) -> None:
        """Stream the output and the ending; errors become an ``error`` event here."""
        try:
            event = first
            while event is not None:
                self.run.add(event)
                await send(
                    {
                        "type": "http.response.body",
                        "body": _sse("output", _output(event)),
                        "more_body": True,
                    }
                )
                event = await anext(execution, None)
            answer = self.run.response(execution.result)
            self.metrics.executed(self.run.language, answer)
            self.log_fields.update(result=answer["status"], timings=answer["timings"])
            ending = _sse("result", answer)
        except SandboxError as exc:
            ending = _sse("error", error_body(self.run.request_id, exc)[1])
        await send({"type": "http.response.body", "body": ending, "more_body": False})


async def serve_websocket(
    websocket: WebSocket,
    client: AsyncClient,
    access: AccessControl,
    metrics: Metrics,
    request_timeout: float,
) -> None:
    """Serve one WebSocket execution; its request must come within ``request_timeout``.
    The socket holds one of its key's slots from the start (the gateway's middleware);
    the execution takes one of its tokens."""
    await websocket.accept()
    request_id = websocket.state.request_id
    try:
        try:
            with trio.fail_after(request_timeout):
                first = await receive_message(websocket)
        except trio.TooSlowError:
            raise RequestTimeout(
                f"no ExecuteRequest within {request_timeout:g} s", seconds=request_timeout
            ) from None
        except ValueError as exc:
            raise InvalidRequest(f"the first message must be an ExecuteRequest: {exc}") from exc
        run = GatewayRun(request_id, first)
        websocket.state.log.update(language=run.language)
        ending: dict[str, Any] | None = None  # stays None if the client leaves
        refused: list[SandboxError] = []  # a stdin message that is not one
        access.spend(websocket.state.key_id)
        async with (
            run.open(client, interactive=True) as execution,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(_forward_stdin, websocket, execution, nursery.cancel_scope, refused)
            ending = await _relay_websocket(websocket, run, execution, metrics)
            nursery.cancel_scope.cancel()
        if refused:
            raise refused[0]
    except SandboxError as exc:
        metrics.rejected.labels(type(exc).__name__).inc()
        ending = _websocket_error(request_id, exc)
    except WebSocketDisconnect:
        return
    if ending is None:
        return
    try:
        await websocket.send_json(ending)
        await websocket.close(1000 if ending["type"] == "result" else 1008)
    except (WebSocketDisconnect, RuntimeError):
        pass  # the client left first


def _websocket_error(request_id: str, error: SandboxError) -> dict[str, Any]:
    status, body, _ = error_body(request_id, error)
    return {"type": "error", "status": status, **body}


async def _relay_websocket(
    websocket: WebSocket, run: GatewayRun, execution: Execution, metrics: Metrics
) -> dict[str, Any] | None:
    """Send the output as it comes; the final message (result or error) to send, or
    None if the client left."""
    try:
        async for event in execution:
            run.add(event)
            await websocket.send_json({"type": "output", **_output(event)})
    except SandboxError as exc:
        return _websocket_error(run.request_id, exc)
    except WebSocketDisconnect:
        return None
    answer = run.response(execution.result)
    metrics.executed(run.language, answer)
    websocket.state.log.update(result=answer["status"], timings=answer["timings"])
    return {"type": "result", **answer}


async def receive_message(websocket: WebSocket) -> Any:
    """The next message, parsed as the daemon parses a request (at most its number of
    JSON values: sandboxd.framing); ValueError if it is not JSON."""
    return decode((await websocket.receive_text()).encode(), MAX_REQUEST_VALUES)


async def _forward_stdin(
    websocket: WebSocket,
    execution: Execution,
    scope: trio.CancelScope,
    refused: list[SandboxError],
) -> None:
    """Pass the client's stdin messages on; if the client leaves, or sends a message
    that is not a stdin message (then in ``refused``), stop everything."""
    try:
        while True:
            try:
                message = await receive_message(websocket)
            except ValueError as exc:
                raise InvalidRequest(f"a message that is not JSON: {exc}") from None
            if isinstance(message, dict) and message.get("type") == "stdin":
                data, eof = message.get("data", ""), message.get("eof", False)
                if not isinstance(data, str) or not isinstance(eof, bool):
                    raise InvalidRequest("a stdin message has a string data and a boolean eof")
                await execution.send_stdin(data, eof=eof)
    except WebSocketDisconnect:
        scope.cancel()
    except InvalidRequest as exc:
        refused.append(exc)
        scope.cancel()
    except SandboxError:
        pass  # the execution ended; its relay reports how
