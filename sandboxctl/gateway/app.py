"""The FastAPI application: routes, the error handlers, and the middleware that gives
each request its id, enforces the body cap and API keys, and writes its log line."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
import uuid
from functools import partial
from typing import Any

import trio
from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sandboxctl.gateway.access import AccessControl
from sandboxctl.gateway.daemon_answers import DaemonAnswers
from sandboxctl.gateway.daemon_connections import DaemonConnections
from sandboxctl.gateway.http_errors import error_body
from sandboxctl.gateway.mcp_endpoint import mcp_endpoint
from sandboxctl.gateway.metrics import Metrics
from sandboxctl.gateway.models import (
    ErrorResponse,
    ExecuteRequest,
    ExecuteResponse,
    HealthResponse,
    LanguagesResponse,
    ReadyResponse,
)
from sandboxctl.gateway.piston import piston_routes, piston_runtimes
from sandboxctl.gateway.piston_connect import serve_piston_socket
from sandboxctl.gateway.playground import playground_routes
from sandboxctl.gateway.runs import ClientLeft, GatewayRun
from sandboxctl.gateway.sessions import session_routes
from sandboxctl.gateway.streaming import EventStream, serve_websocket
from sandboxd import __version__
from sandboxd.errors import (
    DaemonUnavailable,
    InvalidRequest,
    RequestTimeout,
    RequestTooLarge,
    SandboxError,
)
from sandboxd.framing import TooManyValues, check_values
from sandboxd.protocol import MAX_REQUEST_VALUES

log = logging.getLogger("sandboxd.gateway")
access_log = logging.getLogger("sandboxd.gateway.access")

CLIENT_LEFT = 499  # logged for a request whose client went away before its answer
PROTECTED = ("/execute", "/sessions", "/api/v2", "/mcp")  # and everything under them
# The HTTP requests that run a program, each paid for with one of its key's tokens (the
# WebSockets pay when their execution starts, MCP's tool calls when they run one).
EXECUTIONS = re.compile(r"/execute|/api/v2/execute|/sessions/[^/]+/exec")
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "invalid request or unsupported language"),
        (401, "missing or unknown API key"),
        (403, "without API keys: a local user who may not use the daemon's socket"),
        (404, "no session of the caller's has this id"),
        (408, "the request body did not arrive in time"),
        (413, "request body over the size limit"),
        (429, "over the key's rate or concurrency limit (see Retry-After), or its sessions'"),
        (503, "no sandbox free in time, or the daemon is unreachable"),
    )
}


class GatewayMiddleware:
    """Request id, who the caller is, its rate and concurrency (held from before its body
    is read, so a stalled body takes one of the caller's own slots), the body's cap and
    time limit, and one structured log line per request."""

    def __init__(
        self,
        app: ASGIApp,
        access: AccessControl,
        metrics: Metrics,
        max_body: int,
        body_timeout: float,
    ) -> None:
        self.app = app
        self.access = access
        self.metrics = metrics
        self.max_body = max_body
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = str(uuid.uuid4())
        state = scope.setdefault("state", {})
        state.update(request_id=request_id, key_id=None, log={})
        started = time.monotonic()
        status = {"code": 0}

        async def send_logged(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        try:
            try:
                self._check_access(scope, state)
                # A WebSocket holds its slot from the handshake on: its execution takes
                # a token once its request has come.
                executes = scope.get("method") == "POST" and EXECUTIONS.fullmatch(scope["path"])
                with (
                    self.access.admit(state["key_id"], executes=bool(executes))
                    if state["key_id"]
                    else contextlib.nullcontext()
                ):
                    if scope["type"] == "http":
                        # Every POST body is JSON; a PUT's is a file, raw.
                        receive = await self._capped_body(receive, scope["method"] == "POST")
                    await self.app(scope, receive, send_logged)
            except SandboxError as refusal:
                self.metrics.rejected.labels(type(refusal).__name__).inc()
                await _send_error(scope, send_logged, request_id, refusal)
            except ClientLeft:
                status["code"] = CLIENT_LEFT  # nobody to answer
        finally:
            line = {
                "request_id": request_id,
                "method": scope.get("method", "WEBSOCKET"),
                "path": scope["path"],
                "status": status["code"],
                "key_id": state["key_id"],
                "duration": round(time.monotonic() - started, 6),
                **state["log"],
            }
            access_log.info(json.dumps(line))

    def _check_access(self, scope: Scope, state: dict[str, Any]) -> None:
        """Who calls a protected path (``state["key_id"]``); Unauthorized or Forbidden."""
        if not scope["path"].startswith(PROTECTED):
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        state["key_id"] = self.access.authenticate(
            headers, scope.get("client"), scope.get("server")
        )

    async def _capped_body(self, receive: Receive, parsed: bool) -> Receive:
        """Read the body (refused as soon as it passes the cap, or once it took longer
        than the body timeout) and replay it. Raises RequestTooLarge, RequestTimeout, and
        InvalidRequest for one to be ``parsed`` as JSON with more values than a request
        may hold."""
        messages: list[Message] = []
        size = 0
        with trio.move_on_after(self.body_timeout) as stalled:
            while True:
                message = await receive()
                messages.append(message)
                size += len(message.get("body", b""))
                if size > self.max_body:
                    raise RequestTooLarge(
                        f"request body larger than {self.max_body} bytes", maximum=self.max_body
                    )
                if message["type"] != "http.request" or not message.get("more_body"):
                    break
        if stalled.cancelled_caught:
            raise RequestTimeout(
                f"the request body did not arrive within {self.body_timeout:g} s",
                seconds=self.body_timeout,
            )
        try:  # before any route parses it (the daemon's own rule, sandboxd.framing)
            if parsed:
                body = b"".join(m.get("body", b"") for m in messages)
                check_values(body, MAX_REQUEST_VALUES)
        except TooManyValues as exc:
            raise InvalidRequest(f"body: {exc}") from None

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        return replay


async def _send_error(scope: Scope, send: Send, request_id: str, error: SandboxError) -> None:
    if scope["type"] == "websocket":  # refused before the handshake: an HTTP 403
        await send({"type": "websocket.close", "code": 1008, "reason": error.message[:120]})
        return
    status, body, headers = error_body(request_id, error)
    await JSONResponse(body, status, headers)(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


EXECUTE_REQUEST_REF = "#/components/schemas/ExecuteRequest"


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, with the ExecuteRequest body (which the daemon's rules check,
    not FastAPI) and without the 422 it documents for every body: invalid bodies get
    400 here, as in the original service."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        for operations in schema["paths"].values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        request = ExecuteRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(request.pop("$defs", {}))
        components["ExecuteRequest"] = request
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(
    connections: DaemonConnections,
    access: AccessControl,
    *,
    max_body_bytes: int,
    body_timeout: float,
    host: str = "127.0.0.1",
) -> FastAPI:
    metrics = Metrics()
    client = connections.runs
    answers = DaemonAnswers(connections.answers)
    mcp_app, mcp_running = mcp_endpoint(connections.mcp, host, access.spend)
    # /docs and /redoc with their assets from the package: they work on a host without
    # internet access, and no third party learns who opens them.
    app = FastAPIOffline(
        title="sandboxd",
        version=__version__,
        description=(
            "Run untrusted Python, TypeScript and Rust in throw-away sandboxes. "
            "`/health`, `/languages` and `/execute` answer as the original codesandbox did; "
            "`/execute` also returns the full result record, streams with "
            "`Accept: text/event-stream`, and has a WebSocket twin at `/execute/ws`. "
            "`/sessions` keeps a sandbox across calls, with files in and out. "
            "`/mcp/` serves the same tools as `sandboxd-mcp` over MCP's streamable HTTP. "
            "With API keys configured, `/execute`, `/sessions` and `/mcp` need "
            "`Authorization: Bearer KEY` or `X-API-Key: KEY`."
        ),
        lifespan=mcp_running,
    )
    app.add_middleware(
        GatewayMiddleware,
        access=access,
        metrics=metrics,
        max_body=max_body_bytes,
        body_timeout=body_timeout,
    )
    app.openapi = partial(_openapi, app)  # type: ignore[method-assign]  # FastAPI's documented hook

    def request_id(request: Request) -> str:
        return str(request.state.request_id)

    @app.exception_handler(SandboxError)
    async def sandbox_error(request: Request, exc: SandboxError) -> JSONResponse:
        metrics.rejected.labels(type(exc).__name__).inc()
        status, body, headers = error_body(request_id(request), exc)
        return JSONResponse(body, status, headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.rejected.labels("InvalidRequest").inc()
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid body"}
        where = ".".join(str(part) for part in first["loc"] if part != "body") or "body"
        body = ErrorResponse(
            request_id=request_id(request), error=f"Invalid request: {where}: {first['msg']}"
        )
        return JSONResponse(body.model_dump(), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = ErrorResponse(request_id=request_id(request), error=str(exc.detail))
        return JSONResponse(body.model_dump(), exc.status_code, dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error, request id %s", request_id(request))
        body = ErrorResponse(
            request_id=request_id(request),
            error=f"internal error (request id {request_id(request)})",
        )
        return JSONResponse(body.model_dump(), 500)

    @app.get(
        "/health",
        response_model=HealthResponse,
        response_model_exclude_none=True,
        responses={503: {"model": HealthResponse, "description": "cannot run code now"}},
    )
    async def health() -> JSONResponse:
        """Whether the service can run code now."""
        try:
            answer = await answers.health()
        except DaemonUnavailable as exc:
            body = HealthResponse(status="unhealthy", time=int(time.time()), reason=exc.message)
            return JSONResponse(body.model_dump(exclude_none=True), 503)
        body = HealthResponse.model_validate(answer)
        return JSONResponse(
            body.model_dump(exclude_none=True), 200 if body.status == "healthy" else 503
        )

    app.state.draining = False  # set by the server once it is told to stop

    @app.get(
        "/ready",
        response_model=ReadyResponse,
        response_model_exclude_none=True,
        responses={503: {"model": ReadyResponse, "description": "takes no new work now"}},
    )
    async def ready() -> JSONResponse:
        """Whether this node takes new work (a load balancer's health check): not while
        it drains, nor while its daemon cannot run code; with its ready sandboxes and
        free slots."""
        if app.state.draining:
            body = ReadyResponse(ready=False, reason="draining: finishing what it has")
            return JSONResponse(body.model_dump(exclude_none=True), 503)
        try:
            answer = await answers.health()
        except DaemonUnavailable as exc:
            body = ReadyResponse(ready=False, reason=exc.message)
            return JSONResponse(body.model_dump(exclude_none=True), 503)
        pool = answer.get("pool", {})
        healthy = answer.get("status") == "healthy"
        body = ReadyResponse(
            ready=healthy,
            ready_sandboxes=pool.get("ready", 0),
            free_slots=max(0, pool.get("max", 0) - pool.get("busy", 0) - pool.get("sessions", 0)),
            reason=None if healthy else answer.get("reason"),
        )
        return JSONResponse(body.model_dump(exclude_none=True), 200 if healthy else 503)

    @app.get("/languages", response_model=LanguagesResponse, responses={503: ERRORS[503]})
    async def languages() -> dict[str, Any]:
        """The languages the service runs (the original's list, and details)."""
        return await answers.languages()

    @app.post(
        "/execute",
        response_model=ExecuteResponse,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": EXECUTE_REQUEST_REF}}},
            }
        },
        responses={
            **ERRORS,
            200: {
                "description": "the result; with `Accept: text/event-stream`, a stream of "
                "`output` events ending with a `result` (or `error`) event",
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            },
        },
    )
    async def execute(request: Request) -> Response:
        """Run a program in a fresh sandbox and answer with its output and result."""
        try:
            body = json.loads(await request.body())
        except ValueError as exc:
            raise InvalidRequest(f"body: not JSON ({exc})") from None
        run = GatewayRun(request_id(request), body)  # checked by the daemon's own rules
        request.state.log.update(language=run.language)
        if "text/event-stream" in request.headers.get("accept", ""):
            return EventStream(client, run, metrics, request.state.log)
        answer = await run.complete(client, request.receive)
        metrics.executed(run.language, answer)
        request.state.log.update(result=answer["status"], timings=answer["timings"])
        return JSONResponse(answer)

    @app.websocket("/execute/ws")
    async def execute_ws(websocket: WebSocket) -> None:
        """The first message is an ExecuteRequest; then `output` messages come, `stdin`
        messages may go, and a `result` (or `error`) message ends it."""
        await serve_websocket(websocket, client, access, metrics, body_timeout)

    app.include_router(session_routes(client, metrics, ERRORS))
    app.include_router(playground_routes())
    app.mount("/mcp", mcp_app)
    app.include_router(piston_routes(client, answers, metrics, ERRORS))

    @app.websocket("/api/v2/connect")
    async def piston_connect(websocket: WebSocket) -> None:
        """Piston's interactive execution, in its messages and close codes."""
        await serve_piston_socket(websocket, client, access, partial(piston_runtimes, answers))

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def prometheus() -> Response:
        """Prometheus metrics."""
        try:
            health_answer: dict[str, Any] | None = await answers.health()
        except DaemonUnavailable:
            health_answer = None
        return Response(
            metrics.render(health_answer), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    return app
