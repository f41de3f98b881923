"""``/sessions``: the daemon's sessions over HTTP, each owned by the caller's API key (or,
without keys, by the local user who calls). The gateway opens them on behalf of that
owner (the daemon's ``sessions.delegates``): nobody else can see or use them, and the
daemon's per-owner caps count each key on its own.

Files go in and come out as raw bytes (``PUT``/``GET /sessions/{id}/files/{path}``);
an exec answers as ``/execute`` does, with the cell's value for a Python cell.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from sandboxctl.client import AsyncClient, file_content, file_writes
from sandboxctl.gateway.metrics import Metrics
from sandboxctl.gateway.models import (
    ExecuteResponse,
    FileListing,
    FileWritten,
    SessionCreateRequest,
    SessionExecRequest,
    SessionInfo,
    SessionList,
)
from sandboxctl.gateway.runs import GatewayRun
from sandboxctl.gateway.streaming import EventStream
from sandboxd.protocol import Method

# What the session routes answer besides their own body (the middleware's errors too).
SESSION_ERRORS = (400, 401, 403, 404, 408, 413, 429, 503)


def session_routes(
    client: AsyncClient, metrics: Metrics, errors: dict[int | str, Any]
) -> APIRouter:
    router = APIRouter(
        prefix="/sessions",
        tags=["sessions"],
        responses={code: errors[code] for code in SESSION_ERRORS if code in errors},
    )

    async def call(request: Request, method: str, params: dict[str, Any]) -> Any:
        return await client.call(method, {**params, "on_behalf_of": request.state.key_id})

    @router.post("", status_code=201, response_model=SessionInfo)
    async def create(request: Request, body: SessionCreateRequest) -> Any:
        """Open a session: a sandbox kept for this caller until closed, idle or expired."""
        return await call(request, Method.SESSION_CREATE, body.params())

    @router.get("", response_model=SessionList)
    async def list_sessions(request: Request) -> Any:
        """The caller's sessions: the open ones, then the last that ended (with why)."""
        return await call(request, Method.SESSION_LIST, {})

    @router.get("/{session_id}", response_model=SessionInfo)
    async def info(request: Request, session_id: str) -> Any:
        return await call(request, Method.SESSION_INFO, {"id": session_id})

    @router.delete("/{session_id}", response_model=SessionInfo)
    async def close(request: Request, session_id: str) -> Any:
        """End the session: its sandbox, processes and files are gone."""
        return await call(request, Method.SESSION_CLOSE, {"id": session_id})

    @router.post("/{session_id}/exec", response_model=ExecuteResponse)
    async def exec_in_session(request: Request, session_id: str, body: SessionExecRequest) -> Any:
        """Run a program, or a Python cell, in the session; answered as /execute is (a
        stream of events with `Accept: text/event-stream`)."""
        session = {"id": session_id, "on_behalf_of": request.state.key_id}
        run = GatewayRun(request.state.request_id, body.params(), session)
        request.state.log.update(session=session_id)
        if "text/event-stream" in request.headers.get("accept", ""):
            return EventStream(client, run, metrics, request.state.log)
        answer = await run.complete(client, request.receive)
        metrics.executed(run.language, answer)
        request.state.log.update(result=answer["status"])
        return JSONResponse(answer)

    @router.get("/{session_id}/files", response_model=FileListing)
    async def list_files(request: Request, session_id: str, path: str = ".") -> Any:
        """The entries of a directory of the session (its working directory by default)."""
        return await call(request, Method.SESSION_LIST_FILES, {"id": session_id, "path": path})

    @router.put("/{session_id}/files/{path:path}", response_model=FileWritten)
    async def write_file(request: Request, session_id: str, path: str) -> Any:
        """Create or replace a file with the request's body, byte for byte."""
        for params in file_writes(session_id, path, await request.body()):
            answer = await call(request, Method.SESSION_WRITE_FILE, params)
        return answer

    @router.get(
        "/{session_id}/files/{path:path}",
        response_class=Response,
        responses={200: {"content": {"application/octet-stream": {}}}},
    )
    async def read_file(request: Request, session_id: str, path: str) -> Response:
        """A file of the session, byte for byte."""
        answer = await call(request, Method.SESSION_READ_FILE, {"id": session_id, "path": path})
        return Response(file_content(answer), media_type="application/octet-stream")

    @router.delete("/{session_id}/files/{path:path}")
    async def remove_file(request: Request, session_id: str, path: str) -> Any:
        """Remove a file or a directory tree of the session."""
        return await call(request, Method.SESSION_REMOVE_FILE, {"id": session_id, "path": path})

    return router
