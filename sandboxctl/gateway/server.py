"""``sandboxd-gateway``: serve the HTTP API with hypercorn's trio worker.

Without API keys the gateway refuses to listen beyond loopback, and says so at start.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket
import sys
from pathlib import Path

import click
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed
from hypercorn.trio import serve
from hypercorn.trio.tcp_server import TCPServer

from sandboxctl.gateway.access import AccessControl, load_keys
from sandboxctl.gateway.app import create_app
from sandboxctl.gateway.daemon_connections import DaemonConnections
from sandboxctl.gateway.local_peers import SocketUsers
from sandboxd import __version__
from sandboxd.config import Config, load_config
from sandboxd.errors import ConfigError, SandboxError
from sandboxd.listen_socket import systemd_socket
from sandboxd.protocol import DRAIN_TIMEOUT

log = logging.getLogger("sandboxd.gateway")


def _survive_racing_close() -> None:
    """Hypercorn (0.18) sends EOF outside its send lock when a connection closes; a
    WebSocket frame sent at that moment raises BusyResourceError, which would end the
    whole server. That connection is closing anyway: treat the race as its close."""
    send = TCPServer.protocol_send

    async def protocol_send(self: TCPServer, event: object) -> None:
        try:
            await send(self, event)  # type: ignore[arg-type]  # hypercorn's own event, passed on
        except trio.BusyResourceError:
            await self.protocol.handle(Closed())

    TCPServer.protocol_send = protocol_send  # type: ignore[method-assign]  # the patch above


_survive_racing_close()


def split_bind(bind: str, default_port: int) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6]:port`` → (host, port); ConfigError if malformed."""
    host, port = bind, default_port
    if bind.startswith("["):
        host, _, rest = bind[1:].partition("]")
        if rest:
            port = int(rest.removeprefix(":")) if rest.removeprefix(":").isdigit() else -1
    elif bind.count(":") == 1:
        host, _, text = bind.partition(":")
        port = int(text) if text.isdigit() else -1
    if not host or not 0 < port < 65536:
        raise ConfigError(f"--bind {bind!r}: expected HOST, HOST:PORT or [IPv6]:PORT")
    return host, port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_access(config: Config, host: str) -> AccessControl:
    gateway = config.gateway
    keys = load_keys(Path(gateway.api_keys_file)) if gateway.api_keys_file else {}
    if not keys:
        if not is_loopback(host):
            raise ConfigError(
                f"refusing to serve {host} without API keys: set gateway.api_keys_file "
                "(SANDBOXD_API_KEYS_FILE) or bind to 127.0.0.1"
            )
        log.warning(
            "no API keys configured: serving loopback only, to the local users who may use %s",
            config.daemon.socket,
        )
    else:
        log.info("API keys: %d (ids: %s)", len(keys), ", ".join(sorted(keys)))
    return AccessControl(
        keys,
        gateway.rate_per_minute,
        gateway.rate_burst,
        gateway.concurrent_per_key,
        local_users=None if keys else SocketUsers(config.daemon.socket),
    )


async def run_gateway(
    config: Config, host: str, port: int, access: AccessControl, given: socket.socket | None
) -> None:
    """Serve until SIGTERM or SIGINT, on ``given`` (systemd's socket) or on host:port."""
    gateway = config.gateway
    app = create_app(
        # As many connections as the daemon allows one uid: more callers wait their turn.
        DaemonConnections.sharing(str(config.daemon.socket), config.daemon.max_connections_per_uid),
        access,
        max_body_bytes=gateway.max_body_bytes,
        body_timeout=gateway.body_timeout,
        host=host,
    )
    hypercorn = HypercornConfig()
    if given is not None:
        hypercorn.bind = [f"fd://{given.fileno()}"]
    else:
        hypercorn.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    hypercorn.accesslog = None  # we write our own structured line per request
    # Once stopping, what was accepted is answered: behind a balancer (which a drain is
    # for) as long as the daemon answers it; alone, briefly. A connection a client holds
    # open mid-body keeps the gateway up for all of it.
    hypercorn.graceful_timeout = DRAIN_TIMEOUT if gateway.drain_seconds > 0 else 5
    # What one connection may have queued for the app: a few messages, none larger than
    # a request body (a WebSocket's stdin is held back by its socket beyond that).
    hypercorn.websocket_max_message_size = gateway.max_body_bytes
    hypercorn.max_app_queue_size = 4

    async def stop_on_signal() -> None:
        """Stop at SIGTERM or SIGINT: after ``drain_seconds`` of /ready saying so (cut
        short by a second signal), no new connections, and what was accepted answered."""
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            name = signal.Signals(await signals.__anext__()).name
            app.state.draining = True
            if gateway.drain_seconds > 0:
                log.info("%s: draining for %g s (/ready: 503)", name, gateway.drain_seconds)
                with trio.move_on_after(gateway.drain_seconds):
                    await signals.__anext__()
            log.info("%s: stopping", name)

    log.info(
        "sandboxd-gateway %s: http://%s:%d/ -> %s", __version__, host, port, config.daemon.socket
    )
    # hypercorn types its app as ASGI callables; FastAPI is one, not declared as such.
    await serve(app, hypercorn, shutdown_trigger=stop_on_signal)  # type: ignore[arg-type]


@click.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path),
    help="Config file [env: SANDBOXD_CONFIG; default: /etc/sandboxd/sandboxd.toml]",
)
@click.option(
    "--bind",
    help="HOST[:PORT] to listen on [env: SANDBOXD_BIND, API_PORT; default: 127.0.0.1:8000]",
)
@click.option("--socket", "socket_path", help="The daemon's socket [env: SANDBOXD_SOCKET]")
@click.option("--api-keys", "api_keys", help="API key file [env: SANDBOXD_API_KEYS_FILE]")
@click.option("--debug", is_flag=True, help="Debug logging and full tracebacks.")
@click.version_option(__version__, prog_name="sandboxd-gateway")
def main(
    config_file: Path | None,
    bind: str | None,
    socket_path: str | None,
    api_keys: str | None,
    debug: bool,
) -> None:
    """The HTTP API of sandboxd (compatible with the original codesandbox)."""
    try:
        config = load_config(
            config_file,
            overrides={
                "daemon.socket": (socket_path, "--socket"),
                "gateway.api_keys_file": (api_keys, "--api-keys"),
            },
        )
        logging.basicConfig(
            level="DEBUG" if debug else config.daemon.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        given = systemd_socket()
        if given is not None:  # sandboxd-gateway.socket holds it across restarts
            if given.family not in (socket.AF_INET, socket.AF_INET6):
                raise ConfigError("socket activation: the gateway's socket must be TCP")
            host, port = given.getsockname()[:2]
        else:
            host, port = split_bind(bind or config.gateway.bind, config.gateway.api_port)
        access = build_access(config, host)
    except SandboxError as exc:
        if debug:
            raise
        click.echo(f"Error: {exc.message}", err=True)
        sys.exit(1)
    trio.run(run_gateway, config, host, port, access, given)
