"""The daemon's life: take the instance lock, pick the image and backend, clean up after
a crashed predecessor, serve the socket, and on SIGTERM/SIGINT drain and remove
everything it created.

One nursery tree: the root holds the pool and the RPC server; the body waits for a
signal. The first signal stops accepting clients and lets running jobs finish (up to the
drain timeout); a second one, or the timeout, cancels them.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import logging
import os
import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import trio

from sandboxd.backends import choose_backend, remove_leftovers
from sandboxd.config import Config
from sandboxd.errors import ConfigError
from sandboxd.images import Image, ImageStore
from sandboxd.network import Egress
from sandboxd.pool import Pool
from sandboxd.rpc_server import RpcServer
from sandboxd.service import Service

log = logging.getLogger(__name__)

DRAIN_TIMEOUT = 30.0


@contextmanager
def instance_lock(config: Config) -> Iterator[None]:
    """Hold ``<run_dir>/<name>.lock`` so two daemons never manage the same sandboxes."""
    path = config.daemon.run_dir / f"{config.daemon.name}.lock"
    try:
        config.daemon.run_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        lock = open(path, "a+")  # noqa: SIM115 (closed by the with below)
    except OSError as exc:
        raise ConfigError(f"cannot create the lock file {path}: {exc.strerror}") from exc
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise ConfigError(
                f"another sandboxd named {config.daemon.name!r} is running "
                f"(pid {lock.read().strip() or '?'}, lock {path})"
            ) from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        try:
            yield
        finally:
            path.unlink(missing_ok=True)


def remove_stale_socket(path: Path) -> bool:
    """Remove a socket left at ``path`` by a daemon that died (whether there was one);
    ConfigError if a daemon serves it."""
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(str(path))
    except FileNotFoundError:
        return False
    except ConnectionRefusedError:
        path.unlink()
        return True
    except OSError as exc:
        raise ConfigError(f"socket {path}: {exc.strerror}") from exc
    else:
        raise ConfigError(f"socket {path}: another daemon is already serving it")
    finally:
        probe.close()


async def bind_socket(path: Path, group: str) -> trio.socket.SocketType:
    """A listening Unix socket at ``path``, mode 0660, owned by ``group`` if it exists."""
    remove_stale_socket(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = trio.socket.socket(socket.AF_UNIX)
    old_umask = os.umask(0o117)  # never, even briefly, open to everyone
    try:
        await sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"socket {path}: cannot bind: {exc.strerror}") from exc
    finally:
        os.umask(old_umask)
    try:
        os.chown(path, -1, grp.getgrnam(group).gr_gid)
    except KeyError:
        log.info("group %r does not exist: only root can use %s", group, path)
    os.chmod(path, 0o660)
    sock.listen(128)
    return sock


def current_image(config: Config) -> Image:
    if config.backend.rootfs_path:
        return Image.external(Path(config.backend.rootfs_path))
    return ImageStore(config.daemon.state_dir).current()


async def run_daemon(
    config: Config, *, task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve until SIGTERM or SIGINT; everything created is removed before returning."""
    with instance_lock(config):
        image = current_image(config)
        backend, reason = choose_backend(config, image)
        log.info("backend %s (%s)", backend.name, reason)
        if backend.name == "namespaces":
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
            )
            service = Service(
                pool=pool,
                backend=backend,
                backend_reason=reason,
                image=image,
                limits=config.limits,
                egress=egress,
            )
            server = RpcServer(service, max_request_bytes=config.daemon.max_request_bytes)
            sock = await bind_socket(config.daemon.socket, config.daemon.socket_group)
            try:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async with trio.open_nursery() as root:
                        await root.start(pool.run)
                        if egress is not None:
                            await root.start(egress.run)
                        await root.start(server.serve, trio.SocketListener(sock))
                        log.info("ready: serving %s with image %s", config.daemon.socket, image.id)
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
                                await pool.wait_idle()
                                drain.cancel_scope.cancel()
                        root.cancel_scope.cancel()
            finally:
                _unlink_socket(config.daemon.socket)
        finally:
            with trio.CancelScope(shield=True):
                await backend.aclose()
                if egress is not None:
                    egress.stop()
    log.info("stopped; everything removed")


def egress_of(config: Config) -> Egress | None:
    """The sandboxes' egress, if the configuration allows them a network."""
    if not config.network.allow:
        return None
    network = config.network
    return Egress(config.daemon.name, network.allow, network.uplink_netns, network.subnet)


async def clean_up_after(config: Config) -> list[str]:
    """Remove what a daemon of this configuration left when it died (see
    ``backends.remove_leftovers``); ConfigError while one runs. What was found."""
    with instance_lock(config):
        found = await remove_leftovers(config)
        if (egress := egress_of(config)) is not None:
            egress.stop()
        if remove_stale_socket(config.daemon.socket):
            found.append(f"the socket {config.daemon.socket}")
    return found


async def _cancel_on_signal(signals: trio.abc.ReceiveChannel[int], scope: trio.CancelScope) -> None:
    async for signum in signals:
        log.info("%s again: stopping running jobs now", signal.Signals(signum).name)
        scope.cancel()
        return


def _unlink_socket(path: Path) -> None:
    try:
        path.unlink()
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.warning("cannot remove %s: %s", path, exc)
