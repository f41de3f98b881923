"""API keys, the per-key rate and concurrency limits, and the loopback-only rule."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
import trio

from tests.daemon_process import Gateway, start_gateway
from tests.host_state import wait_for
from tests.sandboxctl.gateway.conftest import KEYS
from tests.sandboxctl.gateway.test_mcp_http import mcp_over_http
from tests.sandboxctl.test_mcp import call

HELLO = {"language": "python", "code": "print('hi')"}
DAVE = "dave-key-0123456789abcdef"


def test_without_a_key_execute_is_401_and_health_stays_open(keyed_gateway):
    assert httpx.post(f"{keyed_gateway.url}/execute", json=HELLO).status_code == 401
    wrong = httpx.post(
        f"{keyed_gateway.url}/execute", json=HELLO, headers={"X-API-Key": "not-a-key-at-all-really"}
    )
    assert wrong.status_code == 401 and wrong.json()["error"] == "unknown API key"
    assert httpx.get(f"{keyed_gateway.url}/health").status_code == 200


def test_bearer_and_x_api_key_both_work_and_the_key_is_never_logged(keyed_gateway):
    bearer = httpx.post(
        f"{keyed_gateway.url}/execute",
        json=HELLO,
        headers={"Authorization": f"Bearer {KEYS['bob']}"},
    )
    assert bearer.json()["success"] is True
    header = httpx.post(
        f"{keyed_gateway.url}/execute", json=HELLO, headers={"X-API-Key": KEYS["bob"]}
    )
    assert header.json()["success"] is True
    # The log line trails the answer a little.
    assert wait_for(lambda: '"key_id": "bob"' in keyed_gateway.log(), timeout=10)
    assert all(key not in keyed_gateway.log() for key in KEYS.values())


def test_rate_limit_is_429_with_retry_after(keyed_gateway):
    headers = {"X-API-Key": KEYS["alice"]}
    statuses = [
        httpx.post(f"{keyed_gateway.url}/execute", json=HELLO, headers=headers, timeout=30)
        for _ in range(5)
    ]
    codes = [answer.status_code for answer in statuses]
    assert codes[:3] == [200, 200, 200] and 429 in codes  # bursts of 3, then 6 a minute
    limited = next(answer for answer in statuses if answer.status_code == 429)
    assert 1 <= int(limited.headers["Retry-After"]) <= 10
    assert limited.json()["error"].startswith("rate limit of 6 executions per minute")


async def test_concurrency_limit_per_key(keyed_gateway, daemon, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"carol:{'c' * 20}\n")
    gateway = start_gateway(tmp_path, daemon.socket, api_keys_file=str(keys), concurrent_per_key=2)
    codes: list[int] = []
    slow = {"language": "python", "code": "import time; time.sleep(1.5)"}
    try:
        async with httpx.AsyncClient(
            base_url=gateway.url, timeout=30, headers={"X-API-Key": "c" * 20}
        ) as client:

            async def one() -> None:
                codes.append((await client.post("/execute", json=slow)).status_code)

            async with trio.open_nursery() as nursery:
                for _ in range(2):
                    nursery.start_soon(one)
                await trio.sleep(0.5)
                third = await client.post("/execute", json=slow)
        assert third.status_code == 429
        assert third.json()["error"].startswith("too many requests at once")
        assert codes == [200, 200]
    finally:
        gateway.stop()


@pytest.fixture
def sparse_gateway(daemon, tmp_path) -> Iterator[Gateway]:
    """With one key (dave's), whose executions come 2 in a burst, then 1 a minute."""
    keys = tmp_path / "keys"
    keys.write_text(f"dave:{DAVE}\n")
    gateway = start_gateway(
        tmp_path, daemon.socket, api_keys_file=str(keys), rate_per_minute=1, rate_burst=2
    )
    yield gateway
    gateway.stop()


def test_only_what_runs_a_program_spends_the_rate(sparse_gateway):
    """An agent opens a session, puts files in, lists them: none of that is an execution
    (docs/http.md), so the key's two executions are still there to run."""
    with httpx.Client(base_url=sparse_gateway.url, headers={"X-API-Key": DAVE}, timeout=60) as http:
        created = http.post("/sessions", json={"language": "python"})
        assert created.status_code == 201, created.text
        base = f"/sessions/{created.json()['id']}"
        for number in range(4):
            assert http.put(f"{base}/files/{number}.txt", content=b"x").status_code == 200
        assert len(http.get(f"{base}/files").json()["entries"]) >= 4
        ran = http.post(f"{base}/exec", json={"code": "print(open('3.txt').read())"})
        assert ran.json()["stdout"] == "x\n", ran.text
        assert http.post("/execute", json=HELLO).status_code == 200
        refused = http.post("/execute", json=HELLO)
        assert refused.status_code == 429
        assert refused.json()["error"].startswith("rate limit of 1 executions per minute")
        assert http.delete(base).status_code == 200


async def test_over_mcp_only_the_tool_calls_that_run_code_spend_the_rate(sparse_gateway):
    """The SDK's client sends several requests per session (initialize, its notification,
    tools/list): they take none of the key's executions, run_code does."""
    async with mcp_over_http(sparse_gateway.url, DAVE) as session:
        assert "run_code" in {tool.name for tool in (await session.list_tools()).tools}
        for _ in range(2):
            ran = await call(session, "run_code", language="python", code="print(1)")
            assert ran["stdout"] == "1\n"
        refused = await session.call_tool("run_code", {"language": "python", "code": "1"})
        assert refused.is_error
        assert "rate limit of 1 executions per minute" in refused.content[0].text
        languages = await call(session, "list_languages")  # not an execution
        assert languages


def run_gateway_command(tmp_path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run sandboxd-gateway with an empty config (no installed config leaks in)."""
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    return subprocess.run(
        [sys.executable, "-m", "sandboxctl.gateway", "--config", str(empty), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_without_keys_it_refuses_to_listen_beyond_loopback(daemon, tmp_path):
    done = run_gateway_command(tmp_path, "--bind", "0.0.0.0:18999", "--socket", str(daemon.socket))
    assert done.returncode == 1
    assert done.stderr.startswith("Error: ")
    assert "refusing to serve 0.0.0.0 without API keys" in done.stderr


@pytest.mark.parametrize(
    "line", ["short:key", "nocolon", "a:0123456789abcdefg\na:0123456789abcdefg"]
)
def test_a_bad_key_file_is_one_clear_line(daemon, tmp_path, line):
    keys = tmp_path / "keys"
    keys.write_text(line + "\n")
    done = run_gateway_command(tmp_path, "--api-keys", str(keys), "--socket", str(daemon.socket))
    assert done.returncode == 1
    assert done.stderr.startswith(f"Error: {keys}:")
