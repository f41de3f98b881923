"""The daemon's listening socket: handed over by systemd (socket activation), or made here.

With ``sandboxd.socket`` systemd holds the socket and passes it on each start
(``LISTEN_FDS``, from fd 3). It outlives the daemon, so clients that connect while the
daemon restarts wait in its backlog and are answered by the next daemon, instead of
being refused. Started by hand, the daemon binds the socket itself (mode 0660, the
socket's group), and removes it when it stops. The gateway takes its TCP socket from
``sandboxd-gateway.socket`` the same way (:func:`systemd_socket`).
"""

from __future__ import annotations

import grp
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import trio

from sandboxd.errors import ConfigError

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3
BACKLOG = 128


@dataclass
class Listener:
    socket: trio.socket.SocketType
    path: Path
    activated: bool  # systemd's: it stays when the daemon goes

    def close(self) -> None:
        """Give up the socket: ours is removed, systemd's stays listening."""
        self.socket.close()
        if not self.activated:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot remove %s: %s", self.path, exc)


def systemd_socket(environ: dict[str, str] | None = None) -> socket.socket | None:
    """The one listening socket systemd passed to this process, if it passed one (the
    daemon's and the gateway's units each pass one). ConfigError if what it passed is
    not a listening stream socket."""
    environ = dict(os.environ) if environ is None else environ
    if environ.get("LISTEN_PID") != str(os.getpid()) or not environ.get("LISTEN_FDS"):
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # for this process only, not for what it starts
    if environ["LISTEN_FDS"] != "1":
        raise ConfigError(
            f"socket activation: expected one socket, got LISTEN_FDS={environ['LISTEN_FDS']}"
        )
    try:
        sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    except OSError as exc:
        raise ConfigError(f"socket activation: fd 3 is not a socket: {exc.strerror}") from exc
    listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if sock.type != socket.SOCK_STREAM or not listening:
        sock.detach()
        raise ConfigError("socket activation: fd 3 is not a listening stream socket")
    sock.set_inheritable(False)
    return sock


def remove_stale_socket(path: Path) -> bool:
    """Remove a socket left at ``path`` by a daemon that died (whether there was one);
    ConfigError if something listens there."""
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


async def open_listener(path: Path, group: str) -> Listener:
    """systemd's socket if it passed one, else a new one at ``path`` (mode 0660, owned
    by ``group`` if it exists)."""
    given = systemd_socket()
    if given is not None:
        if given.family != socket.AF_UNIX:
            raise ConfigError("socket activation: sandboxd.socket must be a Unix socket")
        name = given.getsockname()
        log.info("socket activation: serving %s, which systemd holds", name)
        return Listener(trio.socket.from_stdlib_socket(given), Path(name), activated=True)
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
    sock.listen(BACKLOG)
    return Listener(sock, path, activated=False)
