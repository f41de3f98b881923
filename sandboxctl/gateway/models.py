"""The HTTP bodies, as pydantic models: the handlers use them and /openapi.json is
generated from them, so the documentation cannot drift from what is served."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from sandboxd.limits import LIMIT_SPECS
from sandboxd.protocol import Status

# The contract's statuses, as plain strings in the schema. Built at run time from the
# enum, which a type checker cannot follow: it sees a str.
if TYPE_CHECKING:
    StatusName = str
else:
    StatusName = Literal[tuple(str(status) for status in Status)]
PositiveSeconds = Field(default=None, gt=0, description="seconds")
PositiveCount = Field(default=None, gt=0)


class FileInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="relative path in the working directory, plain names only")
    content: str
    encoding: Literal["utf-8", "base64"] = "utf-8"


# Per-run limits: the daemon's table of them, each an optional positive number.
_LIMIT_FIELD: dict[str, Any] = {
    "seconds": (float | None, PositiveSeconds),
    "bytes": (int | None, PositiveCount),
    "count": (int | None, PositiveCount),
}
_limits_model = create_model(
    "LimitsInput",
    __doc__="""Per-run limits, each at most the server's maximum (see GET /languages for none;
    the daemon's `status` lists defaults and maxima).""",
    __config__=ConfigDict(extra="forbid"),
    **{spec.name: _LIMIT_FIELD[spec.unit] for spec in LIMIT_SPECS},
)
if TYPE_CHECKING:  # a model built at run time: a type checker sees its base
    LimitsInput = BaseModel
else:
    LimitsInput = _limits_model


class ExecuteRequest(BaseModel):
    """The original service's request (language, code, timeout) and sandboxd's additions."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"language": "python", "code": "print(2 + 2)"},
                {"language": "typescript", "code": 'console.log("Hello TypeScript!")'},
                {
                    "language": "rust",
                    "code": 'fn main() { println!("Hello Rust!"); }',
                    "timeout": 10,
                },
                {
                    "language": "python",
                    "code": "import sys; print(sys.stdin.read(), sys.argv[1:])",
                    "stdin": "input",
                    "args": ["a", "b"],
                    "limits": {"memory_bytes": 268435456},
                },
            ]
        },
    )

    language: str = Field(description="python, typescript or rust (or py, ts, deno, rs)")
    code: str
    timeout: float | None = Field(
        default=None, description="wall-time limit in seconds; <= 0 means the default"
    )
    stdin: str | None = None
    args: list[str] | None = None
    files: list[FileInput] | None = None
    limits: LimitsInput | None = None
    network: bool | None = Field(
        default=None,
        description="egress to what the server's [network] allow lists (refused without)",
    )

    def params(self) -> dict[str, Any]:
        """The daemon's ``execute`` params for this request."""
        return self.model_dump(exclude_none=True)


class CompileRecord(BaseModel):
    exit_code: int | None
    signal: int | None
    stdout: str
    stderr: str
    truncated: dict[str, bool]
    time: float


class CellRecord(BaseModel):
    value: str | None = Field(description="repr of the cell's last expression (null: none)")
    fresh: bool = Field(description="it ran in a new interpreter")
    kept: bool = Field(description="the interpreter, and what the cell defined, is kept")


class ExecuteResponse(BaseModel):
    """The original's fields first (request_id, success, output, error, execution_time),
    then the full result record."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "request_id": "5f0c2c1e-8a4e-4a51-9a55-0b1e7f3f7a10",
                    "success": True,
                    "output": "4\n",
                    "error": None,
                    "execution_time": 0.031,
                    "status": "ok",
                    "message": "",
                    "exit_code": 0,
                    "signal": None,
                    "stdout": "4\n",
                    "stderr": "",
                    "truncated": {"stdout": False, "stderr": False},
                    "compile": None,
                    "timings": {"queue": 0.0002, "compile": 0.0, "run": 0.012, "total": 0.025},
                    "usage": {"cpu_time": 0.011, "memory_bytes": 9437184},
                    "sandbox_id": "2070668943a8",
                    "warm": True,
                }
            ]
        }
    )

    request_id: str
    success: bool
    output: str = Field(description="stdout and stderr as the program wrote them")
    error: str | None = Field(description="why it did not succeed; null on success")
    execution_time: float = Field(description="seconds, measured at the gateway")
    status: StatusName
    message: str
    exit_code: int | None
    signal: int | None
    stdout: str
    stderr: str
    truncated: dict[str, bool]
    compile: CompileRecord | None
    timings: dict[str, float]
    usage: dict[str, float]
    sandbox_id: str
    warm: bool = Field(description="the runtime was already started when the job came")
    cell: CellRecord | None = Field(default=None, description="a session's Python cell only")


class ErrorResponse(BaseModel):
    """Every error, in the shape the original service used for its 400 and 503."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "request_id": "5f0c2c1e-8a4e-4a51-9a55-0b1e7f3f7a10",
                    "success": False,
                    "error": "Unsupported language: go (known: python, typescript, rust)",
                    "execution_time": 0,
                }
            ]
        }
    )

    request_id: str
    success: Literal[False] = False
    error: str
    execution_time: float = 0


