"""The agent's vsock channel, in a real VM: the guest kernel's AF_VSOCK, the initramfs's
vsock modules, the agent's listener, and the host reconnecting as after a snapshot restore.

This host has no /dev/vhost-vsock, so QEMU's vsock device is served by a vhost-user
back-end (tests/fakes/vhost_user_vsock.py) that speaks Firecracker's hybrid vsock on the
host side (``CONNECT <port>`` on a Unix socket), which the daemon's own connector uses
as it does for Firecracker. The VM has no virtio-serial port: the agent must find vsock
by itself.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from sandboxd.agent_link import AgentLink, Transcript
from sandboxd.backends.agent_bundle import agent_bundle
from sandboxd.backends.qemu.backend import VmLayout
from sandboxd.backends.vm import initramfs
from sandboxd.backends.vm.channel import connect_hybrid_vsock
from sandboxd.errors import AgentError
from sandboxd.images import Image
from tests.fakes.vhost_user_vsock import VhostUserVsock

pytestmark = [pytest.mark.vm, pytest.mark.image]

AGENT_PORT = 8080
GUEST_CID = 3
MEMORY = 512 * 2**20
LIMITS = {
    "wall_time": 20,
    "cpu_time": 20,
    "compile_time": 20,
    "processes": 64,
    "output_bytes": 10_000,
    "file_size_bytes": 10**7,
    "memory_bytes": 2**28,
}


# Where host connections come from: as with vhost-vsock, the daemon binds a port below
# 1024, which the VM's agent demands; Firecracker's own ports are high.
ROOT_PORTS = range(1000, 1024)
FIRECRACKER_PORTS = range(1 << 30, 1 << 31)


@pytest.fixture
def vsock_vm(request: pytest.FixtureRequest, tmp_path: Path, vm_image: Image) -> Iterator[Path]:
    """A booting VM whose only agent channel is vsock, set up as the qemu backend sets
    up vhost-vsock VMs; yields the hybrid vsock socket (host ports: ``request.param``)."""
    image = vm_image
    assert image.vm_dir is not None
    ramdisk = tmp_path / "initramfs.img"
    ramdisk.write_bytes(initramfs.for_image(image, agent_bundle()))
    kernel = image.vm_dir / "bzImage"
    hz = image.manifest["vm"]["hz"]
    layout = VmLayout(image.vm_dir, kernel, MEMORY, 1, "tcg", hz, AGENT_PORT, vsock_privileged=True)
    vsock = [
        "-object", f"memory-backend-memfd,id=mem,size={MEMORY},share=on",
        "-machine", "memory-backend=mem",
        "-chardev", f"socket,id=vu,path={tmp_path / 'vu.sock'}",
        "-device", "vhost-user-vsock-device,chardev=vu",
    ]  # fmt: skip
    # Paths as QEMU sees them outside a jail.
    argv = [
        {"/kernel": str(kernel), "/initramfs.img": str(ramdisk)}.get(arg)
        or arg.replace("/vm/", f"{image.vm_dir}/")
        for arg in layout.qemu_argv(vsock)
    ]
    uds = tmp_path / "v.sock"
    with (
        VhostUserVsock(tmp_path / "vu.sock", uds, GUEST_CID, getattr(request, "param", ROOT_PORTS)),
        (tmp_path / "console").open("wb") as console,
    ):
        qemu = subprocess.Popen(argv, stdout=console, stderr=subprocess.STDOUT)
        try:
            yield uds
        finally:
            qemu.kill()
            qemu.wait()


async def connect(uds: Path, port: int) -> trio.SocketStream:
    with trio.fail_after(120):
        return await connect_hybrid_vsock(uds, port, lambda: True)


async def test_the_agent_serves_vsock_and_takes_the_host_again_after_a_lost_connection(
    vsock_vm: Path,
):
    first = await connect(vsock_vm, AGENT_PORT)
    link = AgentLink(first, first)
    hello = await link.handshake()
    assert hello["pid"] == 1  # the VM's agent, as its PID 1
    # The connection goes away before a job, as a restored VM's old one does.
    await first.aclose()

    second = await connect(vsock_vm, AGENT_PORT)
    link = AgentLink(second, second)
    await link.handshake()
    output: list[str] = []

    async def on_output(stage: str, stream: str, data: str) -> None:
        output.append(data)

    job = {
        "type": "job",
        "files": [{"path": "main.py", "content": "import socket\nprint(socket.gethostname())"}],
        "run": {"argv": ["python3", "main.py"]},
        "limits": LIMITS,
    }
    transcript = Transcript(10_000)
    result = await link.run(job, on_output, transcript)
    assert result["status"] == "ok", result
    assert transcript.text("run", "stdout") == "".join(output) != ""
    await second.aclose()


@pytest.mark.parametrize("vsock_vm", [FIRECRACKER_PORTS], indirect=True)
async def test_the_agent_refuses_connections_from_unprivileged_host_ports(vsock_vm: Path):
    # Any local user can dial a VM over the host's vhost-vsock; only root binds < 1024.
    stream = await connect(vsock_vm, AGENT_PORT)  # the guest kernel accepts...
    link = AgentLink(stream, stream)
    with trio.fail_after(60), pytest.raises(AgentError):
        await link.handshake()  # ...and the agent hangs up
    await stream.aclose()


async def test_nothing_listens_on_other_vsock_ports(vsock_vm: Path):
    stream = await connect(vsock_vm, AGENT_PORT)  # the agent is up
    await stream.aclose()
    async with await trio.open_unix_socket(str(vsock_vm)) as other:
        await other.send_all(f"CONNECT {AGENT_PORT + 1}\n".encode())
        with trio.fail_after(10):
            assert await other.receive_some(64) == b""
