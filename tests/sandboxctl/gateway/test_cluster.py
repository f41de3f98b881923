"""Two nodes behind HAProxy, for real: each node's gateway in a network namespace of its
own on a veth to a bridge in another, HAProxy and the clients in a third, with
contrib/haproxy.cfg as shipped but for its addresses and a faster check. No packet of
these leaves the namespaces the test makes."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio
from pyroute2 import NetNS, netns

from sandboxd.host.netns import in_netns
from tests.conftest import needs_root
from tests.daemon_process import Daemon, Gateway, start_daemon, start_gateway
from tests.host_state import wait_for
from tests.sandboxctl.gateway.test_streaming import parse_sse
from tests.sandboxctl.gateway.ws_client import connect

pytestmark = [
    needs_root,
    pytest.mark.skipif(shutil.which("haproxy") is None, reason="apt install haproxy"),
]

CONFIG = Path(__file__).parents[3] / "contrib" / "haproxy.cfg"
KEY = "cluster-key-0123456789abcdef"
NODES = {"node1": "10.99.0.11", "node2": "10.99.0.12"}
BALANCER = "10.99.0.2"
JOB = "import time, sys\ntime.sleep(0.2)\nprint(sys.stdin.read())"
SLOW = "import time\ntime.sleep(2.5)\nprint('finished')"


@dataclass
class Node:
    name: str
    daemon: Daemon
    gateway: Gateway

    def jobs(self) -> set[str]:
        """The sandboxes whose jobs this node's daemon ran."""
        return set(re.findall(r"job sandbox=(\w+)", self.daemon.log()))


def _link(ns: NetNS, name: str, address: str | None = None) -> None:
    index = ns.link_lookup(ifname=name)[0]
    if address:
        ns.addr("add", index=index, address=address, prefixlen=24)
    ns.link("set", index=index, state="up")


@contextmanager
def namespaces() -> Iterator[dict[str, str]]:
    """The bridge's namespace, and one for each node and for the balancer, each on a
    veth to the bridge: name → the namespace's file."""
    tag = os.getpid() % 100000
    names = {"bridge": f"sbxbr{tag}", "balancer": f"sbxlb{tag}"}
    names |= {node: f"sbx{node}{tag}" for node in NODES}
    for name in names.values():
        netns.create(name)
    try:
        with NetNS(names["bridge"]) as bridge:
            bridge.link("add", ifname="br0", kind="bridge")
            _link(bridge, "br0")
            addresses = {"balancer": BALANCER, **NODES}
            for index, (role, address) in enumerate(addresses.items()):
                port = f"p{index}"
                bridge.link("add", ifname=port, kind="veth", peer={"ifname": "eth0"})
                bridge.link(
                    "set", index=bridge.link_lookup(ifname="eth0")[0], net_ns_fd=names[role]
                )
                bridge.link(
                    "set",
                    index=bridge.link_lookup(ifname=port)[0],
                    master=bridge.link_lookup(ifname="br0")[0],
                )
                _link(bridge, port)
                with NetNS(names[role]) as inside:
                    _link(inside, "lo")
                    _link(inside, "eth0", address)
        yield {role: f"{netns.NETNS_RUN_DIR}/{name}" for role, name in names.items()}
    finally:
        for name in names.values():
            netns.remove(name)


def balancer_config(ports: dict[str, int], check_interval: str) -> str:
    """contrib/haproxy.cfg with this test's addresses, the nodes' ``ports`` and a check
    interval of ``check_interval``."""
    text = CONFIG.read_text().replace("bind :8000", f"bind {BALANCER}:8000")
    text = text.replace("inter 2s", f"inter {check_interval}")
    for node, address in NODES.items():
        server = f"server {node} {address}:{ports[node]} check"
        text = re.sub(rf"server {node} \S+ check", server, text)
    return text


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[dict[str, Node], str, str, Path]]:
    """The two nodes, the balancer's URL, its namespace, and its log."""
    keys = tmp_path / "keys"
    keys.write_text(f"cluster:{KEY}\n")
    with namespaces() as spaces:
        nodes: dict[str, Node] = {}
        try:
            for node in NODES:
                directory = tmp_path / node
                directory.mkdir()
                daemon = start_daemon(directory, sessions={"node": node})
                gateway = start_gateway(
                    directory,
                    daemon.socket,
                    netns=spaces[node],
                    bind="0.0.0.0",
                    api_keys_file=str(keys),
                    rate_per_minute=100_000,
                    rate_burst=10_000,
                    drain_seconds=2,
                )
                nodes[node] = Node(node, daemon, gateway)
            config = tmp_path / "haproxy.cfg"
            ports = {name: int(node.gateway.url.rsplit(":", 1)[1]) for name, node in nodes.items()}
            config.write_text(balancer_config(ports, "300ms"))
            log = tmp_path / "haproxy.log"
            with open(log, "wb") as output:
                haproxy = subprocess.Popen(
                    ["nsenter", f"--net={spaces['balancer']}", "haproxy", "-db", "-f", str(config)],
                    stdout=output,
                    stderr=subprocess.STDOUT,
                )
            try:
                url = f"http://{BALANCER}:8000"
                assert wait_for(lambda: _answers(spaces, url), 10), log.read_text()
                yield nodes, url, spaces["balancer"], log
            finally:
                haproxy.terminate()
                haproxy.wait(10)
        finally:
            for node in nodes.values():
                node.gateway.process.kill()
                node.gateway.process.wait()
                if node.daemon.process.poll() is None:
                    node.daemon.stop()
                else:
                    node.daemon.clean_up()