class PoolStats(BaseModel):
    size: int
    max: int
    ready: int
    busy: int = Field(description="running a job")
    sessions: int = Field(default=0, description="held by sessions")
    starting: int
    waiting: int
    ready_by_kind: dict[str, int] = Field(
        description="ready sandboxes by the runtime they hold started ('plain': none)"
    )
    ready_memory_bytes: int = Field(description="host memory the ready sandboxes hold")
    last_error: str


class HealthResponse(BaseModel):
    """The original's {"status", "time"} plus the backend, pool and version."""

    status: Literal["healthy", "unhealthy"]
    time: int = Field(description="unix seconds")
    backend: str | None = None
    version: str | None = None
    pool: PoolStats | None = None
    reason: str | None = Field(default=None, description="why it is unhealthy")


class ReadyResponse(BaseModel):
    """Whether this node takes new work now, and how much, for a load balancer."""

    ready: bool
    ready_sandboxes: int = Field(default=0, description="started and waiting for a job")
    free_slots: int = Field(
        default=0, description="jobs it could run at once beside those it runs (max less busy)"
    )
    reason: str | None = Field(default=None, description="why it is not ready")


class LanguageDetail(BaseModel):
    name: str
    version: str
    extension: str
    compiled: bool
    aliases: list[str]


class LanguagesResponse(BaseModel):
    languages: list[str] = Field(description="the original's list of names")
    details: list[LanguageDetail]


class SessionCreateRequest(BaseModel):
    """A session: one sandbox kept across calls. Its memory, processes, file size and
    network are set here for its whole life; each exec has its own time limits."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"language": "python", "ttl": 600, "idle_timeout": 120}]},
    )

    language: str | None = Field(default=None, description="its execs' default (python)")
    timeout: float | None = Field(default=None, description="each exec's default wall time")
    limits: LimitsInput | None = None
    ttl: float | None = Field(default=None, gt=0, description="seconds it may live at most")
    idle_timeout: float | None = Field(
        default=None, gt=0, description="seconds without a call after which it ends"
    )
    network: bool | None = None

    def params(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class SessionExecRequest(BaseModel):
    """A program (or, with ``cell``, a Python cell of the session's interpreter)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"code": "x = 41"}, {"code": "x + 1", "cell": True}]},
    )

    code: str
    language: str | None = None
    timeout: float | None = None
    stdin: str | None = None
    args: list[str] | None = None
    files: list[FileInput] | None = None
    limits: LimitsInput | None = None
    cell: bool | None = Field(
        default=None, description="run in the session's Python interpreter, kept between cells"
    )

    def params(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class SessionInfo(BaseModel):
    id: str
    language: str
    state: Literal["idle", "busy", "ended"]
    ended: str | None = Field(description="why it ended")
    created: float = Field(description="unix seconds")
    expires: float = Field(description="unix seconds: its time to live is up")
    idle_timeout: float
    execs: int
    network: bool
    limits: dict[str, float]
    sandbox_id: str


class SessionList(BaseModel):
    sessions: list[SessionInfo] = Field(description="open ones, then the last that ended")


class FileEntry(BaseModel):
    name: str
    type: Literal["file", "directory", "link", "other"]
    size: int


class FileListing(BaseModel):
    path: str
    entries: list[FileEntry]
    truncated: bool


class FileWritten(BaseModel):
    path: str
    size: int
