"""A seccomp filter for the namespaces backend's jails, compiled to classic BPF here
(bubblewrap loads it with ``--seccomp FD``).

A jail shares the host kernel, so the kernel interfaces that programs never need and
that exploits often start from are refused with EPERM: keyrings, BPF, perf events,
userfaultfd, io_uring, module and kexec loading, mounting, ptrace and friends. Any
syscall of another ABI (x32, or 32-bit entry) is refused the same way. Everything else
is allowed; the rest of the confinement is the namespaces, the uid and the cgroup.
"""

from __future__ import annotations

import platform
import struct

# x86_64 numbers (arch/x86/entry/syscalls/syscall_64.tbl).
DENIED_X86_64 = {
    "ptrace": 101,
    "syslog": 103,
    "vhangup": 153,
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
    "kexec_load": 246,
    "add_key": 248,
    "request_key": 249,
    "keyctl": 250,
    "unshare": 272,
    "perf_event_open": 298,
    "fanotify_init": 300,
    "name_to_handle_at": 303,
    "open_by_handle_at": 304,
    "setns": 308,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "finit_module": 313,
    "kexec_file_load": 320,
    "bpf": 321,
    "userfaultfd": 323,
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "mount_setattr": 442,
}

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
EPERM = 1
# struct seccomp_data: int nr; __u32 arch; ...
_NR, _ARCH = 0, 4
_LD_ABS_W, _JEQ_K, _JGE_K, _RET_K = 0x20, 0x15, 0x35, 0x06


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def supported() -> bool:
    return platform.machine() == "x86_64"


def filter_program() -> bytes:
    """The compiled filter (an array of struct sock_filter), for ``bwrap --seccomp``."""
    denied = sorted(set(DENIED_X86_64.values()))
    program = [_insn(_LD_ABS_W, _ARCH)]
    # Each jump skips to the "deny" return at the end: count what lies between.
    to_deny = 1 + 1 + 1 + len(denied) + 1  # from after this jump
    program.append(_insn(_JEQ_K, AUDIT_ARCH_X86_64, 0, to_deny - 1))
    program.append(_insn(_LD_ABS_W, _NR))
    program.append(_insn(_JGE_K, X32_SYSCALL_BIT, len(denied) + 1, 0))
    for index, number in enumerate(denied):
        program.append(_insn(_JEQ_K, number, len(denied) - index, 0))
    program.append(_insn(_RET_K, SECCOMP_RET_ALLOW))
    program.append(_insn(_RET_K, SECCOMP_RET_ERRNO | EPERM))
    return b"".join(program)
