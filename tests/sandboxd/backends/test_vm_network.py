"""Egress for VMs, with the qemu backend (software emulation here) and the firecracker
backend (against the fake, whose QEMU guest gets the TAP Firecracker opened): each VM's
NIC is a TAP in a network namespace of the VM's own, routed out only for a job that
asks, under the policy namespaces sandboxes have. The world outside is
tests.network_world's: namespaces this test makes, routed nowhere else."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest
from pyroute2 import Conntrack, IPRoute, netns

from sandboxd.host.netns import in_netns
from sandboxd.host.network import Egress
from sandboxd.host.vm_network import GATEWAY
from tests.conftest import IS_ROOT
from tests.daemon_process import Daemon, start_daemon, wait_for_warm
from tests.host_state import wait_for
from tests.network_world import (
    ALLOWED,
    METADATA,
    PAGE,
    PROBE,
    REFUSED,
    SUBNET,
    UPLINK_ADDRESS,
    nft_ruleset,
    outside_world,
    probe,
    sandbox_addresses,
    sandbox_connections,
    uplink_links,
)

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(not IS_ROOT, reason="needs root: QEMU, network namespaces"),
    pytest.mark.skipif(shutil.which("nft") is None, reason="needs nftables"),
]

JOB = {"timeout": 60}
MAX_CONNECTIONS = 8
# New "connections" to a destination the uplink refuses: each is tracked in the VM's own
# namespace before the uplink drops it.
FLOOD = f"""
import socket
flood = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for port in range(2000, 2100):
    flood.sendto(b"x", ("{REFUSED}", port))
