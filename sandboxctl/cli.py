"""``sandboxctl``: the unprivileged command line of sandboxd.

The root group puts an :class:`App` (the client and output settings) in ``ctx.obj``;
commands are thin. Every failure of sandboxctl itself is one ``Error: ...`` line on
stderr (the traceback only with ``--debug``) and an exit code a program rarely picks:
125 when the service failed or cannot be reached, 2 when the request was wrong.
"""

from __future__ import annotations

import importlib
import json
import sys
from typing import Any

import click

from sandboxctl.app import EXIT_SERVICE, EXIT_USAGE, App, socket_option
from sandboxctl.client import Client
from sandboxd import __version__
from sandboxd.errors import RequestError, SandboxError

# The commands that have modules of their own, loaded only when they run (or --help
# lists them): each start of sandboxctl pays for the command it runs, not the others.
COMMAND_MODULES = {
    "exec": ("sandboxctl.exec_command", "exec_command"),
    "session": ("sandboxctl.session_command", "session_group"),
    "shell": ("sandboxctl.shell_command", "shell"),
}


class _Group(click.Group):
    """Turns SandboxError into one line and an exit code, in this one place; finds the
    commands of COMMAND_MODULES."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *COMMAND_MODULES])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMAND_MODULES:
            return super().get_command(ctx, cmd_name)
        module, name = COMMAND_MODULES[cmd_name]
        command: click.Command = getattr(importlib.import_module(module), name)
        return command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SandboxError as exc:
            if ctx.obj is not None and ctx.obj.debug:
                raise
            click.echo(f"Error: {exc.message}", err=True)
            sys.exit(EXIT_USAGE if isinstance(exc, RequestError) else EXIT_SERVICE)


@click.group(cls=_Group)
@socket_option
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.version_option(__version__, prog_name="sandboxctl")
@click.pass_context
def main(ctx: click.Context, socket_path: str | None, debug: bool) -> None:
    """Run code in sandboxd's throw-away sandboxes and look at the service."""
    ctx.obj = App(Client(socket_path), debug)


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the full answer as JSON.")
@click.pass_obj
def health(app: App, as_json: bool) -> None:
    """Is the service up and able to run code? Exit code 1 if not."""
    answer = app.client.health()
    if as_json:
        _print_json(answer)
    else:
        pool = answer.get("pool", {})
        click.echo(
            f"{answer['status']}: backend {answer.get('backend')}, "
            f"{pool.get('ready', 0)} ready, {pool.get('busy', 0)} busy"
            + (f" ({answer['reason']})" if answer.get("reason") else "")
        )
    if answer.get("status") != "healthy":
        sys.exit(1)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the full answer as JSON.")
@click.pass_obj
def languages(app: App, as_json: bool) -> None:
    """The languages the service runs, with versions."""
    answer = app.client.languages()
    if as_json:
        _print_json(answer)
        return
    for entry in answer.get("details", []):
        kind = "compiled" if entry.get("compiled") else "interpreted"
        aliases = ", ".join(entry.get("aliases", []))
        click.echo(
            f"{entry['name']:<12} {entry['version']:<10} {entry['extension']:<5} "
            f"{kind:<12} aliases: {aliases}"
        )


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the full answer as JSON.")
@click.pass_obj
def status(app: App, as_json: bool) -> None:
    """Backend (and why it was chosen), pool, image and limits."""
    answer = app.client.status()
    if as_json:
        _print_json(answer)
        return
    backend, pool, image = answer["backend"], answer["pool"], answer["image"]
    click.echo(f"sandboxd {answer['version']}, up {answer['uptime']:.0f} s")
    click.echo(f"backend:  {backend['name']} — {backend['isolation']}")
    click.echo(f"          {backend['reason']}")
    # What the VM backends add, and how the namespaces backend runs warm jobs.
    for detail in ("kernel", "channel", "snapshot", "host", "cgroups", "warm_jobs"):
        if backend.get(detail):
            click.echo(f"          {detail}: {backend[detail]}")
    click.echo(
        f"pool:     {pool['ready']} ready, {pool['busy']} busy, {pool['starting']} starting, "
        f"{pool['waiting']} waiting (size {pool['size']}, max {pool['max']})"
    )
    if pool.get("last_error"):
        click.echo(f"          last launch error: {pool['last_error']}")
    langs = ", ".join(f"{k} {v}" for k, v in image["languages"].items())
    click.echo(f"image:    {image['id']} ({langs})")
