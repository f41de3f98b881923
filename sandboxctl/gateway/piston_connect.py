"""Piston's WebSocket, ``/api/v2/connect``: an interactive execution in Piston's messages.

The client sends ``init`` (an execute request) within a second; the gateway answers
``runtime``, then ``stage``, ``data`` (stdout, stderr) and an ``exit`` per stage as the
job runs, and closes with 4999. The client sends ``data`` on ``stdin`` and may send a
``signal``: sandboxd delivers no signal of a client's choice to a program, so any valid
one ends the program (its exit then says ``SIGKILL``). Close codes are Piston's: 4000
already initialized, 4001 no init in time, 4002 an error (sent first as ``error``),
4003 not yet initialized, 4004 only stdin can be written, 4005 an invalid signal.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from fastapi import WebSocket, WebSocketDisconnect

from sandboxctl.client import AsyncClient, Execution
from sandboxctl.gateway.access import AccessControl
from sandboxctl.gateway.piston import PistonError, ended_in_compile, execute_params
from sandboxctl.gateway.runs import GatewayRun
from sandboxctl.gateway.streaming import receive_message
from sandboxd.errors import SandboxError
from sandboxd.result import ExecutionResult

INIT_TIMEOUT = 1.0  # Piston's: a socket not initialized by then is closed
SIGNALS = {sig.name for sig in signal.Signals}
SIGNAL_NUMBERS = {int(sig) for sig in signal.Signals}


class Closing(Exception):
    """End the socket with this Piston close code (and reason)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


class _State:
    """What the client's side of the socket did while the job ran."""

    def __init__(self) -> None:
        self.closing: Closing | None = None  # it broke the protocol: close so
        self.signalled = False  # it sent a signal: the program was ended
        self.gone = False  # it left


async def serve_piston_socket(
    websocket: WebSocket,
    client: AsyncClient,
    access: AccessControl,
    runtimes: Callable[[], Awaitable[list[dict[str, Any]]]],
) -> None:
    await websocket.accept()
    try:
        with trio.move_on_after(INIT_TIMEOUT) as waited:
            first = await _message(websocket)
        if waited.cancelled_caught:
            raise Closing(4001, "Initialization Timeout")
        if first.get("type") != "init":
            raise Closing(4003, "Not yet initialized")
        try:
            params, runtime = execute_params(first, await runtimes())
        except PistonError as exc:
            await websocket.send_json({"type": "error", "message": str(exc)})
            raise Closing(4002, "Notified Error") from None
        await websocket.send_json(
            {"type": "runtime", "language": runtime["language"], "version": runtime["version"]}
        )
        run = GatewayRun(websocket.state.request_id, params)
        state = _State()
        compiled = bool(runtime["compiled"])
        access.spend(websocket.state.key_id)  # its slot is the socket's (the middleware)
        async with run.open(client, interactive=True) as execution, trio.open_nursery() as n:
            n.start_soon(_take_messages, websocket, execution, n.cancel_scope, state)
            await _relay(websocket, execution, compiled)
            n.cancel_scope.cancel()
        if state.gone:
            return
        if state.closing is not None:
            raise state.closing
        if state.signalled:  # the run ended when the connection to it closed
            await websocket.send_json(
                {"type": "exit", "stage": "run", "code": None, "signal": "SIGKILL"}
            )
        raise Closing(4999, "Job Completed")
    except Closing as closing:
        await _close(websocket, closing.code, str(closing))
    except SandboxError as exc:
        await websocket.send_json({"type": "error", "message": exc.message})
        await _close(websocket, 4002, "Notified Error")
    except WebSocketDisconnect:
        return


async def _message(websocket: WebSocket) -> dict[str, Any]:
    try:
        message = await receive_message(websocket)
    except ValueError:
        raise Closing(4002, "Notified Error") from None
    return message if isinstance(message, dict) else {}


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):  # the client left first
        await websocket.close(code, reason)


async def _take_messages(
    websocket: WebSocket, execution: Execution, scope: trio.CancelScope, state: _State
) -> None:
    """The client's messages while the job runs: stdin, a signal (which ends it)."""
    try:
        while True:
            message = await _message(websocket)
            kind = message.get("type")
            if kind == "init":
                raise Closing(4000, "Already Initialized")
            if kind == "data":
                if message.get("stream") != "stdin":
                    raise Closing(4004, "Can only write to stdin")
                await execution.send_stdin(str(message.get("data", "")))
            elif kind == "signal":
                if message.get("signal") not in SIGNALS:
                    raise Closing(4005, "Invalid signal")
                state.signalled = True
                break
    except Closing as closing:
        state.closing = closing
    except WebSocketDisconnect:
        state.gone = True
    except SandboxError:
        return  # the job ended; the relay reports how
    scope.cancel()  # closing the execution's connection stops the program


async def _relay(websocket: WebSocket, execution: Execution, compiled: bool) -> None:
    """Stages, output and exits as Piston sends them, until the job ends."""
    stage = "compile" if compiled else "run"
    await websocket.send_json({"type": "stage", "stage": stage})
    async for event in execution:
        if event.stage != stage:
            await _exit(websocket, stage, None)
            stage = event.stage
            await websocket.send_json({"type": "stage", "stage": stage})
        await websocket.send_json({"type": "data", "stream": event.stream, "data": event.data})
    result = execution.result
    if compiled and stage == "compile" and ended_in_compile(result):
        await _exit(websocket, "compile", result)
        return
    if stage == "compile":
        await _exit(websocket, "compile", None)
        await websocket.send_json({"type": "stage", "stage": "run"})
    await _exit(websocket, "run", result)


async def _exit(websocket: WebSocket, stage: str, result: ExecutionResult | None) -> None:
    code, number = (0, None) if result is None else (result.exit_code, result.signal)
    if result is not None and result.compile is not None and stage == "compile":
        code, number = result.compile.exit_code, result.compile.signal
    name = signal.Signals(number).name if number in SIGNAL_NUMBERS else None
    await websocket.send_json({"type": "exit", "stage": stage, "code": code, "signal": name})
