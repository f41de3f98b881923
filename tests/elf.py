"""What an ELF executable asks of the kernel at its exec, read from its program headers."""

from __future__ import annotations

import struct

PT_INTERP = 3  # a segment naming the dynamic loader the kernel maps first


def needs_loader(image: bytes) -> bool:
    """Whether the 64-bit little-endian ELF ``image`` is run through a dynamic loader."""
    assert image[:4] == b"\x7fELF" and image[4] == 2 and image[5] == 1, "not an ELF64 LE file"
    (phoff,) = struct.unpack_from("<Q", image, 32)
    entry_size, count = struct.unpack_from("<HH", image, 54)
    types = [struct.unpack_from("<I", image, phoff + i * entry_size)[0] for i in range(count)]
    return PT_INTERP in types
