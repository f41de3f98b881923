"""The ``sandboxd`` command: run the daemon, build and manage images.

Errors end as one ``Error: ...`` line on stderr (a traceback only with ``--debug``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import trio

from sandboxd import __version__
from sandboxd.config import BACKEND_NAMES, Config, load_config
from sandboxd.errors import ConfigError, SandboxError
from sandboxd.images import ImageStore

F = TypeVar("F", bound=Callable[..., Any])


def _config_options(function: F) -> F:
    function = click.option(
        "--config",
        "config_file",
        type=click.Path(path_type=Path),
        help="Config file [env: SANDBOXD_CONFIG; default: /etc/sandboxd/sandboxd.toml]",
    )(function)
    return click.option("--debug", is_flag=True, help="Debug logging and full tracebacks.")(
        function
    )


def _load(config_file: Path | None, **overrides: tuple[Any, str]) -> Config:
    return load_config(config_file, overrides=overrides)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _need_root(command: str, why: str) -> None:
    if os.geteuid() != 0:
        raise ConfigError(f"{command} needs root: {why} (use sudo)")


class _Fail:
    """Turn a SandboxError into one line and exit code 1 (the traceback only on --debug)."""

    def __init__(self, debug: bool) -> None:
        self.debug = debug

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, SandboxError) and not self.debug:
            detail = exc.data.get("log_tail") if isinstance(exc.data, dict) else None
            click.echo(f"Error: {exc.message}", err=True)
            if detail:
                click.echo(detail, err=True)
            sys.exit(1)


@click.group()
@click.version_option(__version__, prog_name="sandboxd")
def main() -> None:
    """sandboxd: run untrusted code in throw-away sandboxes."""


@main.command()
@_config_options
@click.option("--socket", "socket_path", help="Socket to serve [env: SANDBOXD_SOCKET]")
@click.option("--backend", type=click.Choice(BACKEND_NAMES), help="Backend [env: SANDBOXD_BACKEND]")
@click.option("--pool-size", type=int, help="Ready sandboxes to keep [env: SANDBOXD_POOL_SIZE]")
def run(
    config_file: Path | None,
    debug: bool,
    socket_path: str | None,
    backend: str | None,
    pool_size: int | None,
) -> None:
    """Run the daemon in the foreground until SIGTERM or SIGINT."""
    from sandboxd.daemon import run_daemon

    with _Fail(debug):
        _need_root("sandboxd run", "it makes jails, cgroups and VMs")
        config = _load(
            config_file,
            **{
                "daemon.socket": (socket_path, "--socket"),
                "backend.name": (backend, "--backend"),
                "pool.size": (pool_size, "--pool-size"),
            },
        )
        _setup_logging("debug" if debug else config.daemon.log_level)
        logging.getLogger(__name__).info("sandboxd %s, config from %s", __version__, config.source)
        trio.run(run_daemon, config)


@main.command()
@_config_options
@click.option(
    "--keep-socket",
    is_flag=True,
    help="Leave the socket alone: systemd holds it (sandboxd.socket).",
)
def cleanup(config_file: Path | None, debug: bool, keep_socket: bool) -> None:
    """Remove what a daemon that died left behind: its sandboxes (processes, cgroups,
    VMs), jails, network namespace and socket. Refused while the daemon runs."""
    from sandboxd.daemon import clean_up_after

    with _Fail(debug):
        _need_root("sandboxd cleanup", "sandboxes are root's to remove")
        config = _load(config_file)
        found = trio.run(clean_up_after, config, keep_socket)
        click.echo("\n".join(f"removed {what}" for what in found) or "nothing was left behind")


@main.group()
def image() -> None:
    """Build, list and remove sandbox images."""


@image.command("build")
@_config_options
@click.option("--force", is_flag=True, help="Rebuild even if the recipe is unchanged.")
def image_build(config_file: Path | None, debug: bool, force: bool) -> None:
    """Build the image of the current recipe (cached: a no-op when unchanged)."""
    with _Fail(debug):
        _need_root("sandboxd image build", "mmdebstrap builds the root tree as root")
        config = _load(config_file)
        store = ImageStore(config.daemon.state_dir)
        built = store.build(lambda line: click.echo(line, err=True), force=force)
        click.echo(built.id)


@image.command("list")
@_config_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def image_list(config_file: Path | None, debug: bool, as_json: bool) -> None:
    """List built images."""
    with _Fail(debug):
        config = _load(config_file)
        images = [img.describe() for img in ImageStore(config.daemon.state_dir)]
        if as_json:
            click.echo(json.dumps(images, indent=2))
            return
        for entry in images:
            languages = ", ".join(f"{k} {v}" for k, v in entry["languages"].items())
            click.echo(f"{entry['id']}  {entry['created']}  {languages}")


@image.command("rm")
@_config_options
@click.argument("image_id")
def image_rm(config_file: Path | None, debug: bool, image_id: str) -> None:
    """Remove an image by id (or unique id prefix)."""
    with _Fail(debug):
        config = _load(config_file)
        removed = ImageStore(config.daemon.state_dir).remove(image_id)
        click.echo(f"removed {removed.id}")
