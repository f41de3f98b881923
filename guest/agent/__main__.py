"""The agent's start: its options, then one job served on its channel (in a VM, on each
host connection until one brings the job)."""

from __future__ import annotations

import _ctypes
import _signal as signal
import os
import sys

from .common import JobError
from .job import job_result
from .limits import Confinement
from .processes import IGNORED_SIGNALS
from .protocol import PROTOCOL, Channel
from .runner import Runner

TYPE_CHECKING = False  # typing costs every sandbox its import
if TYPE_CHECKING:
    from typing import Any

PR_SET_DUMPABLE = 4


def next_job(channel: Channel, runner: Runner, in_vm: bool) -> dict[str, Any] | None:
    """Answer every sync with hello, its warm runtime started, until the job (or the
    session) comes; None if the host left first (closed the channel, or, on vsock,
    reset the connection)."""
    while True:
        try:
            message = channel.receive()
        except OSError:  # ConnectionError, or ENOTCONN after a vsock reset
            return None
        if message is None:
            return None
        if message.get("type") != "sync":
            if message.get("type") not in ("job", "session"):
                raise JobError(f"expected a job or a session, got {message.get('type')!r}")
            return message
        if in_vm:
            from .vm import synchronise

            synchronise(message)
        runner.start_warm(message.get("warm"))
        hello = {"type": "hello", "protocol": PROTOCOL, "nonce": message.get("nonce")}
        try:
            channel.send({**hello, "pid": os.getpid()})
        except OSError:
            return None


def serve(channel: Channel, runner: Runner, in_vm: bool = False) -> bool:
    """Take one job (or a session) from the host on ``channel`` and answer it; False if
    the host went away before sending one (it did not need this sandbox, or, on vsock, a
    VM restored from a snapshot lost the connection it had when it was saved)."""
    runner.channel = channel
    try:
        message = next_job(channel, runner, in_vm)
    except (JobError, ValueError) as exc:
        channel.send({"type": "result", "status": "internal_error", "message": f"agent: {exc}"})
        return True
    if message is None:
        return False
    if message["type"] == "session":
        from .session import serve_session  # only sessions pay for its imports

        runner.start_warm(None)  # the session's working directory is the caller's
        serve_session(channel, runner)
    else:
        channel.send(job_result(message, runner))
    return True


USAGE = """usage: agent [--workdir DIR] [--isolated] [--vm] [--port-name NAME]
             [--vsock-port PORT] [--vsock-privileged-peer] [--vm-memory-reserve BYTES]

  --workdir DIR              where the job's files go (/work)
  --isolated                 the agent is alone in its pid namespace: kill leftovers
                             with kill(-1)
  --vm                       run as PID 1 of a VM, talking on its virtio-serial port or
                             its vsock port
  --port-name NAME           the virtio-serial port (sandboxd.agent)
  --vsock-port PORT          the vsock port to listen on (52)
  --vsock-privileged-peer    take vsock connections only from host ports below 1024
                             (the host's root)
  --vm-memory-reserve BYTES  of the VM's memory, what is kept for the agent and the
                             kernel (96 MiB)
"""
OPTIONS: dict[str, str | int] = {
    "workdir": "/work",
    "port_name": "sandboxd.agent",
    "vsock_port": 52,
    "vm_memory_reserve": 96 * 2**20,
}
FLAGS = ("isolated", "vm", "vsock_privileged_peer")


def parse_options(argv: list[str]) -> dict[str, Any]:
    """The agent's command line, which its host writes (argparse would cost every
    sandbox its import); exits 2 with the usage on a mistake."""
    options: dict[str, Any] = {**OPTIONS, **dict.fromkeys(FLAGS, False)}
    words = iter(argv)
    for word in words:
        name = word.removeprefix("--").replace("-", "_")
        if word in ("-h", "--help"):
            sys.stdout.write(USAGE)
            sys.exit(0)
        elif word.startswith("--") and name in FLAGS:
            options[name] = True
        elif word.startswith("--") and name in OPTIONS and (value := next(words, None)):
            kind = type(OPTIONS[name])
            try:
                options[name] = kind(value)
            except ValueError:
                _usage_error(f"{word}: expected {kind.__name__}, got {value!r}")
        else:
            _usage_error(f"cannot make sense of {word!r}")
    return options


def _usage_error(message: str) -> None:
    sys.stderr.write(f"{USAGE}agent: {message}\n")
    sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    options = parse_options(sys.argv[1:] if argv is None else argv)
    # Not dumpable: the program (same uid in a jail) can then neither ptrace the agent
    # nor open its /proc files to read or rewrite its memory and forge a result.
    _ctypes.call_function(
        # dlopen(NULL) is the program itself (typeshed allows only paths)
        _ctypes.dlsym(_ctypes.dlopen(None, os.RTLD_NOW), "prctl"),  # type: ignore[arg-type]
        (PR_SET_DUMPABLE, 0),
    )
    for number in IGNORED_SIGNALS:  # a program's kill(1, ...) changes nothing
        signal.signal(number, signal.SIG_IGN)
    workdir = options["workdir"]
    if options["vm"]:
        from .limits import VmConfinement
        from .vm import end_vm, host_connections

        os.makedirs(workdir, exist_ok=True)
        confinement = VmConfinement(options["vm_memory_reserve"])
        try:
            links = host_connections(
                options["port_name"], options["vsock_port"], options["vsock_privileged_peer"]
            )
            runner = Runner(workdir, True, confinement)
            for channel in links:
                if serve(channel, runner, True):
                    break
        finally:
            end_vm()
        return 0
    channel = Channel(sys.stdin.fileno(), sys.stdout.buffer)
    serve(channel, Runner(workdir, options["isolated"], Confinement()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
