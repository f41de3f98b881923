"""Piston's v2 API, for the judges and bots written against it: ``GET /api/v2/runtimes``
and ``POST /api/v2/execute``, answered as Piston answers, on sandboxd's own jobs.

Piston's fields map onto sandboxd's limits (milliseconds to seconds; ``-1`` is the
server's default); where the two differ, sandboxd's limits and maxima win: a request
over the server's maximum is refused in Piston's words, the memory limit is the whole
sandbox's for both stages (the larger of the two asked), and a compile's CPU time is its
wall time. A body is taken if it is JSON, whatever its Content-Type (piston-client sends
text/plain), and refused with 415 if it is not. Statuses are Piston's (isolate's):
``RE`` a non-zero exit, ``SG`` a signal, ``TO`` a time limit, ``OL``/``EL``
stdout/stderr over the output limit, ``XX`` sandboxd's own failure; ``null`` for a clean
exit.
"""

from __future__ import annotations

import base64
import binascii
import json
import signal
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from sandboxctl.client import AsyncClient
from sandboxctl.gateway.daemon_answers import DaemonAnswers
from sandboxctl.gateway.metrics import Metrics
from sandboxctl.gateway.runs import GatewayRun
from sandboxd.errors import InvalidParams, LimitAboveMaximum, SandboxError, UnsupportedLanguage
from sandboxd.protocol import Status
from sandboxd.result import CompileResult, ExecutionResult

RUNTIMES = {"typescript": "deno"}  # Piston's ``runtime`` of a language, where it names one
# Piston's limit fields: (stage, Piston's name) → sandboxd's limit, and its unit's factor.
LIMIT_FIELDS = {
    "run_timeout": ("wall_time", 1000),
    "compile_timeout": ("compile_time", 1000),
    "run_cpu_time": ("cpu_time", 1000),
    "compile_cpu_time": ("compile_time", 1000),
    "run_memory_limit": ("memory_bytes", 1),
    "compile_memory_limit": ("memory_bytes", 1),
}


class PistonError(Exception):
    """A request Piston would refuse with 400 and ``{"message": ...}``."""


def version_matches(selector: str, version: str) -> bool:
    """Whether ``version`` satisfies a Piston version selector: ``*``, an exact version,
    or one with ``x``/``*`` for its last parts (``3``, ``3.x``, ``3.11.*``)."""
    wanted = [part for part in selector.strip().lstrip("=v").split(".") if part]
    have = version.split(".")
    for index, part in enumerate(wanted):
        if part in ("*", "x", "X"):
            return True
        if index >= len(have) or part != have[index]:
            return False
    return True


def _decode(file: dict[str, Any], index: int) -> str:
    content, encoding = file.get("content"), file.get("encoding", "utf8")
    if not isinstance(content, str):
        raise PistonError(f"files[{index}].content is required as a string")
    if encoding == "utf8":
        return content
    try:
        if encoding == "base64":
            raw = base64.b64decode(content, validate=True)
        elif encoding == "hex":
            raw = bytes.fromhex(content)
        else:
            raise ValueError(encoding)
    except (binascii.Error, ValueError):
        raise PistonError(f"files[{index}]: encoding must be utf8, base64 or hex") from None
    return raw.decode("utf-8", errors="surrogateescape")