print("sent")
"""
ROUTER = str(GATEWAY.ip)
FETCH = f"""
import sys, urllib.request
page = urllib.request.urlopen("http://{ALLOWED}:8000/page.html", timeout=20)
sys.stdout.write(page.read().decode())
"""


@pytest.fixture(scope="module")
def world() -> Iterator[str]:
    with outside_world() as uplink:
        yield uplink


def vm_settings(uplink: str, vm_backend: dict, **more: object) -> dict[str, dict[str, object]]:
    return {
        "pool": {"size": 1, "max_sandboxes": 4, "start_timeout": 120, "queue_timeout": 120},
        "backend": {**vm_backend, "vm_memory": 512 * 2**20, **more},
        "network": {
            "allow": [f"{ALLOWED}/32"],
            "uplink_netns": uplink,
            "max_connections": MAX_CONNECTIONS,
        },
    }


@pytest.fixture(scope="module")
def vm_daemon(tmp_path_factory: pytest.TempPathFactory, world: str, vm_backend) -> Iterator[Daemon]:
    daemon = start_daemon(tmp_path_factory.mktemp("vm-network"), **vm_settings(world, vm_backend))
    yield daemon
    assert daemon.stop() == 0, daemon.log()


def vm_namespaces(daemon: Daemon) -> list[str]:
    return [name for name in netns.listnetns() if name.startswith(f"sandboxd-{daemon.name}.")]


def test_pool_vms_restore_a_snapshot_that_has_the_nic(vm_daemon):
    status = vm_daemon.client.status()
    assert status["backend"]["snapshot"].startswith("pool VMs restore a snapshot"), status
    assert "to 198.51.100.1/32 only" in status["network"]
    result = vm_daemon.client.execute("python", "print('restored')", **JOB)
    assert result.stdout == "restored\n", result.stderr
    assert "restore failed" not in vm_daemon.log()


def test_without_asking_a_vm_job_sees_no_interface_but_lo(vm_daemon):
    # (before the tests that open sessions: the pool's one sandbox follows demand)
    wait_for_warm(vm_daemon.client, "python", timeout=120)
    listed = vm_daemon.client.execute(
        "python", "import socket; print(socket.if_nameindex())", **JOB
    )
    assert listed.stdout == "[(1, 'lo')]\n", listed.stderr
    assert listed.warm  # the warm runtime waited out of the network too
    assert probe(vm_daemon, ALLOWED, network=False, **JOB) == {ALLOWED: "OSError"}
    # ... while a job that asks gets eth0, up with the address every VM has.
    asked = vm_daemon.client.execute(
        "python", "import socket; print(socket.if_nameindex())", network=True, **JOB
    )
    assert asked.stdout == "[(1, 'lo'), (2, 'eth0')]\n", asked.stderr


def test_a_vm_reaches_the_allowed_destination_and_nothing_else(vm_daemon, world):
    # Another VM with the network, running meanwhile: its address must be out of reach.
    with vm_daemon.client.session("python", network=True) as other:
        (neighbour,) = sandbox_addresses(world)
        addresses = (ALLOWED, REFUSED, UPLINK_ADDRESS, METADATA, neighbour, ROUTER)
        seen = probe(vm_daemon, *addresses, connect=5, **JOB)
        # The session's own calls have its network.
        listed = other.exec("import socket; print(socket.if_nameindex())", **JOB)
        assert listed.stdout == "[(1, 'lo'), (2, 'eth0')]\n", listed.stderr
    assert seen == {
        ALLOWED: f"hello from {ALLOWED}",
        REFUSED: "TimeoutError",  # on a network that is not allowed
        UPLINK_ADDRESS: "TimeoutError",  # the uplink host itself
        METADATA: "TimeoutError",  # link-local
        neighbour: "TimeoutError",  # another sandbox
        ROUTER: "TimeoutError",  # the VM's own namespace, the TAP's end
    }
    page = vm_daemon.client.execute("python", FETCH, network=True, **JOB)
    assert page.stdout == PAGE, page.stderr
    # Their links went with them, and so did their connections.
    assert wait_for(lambda: uplink_links(world) == ["lo", "wan"], timeout=10), uplink_links(world)
    assert wait_for(lambda: not sandbox_connections(world), timeout=10)


def attached_namespace(daemon: Daemon) -> str:
    """The file of the one VM namespace that holds an egress link now."""

    def attached() -> bool:
        with IPRoute() as ip:
            return bool(ip.link_lookup(ifname="eth0"))

    paths = [f"{netns.NETNS_RUN_DIR}/{name}" for name in vm_namespaces(daemon)]
    (found,) = [path for path in paths if in_netns(path, attached)]
    return found


def tracked_connections() -> int:
    with Conntrack() as table:
        return len(list(table.dump_entries()))


def test_a_vm_s_flood_of_new_connections_is_capped_in_its_own_namespace(vm_daemon):
    with vm_daemon.client.session("python", network=True) as session:
        namespace = attached_namespace(vm_daemon)
        flooded = session.exec(FLOOD, **JOB)
        assert flooded.stdout == "sent\n", flooded.stderr
        assert 0 < in_netns(namespace, tracked_connections) <= MAX_CONNECTIONS


def test_a_vmm_a_guest_broke_into_gets_nothing_out_of_the_vm_s_namespace(vm_daemon, vm_backend):
    if vm_backend["name"] != "firecracker":
        pytest.skip("QEMU holds only its TAP's fd, from a namespace of its own")
    with vm_daemon.client.session("python", network=True):
        namespace = attached_namespace(vm_daemon)
        uid = vm_daemon.uid_base + int(namespace.rpartition(".vm")[2])  # the VM's, as its VMM
        code = PROBE.format(addresses=[ALLOWED], timeout=2)

        def probe_as(*user: str) -> str:
            argv = ["nsenter", f"--net={namespace}", *user, sys.executable, "-I", "-c", code]
            return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout

        vmm = ("setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups")
        assert probe_as(*vmm) == f"{ALLOWED} TimeoutError\n"  # its packets never leave
        # (as root the same namespace reaches the allowed address: the rule is what stops it)
        assert probe_as() == f"{ALLOWED} hello from {ALLOWED}\n"


def test_a_killed_daemon_leaves_no_namespace_link_or_rule_after_cleanup(
    tmp_path, world, vm_backend
):
    daemon = start_daemon(tmp_path, **vm_settings(world, vm_backend, snapshot=False))
    try:
        daemon.client.session("python", network=True)  # its VM is attached when killed
        assert vm_namespaces(daemon) and sandbox_addresses(world)
    finally:
        daemon.stop(signal.SIGKILL)
    cleaned = daemon.clean_up()
    assert cleaned.returncode == 0, cleaned.stderr
    assert "network namespace" in cleaned.stdout, cleaned.stdout
    assert vm_namespaces(daemon) == []
    assert uplink_links(world) == ["lo", "wan"]
    # (the module's daemon keeps its own tables there)
    assert f"table inet {Egress(daemon.name, [], world, str(SUBNET)).table} " not in nft_ruleset(
        world
    )
