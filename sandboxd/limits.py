"""The limits every run has, their units, and how a request's wishes are checked.

The server holds a default and a maximum for each limit (see :mod:`sandboxd.config`); a
request may ask for any value up to the maximum. The original service's ``timeout`` field
(seconds, ``<= 0`` meaning "the default") keeps working as the wall-time limit.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sandboxd.errors import InvalidParams, LimitAboveMaximum

MiB = 1024 * 1024


@dataclass(frozen=True)
class LimitSpec:
    """One kind of limit: its name on the wire, its unit and the server's built-in bounds."""

    name: str
    unit: str  # "seconds" (a positive number) or "bytes" / "count" (a positive integer)
    default: float
    maximum: float
    help: str
    minimum: float = 0  # exclusive when 0: any positive amount

    def check(self, value: Any, where: str) -> float:
        """Return ``value`` if it is a valid amount of this limit, else raise InvalidParams."""
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise InvalidParams.field(where, f"expected a number of {self.unit}")
        if self.unit != "seconds" and not float(value).is_integer():
            raise InvalidParams.field(where, f"expected a whole number of {self.unit}")
        if value <= 0:
            raise InvalidParams.field(where, "must be greater than 0")
        if value < self.minimum:
            raise InvalidParams.field(where, f"must be at least {self.format(self.minimum)}")
        return int(value) if self.unit != "seconds" else float(value)

    def format(self, value: float) -> str:
        amount = f"{value:g}" if self.unit == "seconds" else str(int(value))
        return f"{amount} {self.unit}"


LIMIT_SPECS: tuple[LimitSpec, ...] = (
    LimitSpec("wall_time", "seconds", 30, 300, "wall-clock time of the program's run"),
    LimitSpec("cpu_time", "seconds", 30, 300, "CPU time of the run, all its processes"),
    LimitSpec("compile_time", "seconds", 30, 120, "wall-clock and CPU time of the compile"),
    # Below this the sandbox's own agent would not fit.
    LimitSpec(
        "memory_bytes",
        "bytes",
        512 * MiB,
        4096 * MiB,
        "memory of the whole sandbox",
        minimum=32 * MiB,
    ),
    LimitSpec("processes", "count", 64, 1024, "processes and threads at once"),
    LimitSpec("output_bytes", "bytes", 1 * MiB, 16 * MiB, "captured bytes per output stream"),
    LimitSpec("file_size_bytes", "bytes", 64 * MiB, 1024 * MiB, "size of any file written"),
)
SPECS_BY_NAME: dict[str, LimitSpec] = {spec.name: spec for spec in LIMIT_SPECS}


@dataclass(frozen=True)
class LimitBounds:
    """The server's configured default and maximum for one limit."""

    default: float
    maximum: float


@dataclass(frozen=True)
class Limits:
    """The limits one run gets, all resolved."""

    wall_time: float
    cpu_time: float
    compile_time: float
    memory_bytes: int
    processes: int
    output_bytes: int
    file_size_bytes: int

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def default_bounds() -> dict[str, LimitBounds]:
    return {spec.name: LimitBounds(spec.default, spec.maximum) for spec in LIMIT_SPECS}


def _where(name: str, timeout: Any) -> str:
    return "timeout" if name == "wall_time" and timeout is not None else f"limits.{name}"


def check_limits(requested: Any, timeout: Any) -> dict[str, float]:
    """The limits a request's ``limits`` object and ``timeout`` ask for, each checked
    against its kind (not yet against the server's maximum): InvalidParams if one is
    malformed or unknown."""
    if requested is None:
        requested = {}
    if not isinstance(requested, dict):
        raise InvalidParams.field("limits", "expected an object of limit name to value")
    unknown = sorted(set(requested) - SPECS_BY_NAME.keys())
    if unknown:
        known = ", ".join(SPECS_BY_NAME)
        raise InvalidParams.field(f"limits.{unknown[0]}", f"unknown limit (known: {known})")
    wanted = {name: value for name, value in requested.items() if value is not None}
    if timeout is not None:
        if "wall_time" in wanted:
            raise InvalidParams.field("timeout", "give either timeout or limits.wall_time")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or math.isnan(timeout):
            raise InvalidParams.field("timeout", "expected a number of seconds")
        if timeout > 0:  # the original service read <= 0 as "use the default"
            wanted["wall_time"] = timeout
    return {
        name: SPECS_BY_NAME[name].check(value, _where(name, timeout))
        for name, value in wanted.items()
    }


def resolve_limits(requested: Any, timeout: Any, bounds: Mapping[str, LimitBounds]) -> Limits:
    """Turn a request's ``limits`` object and ``timeout`` into the limits of its run.

    Raises InvalidParams for a malformed or unknown limit and LimitAboveMaximum for a
    value above the server's maximum.
    """
    wanted = check_limits(requested, timeout)
    values: dict[str, float] = {}
    for spec in LIMIT_SPECS:
        bound = bounds[spec.name]
        value = wanted.get(spec.name, bound.default)
        if value > bound.maximum:
            where = _where(spec.name, timeout)
            raise LimitAboveMaximum(
                f"{where} of {spec.format(value)} is above the server's maximum of "
                f"{spec.format(bound.maximum)}",
                limit=spec.name,
                requested=value,
                maximum=bound.maximum,
            )
        values[spec.name] = value
    return Limits(**values)  # type: ignore[arg-type]  # the table's units type each field
