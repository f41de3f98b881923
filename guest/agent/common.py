"""What every part of the agent uses. It runs afresh in each sandbox, so it imports only
what serving a job needs, and their C halves where the Python ones pull in more (json,
signal, selectors, contextlib, ctypes and argparse would cost some 15 ms of CPU each
start together, with re, enum, collections and functools)."""

from __future__ import annotations

import binascii

CHUNK = 65536  # bytes read or written at once
BASE_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/tmp",
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
}


class ignoring:  # named and used as contextlib.suppress is
    """contextlib.suppress, without what contextlib imports."""

    def __init__(self, *errors: type[BaseException]) -> None:
        self.errors = errors

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> bool:
        return kind is not None and issubclass(kind, self.errors)


class JobError(Exception):
    """The job cannot be carried out (bad message, a file that cannot be written)."""


# base64 by binascii's C functions: the base64 module imports re, some 12 ms a start.
def from_base64(text: str) -> bytes:
    """The bytes of base64 ``text``; ValueError (binascii.Error) if it is not that."""
    return binascii.a2b_base64(text.encode(), strict_mode=True)


def to_base64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode()
