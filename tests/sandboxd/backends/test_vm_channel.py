"""The choice of a VM's agent channel, and what each kind asks of QEMU and the host.

The vsock path itself runs in real VMs in tests/sandboxd/backends/test_vsock_vm.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from sandboxd.backends.qemu.backend import VmLayout
from sandboxd.backends.vm import channel as vm_channel
from sandboxd.backends.vm.channel import SerialChannel, VsockChannel, choose_channel
from sandboxd.errors import LaunchError

HAS_VHOST_VSOCK = os.path.exists(vm_channel.VHOST_VSOCK)


def test_virtio_serial_when_configured_or_without_vhost_vsock():
    assert choose_channel("virtio-serial") == ("virtio-serial", "configured")
    kind, why = choose_channel("auto")
    if HAS_VHOST_VSOCK and os.access(vm_channel.VHOST_VSOCK, os.R_OK | os.W_OK):
        assert (kind, why) == ("vsock", "/dev/vhost-vsock is usable")
    else:
        assert kind == "virtio-serial"
        assert "/dev/vhost-vsock" in why


def test_vsock_asked_for_without_the_device_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setattr(vm_channel, "VHOST_VSOCK", str(tmp_path / "vhost-vsock"))
    with pytest.raises(LaunchError, match=r"vm_channel = vsock, but there is no .*modprobe"):
        choose_channel("vsock")
    assert choose_channel("auto")[0] == "virtio-serial"


def test_serial_channel_gives_qemu_its_end_and_keeps_ours():
    with SerialChannel() as channel:
        args = channel.qemu_args()
        fds = channel.hand_over()
        assert len(fds) == 1 and f"socket,id=agent,fd={fds[0]}" in args
        assert "virtserialport,chardev=agent,name=sandboxd.agent" in args
        assert channel.hand_over() == []  # handed over once: the jail closes them
        os.close(fds[0])


def test_an_unused_channel_closes_what_qemu_never_got(monkeypatch, tmp_path):
    device = tmp_path / "vhost-vsock"
    device.touch()
    monkeypatch.setattr(vm_channel, "VHOST_VSOCK", str(device))
    channel = VsockChannel(cid=900_003, port=52)
    (fd,) = channel.qemu_fds
    assert channel.qemu_args() == ["-device", f"vhost-vsock-device,guest-cid=900003,vhostfd={fd}"]
    channel.close()
    with pytest.raises(OSError):
        os.fstat(fd)


async def test_vsock_connect_retries_while_the_vm_runs_then_gives_up(monkeypatch, tmp_path):
    device = tmp_path / "vhost-vsock"
    device.touch()
    monkeypatch.setattr(vm_channel, "VHOST_VSOCK", str(device))
    monkeypatch.setattr(vm_channel, "CONNECT_RETRY", 0.01)
    checks = []

    def running() -> bool:
        checks.append(trio.current_time())
        return len(checks) < 3

    # No VM has this CID: every attempt fails (refused, or timed out after 2 s).
    with (
        VsockChannel(cid=900_003, port=52) as channel,
        pytest.raises(LaunchError, match="stopped before its agent listened"),
    ):
        await channel.connect(running)
    assert len(checks) == 3


def test_the_kernel_is_told_the_agent_port():
    layout = VmLayout(Path("/vm"), Path("/vm/bzImage"), 2**28, 1, "kvm", 250, agent_port=8080)
    assert "sandboxd.agent_port=8080" in layout.kernel_cmdline().split()
