"""The job's files, written into the working directory without leaving it."""

from __future__ import annotations

import os

from .common import JobError, ignoring

TYPE_CHECKING = False  # typing costs every sandbox its import
if TYPE_CHECKING:
    from typing import Any


def _open_dir(name: str, dir_fd: int) -> int:
    with ignoring(FileExistsError):
        os.mkdir(name, 0o755, dir_fd=dir_fd)
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)


def write_files(workdir: str, files: list[dict[str, Any]]) -> None:
    """Write the job's files under ``workdir`` without following any link or leaving it."""
    root = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for entry in files:
            path = str(entry["path"])
            parts = path.split("/")
            if any(part in ("", ".", "..") for part in parts) or "\0" in path:
                raise JobError(f"refusing file path {path!r}")
            if entry.get("encoding") == "base64":
                import base64

                content = base64.b64decode(entry["content"], validate=True)
            else:
                content = str(entry["content"]).encode()
            dir_fd = os.dup(root)
            try:
                for part in parts[:-1]:
                    next_fd = _open_dir(part, dir_fd)
                    os.close(dir_fd)
                    dir_fd = next_fd
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                fd = os.open(parts[-1], flags, 0o644, dir_fd=dir_fd)
                with os.fdopen(fd, "wb") as stream:
                    stream.write(content)
            finally:
                os.close(dir_fd)
    except OSError as exc:
        raise JobError(f"cannot write the job's files: {exc.strerror}") from exc
    finally:
        os.close(root)
