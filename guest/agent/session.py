"""A session: the sandbox serves the host's requests in turn (jobs, and files in its
working directory) until the host closes the channel. Each job's processes are gone
before the next request is read; the files stay."""

from __future__ import annotations

from .common import JobError, from_base64, to_base64
from .job import job_result

TYPE_CHECKING = False  # typing costs every sandbox its import
if TYPE_CHECKING:
    from typing import Any

    from .protocol import Channel
    from .runner import Runner

FILE_CHUNK = 48 * 1024  # bytes of a file per file.data message (64 KiB in base64)


def serve_session(channel: Channel, runner: Runner) -> None:
    """Answer every request until the host closes the channel."""
    while (message := channel.receive()) is not None:
        kind = message.get("type")
        if kind in ("cancel", "stdin"):  # for a job that had ended when they came
            continue
        if kind == "job":
            channel.send(job_result(message, runner))
            continue
        try:
            reply = _file_request(channel, runner, kind, message)
        except (JobError, ValueError, KeyError, TypeError) as exc:
            reply = {"type": "error", "message": str(exc)}
        channel.send(reply)


def _file_request(
    channel: Channel, runner: Runner, kind: object, message: dict[str, Any]
) -> dict[str, Any]:
    """Carry out one file request; its last reply (a read sends its data before)."""
    files, path = runner.files, str(message["path"])
    if kind == "file.write":
        content = from_base64(str(message["content"]))
        if message.get("append"):
            return {"type": "done", "size": files.append(path, content, int(message["max_bytes"]))}
        files.write(path, content)
        return {"type": "done", "size": len(content)}
    if kind == "file.read":
        size = 0
        for piece in files.read(path, int(message["max_bytes"]), FILE_CHUNK):
            channel.send({"type": "file.data", "data": to_base64(piece)})
            size += len(piece)
        return {"type": "done", "size": size}
    if kind == "file.list":
        entries, truncated = files.list(path)
        return {"type": "done", "entries": entries, "truncated": truncated}
    if kind == "file.remove":
        files.remove(path)
        return {"type": "done"}
    raise JobError(f"unexpected request in a session: {kind!r}")
