"""The kernel VMs boot: the image's, or KERNEL_PATH's, checked before any VM starts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sandboxd.backends.vm.kernel import choose_kernel
from sandboxd.errors import ConfigError

IMAGE_VERSION = "6.1.0-56-cloud-amd64"


def fake_vmlinux(path: Path, version: str) -> Path:
    header = b"\x7fELF\x02\x01\x01" + b"\0" * 11 + (62).to_bytes(2, "little")  # x86-64
    path.write_bytes(header + b"\0" * 44 + f"Linux version {version} (builder) #1".encode())
    return path


def test_without_kernel_path_the_image_s_kernel_and_modules(tmp_path):
    kernel = choose_kernel("", tmp_path, IMAGE_VERSION)
    assert (kernel.path, kernel.vmlinux) == (tmp_path / "bzImage", tmp_path / "vmlinux")
    assert kernel.with_modules and kernel.version == IMAGE_VERSION


def test_a_kernel_of_the_image_s_version_keeps_its_modules(public_tmp_path):
    path = fake_vmlinux(public_tmp_path / "vmlinux", IMAGE_VERSION)
    kernel = choose_kernel(str(path), public_tmp_path / "image", IMAGE_VERSION)
    assert (kernel.path, kernel.vmlinux, kernel.with_modules) == (path, path, True)


def test_another_kernel_must_bring_its_drivers(public_tmp_path):
    path = fake_vmlinux(public_tmp_path / "vmlinux", "6.18.4-custom")
    kernel = choose_kernel(str(path), public_tmp_path / "image", IMAGE_VERSION)
    assert (kernel.version, kernel.with_modules) == ("6.18.4-custom", False)
    assert "built-in drivers" in kernel.describe()


def test_a_kernel_the_unprivileged_vmms_cannot_read_is_refused(public_tmp_path):
    hidden = public_tmp_path / "hidden"
    hidden.mkdir(mode=0o700)
    path = fake_vmlinux(hidden / "vmlinux", IMAGE_VERSION)
    with pytest.raises(ConfigError, match=f"{hidden} is not \\(chmod o\\+x\\)"):
        choose_kernel(str(path), public_tmp_path, IMAGE_VERSION)
    hidden.chmod(0o755)
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="must be readable by everyone"):
        choose_kernel(str(path), public_tmp_path, IMAGE_VERSION)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read"),
        (b"MZ compressed bzImage", "not an uncompressed x86-64 Linux kernel"),
        (b"\x7fELF but no version banner", "not an uncompressed x86-64 Linux kernel"),
        (b"\x7fELF\x01 a 32-bit one, Linux version 6.1.0 ", "not an uncompressed x86-64"),
    ],
)
def test_what_is_not_a_bootable_kernel_is_refused_clearly(tmp_path, content, message):
    path = tmp_path / "kernel"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"backend.kernel_path: .*{message}"):
        choose_kernel(str(path), tmp_path, IMAGE_VERSION)


def test_a_kernel_others_could_replace_is_refused(public_tmp_path):
    shared = public_tmp_path / "shared"
    shared.mkdir()
    path = fake_vmlinux(shared / "vmlinux", IMAGE_VERSION)
    path.chmod(0o664)  # group-writable: the group could boot its own kernel in every VM
    with pytest.raises(ConfigError, match=f"{path} is not \\(chown root, chmod go-w\\)"):
        choose_kernel(str(path), public_tmp_path, IMAGE_VERSION)
    path.chmod(0o644)
    shared.chmod(0o777)  # and so could anyone who may rename it away
    with pytest.raises(ConfigError, match=f"{shared} is not \\(chown root, chmod go-w\\)"):
        choose_kernel(str(path), public_tmp_path, IMAGE_VERSION)
    shared.chmod(0o755)
    os.chown(path, 65534, 65534)
    with pytest.raises(ConfigError, match="must be root's"):
        choose_kernel(str(path), public_tmp_path, IMAGE_VERSION)
    os.chown(path, 0, 0)
    assert choose_kernel(str(path), public_tmp_path, IMAGE_VERSION).vmlinux == path
