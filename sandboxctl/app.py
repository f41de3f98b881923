"""What every sandboxctl command shares: the app object in ``ctx.obj`` and exit codes."""

from __future__ import annotations

from dataclasses import dataclass

import click

from sandboxctl.client import Client
from sandboxd.protocol import DEFAULT_SOCKET

# sandboxctl's own failures use codes a program rarely picks, as `docker run` and
# coreutils `timeout` do, so that `sandboxctl exec` can pass the program's code through.
EXIT_USAGE = 2  # the request was wrong
EXIT_TIMEOUT = 124  # the program ran out of time
EXIT_SERVICE = 125  # the service failed or cannot be reached


# The daemon's socket, as every command line of sandboxctl's takes it.
socket_option = click.option(
    "--socket",
    "socket_path",
    envvar="SANDBOXD_SOCKET",
    show_envvar=True,
    help=f"The daemon's socket [default: {DEFAULT_SOCKET}]",
)


@dataclass
class App:
    client: Client
    debug: bool
