"""``sandboxctl session``: a sandbox kept across commands, with files in and out.

id=$(sandboxctl session create -l python)
sandboxctl session put "$id" data.csv
sandboxctl session exec "$id" -c 'print(open("data.csv").read())'
sandboxctl session get "$id" out.png > out.png
sandboxctl session close "$id"
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import IO, Any

import click

from sandboxctl.app import App
from sandboxctl.client import Session
from sandboxctl.exec_command import (
    finish,
    limit_option,
    parse_limits,
    program_of,
    read_files,
    stream_to_terminal,
)
from sandboxd.protocol import Method


def _session(app: App, session_id: str) -> Session:
    return Session(app.client, {"id": session_id})


@click.group("session")
def session_group() -> None:
    """Sessions: a sandbox that keeps its files between commands (see docs/api.md)."""


@session_group.command("create")
@click.option("-l", "--language", default="python", show_default=True)
@click.option("--ttl", type=float, help="Seconds the session may live at most.")
@click.option("--idle-timeout", type=float, help="Seconds without a command before it ends.")
@limit_option
@click.option("--network", is_flag=True, help="Egress to what the server allows.")
@click.option("--json", "as_json", is_flag=True, help="Print the session's info as JSON.")
@click.pass_obj
def create(
    app: App,
    language: str,
    ttl: float | None,
    idle_timeout: float | None,
    limits: tuple[str, ...],
    network: bool,
    as_json: bool,
) -> None:
    """Open a session and print its id."""
    session = app.client.session(
        language,
        ttl=ttl,
        idle_timeout=idle_timeout,
        limits=parse_limits(limits),
        network=network or None,
    )
    click.echo(json.dumps(session.info, indent=2) if as_json else session.id)


@session_group.command("exec")
@click.argument("session_id")
@click.option("-c", "--code", help="The program's source code.")
@click.argument("source", type=click.File("r"), required=False)
@click.option("-l", "--language", help="Another language than the session's.")
@click.option("--stdin", "stdin_text", help="Text the program reads on its stdin.")
@click.option("-a", "--arg", "args", multiple=True, help="An argument (repeatable).")
@click.option(
    "-f", "--file", "files", multiple=True, metavar="LOCAL[:PATH]", help="Put a file first."
)
@click.option("-t", "--timeout", type=float, help="Wall-time limit in seconds.")
@limit_option
@click.option(
    "--cell", is_flag=True, help="Run it as a Python cell: what it defines stays for the next."
)
@click.option("--json", "as_json", is_flag=True, help="Print the full result record as JSON.")
@click.pass_obj
def exec_in_session(
    app: App,
    session_id: str,
    code: str | None,
    source: IO[str] | None,
    language: str | None,
    stdin_text: str | None,
    args: tuple[str, ...],
    files: tuple[str, ...],
    timeout: float | None,
    limits: tuple[str, ...],
    cell: bool,
    as_json: bool,
) -> None:
    """Run a program (-c CODE, a SOURCE file, or -) in the session; exits as
    ``sandboxctl exec`` does. A cell's last expression's value is printed after it."""
    result = _session(app, session_id).exec(
        program_of(code, source),
        language=language,
        stdin=stdin_text,
        args=list(args) or None,
        files=read_files(files),
        timeout=timeout,
        limits=parse_limits(limits),
        cell=cell or None,
        on_output=None if as_json else stream_to_terminal,
    )
    if result.cell is not None and result.cell.value is not None and not as_json:
        click.echo(result.cell.value)
    finish(result, as_json)


@session_group.command("put")
@click.argument("session_id")
@click.argument("local", type=click.Path(dir_okay=False, allow_dash=True))
@click.argument("path", required=False)
@click.pass_obj
def put(app: App, session_id: str, local: str, path: str | None) -> None:
    """Copy a LOCAL file (- for stdin) into the session, as PATH (its name by default)."""
    if local == "-":
        if path is None:
            raise click.UsageError("give the PATH to write stdin to")
        content = sys.stdin.buffer.read()
    else:
        try:
            content = Path(local).read_bytes()
        except OSError as exc:
            raise click.BadParameter(f"{local}: {exc.strerror}", param_hint="LOCAL") from None
    _session(app, session_id).write_file(path or Path(local).name, content)


@session_group.command("get")
@click.argument("session_id")
@click.argument("path")
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False), help="Write it here, not to stdout."
)
@click.pass_obj
def get(app: App, session_id: str, path: str, output: str | None) -> None:
    """Copy the file PATH out of the session, byte for byte."""
    content = _session(app, session_id).read_file(path)
    if output is None:
        sys.stdout.buffer.write(content)
        sys.stdout.flush()
    else:
        Path(output).write_bytes(content)


@session_group.command("rm")
@click.argument("session_id")
@click.argument("path")
@click.pass_obj
def remove(app: App, session_id: str, path: str) -> None:
    """Remove a file or a directory tree from the session."""
    _session(app, session_id).remove_file(path)


@session_group.command("ls")
@click.argument("session_id", required=False)
@click.argument("path", default=".")
@click.option("--json", "as_json", is_flag=True, help="Print the answer as JSON.")
@click.pass_obj
def list_command(app: App, session_id: str | None, path: str, as_json: bool) -> None:
    """Your sessions; or, given a SESSION_ID, the files at PATH in it."""
    listing: list[dict[str, Any]]
    if session_id is None:
        listing = app.client.sessions()
        rows = [_session_row(entry) for entry in listing]
    else:
        listing = _session(app, session_id).list_files(path)
        rows = [f"{e['type']:<9} {e['size']:>10}  {e['name']}" for e in listing]
    click.echo(json.dumps(listing, indent=2) if as_json else "\n".join(rows))


def _session_row(entry: dict[str, Any]) -> str:
    state = f"ended: {entry['ended']}" if entry.get("ended") else entry["state"]
    left = max(0, entry["expires"] - time.time())
    expires = "" if entry.get("ended") else f", expires in {left:.0f} s"
    return f"{entry['id']}  {entry['language']:<10} {entry['execs']} execs{expires}  {state}"


@session_group.command("close")
@click.argument("session_id")
@click.pass_obj
def close(app: App, session_id: str) -> None:
    """End the session: its sandbox, processes and files are gone."""
    app.client.call(Method.SESSION_CLOSE, {"id": session_id})  # an error if it is not open
