"""The daemon's life: take the instance lock, pick the image and backend, clean up after
a crashed predecessor, serve the socket, and on SIGTERM/SIGINT drain and remove
everything it created.

One nursery tree: the root holds the pool and the RPC server; the body waits for a
signal. The first signal stops accepting clients (new ones wait in the socket's backlog:
for the next daemon, when systemd holds the socket) and answers every request already
accepted, queued jobs included, up to the drain timeout; a second signal, or the
timeout, cancels them.
"""

from __future__ import annotations

import gc
import ipaddress
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager
from pathlib import Path

import trio

from sandboxd.backends import choose_backend, remove_leftovers
from sandboxd.config import Config
from sandboxd.errors import ConfigError
from sandboxd.host.network import Egress
from sandboxd.host.vm_network import GUEST as VM_GUEST
from sandboxd.images import Image, ImageStore
from sandboxd.instances import registered
from sandboxd.job import warm_runtimes
from sandboxd.languages import LanguageTable
from sandboxd.listen_socket import open_listener, remove_stale_socket
from sandboxd.peers import SocketLimits
from sandboxd.pool import Pool
from sandboxd.protocol import DRAIN_TIMEOUT
from sandboxd.rpc_server import RpcServer
from sandboxd.service import Service
from sandboxd.sessions import Sessions

log = logging.getLogger(__name__)


def instance_lock(config: Config) -> AbstractContextManager[None]:
    """This daemon's place among those running on the host (sandboxd.instances)."""
    uid_base = config.backend.uid_base
    return registered(config.daemon.name, range(uid_base, uid_base + config.pool.max_sandboxes))


def current_image(config: Config) -> Image:
    if config.backend.rootfs_path:
        return Image.external(Path(config.backend.rootfs_path))
    return ImageStore(config.daemon.state_dir).current()


async def run_daemon(
    config: Config, *, task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve until SIGTERM or SIGINT; everything created is removed before returning."""
    with instance_lock(config):
        try:
            config.daemon.run_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        except OSError as exc:
            raise ConfigError(f"cannot create {config.daemon.run_dir}: {exc.strerror}") from exc
        image = current_image(config)
        backend, reason = choose_backend(config, image)
        log.info("backend %s (%s)", backend.name, reason)
        if backend.shares_host_kernel:
            log.warning("sandboxes are namespaces, not VMs: they share the host kernel")
        egress = egress_of(config)
        try:
            await backend.start()
            if egress is not None:
                egress.start()
            pool = Pool(
                backend,
                size=config.pool.size,
                max_sandboxes=config.pool.max_sandboxes,
                queue_timeout=config.pool.queue_timeout,
                start_timeout=config.pool.start_timeout,
                warm=warm_runtimes(LanguageTable(image.languages)) if config.pool.warm else {},
            )
            service = Service(
                pool=pool,
                backend=backend,
                backend_reason=reason,
                image=image,
                limits=config.limits,
                egress=egress,
            )
            sessions = Sessions(service, config.sessions)
            server = RpcServer(service, sessions, socket_limits(config))
            listening = await open_listener(config.daemon.socket, config.daemon.socket_group)
            try:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async with trio.open_nursery() as root:
                        await root.start(pool.run)
                        await root.start(sessions.run)
                        if egress is not None:
                            await root.start(egress.run)
                        await root.start(server.serve, trio.SocketListener(listening.socket))
                        log.info("ready: serving %s with image %s", listening.path, image.id)
                        _settle_garbage_collection()
                        task_status.started(config.daemon.socket)
                        async for signum in signals:
                            log.info(
                                "%s: draining (up to %g s)",
                                signal.Signals(signum).name,
                                DRAIN_TIMEOUT,
                            )
                            break
                        server.stop_accepting()
                        pool.close()
                        with trio.move_on_after(DRAIN_TIMEOUT):
                            async with trio.open_nursery() as drain:
                                drain.start_soon(_cancel_on_signal, signals, drain.cancel_scope)
                                # What was accepted is answered, queued jobs included.
                                await server.wait_answered()
                                await sessions.close_all()
                                await pool.wait_idle()
                                drain.cancel_scope.cancel()
                        root.cancel_scope.cancel()
            finally:
                listening.close()
        finally:
            with trio.CancelScope(shield=True):
                await backend.aclose()
                if egress is not None:
                    egress.stop()
    log.info("stopped; everything removed")


def socket_limits(config: Config) -> SocketLimits:
    daemon = config.daemon
    return SocketLimits(
        max_request_bytes=daemon.max_request_bytes,
        stdin_buffer_bytes=daemon.stdin_buffer_bytes,
        request_timeout=daemon.request_timeout,
        idle_timeout=daemon.idle_timeout,
        send_timeout=daemon.send_timeout,
        connections_per_uid=daemon.max_connections_per_uid,
        requests_per_connection=daemon.max_requests_per_connection,
        pending_bytes_per_uid=daemon.pending_bytes_per_uid,
    )


def egress_of(config: Config) -> Egress | None:
    """The sandboxes' egress, if the configuration allows them a network."""
    if not config.network.allow:
        return None
    network = config.network
    if ipaddress.IPv4Network(network.subnet).overlaps(VM_GUEST.network):
        raise ConfigError(
            f"{config.source}: network.subnet {network.subnet} holds {VM_GUEST.network}, the "
            "network every VM sees inside its own namespace: choose one without it"
        )
    return Egress(
        config.daemon.name,
        network.allow,
        network.uplink_netns,
        network.subnet,
        max_connections=network.max_connections,
    )


async def clean_up_after(config: Config, keep_socket: bool = False) -> list[str]:
    """Remove what a daemon of this configuration left when it died (see
    ``backends.remove_leftovers``); ConfigError while one runs. What was found.
    ``keep_socket``: the socket is systemd's (not even probed: a connection to it
    would start the daemon again)."""
    with instance_lock(config):
        found = await remove_leftovers(config)
        if (egress := egress_of(config)) is not None:
            egress.stop()
        if not keep_socket and remove_stale_socket(config.daemon.socket):
            found.append(f"the socket {config.daemon.socket}")
    return found


# Young objects collected at most this often (CPython's default is 700). A job allocates
# thousands that reference counting frees; collecting every 700 made the cycle collector
# a quarter of a millisecond of each job's CPU, for garbage it seldom found.
GC_THRESHOLD = 10_000


def _settle_garbage_collection() -> None:
    """Once serving: what start-up made (modules, the image, the backend) lives as long
    as the daemon, so no collection walks it again; young objects are collected less
    often."""
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD)


async def _cancel_on_signal(signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
    async for signum in signals:
        log.info("%s again: stopping running jobs now", signal.Signals(signum).name)
        scope.cancel()
        return
