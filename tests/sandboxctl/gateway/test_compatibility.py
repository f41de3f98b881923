"""The original service's clients keep working unchanged: its README's curl examples,
verbatim but for the port, and the answers' fields and statuses."""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest

from sandboxctl.gateway.http_errors import error_text
from sandboxd import errors

# Copied verbatim from the original README (Quick Start, API Endpoints, Testing).
ORIGINAL_CURLS = {
    "health": "curl http://localhost:8000/health",
    "languages": "curl http://localhost:8000/languages",
    "execute": """curl -X POST http://localhost:8000/execute \\
  -H "Content-Type: application/json" \\
  -d '{
    "language": "python",
    "code": "print(\\"Hello from Rust codesandbox!\\")",
    "timeout": 30
  }'""",
    "python": """curl -X POST http://localhost:8000/execute \\
  -H "Content-Type: application/json" \\
  -d '{"language": "python", "code": "print(2 + 2)"}'""",
    "typescript": """curl -X POST http://localhost:8000/execute \\
  -H "Content-Type: application/json" \\
  -d '{"language": "typescript", "code": "console.log(\\"Hello TypeScript!\\")"}'""",
    "rust": """curl -X POST http://localhost:8000/execute \\
  -H "Content-Type: application/json" \\
  -d '{"language": "rust", "code": "fn main() { println!(\\"Hello Rust!\\"); }"}'""",
}


def run_curl(gateway, name: str) -> dict:
    command = ORIGINAL_CURLS[name].replace("http://localhost:8000", gateway.url)
    done = subprocess.run(
        ["bash", "-c", command + " -s"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_curl_health(gateway):
    answer = run_curl(gateway, "health")
    assert answer["status"] == "healthy"
    assert isinstance(answer["time"], int)


def test_curl_languages(gateway):
    assert run_curl(gateway, "languages")["languages"] == ["python", "typescript", "rust"]


@pytest.mark.parametrize(
    ("name", "output"),
    [
        ("execute", "Hello from Rust codesandbox!\n"),
        ("python", "4\n"),
        ("typescript", "Hello TypeScript!\n"),
        ("rust", "Hello Rust!\n"),
    ],
)
def test_curl_execute(gateway, name, output):
    answer = run_curl(gateway, name)
    assert uuid.UUID(answer["request_id"])
    assert (answer["success"], answer["output"], answer["error"]) == (True, output, None)
    assert isinstance(answer["execution_time"], float) and answer["execution_time"] > 0


def test_failure_is_200_with_success_false_and_the_output_kept(http):
    answer = http.post(
        "/execute", json={"language": "python", "code": "import sys\nprint('partial')\nsys.exit(1)"}
    )
    assert answer.status_code == 200
    body = answer.json()
    assert (body["success"], body["error"], body["output"]) == (
        False,
        "process exited with code 1",
        "partial\n",
    )


def test_output_interleaves_stdout_and_stderr_as_written(http):
    # Two pipes carry no order between them: writes to both within microseconds may
    # swap (docs/http.md says so); a program's ordinary pace keeps its order.
    code = (
        "import sys, time\nprint('a')\ntime.sleep(0.05)\nprint('b', file=sys.stderr)\n"
        "time.sleep(0.05)\nprint('c')"
    )
    body = http.post("/execute", json={"language": "python", "code": code}).json()
    assert body["output"] == "a\nb\nc\n"
    assert (body["stdout"], body["stderr"]) == ("a\nc\n", "b\n")


def test_timeout_field_and_nonpositive_default(http):
    slow = {"language": "python", "code": "import time; time.sleep(5)", "timeout": 1}
    body = http.post("/execute", json=slow).json()
    assert (body["success"], body["status"]) == (False, "timeout")
    assert body["error"] == "wall time limit of 1 s exceeded"
    quick = http.post("/execute", json={"language": "py", "code": "print(1)", "timeout": 0})
    assert quick.json()["success"] is True


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        ({"language": "go", "code": "package main"}, "Unsupported language: go"),
        ({"language": "python"}, "Invalid request: code: is required"),
        ({"code": "x"}, "Invalid request: language: is required"),
        ({"language": "python", "code": "", "timeout": "soon"}, "Invalid request: timeout"),
    ],
)
def test_invalid_requests_are_400_in_the_original_shape(http, payload, error):
    answer = http.post("/execute", json=payload)
    assert answer.status_code == 400
    body = answer.json()
    assert set(body) == {"request_id", "success", "error", "execution_time"}
    assert body["success"] is False and body["execution_time"] == 0
    assert body["error"].startswith(error)


REFUSED = [
    {"language": "python", "code": "print('\ud800')"},  # a lone surrogate: 500 once
    {"language": "python", "code": "", "timeout": "5"},  # coerced once
    {"language": "python", "code": "", "timeout": True},
    {"language": "python", "code": "", "stdin": 5},
    {"language": "python", "code": "", "network": "yes"},
    {"language": "python", "code": "", "args": ["x" * 200_000]},  # internal_error once
    {"language": "python", "code": "", "args": ["x" * 100_000] * 12},
    {"language": "python", "code": "", "limits": {"memory_bytes": "268435456"}},
    {"language": "python", "code": "", "limits": {"wall_time": 1.5, "cpus": 2}},
    {"language": "python", "code": "", "files": [{"path": "../x", "content": ""}]},
    {
        "language": "python",
        "code": "",
        "files": [{"path": "a", "content": "!", "encoding": "base64"}],
    },
    {"language": 3, "code": ""},
]


@pytest.mark.parametrize("params", REFUSED, ids=range(len(REFUSED)))
def test_the_gateway_refuses_what_the_socket_refuses_in_the_same_words(http, client, params):
    with pytest.raises(errors.InvalidParams) as refused:
        client.call("execute", params)
    body = json.dumps(params).encode()  # ASCII escapes: it may carry a lone surrogate
    answer = http.post("/execute", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 400
    assert answer.json()["error"] == error_text(refused.value)


def test_body_that_is_not_json_is_400(http):
    answer = http.post(
        "/execute", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert answer.status_code == 400
    assert answer.json()["error"].startswith("Invalid request")


def test_no_capacity_is_503_no_available_vms(make_daemon, tmp_path):
    import httpx

    from tests.daemon_process import start_gateway, start_holding_job

    daemon = make_daemon(pool={"size": 1, "max_sandboxes": 1, "queue_timeout": 0.5})
    gateway = start_gateway(tmp_path, daemon.socket)
    holder, _ = start_holding_job(daemon.socket)
    try:
        answer = httpx.post(
            f"{gateway.url}/execute", json={"language": "python", "code": "1"}, timeout=30
        )
        assert answer.status_code == 503
        assert answer.json()["error"].startswith("No available VMs")
        assert answer.json()["success"] is False
    finally:
        holder.close()
        gateway.stop()
