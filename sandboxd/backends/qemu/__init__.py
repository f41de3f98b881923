"""The qemu backend: a QEMU microvm per sandbox, QEMU itself jailed, driven over QMP."""
