"""What giving a sandbox a network costs a job, side by side in one run, per backend.

A daemon of its own per backend gets egress through a network namespace made here
(nothing routes out of it: the jobs send no packets). Interleaved: a Python hello-world
without and with ``"network": true`` — for namespaces a veth, an address and a route
made for the job; for a VM (qemu) the veth moved into its own network namespace, where
its TAP already is — removed with its connection-tracking entries after. Printed:
medians, p95s and the ratio.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pyroute2 import netns

from bench.stats import Samples, interleave, table
from tests.daemon_process import start_daemon

RUNS = int(os.environ.get("BENCH_RUNS", "30"))
VM_RUNS = int(os.environ.get("BENCH_VM_RUNS", "8"))  # software emulation is slow here
HELLO = {"language": "python", "code": 'print("hello")', "timeout": 60}
BACKENDS = {
    "namespaces": ({"name": "namespaces"}, {"size": 4}, RUNS),
    "qemu": (
        {"name": "qemu", "vm_memory": 512 * 2**20},
        {"size": 1, "start_timeout": 120},
        VM_RUNS,
    ),
}


def measure(
    uplink: str, backend: dict[str, object], pool: dict[str, object], runs: int
) -> tuple[Samples, Samples]:
    """(with network, without) for ``runs`` interleaved jobs on a daemon of ``backend``."""
    with tempfile.TemporaryDirectory(prefix="sandboxd-bench-") as tmp:
        daemon = start_daemon(
            Path(tmp),
            pool={**pool, "queue_timeout": 120},
            backend=backend,
            daemon={"log_level": "warning"},
            network={"allow": ["198.51.100.0/24"], "uplink_netns": uplink},
        )
        try:
            client = daemon.client

            def without() -> None:
                assert client.execute(**HELLO).stdout == "hello\n"

            def with_network() -> None:
                assert client.execute(**HELLO, network=True).stdout == "hello\n"

            for action in (without, with_network):
                action()
            plain, networked = Samples("no network"), Samples("with network")
            interleave(runs, (plain, without), (networked, with_network))
        finally:
            daemon.stop()
    return networked, plain


def main() -> None:
    uplink = f"sbxbench{os.getpid()}"
    netns.create(uplink)
    try:
        rows = []
        for name, (backend, pool, runs) in BACKENDS.items():
            networked, plain = measure(uplink, backend, pool, runs)
            rows.append((f"{name}: with network ({runs} runs)", networked, plain))
        print("\nnetwork on request, python hello-world, interleaved per backend\n")
        print(table(rows))
    finally:
        netns.remove(uplink)


if __name__ == "__main__":
    main()
