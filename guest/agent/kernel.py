"""The kernel of a session's Python cells: this runs in the session's own interpreter (a
``python3`` the agent starts as the program's uid, under its limits), not in the agent.

It reads one cell per line from the agent, runs it in one ``__main__`` namespace kept from
cell to cell, and answers with how it ended (and the repr of a last expression) once
its output is flushed. Errors print as Python prints them, from the cell's own frames.
``sys.exit`` in a cell ends the interpreter with that status, as in a program; its state
is then lost, and the session's next cell starts a new one.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import types
    from typing import Any


def run_cell(namespace: types.ModuleType, source: str, stdin: str, name: str) -> dict[str, Any]:
    """Run one cell; its reply (``ok``, the ``value`` of a last expression, or the
    ``error``'s type)."""
    import ast
    import io
    import linecache
    import traceback

    linecache.cache[name] = (len(source), None, source.splitlines(True), name)  # tracebacks
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin.encode()), encoding="utf-8")
    try:
        tree = ast.parse(source, name)
    except SyntaxError as exc:
        traceback.print_exception(type(exc), exc, None)  # as Python shows it: no frames
        return {"ok": False, "error": type(exc).__name__}
    last = tree.body[-1] if tree.body else None
    if isinstance(last, ast.Expr):  # its value is the cell's, as in a notebook
        tree.body.pop()
    else:
        last = None
    scope = namespace.__dict__
    try:
        exec(compile(tree, name, "exec"), scope)
        value = None
        if last is not None:
            result = eval(compile(ast.Expression(last.value), name, "eval"), scope)
            if result is not None:
                value = repr(result)
    except SystemExit:
        raise
    except BaseException as exc:
        # From the cell's frames on: this function's own is not the program's.
        frames = exc.__traceback__.tb_next if exc.__traceback__ else None
        traceback.print_exception(type(exc), exc, frames)
        return {"ok": False, "error": type(exc).__name__}
    return {"ok": True, "value": value}


def main(cells_fd: int, replies_fd: int) -> None:
    import builtins
    import json
    import types

    del sys.path[0]  # the agent's bundle: a cell sees the path of a plain python3 -c
    for module in [name for name in sys.modules if name.partition(".")[0] == "agent"]:
        del sys.modules[module]
    namespace = types.ModuleType("__main__")
    namespace.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = namespace
    replies = os.fdopen(replies_fd, "wb", buffering=0)
    with os.fdopen(cells_fd, "rb") as cells:
        for count, line in enumerate(cells, 1):
            cell = json.loads(line)
            reply = run_cell(namespace, cell["code"], cell["stdin"], f"<cell {count}>")
            sys.stdout.flush()
            sys.stderr.flush()
            replies.write(json.dumps(reply).encode() + b"\n")