def _answers(spaces: dict[str, str], url: str) -> bool:
    def ask() -> bool:
        try:
            return httpx.get(f"{url}/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    return in_netns(spaces["balancer"], ask)


def run_jobs(
    client: httpx.Client, first: int, count: int
) -> list[tuple[int, httpx.Response | str]]:
    """``count`` jobs at concurrency 4, each echoing its number: (number, answer)."""

    def one(number: int) -> tuple[int, httpx.Response | str]:
        body = {"language": "python", "code": JOB, "stdin": str(number)}
        try:
            return number, client.post("/execute", json=body)
        except httpx.HTTPError as exc:
            return number, f"{type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, range(first, first + count)))


def test_two_nodes_share_the_load_lose_none_when_one_dies_and_keep_sessions(cluster):
    nodes, url, balancer, log = cluster

    def work() -> dict[str, object]:
        headers = {"Authorization": f"Bearer {KEY}"}
        with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
            # Sessions made through the balancer keep every call on their node.
            sessions = [
                client.post("/sessions", json={"language": "python"}).json()["id"] for _ in range(4)
            ]
            for round_ in range(3):
                for index, session in enumerate(sessions):
                    code = f"x = {index}" if round_ == 0 else "x += 10"
                    cell = client.post(
                        f"/sessions/{session}/exec", json={"code": code, "cell": True}
                    )
                    assert cell.status_code == 200 and cell.json()["success"], cell.text
                    # File calls too: each writes where its session's cells run.
                    mark = client.put(f"/sessions/{session}/files/mark{round_}", content=b"x")
                    assert mark.status_code == 200, mark.text
            marks = [
                client.post(
                    f"/sessions/{s}/exec",
                    json={"code": "import os; sorted(os.listdir())", "cell": True},
                ).json()["cell"]["value"]
                for s in sessions
            ]
            values = [
                client.post(f"/sessions/{s}/exec", json={"code": "x", "cell": True}).json()["cell"][
                    "value"
                ]
                for s in sessions
            ]
            before = run_jobs(client, 0, 24)
            # One node's daemon dies while jobs run; the balancer takes it out.
            with ThreadPoolExecutor(1) as background:
                during = background.submit(run_jobs, client, 100, 24)
                time.sleep(1.0)
                killed_at = time.monotonic()
                nodes["node2"].daemon.process.kill()
                mid = during.result()
            down = wait_for(lambda: "node2 is DOWN" in log.read_text(), 10)
            taken_out = time.monotonic() - killed_at
            after = run_jobs(client, 200, 16)
            return {
                "sessions": sessions,
                "values": values,
                "marks": marks,
                "before": before,
                "mid": mid,
                "after": after,
                "down": down,
                "taken_out": taken_out,
            }

    seen = in_netns(balancer, work)
    assert {s.split("-")[0] for s in seen["sessions"]} == set(NODES), seen["sessions"]
    assert seen["values"] == [str(index + 20) for index in range(4)]
    assert all("'mark0', 'mark1', 'mark2'" in listed for listed in seen["marks"]), seen["marks"]
    # Before the kill, both nodes served a share, and every answer was right.
    served = {name: node.jobs() for name, node in nodes.items()}
    for number, answer in seen["before"]:
        assert not isinstance(answer, str), answer
        assert answer.status_code == 200 and answer.json()["stdout"] == f"{number}\n", answer.text
    before_ids = {answer.json()["sandbox_id"] for _, answer in seen["before"]}
    assert all(before_ids & jobs for jobs in served.values()), served
    # Mid-kill: every request was answered, and right: what the dead node had, or was
    # sent before the balancer knew, ran again on the other (its 503, retried).
    for number, answer in seen["mid"]:
        assert not isinstance(answer, str), answer  # nothing lost on the way
        assert answer.status_code == 200, answer.text
        assert answer.json()["stdout"] == f"{number}\n", answer.text
    assert seen["down"], log.read_text()
    assert seen["taken_out"] < 5  # within a few check intervals (300 ms each, fall 2)
    # After: all on the live node, all right.
    for number, answer in seen["after"]:
        assert not isinstance(answer, str), answer
        assert answer.status_code == 200 and answer.json()["stdout"] == f"{number}\n", answer.text
    after_ids = {answer.json()["sandbox_id"] for _, answer in seen["after"]}
    assert after_ids <= nodes["node1"].jobs()


def test_a_draining_node_finishes_its_jobs_while_the_balancer_moves_new_work(cluster):
    nodes, url, balancer, log = cluster

    def work() -> dict[str, object]:
        headers = {"Authorization": f"Bearer {KEY}"}
        with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
            slow_job = {"language": "python", "code": SLOW}
            with ThreadPoolExecutor(2) as background:
                slow = [background.submit(client.post, "/execute", json=slow_job) for _ in range(2)]
                time.sleep(0.7)  # one on each node (leastconn), both running
                told = time.monotonic()
                nodes["node1"].gateway.process.send_signal(signal.SIGTERM)
                down = wait_for(lambda: "node1 is DOWN" in log.read_text(), 10)
                taken_out = time.monotonic() - told
                new = run_jobs(client, 300, 8)
                finished = [future.result() for future in slow]
        return {"down": down, "taken_out": taken_out, "new": new, "slow": finished}

    seen = in_netns(balancer, work)
    assert seen["down"] and seen["taken_out"] < 2, log.read_text()  # before its drain ends
    for number, answer in seen["new"]:
        assert not isinstance(answer, str), answer
        assert answer.status_code == 200 and answer.json()["stdout"] == f"{number}\n"
    new_ids = {answer.json()["sandbox_id"] for _, answer in seen["new"]}
    assert new_ids <= nodes["node2"].jobs()  # new work went to the node not draining
    slow_ids = set()
    for answer in seen["slow"]:
        assert (answer.status_code, answer.json()["stdout"]) == (200, "finished\n")
        slow_ids.add(answer.json()["sandbox_id"])
    assert slow_ids & nodes["node1"].jobs()  # the draining node finished its job
    assert nodes["node1"].gateway.process.wait(30) == 0


COUNTING = "import time\nfor i in range(3):\n    print(i, flush=True)\n    time.sleep(0.4)"
ECHO = "import sys\nprint('echo', sys.stdin.readline().strip(), flush=True)"


def test_streams_and_websockets_pass_through_the_balancer(cluster):
    _, url, balancer, _ = cluster
    auth = {"Authorization": f"Bearer {KEY}"}

    def stream() -> tuple[list[tuple[str, dict]], float, float]:
        """The server-sent events of a counting job, with when the first output came and
        when the answer ended, from the request on."""
        with httpx.Client(base_url=url, headers=auth, timeout=60) as client:
            start = time.monotonic()
            body = {"language": "python", "code": COUNTING}
            headers = {"Accept": "text/event-stream"}
            text, first = "", 0.0
            with client.stream("POST", "/execute", json=body, headers=headers) as answer:
                assert answer.status_code == 200
                for chunk in answer.iter_text():
                    if not first and "event: output" in text + chunk:
                        first = time.monotonic() - start
                    text += chunk
            return parse_sse(text), first, time.monotonic() - start

    async def websocket() -> list[dict]:
        ws_url = url.replace("http://", "ws://") + "/execute/ws"
        async with connect(ws_url, [("authorization", f"Bearer {KEY}")]) as ws:
            await ws.send({"language": "python", "code": ECHO})
            await ws.send({"type": "stdin", "data": "through haproxy\n", "eof": True})
            messages = [await ws.receive()]
            while messages[-1]["type"] == "output":
                messages.append(await ws.receive())
            return messages

    events, first, total = in_netns(balancer, stream)
    outputs = [data["data"] for name, data in events if name == "output"]
    assert "".join(outputs) == "0\n1\n2\n" and events[-1][0] == "result"
    assert first < total - 0.6  # the first line came while the job still ran: streamed
    messages = in_netns(balancer, lambda: trio.run(websocket))
    assert messages[-1]["type"] == "result" and messages[-1]["success"] is True
    assert messages[-1]["output"] == "echo through haproxy\n"
