"""The result record of one execution: what happened, the output, timings and usage.

The agent fills in what it saw inside the sandbox; the daemon adds what only the host
knows (queue time, an OOM kill seen by the sandbox's cgroup, a sandbox that died or had
to be killed from outside). Clients rebuild it with :meth:`ExecutionResult.from_dict`.
The record is documented field by field in ``docs/api.md``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from sandboxd.protocol import STREAMS, Status


@dataclass
class CompileResult:
    """The compile stage of a compiled language."""

    exit_code: int | None = None
    signal: int | None = None
    stdout: str = ""
    stderr: str = ""
    truncated: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(STREAMS, False))
    time: float = 0.0


@dataclass
class CellResult:
    """A session's Python cell (``"cell": true``): its interpreter and last value."""

    value: str | None = None  # repr of the cell's last expression, if it had one (not None)
    fresh: bool = False  # it ran in a new interpreter (the first cell, or after one ended)
    kept: bool = False  # the interpreter, and what the cell defined, is there for the next


@dataclass
class ExecutionResult:
    status: Status
    message: str = ""
    exit_code: int | None = None
    signal: int | None = None
    stdout: str = ""
    stderr: str = ""
    truncated: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(STREAMS, False))
    compile: CompileResult | None = None
    timings: dict[str, float] = field(
        default_factory=lambda: {"queue": 0.0, "compile": 0.0, "run": 0.0, "total": 0.0}
    )
    usage: dict[str, float] = field(default_factory=lambda: {"cpu_time": 0.0, "memory_bytes": 0})
    sandbox_id: str = ""
    warm: bool = False  # the runtime was already started, waiting, when the job came
    cell: CellResult | None = None

    @property
    def ok(self) -> bool:
        return self.status is Status.OK

    def to_dict(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        record["status"] = str(self.status)
        return record

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> ExecutionResult:
        """Rebuild a record, ignoring keys a newer daemon may have added."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in record.items() if key in names}
        try:
            values["status"] = Status(str(record.get("status")))
        except ValueError:
            values["status"] = Status.INTERNAL_ERROR
        for name, part in (("compile", CompileResult), ("cell", CellResult)):
            if isinstance(record.get(name), dict):
                names = {f.name for f in dataclasses.fields(part)}
                values[name] = part(**{k: v for k, v in record[name].items() if k in names})
        return cls(**values)
