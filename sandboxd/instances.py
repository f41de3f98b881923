"""The daemons running on this host, so that two never manage the same sandboxes.

Sandboxes are known by the daemon's name (its cgroups, network namespace, jails) and run
as uids from its range: a second daemon with the same name would take the first one's
sandboxes for a crashed predecessor's and remove them, and one with an overlapping uid
range could signal them. So every daemon holds a lock named after it in one directory
that all of them share, whatever their own run directory, and writes its uid range
there; a daemon whose name is held, or whose range overlaps a running one's, does not
start. Locks are ``flock``s: a daemon that dies releases its own. The directory is
root's alone: no other user can plant a link or hold a lock there.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from sandboxd.errors import ConfigError

LOCK_DIR = Path("/run/sandboxd-instances")  # in /run, where only root makes entries


def _lock_dir(path: Path) -> None:
    """Make (or check) the directory: root's alone, or ConfigError. A directory others
    could write to would let them plant a link where root writes its lock."""
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        info = os.lstat(path)
    except OSError as exc:
        raise ConfigError(f"cannot use the lock directory {path}: {exc.strerror}") from exc
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0 or info.st_mode & 0o022:
        raise ConfigError(
            f"the lock directory {path} must be a directory that only root can write to"
        )


def _open_lock(path: Path) -> IO[str]:
    """A lock file, never through a link or into a FIFO; ConfigError otherwise."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as exc:
        raise ConfigError(f"cannot open the lock file {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigError(f"the lock file {path} is not a plain file")
    return os.fdopen(fd, "r+")


@contextmanager
def registered(name: str, uids: range, *, lock_dir: Path = LOCK_DIR) -> Iterator[None]:
    """Hold this daemon's place while the block runs; ConfigError (one line) if a
    running daemon has the name or shares uids."""
    _lock_dir(lock_dir)
    path = lock_dir / f"{name}.lock"
    with _open_lock(lock_dir / ".registry") as registry:
        fcntl.flock(registry, fcntl.LOCK_EX)  # one daemon registers (or leaves) at a time
        lock = _open_lock(path)
        taken = False
        try:
            _take(lock, name, path)
            taken = True
            _refuse_overlaps(lock_dir, name, uids)
            lock.truncate(0)
            json.dump({"pid": os.getpid(), "uids": [uids.start, uids.stop]}, lock)
            lock.flush()
        except BaseException:
            if taken:  # ours, not a running daemon's
                path.unlink(missing_ok=True)
            lock.close()
            raise
        finally:
            fcntl.flock(registry, fcntl.LOCK_UN)
    with lock:
        try:
            yield
        finally:
            with _open_lock(lock_dir / ".registry") as registry:
                fcntl.flock(registry, fcntl.LOCK_EX)
                path.unlink(missing_ok=True)  # while no other daemon looks


def _take(lock: IO[str], name: str, path: Path) -> None:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConfigError(
            f"another sandboxd named {name!r} is running (pid {_holder(path).get('pid', '?')}, "
            f"lock {path})"
        ) from None


def _holder(path: Path) -> dict[str, object]:
    try:
        value = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _refuse_overlaps(lock_dir: Path, name: str, uids: range) -> None:
    for other in sorted(lock_dir.glob("*.lock")):
        if other.stem == name or not _held(other):
            continue
        theirs = _holder(other).get("uids")
        if not (isinstance(theirs, list) and len(theirs) == 2):
            continue
        if not all(isinstance(bound, int) for bound in theirs):
            continue
        start, stop = theirs
        if start < uids.stop and uids.start < stop:
            raise ConfigError(
                f"backend.uid_base: uids {uids.start}-{uids.stop - 1} overlap those of the "
                f"running sandboxd {other.stem!r} ({start}-{stop - 1}): give each daemon a "
                "range of its own"
            )


def _held(path: Path) -> bool:
    """Whether a running daemon holds the lock at ``path``."""
    try:
        with _open_lock(path) as probe:
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            return False
    except ConfigError:
        return False
