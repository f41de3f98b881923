"""Files in the working directory, written, read, listed and removed without leaving it:
every path is walked one directory at a time with O_NOFOLLOW, so no link a program
planted (and no directory swapped for one while we walk) leads anywhere else."""

from __future__ import annotations

import os
import stat

from .common import JobError, from_base64, ignoring

TYPE_CHECKING = False  # typing costs every sandbox its import
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

MAX_ENTRIES = 10000  # of a directory listing
STAGING = ".sandboxd-write-"  # (and a random suffix) where a file is written first
MAX_LISTING_BYTES = 512 * 1024  # of names in a directory listing, at most
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _parts(path: str) -> list[str]:
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts) or "\0" in path:
        raise JobError(f"refusing file path {path!r}")
    return parts


def _walk(root: int, parts: list[str], create: bool, owner: int | None) -> int:
    """A new fd of the directory ``parts`` names under ``root`` (made if ``create``)."""
    dir_fd = os.dup(root)
    try:
        for part in parts:
            if create:
                with ignoring(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=dir_fd)
                    if owner is not None:
                        os.chown(part, owner, owner, dir_fd=dir_fd, follow_symlinks=False)
            next_fd = os.open(part, _DIRECTORY, dir_fd=dir_fd)
            os.close(dir_fd)
            dir_fd = next_fd
    except BaseException:
        os.close(dir_fd)
        raise
    return dir_fd


class Workdir:
    """The working directory, as the job's and the session's file operations see it.
    ``owner``: the uid files are given (in a VM the agent is root; in a jail it is
    already the program's uid, and None)."""

    def __init__(self, path: str, owner: int | None = None) -> None:
        self.path = path
        self.owner = owner

    def _operate(self, what: str, path: str, operation: Any) -> Any:
        """``operation(dir_fd, name)`` on the entry ``path`` names (its directory made
        if ``what`` is a write); JobError naming the path and the reason if it fails."""
        parts = _parts(path) if path not in ("", ".") else []
        root = os.open(self.path, _DIRECTORY)
        try:
            dir_fd = _walk(root, parts[:-1], what == "write", self.owner)
            try:
                return operation(dir_fd, parts[-1] if parts else ".")
            finally:
                os.close(dir_fd)
        except OSError as exc:
            reason = "a path component is a link" if exc.errno == 40 else exc.strerror  # ELOOP
            raise JobError(f"cannot {what} {path!r}: {reason}") from exc
        finally:
            os.close(root)

    def write(self, path: str, content: bytes) -> None:
        """Create or replace the file ``path`` (never through a link: a link, or any
        other file there, is replaced; a directory is not)."""

        def write(dir_fd: int, name: str) -> None:
            staging = STAGING + os.urandom(6).hex()  # no name a program could plant first
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(staging, flags, 0o644, dir_fd=dir_fd)
            try:
                _write_all(fd, content)
                if self.owner is not None:
                    os.fchown(fd, self.owner, self.owner)
            finally:
                os.close(fd)
            try:
                os.rename(staging, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except OSError:
                os.unlink(staging, dir_fd=dir_fd)
                raise

        self._operate("write", path, write)

    def append(self, path: str, content: bytes, max_bytes: int) -> int:
        """Add ``content`` to the regular file ``path`` if it then holds at most
        ``max_bytes``; its size after."""

        def append(dir_fd: int, name: str) -> int:
            flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            fd = os.open(name, flags, dir_fd=dir_fd)
            try:
                info = os.fstat(fd)
                why = self._refusal(info)
                if why:
                    raise JobError(f"cannot append to {path!r}: {why}")
                if info.st_size + len(content) > max_bytes:
                    raise JobError(
                        f"cannot append to {path!r}: over the limit of {max_bytes} bytes"
                    )
                _write_all(fd, content)
                return os.fstat(fd).st_size
            finally:
                os.close(fd)

        return self._operate("append to", path, append)

    def _refusal(self, info: os.stat_result) -> str:
        """Why the agent will not read or add to this file: not a regular file, or, where
        the agent is root (a VM), not the job's (a hard link the program made to a file
        of root's)."""
        if not stat.S_ISREG(info.st_mode):
            return "not a regular file"
        if self.owner is not None and info.st_uid != self.owner:
            return "not a file of the job's"
        return ""

    def write_all(self, files: list[dict[str, Any]]) -> None:
        """Write a job's files (``path``, ``content``, ``encoding`` utf-8 or base64)."""
        for entry in files:
            if entry.get("encoding") == "base64":
                content = from_base64(str(entry["content"]))
            else:
                content = str(entry["content"]).encode()
            self.write(str(entry["path"]), content)

    def read(self, path: str, max_bytes: int, chunk: int) -> Iterator[bytes]:
        """The content of the regular file ``path``, if it holds at most ``max_bytes``,
        in pieces of ``chunk`` bytes (the agent holds one at a time: a session's files
        and the agent share its memory, so a file read whole could leave no room)."""

        def open_file(dir_fd: int, name: str) -> int:
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            fd = os.open(name, flags, dir_fd=dir_fd)
            info = os.fstat(fd)
            why = self._refusal(info)
            if not why and info.st_size > max_bytes:
                why = f"{info.st_size} bytes, more than the limit of {max_bytes}"
            if why:
                os.close(fd)
                raise JobError(f"cannot read {path!r}: {why}")
            return fd

        fd = self._operate("read", path, open_file)
        try:
            size = 0
            while piece := os.read(fd, chunk):
                size += len(piece)
                if size > max_bytes:  # it grew while we read
                    raise JobError(
                        f"cannot read {path!r}: more than the limit of {max_bytes} bytes"
                    )
                yield piece
        finally:
            os.close(fd)

    def list(self, path: str) -> tuple[list[dict[str, Any]], bool]:
        """The entries of the directory ``path`` (name, type, size), sorted by name, and
        whether there were more than MAX_ENTRIES."""

        def list_dir(dir_fd: int, name: str) -> tuple[list[dict[str, Any]], bool]:
            fd = os.open(name, _DIRECTORY, dir_fd=dir_fd)
            entries: list[dict[str, Any]] = []
            size = 0
            try:
                with os.scandir(fd) as scan:
                    for entry in scan:
                        if entry.name.startswith(STAGING):
                            continue
                        # A name that is not UTF-8 is shown with U+FFFD where it is not.
                        shown = os.fsencode(entry.name).decode(errors="replace")
                        size += len(shown) + 64
                        if len(entries) == MAX_ENTRIES or size > MAX_LISTING_BYTES:
                            break
                        info = entry.stat(follow_symlinks=False)
                        kind = _kind(info.st_mode)
                        entries.append({"name": shown, "type": kind, "size": info.st_size})
                    else:
                        return sorted(entries, key=lambda e: e["name"]), False
                return sorted(entries, key=lambda e: e["name"]), True
            finally:
                os.close(fd)

        return self._operate("list", path, list_dir)

    def remove(self, path: str) -> None:
        """Remove the file or the directory tree ``path`` (a link itself, never what it
        points to)."""

        def remove(dir_fd: int, name: str) -> None:
            info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISDIR(info.st_mode):
                import shutil  # fd-based: it never follows a link out of the tree

                shutil.rmtree(name, dir_fd=dir_fd)
            else:
                os.unlink(name, dir_fd=dir_fd)

        if path in ("", "."):
            raise JobError("cannot remove the working directory itself")
        self._operate("remove", path, remove)


def _write_all(fd: int, content: bytes) -> None:
    view = memoryview(content)
    while view:
        view = view[os.write(fd, view) :]


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISLNK(mode):
        return "link"
    return "other"
