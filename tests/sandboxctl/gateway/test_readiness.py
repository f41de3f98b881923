"""What a load balancer asks a node (``GET /ready``), and a node told to stop: it says it
is draining, still serves, answers what it accepted, then exits."""

from __future__ import annotations

import signal
import threading
import time

import httpx

from tests.daemon_process import start_gateway

SLOW = "import time\ntime.sleep(2)\nprint('finished')"


def test_ready_says_how_much_work_the_node_takes(http, daemon):
    answer = http.get("/ready")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    pool = daemon.client.health()["pool"]
    assert body["ready"] is True and "reason" not in body
    assert 0 <= body["ready_sandboxes"] <= pool["max"]
    assert 0 < body["free_slots"] <= pool["max"]


def test_a_draining_node_says_so_serves_on_and_answers_what_it_accepted(daemon, tmp_path):
    gateway = start_gateway(tmp_path, daemon.socket, drain_seconds=3)
    accepted: dict[str, httpx.Response] = {}

    def run_slow_job() -> None:
        with httpx.Client(base_url=gateway.url, timeout=60) as client:
            accepted["slow"] = client.post("/execute", json={"language": "python", "code": SLOW})

    with httpx.Client(base_url=gateway.url, timeout=60) as client:
        assert client.get("/ready").status_code == 200
        slow = threading.Thread(target=run_slow_job)
        slow.start()
        time.sleep(0.5)  # the slow job is running
        told = time.monotonic()
        gateway.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        draining = client.get("/ready")
        assert draining.status_code == 503
        assert draining.json() == {
            "ready": False,
            "ready_sandboxes": 0,
            "free_slots": 0,
            "reason": "draining: finishing what it has",
        }
        # New work that a balancer sends before it notices is still done.
        late = client.post("/execute", json={"language": "python", "code": "print(1)"})
        assert (late.status_code, late.json()["stdout"]) == (200, "1\n")
    slow.join(30)
    assert (accepted["slow"].status_code, accepted["slow"].json()["stdout"]) == (200, "finished\n")
    assert gateway.process.wait(30) == 0, gateway.log()
    assert time.monotonic() - told >= 3  # it drained as long as told
    assert "draining for 3 s" in gateway.log()
