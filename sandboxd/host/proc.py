"""What /proc says of a process: its children, its name, state, parent and flags, and
whether it is on its way out."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import NamedTuple

PF_EXITING = 0x00000004  # in /proc/<pid>/stat's flags: the process is exiting


class ProcStat(NamedTuple):
    """The fields of ``/proc/<pid>/stat`` that sandboxd reads."""

    comm: str
    state: str  # "Z" for a zombie
    ppid: int
    flags: int  # PF_* flags


def children(pid: int) -> list[int] | None:
    """The children of ``pid`` (of its main thread); None if the kernel does not say
    (a kernel without CONFIG_PROC_CHILDREN, or ``pid`` gone)."""
    try:
        return [
            int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        ]
    except OSError:
        return None


def stat(pid: int) -> ProcStat | None:
    """``pid``'s stat, None if it is gone (or reaped meanwhile)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The name may hold spaces and parentheses: it ends at the last ")".
    comm = text[text.index("(") + 1 : text.rindex(")")]
    # After the name: state, ppid, pgrp, session, tty, tpgid, flags, ...
    fields = text[text.rindex(")") + 2 :].split()
    return ProcStat(comm, fields[0], int(fields[1]), int(fields[6]))


def ending(pid: int) -> bool:
    """Whether ``pid`` will run no more of its own code: gone, a zombie, exiting, or
    with a SIGKILL pending. A process killed while it waited in a system call leaves
    that call (a FIFO it was opening, say) before it is a zombie, and on a loaded
    machine it may wait a while to be scheduled to finish dying."""
    info = stat(pid)
    if info is None or info.state in ("Z", "X") or info.flags & PF_EXITING:
        return True
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    kill = 1 << (signal.SIGKILL - 1)
    return any(
        int(line.split()[1], 16) & kill
        for line in status.splitlines()
        if line.startswith(("SigPnd:", "ShdPnd:"))
    )
