"""The daemons running on this host, so that two never manage the same sandboxes.

Sandboxes are known by the daemon's name (its cgroups, network namespace, jails) and run
as uids from its range: a second daemon with the same name would take the first one's
sandboxes for a crashed predecessor's and remove them, and one with an overlapping uid
range could signal them. So every daemon holds a lock named after it in one directory
that all of them share, whatever their own run directory, and writes its uid range
there; a daemon whose name is held, or whose range overlaps a running one's, does not
start. Locks are ``flock``s: a daemon that dies releases its own.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from sandboxd.errors import ConfigError

LOCK_DIR = Path("/run/lock/sandboxd")


@contextmanager
def registered(name: str, uids: range, *, lock_dir: Path = LOCK_DIR) -> Iterator[None]:
    """Hold this daemon's place while the block runs; ConfigError (one line) if a
    running daemon has the name or shares uids."""
    try:
        lock_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        registry = open(lock_dir / ".registry", "a")  # noqa: SIM115 (closed below)
    except OSError as exc:
        raise ConfigError(f"cannot use the lock directory {lock_dir}: {exc.strerror}") from exc
    path = lock_dir / f"{name}.lock"
    with registry:
        fcntl.flock(registry, fcntl.LOCK_EX)  # one daemon registers at a time
        lock = open(path, "a+")  # noqa: SIM115 (closed by the with below)
        try:
            _take(lock, name, path)
            _refuse_overlaps(lock_dir, name, uids)
            lock.truncate(0)
            json.dump({"pid": os.getpid(), "uids": [uids.start, uids.stop]}, lock)
            lock.flush()
        except BaseException:
            lock.close()
            raise
        finally:
            fcntl.flock(registry, fcntl.LOCK_UN)
    with lock:
        try:
            yield
        finally:
            path.unlink(missing_ok=True)


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
        start, stop = int(theirs[0]), int(theirs[1])
        if start < uids.stop and uids.start < stop:
            raise ConfigError(
                f"backend.uid_base: uids {uids.start}-{uids.stop - 1} overlap those of the "
                f"running sandboxd {other.stem!r} ({start}-{stop - 1}): give each daemon a "
                "range of its own"
            )


def _held(path: Path) -> bool:
    """Whether a running daemon holds the lock at ``path``."""
    try:
        with open(path) as probe:
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            return False
    except OSError:
        return False
