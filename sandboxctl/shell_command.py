"""``sandboxctl shell``: Python at a prompt, each input a cell of a session's interpreter.

Lines are read as Python's own prompt reads them (a block continues until it is
complete), sent as one cell, and answered with the cell's output and the value of its
last expression. Ctrl-D ends it; the session it opened is closed then.
"""

from __future__ import annotations

import codeop
from collections.abc import Callable

import click

from sandboxctl.app import App
from sandboxctl.client import Session
from sandboxctl.exec_command import limit_option, parse_limits, stream_to_terminal
from sandboxd.protocol import Status


def read_cell(read: Callable[[str], str] = input) -> str | None:
    """The next complete input (a statement, or a block ended by an empty line), None at
    the end of input. What does not compile is sent as it is: the cell reports it."""
    lines: list[str] = []
    while True:
        try:
            line = read(">>> " if not lines else "... ")
        except EOFError:
            return "\n".join(lines) if lines else None
        except KeyboardInterrupt:
            click.echo("\nKeyboardInterrupt", err=True)
            lines = []
            continue
        if not lines and not line.strip():
            continue
        lines.append(line)
        source = "\n".join(lines)
        try:
            if codeop.compile_command(source, "<stdin>", "single") is None:
                continue  # more to come
        except (SyntaxError, OverflowError, ValueError):
            pass
        return source


@click.command("shell")
@click.option("--session", "session_id", help="Use this open session (left open at the end).")
@limit_option
@click.pass_obj
def shell(app: App, session_id: str | None, limits: tuple[str, ...]) -> None:
    """Python at a prompt, in a session whose interpreter keeps what each input defines."""
    if session_id is None:
        session = app.client.session("python", limits=parse_limits(limits))
        click.echo(f"session {session.id}: Ctrl-D ends it", err=True)
    else:
        session = Session(app.client, {"id": session_id})
    try:
        while (source := read_cell()) is not None:
            result = session.exec(source, cell=True, on_output=stream_to_terminal)
            if result.cell is not None and result.cell.value is not None:
                click.echo(result.cell.value)
            if result.status not in (Status.OK, Status.RUNTIME_ERROR):
                click.echo(f"sandboxctl: {result.status}: {result.message}", err=True)
            if result.cell is not None and not result.cell.kept:
                click.echo("(the interpreter ended: the next input starts a new one)", err=True)
    finally:
        if session_id is None:
            session.close()
