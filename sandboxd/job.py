"""One job as the daemon accepts it: checked at the edge, then turned into the agent's
``job`` message.

The same fields serve the JSON-RPC ``execute`` method and the HTTP gateway: ``language``,
``code``, ``stdin``, ``args``, ``files``, ``timeout`` and ``limits``. Every way a field
can be wrong raises :class:`InvalidParams` naming the field and the reason.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sandboxd.errors import InvalidParams
from sandboxd.languages import Language, LanguageTable
from sandboxd.limits import LimitBounds, Limits, check_limits, resolve_limits
from sandboxd.protocol import EXECUTE_FIELDS

MAX_ARGS = 256
# What the kernel lets exec take: one argument under 128 KiB, and all of them (with the
# environment) a quarter of the stack limit; well below, so that exec never refuses.
MAX_ARG_BYTES = 128 * 1024 - 1
MAX_ARGS_BYTES = 1024 * 1024
MAX_FILES = 100
MAX_PATH = 255


@dataclass(frozen=True)
class JobFile:
    path: str
    content: bytes


@dataclass(frozen=True)
class Job:
    language: Language
    code: str
    stdin: str
    args: tuple[str, ...]
    files: tuple[JobFile, ...]
    limits: Limits
    interactive: bool  # stdin stays open for what the client streams (execute.stdin)
    network: bool  # egress to what the server's [network] allow lists
    compile_file_size_bytes: int  # the compiler's own files may be as large as the maximum
    cell: bool = False  # a session's Python cell: run in its interpreter kept alive

    def agent_message(self) -> dict[str, Any]:
        """The ``job`` message of the agent protocol (see guest/agent/): a warm
        runtime (:func:`warm_runtime`) takes it if it runs the same command."""
        files = (
            []
            if self.cell
            else [{"path": self.language.source_file, "content": self.code, "encoding": "utf-8"}]
        )
        files += [
            {"path": f.path, "content": base64.b64encode(f.content).decode(), "encoding": "base64"}
            for f in self.files
        ]
        compile_step = (
            {"argv": list(self.language.compile), "file_size_bytes": self.compile_file_size_bytes}
            if self.language.compile
            else None
        )
        return {
            "type": "job",
            "files": files,
            "compile": compile_step,
            "run": {
                "argv": [*self.language.run, *self.args],
                **({"cell": self.code} if self.cell else {}),
            },
            "env": dict(self.language.env),
            "stdin": self.stdin,
            "stdin_stream": self.interactive,
            "network": self.network,
            "limits": self.limits.to_dict(),
        }


def warm_runtime(language: Language) -> dict[str, Any] | None:
    """The ``warm`` of the agent's sync for a sandbox kept ready for ``language``: its
    run command as a job without arguments runs it; None if it does not warm."""
    if not language.warm:
        return None
    return {"argv": list(language.run), "env": dict(language.env), "source": language.source_file}


def warm_runtimes(languages: LanguageTable) -> dict[str, dict[str, Any]]:
    """Language name → its warm runtime, for the languages offered that warm."""
    runtimes = {name: warm_runtime(languages.resolve(name)) for name in languages.names()}
    return {name: runtime for name, runtime in runtimes.items() if runtime is not None}


def unicode_text(value: Any, where: str, expected: str = "expected a string") -> str:
    """``value`` if it is a string that UTF-8 can carry (JSON can hold lone surrogates,
    which no program could be given); InvalidParams otherwise."""
    if not isinstance(value, str):
        raise InvalidParams.field(where, expected)
    try:
        value.encode()
    except UnicodeEncodeError:
        raise InvalidParams.field(where, "is not valid Unicode (a lone surrogate)") from None
    return value


def _text(params: Mapping[str, Any], name: str, *, required: bool) -> str:
    value = params.get(name)
    if value is None:
        if required:
            raise InvalidParams.field(name, "is required")
        return ""
    return unicode_text(value, name)


def flag(params: Mapping[str, Any], name: str, default: bool = False) -> bool:
    value = params.get(name)
    if value is None:  # as for every optional field: null is the same as leaving it out
        return default
    if not isinstance(value, bool):
        raise InvalidParams.field(name, "expected true or false")
    return value


def _args(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_ARGS:
        raise InvalidParams.field("args", f"expected a list of at most {MAX_ARGS} strings")
    total = 0
    for index, arg in enumerate(value):
        if "\0" in unicode_text(arg, f"args[{index}]"):
            raise InvalidParams.field(f"args[{index}]", "expected a string without NUL bytes")
        size = len(arg.encode())
        if size > MAX_ARG_BYTES:
            raise InvalidParams.field(f"args[{index}]", f"longer than {MAX_ARG_BYTES} bytes")
        total += size + 1
    if total > MAX_ARGS_BYTES:
        raise InvalidParams.field("args", f"more than {MAX_ARGS_BYTES} bytes in all")
    return tuple(value)


def check_path(path: Any, where: str) -> str:
    """A file path confined to the working directory: relative, plain names only."""
    if not unicode_text(path, where, "expected a non-empty relative path"):
        raise InvalidParams.field(where, "expected a non-empty relative path")
    if path.startswith("/"):
        raise InvalidParams.field(where, "absolute paths are not allowed")
    if "\0" in path or len(path) > 1024:
        raise InvalidParams.field(where, "must be at most 1024 characters without NUL bytes")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise InvalidParams.field(
                where, f"{part or 'an empty'!r} path component is not allowed"
            )
        if len(part.encode()) > MAX_PATH:
            raise InvalidParams.field(where, f"a path component is longer than {MAX_PATH} bytes")
    return path


def _files(value: Any) -> tuple[JobFile, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_FILES:
        raise InvalidParams.field("files", f"expected a list of at most {MAX_FILES} files")
    files: list[JobFile] = []
    taken: set[str] = set()
    for index, entry in enumerate(value):
        where = f"files[{index}]"
        if not isinstance(entry, dict) or not {"path", "content"} <= entry.keys():
            raise InvalidParams.field(where, "expected an object with path and content")
        extra = set(entry) - {"path", "content", "encoding"}
        if extra:
            raise InvalidParams.field(f"{where}.{sorted(extra)[0]}", "unknown field")
        path = check_path(entry["path"], f"{where}.path")
        if _clashes(path, taken):
            raise InvalidParams.field(f"{where}.path", f"{path!r} clashes with another file")
        taken.add(path)
        files.append(JobFile(path, decode_content(entry, f"{where}.")))
    return tuple(files)


def _clashes(path: str, taken: set[str]) -> bool:
    """Whether ``path`` is one of ``taken``, or a directory of one, or inside one."""
    prefixes = {"/".join(path.split("/")[:n]) for n in range(1, path.count("/") + 1)}
    return path in taken or bool(prefixes & taken) or any(t.startswith(path + "/") for t in taken)


def decode_content(entry: Mapping[str, Any], where: str) -> bytes:
    """The bytes of a file's ``content`` in its ``encoding`` (utf-8 or base64); ``where``
    prefixes the field names an error gives."""
    encoding = entry.get("encoding", "utf-8")
    content = unicode_text(entry.get("content"), f"{where}content")
    if encoding == "utf-8":
        return content.encode()
    if encoding == "base64":
        try:
            return base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidParams.field(f"{where}content", "is not valid base64") from None
    raise InvalidParams.field(f"{where}encoding", "expected 'utf-8' or 'base64'")


@dataclass(frozen=True)
class CheckedParams:
    """``execute``'s params, each of the right kind (what check_params returns)."""

    language: str
    code: str
    stdin: str
    args: tuple[str, ...]
    files: tuple[JobFile, ...]
    interactive: bool
    network: bool
    cell: bool