def execute_params(
    body: Any, runtimes: list[dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """sandboxd's execute params for a Piston request, and the runtime it selects;
    PistonError with Piston's message for what Piston refuses."""
    if not isinstance(body, dict):
        raise PistonError("the body must be a JSON object")
    language, version, files = body.get("language"), body.get("version"), body.get("files")
    if not language or not isinstance(language, str):
        raise PistonError("language is required as a string")
    if not version or not isinstance(version, str):
        raise PistonError("version is required as a string")
    if not isinstance(files, list) or not files:
        raise PistonError("files is required as an array")
    runtime = next(
        (
            rt
            for rt in runtimes
            if language in (rt["language"], *rt["aliases"])
            and version_matches(version, rt["version"])
        ),
        None,
    )
    if runtime is None:
        raise PistonError(f"{language}-{version} runtime is unknown")
    sources = [_decode(file if isinstance(file, dict) else {}, i) for i, file in enumerate(files)]
    extra = [
        {"path": str(file.get("name") or f"file{index}"), "content": source}
        for index, (file, source) in enumerate(zip(files, sources, strict=True))
        if index
    ]
    limits: dict[str, float] = {}
    for field, (limit, factor) in LIMIT_FIELDS.items():
        value = body.get(field)
        if value is None or value == -1:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PistonError(f"If specified, {field} must be a number")
        if value < 0:
            raise PistonError(f"{field} must be non-negative")
        if value:
            limits[limit] = max(limits.get(limit, 0), value / factor)
    params: dict[str, Any] = {
        "language": runtime["language"],
        "code": sources[0],
        "stdin": body.get("stdin") or "",
        "args": [str(arg) for arg in body.get("args") or []],
        "files": extra or None,
        "limits": limits or None,
    }
    return {key: value for key, value in params.items() if value is not None}, runtime


def _signal_name(number: int | None) -> str | None:
    if number is None:
        return None
    try:
        return signal.Signals(number).name
    except ValueError:
        return None


def ended_in_compile(result: ExecutionResult) -> bool:
    """Whether the job ended in its compile stage (its run never started)."""
    return (
        result.compile is not None
        and result.status is not Status.OK
        and result.exit_code is None
        and result.signal is None
    )


def stage_record(
    result: ExecutionResult, part: ExecutionResult | CompileResult, output: str, wall: float
) -> dict[str, Any]:
    """One stage in Piston's shape; ``part`` is the stage's own record (the result for
    the stage the job ended in, with its status)."""
    exit_code, signal_number = part.exit_code, part.signal
    status: str | None = None
    message: str | None = None
    last = part is result or ended_in_compile(result)
    if last and result.status is Status.OUTPUT_LIMIT:
        only_stderr = part.truncated.get("stderr") and not part.truncated.get("stdout")
        status = "EL" if only_stderr else "OL"
        message = f"{'stderr' if only_stderr else 'stdout'} length exceeded"
    elif last and result.status is Status.TIMEOUT:
        status, message = "TO", result.message
    elif last and result.status in (Status.KILLED, Status.INTERNAL_ERROR):
        status, message = "XX", result.message
    elif signal_number:
        status, message = "SG", f"Caught fatal signal {signal_number}"
    elif exit_code:
        status, message = "RE", f"Exited with error status {exit_code}"
    if status in ("TO", "OL", "EL"):
        signal_number = signal.SIGKILL  # as Piston reports a process it stopped
    return {
        "stdout": part.stdout,
        "stderr": part.stderr,
        "output": output,
        "code": exit_code,
        "signal": _signal_name(signal_number),
        "message": message,
        "status": status,
        "cpu_time": round(result.usage.get("cpu_time", 0) * 1000),
        "wall_time": round(wall * 1000),
        "memory": int(result.usage.get("memory_bytes", 0)),
    }


class PistonMessage(BaseModel):
    """Piston's refusal."""

    message: str


class PistonRuntime(BaseModel):
    language: str
    version: str
    aliases: list[str]
    runtime: str | None = None


async def piston_runtimes(answers: DaemonAnswers) -> list[dict[str, Any]]:
    """The daemon's languages as Piston's runtimes (with whether each compiles)."""
    details = (await answers.languages())["details"]
    return [
        {
            "language": entry["name"],
            "version": entry["version"],
            "aliases": entry["aliases"],
            **({"runtime": RUNTIMES[entry["name"]]} if entry["name"] in RUNTIMES else {}),
            "compiled": entry["compiled"],  # ours (GET /runtimes leaves it out)
        }
        for entry in details
    ]


def piston_routes(
    client: AsyncClient, answers: DaemonAnswers, metrics: Metrics, errors: dict[int | str, Any]
) -> APIRouter:
    refusals: dict[int | str, Any] = {
        400: {"model": PistonMessage, "description": "refused, in Piston's words"},
        415: {"model": PistonMessage, "description": "the body is not JSON"},
    }
    router = APIRouter(
        prefix="/api/v2",
        tags=["piston"],
        responses={code: errors[code] for code in (401, 403, 408, 413, 429, 503)},
    )

    @router.get("/runtimes", response_model=list[PistonRuntime], response_model_exclude_none=True)
    async def list_runtimes() -> list[dict[str, Any]]:
        """The languages, as Piston lists its runtimes."""
        return await piston_runtimes(answers)

    @router.post("/execute", responses=refusals)
    async def execute(request: Request) -> JSONResponse:
        """Run a program as Piston's POST /api/v2/execute does."""
        try:
            body = json.loads(await request.body())
        except ValueError:
            # Piston refuses a body not typed application/json; piston-client sends its
            # JSON as text/plain, so a body that is JSON is taken whatever its type.
            return JSONResponse({"message": "requests must be of type application/json"}, 415)
        try:
            params, runtime = execute_params(body, await piston_runtimes(answers))
            run = GatewayRun(request.state.request_id, params)
            record = await run.complete(client, request.receive)
        except PistonError as exc:
            return JSONResponse({"message": str(exc)}, 400)
        except LimitAboveMaximum as exc:
            field = next(f for f, (limit, _) in LIMIT_FIELDS.items() if limit == exc.data["limit"])
            factor = LIMIT_FIELDS[field][1]
            message = (
                f"{field} cannot exceed the configured limit of {exc.data['maximum'] * factor:g}"
            )
            return JSONResponse({"message": message}, 400)
        except (InvalidParams, UnsupportedLanguage) as exc:
            return JSONResponse({"message": exc.message}, 400)
        except SandboxError:
            raise  # the gateway's own error answers (no capacity: 503)
        metrics.executed(runtime["language"], record)
        result = ExecutionResult.from_dict(record)
        answer: dict[str, Any] = {"language": runtime["language"], "version": runtime["version"]}
        timings = result.timings
        if result.compile is not None:
            compiled = stage_record(
                result, result.compile, run.output("compile"), timings["compile"]
            )
            answer["compile"] = compiled
        # A job that ended in its compile has no run stage: Piston answers that as the run.
        if ended_in_compile(result):
            answer["run"] = answer["compile"]
        else:
            answer["run"] = stage_record(result, result, run.output("run"), timings["run"])
        return JSONResponse(answer)

    return router
