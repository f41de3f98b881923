"""A seccomp filter for the namespaces backend's jails, compiled to classic BPF here
(bubblewrap loads it with ``--seccomp FD``).

A jail shares the host kernel, so the kernel interfaces that programs never need and
that exploits often start from are refused with EPERM: keyrings, BPF, perf events,
userfaultfd, io_uring, module and kexec loading, mounting, ptrace and friends, the LDT
and other processes' pages (as Docker's default profile refuses them). Sockets are
allowed only in the families a program needs (Unix, IPv4, IPv6, and netlink's route
protocol, which the C library asks for addresses): no vsock, which no network namespace
confines, no packet, Bluetooth or crypto sockets. ``personality`` may only query or set
the harmless personas. Any syscall of another ABI (x32, or 32-bit entry) is refused, and
one newer than the newest reviewed here gets ENOSYS, as on a kernel without it, so that
the C library falls back to what it had before.
"""

from __future__ import annotations

import functools
import platform
import socket
import struct
from collections.abc import Sequence

# x86_64 numbers (arch/x86/entry/syscalls/syscall_64.tbl).
DENIED_X86_64 = {
    "ptrace": 101,
    "syslog": 103,
    "uselib": 134,
    "vhangup": 153,
    "modify_ldt": 154,
    "pivot_root": 155,
    "acct": 163,
    "mount": 165,
    "umount2": 166,
    "swapon": 167,
    "swapoff": 168,
    "reboot": 169,
    "init_module": 175,
    "delete_module": 176,
    "quotactl": 179,
    "lookup_dcookie": 212,
    "migrate_pages": 256,
    "kexec_load": 246,
    "add_key": 248,
    "request_key": 249,
    "keyctl": 250,
    "unshare": 272,
    "move_pages": 279,
    "perf_event_open": 298,
    "fanotify_init": 300,
    "name_to_handle_at": 303,
    "open_by_handle_at": 304,
    "setns": 308,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "kcmp": 312,
    "finit_module": 313,
    "kexec_file_load": 320,
    "bpf": 321,
    "userfaultfd": 323,
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "open_tree": 428,
    "move_mount": 429,
    "pidfd_getfd": 438,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "mount_setattr": 442,
    "quotactl_fd": 443,
}
SOCKET, SOCKETPAIR, PERSONALITY = 41, 53, 135
NEWEST_REVIEWED = 462  # mseal (Linux 6.10); anything above is unknown here
SOCKET_FAMILIES = (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6)
NETLINK_ROUTE = 0
# What Docker's default profile lets personality() set: Linux itself, as 32-bit Linux
# (PER_LINUX32), with uname's 2.6 version (UNAME26), or both; 0xffffffff only asks.
PERSONAS = (0x0, 0x0008, 0x20000, 0x20008, 0xFFFFFFFF)

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
EPERM, ENOSYS = 1, 38
# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6].
# Each argument's low 32 bits (little-endian) are what an int parameter holds.
_NR, _ARCH = 0, 4


def _arg(index: int) -> int:
    return 16 + 8 * index


_LD_ABS_W, _JEQ_K, _JGE_K, _JA, _RET_K = 0x20, 0x15, 0x35, 0x05, 0x06

# An instruction before assembly: (code, k, true label, false label); a label is a
# str, and None means "the next instruction".
_Insn = tuple[int, int, str | None, str | None]


def supported() -> bool:
    return platform.machine() == "x86_64"


def _load(offset: int) -> _Insn:
    return (_LD_ABS_W, offset, None, None)


def _jump_if(code: int, k: int, true: str | None, false: str | None = None) -> _Insn:
    return (code, k, true, false)


def _ret(value: int) -> _Insn:
    return (_RET_K, value, None, None)


def _allow_if_one_of(values: Sequence[int], allow: str = "allow") -> list[_Insn]:
    """Jump to ``allow`` if the loaded word is one of ``values``; fall through if not."""
    return [_jump_if(_JEQ_K, value, allow) for value in values]


def _assemble(blocks: dict[str, list[_Insn]]) -> bytes:
    """Lay the labelled blocks out in order and resolve the jumps (forward only)."""
    program: list[_Insn] = []
    where: dict[str, int] = {}
    for label, block in blocks.items():
        where[label] = len(program)
        program.extend(block)
    out = []
    for index, (code, k, true, false) in enumerate(program):
        offsets = []
        for target in (true, false):
            offset = 0 if target is None else where[target] - index - 1
            if not 0 <= offset <= 255:
                raise ValueError(f"seccomp jump from {index} to {target} cannot be encoded")
            offsets.append(offset)
        if code == _JA:
            out.append(struct.pack("HBBI", code, 0, 0, offsets[0]))
        else:
            out.append(struct.pack("HBBI", code, offsets[0], offsets[1], k))
    return b"".join(out)


@functools.cache
def filter_program() -> bytes:
    """The compiled filter (an array of struct sock_filter), for ``bwrap --seccomp``;
    the same for every sandbox, so assembled once."""
    denied = sorted(set(DENIED_X86_64.values()))
    return _assemble(
        {
            "start": [
                _load(_ARCH),
                _jump_if(_JEQ_K, AUDIT_ARCH_X86_64, None, "deny"),
                _load(_NR),
                _jump_if(_JGE_K, X32_SYSCALL_BIT, "deny"),
                _jump_if(_JGE_K, NEWEST_REVIEWED + 1, "unknown"),
                _jump_if(_JEQ_K, SOCKET, "socket"),
                _jump_if(_JEQ_K, SOCKETPAIR, "socketpair"),
                _jump_if(_JEQ_K, PERSONALITY, "personality"),
                *(_jump_if(_JEQ_K, number, "deny") for number in denied),
                (_JA, 0, "allow", None),
            ],
            "socket": [
                _load(_arg(0)),
                *_allow_if_one_of(SOCKET_FAMILIES),
                _jump_if(_JEQ_K, socket.AF_NETLINK, None, "deny"),
                _load(_arg(2)),
                _jump_if(_JEQ_K, NETLINK_ROUTE, "allow", "deny"),
            ],
            "socketpair": [
                _load(_arg(0)),
                _jump_if(_JEQ_K, socket.AF_UNIX, "allow", "deny"),
            ],
            "personality": [
                _load(_arg(0)),
                *_allow_if_one_of(PERSONAS),
                (_JA, 0, "deny", None),
            ],
            "allow": [_ret(SECCOMP_RET_ALLOW)],
            "deny": [_ret(SECCOMP_RET_ERRNO | EPERM)],
            "unknown": [_ret(SECCOMP_RET_ERRNO | ENOSYS)],
        }
    )