def only_fields(params: Any, fields: tuple[str, ...]) -> dict[str, Any]:
    """``params`` if it is an object of no other fields than ``fields``; InvalidParams
    naming the first unknown one otherwise."""
    if not isinstance(params, dict):
        raise InvalidParams.field("params", "expected an object")
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise InvalidParams.field(unknown[0], f"unknown field (known: {', '.join(fields)})")
    return params


def check_params(params: Any, fields: tuple[str, ...] = EXECUTE_FIELDS) -> CheckedParams:
    """Every check of ``execute``'s params that needs neither the languages nor the
    server's limits; InvalidParams naming the field and why. The HTTP gateway runs it
    too, with its own ``fields``, so both edges refuse an input in the same words."""
    params = only_fields(params, fields)
    checked = CheckedParams(
        language=_text(params, "language", required=True),
        code=_text(params, "code", required=True),
        stdin=_text(params, "stdin", required=False),
        args=_args(params.get("args")),
        files=_files(params.get("files")),
        interactive=flag(params, "interactive"),
        network=flag(params, "network"),
        cell=flag(params, "cell"),
    )
    if checked.cell and (checked.args or checked.interactive):
        raise InvalidParams.field("cell", "a cell takes no args and no interactive stdin")
    check_limits(params.get("limits"), params.get("timeout"))
    return checked


def parse_job(
    params: Mapping[str, Any],
    languages: LanguageTable,
    bounds: Mapping[str, LimitBounds],
    fields: tuple[str, ...] = EXECUTE_FIELDS,
) -> Job:
    """Check an ``execute`` request's params (of ``fields``) and build its Job.

    Raises InvalidParams, UnsupportedLanguage or LimitAboveMaximum.
    """
    checked = check_params(params, fields)
    language = languages.resolve(checked.language)
    if checked.cell and not language.cells:
        raise InvalidParams.field("cell", f"{language.name} has no cells (python has)")
    for index, file in enumerate(checked.files):  # none may replace the program itself
        if _clashes(file.path, {language.source_file}):
            raise InvalidParams.field(
                f"files[{index}].path", f"{file.path!r} clashes with another file"
            )
    return Job(
        language=language,
        code=checked.code,
        stdin=checked.stdin,
        args=checked.args,
        files=checked.files,
        limits=resolve_limits(params.get("limits"), params.get("timeout"), bounds),
        interactive=checked.interactive,
        network=checked.network,
        compile_file_size_bytes=int(bounds["file_size_bytes"].maximum),
        cell=checked.cell,
    )
