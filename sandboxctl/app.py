"""What every sandboxctl command shares: the app object in ``ctx.obj`` and exit codes."""

from __future__ import annotations

from dataclasses import dataclass

from sandboxctl.client import Client

# sandboxctl's own failures use codes a program rarely picks, as `docker run` and
# coreutils `timeout` do, so that `sandboxctl exec` can pass the program's code through.
EXIT_USAGE = 2  # the request was wrong
EXIT_TIMEOUT = 124  # the program ran out of time
EXIT_SERVICE = 125  # the service failed or cannot be reached


@dataclass
class App:
    client: Client
    debug: bool
