"""What giving a sandbox a network costs a job, side by side in one run.

A daemon of its own gets egress through a network namespace made here (nothing routes
out of it: the jobs send no packets). Interleaved: a Python hello-world without and
with ``"network": true`` (a veth, an address and a route made for the job, removed
with its connection-tracking entries after). Printed: medians, p95s and the ratio.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pyroute2 import netns

from bench.stats import Samples, interleave, table
from tests.daemon_process import start_daemon

RUNS = int(os.environ.get("BENCH_RUNS", "30"))
HELLO = {"language": "python", "code": 'print("hello")'}


def main() -> None:
    uplink = f"sbxbench{os.getpid()}"
    netns.create(uplink)
    try:
        with tempfile.TemporaryDirectory(prefix="sandboxd-bench-") as tmp:
            daemon = start_daemon(
                Path(tmp),
                pool={"size": 4},
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
                plain = Samples("no network")
                networked = Samples("with network")
                interleave(RUNS, (plain, without), (networked, with_network))
            finally:
                daemon.stop()
        print(f"\nnetwork on request, python hello-world, {RUNS} runs each, interleaved\n")
        print(table([("with network (egress link)", networked, plain)]))
    finally:
        netns.remove(uplink)


if __name__ == "__main__":
    main()
