"""What the HTTP gateway adds over the socket client, side by side in one run.

A daemon and a gateway of their own are started. Interleaved: a Python hello-world
through the client library (the socket), and the same through ``POST /execute`` with a
keep-alive HTTP client. Printed: medians, p95s and the gateway's ratio to the socket.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import httpx

from bench.stats import Samples, interleave, table
from sandboxctl.client import Client
from tests.daemon_process import start_daemon, start_gateway

RUNS = int(os.environ.get("BENCH_RUNS", "30"))
HELLO = {"language": "python", "code": 'print("hello")'}


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="sandboxd-bench-") as tmp:
        daemon = start_daemon(Path(tmp), pool={"size": 4}, daemon={"log_level": "warning"})
        gateway = start_gateway(Path(tmp), daemon.socket)
        try:
            client = Client(daemon.socket)
            with httpx.Client(base_url=gateway.url, timeout=60) as http:

                def socket_call() -> None:
                    assert client.execute(**HELLO).stdout == "hello\n"

                def http_call() -> None:
                    assert http.post("/execute", json=HELLO).json()["output"] == "hello\n"

                for action in (socket_call, http_call):
                    action()
                via_socket = Samples("client library (socket)")
                via_http = Samples("POST /execute (gateway)")
                interleave(RUNS, (via_socket, socket_call), (via_http, http_call))
            print(f"\ngateway overhead, python hello-world, {RUNS} runs each, interleaved\n")
            print(table([("POST /execute (gateway)", via_http, via_socket)]))
        finally:
            gateway.stop()
            daemon.stop()


if __name__ == "__main__":
    main()
