"""What /proc says of a process: its children, and its name, state, parent and flags."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple


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
