"""One execution as the gateway reports it: its request, checked as the daemon checks
it (so both edges refuse an input in the same words), the output in the order the
program wrote it, and the response body with the original service's fields and the
result record."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

import trio
from starlette.types import Receive

from sandboxctl.client import AsyncClient, Execution, OutputEvent
from sandboxctl.gateway.metrics import SESSION
from sandboxctl.gateway.models import ExecuteResponse
from sandboxd.job import check_params
from sandboxd.protocol import EXECUTE_FIELDS, Method, Status
from sandboxd.result import ExecutionResult

# What an HTTP request may carry: the daemon's execute fields but "interactive", which
# only the WebSocket means (and sets), and "stream_output": every response is made of
# the output streamed.
HTTP_FIELDS = tuple(name for name in EXECUTE_FIELDS if name not in ("interactive", "stream_output"))


T = TypeVar("T")


class ClientLeft(Exception):
    """The HTTP client went away before its answer: its job was stopped, and nothing is
    sent (logged as 499, as nginx does)."""


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def unless_client_leaves(receive: Receive, work: Callable[[], Awaitable[T]]) -> T:
    """What ``work()`` returns or raises (as itself, not in a group), unless the client
    behind ``receive`` (its body already read) goes away first: then ``work`` is
    cancelled (closing an execution stops its job) and this raises ClientLeft."""
    done: list[T] = []
    failure: Exception | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
        try:
            done.append(await work())
        except Exception as exc:  # raised below, outside the nursery
            failure = exc
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
    if not done:
        raise ClientLeft
    return done[0]


class GatewayRun:
    def __init__(self, request_id: str, params: Any, session: dict[str, Any] | None = None) -> None:
        """Raises InvalidParams, with the daemon's words, for params it would refuse.
        ``session``: an exec in this session (its ``id`` and ``on_behalf_of``), whose
        params the daemon checks."""
        self.session = session
        if session is None:
            self.language = check_params(params, HTTP_FIELDS).language
        else:
            self.language = str(params.get("language") or SESSION)
        self.request_id = request_id
        self.params: dict[str, Any] = params
        self.started = time.monotonic()
        self._chunks: dict[str, list[str]] = {"compile": [], "run": []}

    def add(self, event: OutputEvent) -> None:
        self._chunks.setdefault(event.stage, []).append(event.data)

    def output(self, stage: str) -> str:
        """What the stage wrote, stdout and stderr in the order it wrote them."""
        return "".join(self._chunks.get(stage, []))

    def response(self, result: ExecutionResult) -> dict[str, Any]:
        """The ExecuteResponse body, checked against its model (what /openapi.json shows)."""
        # A failed compile has nothing but the compiler to show; otherwise the program.
        stage = "compile" if result.status is Status.COMPILE_ERROR else "run"
        body = {
            "request_id": self.request_id,
            "success": result.ok,
            "output": self.output(stage),
            "error": None if result.ok else result.message,
            "execution_time": round(time.monotonic() - self.started, 6),
            **result.to_dict(),
        }
        return ExecuteResponse.model_validate(body).model_dump(mode="json")

    def open(self, client: AsyncClient, **extra: Any) -> AbstractAsyncContextManager[Execution]:
        """The call that runs it (``execute``, or ``session.exec`` in its session)."""
        if self.session is None:
            return client.open_execution(**self.params, **extra)
        return client.open_call(Method.SESSION_EXEC, {**self.params, **self.session, **extra})

    async def complete(self, client: AsyncClient, receive: Receive, **extra: Any) -> dict[str, Any]:
        """Run it to the end; the response body. ClientLeft if the client behind
        ``receive`` went away first (the job is stopped)."""

        async def run() -> dict[str, Any]:
            async with self.open(client, **extra) as execution:
                async for event in execution:
                    self.add(event)
            return self.response(execution.result)

        return await unless_client_leaves(receive, run)
