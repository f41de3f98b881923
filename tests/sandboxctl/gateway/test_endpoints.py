"""Every endpoint and every error status of the gateway, over real HTTP."""

from __future__ import annotations

import json

import httpx

from sandboxctl.gateway.http_errors import HTTP_STATUS
from sandboxd import errors
from sandboxd.languages import BY_NAME
from tests.daemon_process import start_gateway
from tests.host_state import wait_for


def test_health_has_the_original_fields_and_more(http):
    body = http.get("/health").json()
    assert body["status"] == "healthy" and isinstance(body["time"], int)
    assert body["backend"] == "namespaces"
    assert {"ready", "busy"} <= set(body["pool"])
    assert body["version"]


def test_health_and_ready_are_503_when_the_daemon_is_unreachable(tmp_path):
    gateway = start_gateway(tmp_path, tmp_path / "no-daemon.sock")
    try:
        answer = httpx.get(f"{gateway.url}/health")
        assert answer.status_code == 503
        body = answer.json()
        assert body["status"] == "unhealthy"
        assert "sandboxd is not running" in body["reason"]
        execute = httpx.post(f"{gateway.url}/execute", json={"language": "py", "code": ""})
        assert execute.status_code == 503
        assert execute.json()["error"].startswith("Service unavailable: sandboxd is not running")
        ready = httpx.get(f"{gateway.url}/ready")  # a balancer takes the node out
        assert ready.status_code == 503
        assert (
            ready.json()["ready"] is False and "sandboxd is not running" in ready.json()["reason"]
        )
    finally:
        gateway.stop()


def test_languages_has_details(http):
    body = http.get("/languages").json()
    assert body["languages"] == ["python", "typescript", "rust"]
    rust = next(d for d in body["details"] if d["name"] == "rust")
    assert (rust["extension"], rust["compiled"]) == (".rs", True)


def test_full_record_and_all_job_inputs(http):
    import base64

    payload = {
        "language": "python",
        "code": "import sys\nprint(sys.stdin.read(), sys.argv[1:], open('d/f.bin','rb').read())",
        "stdin": "in",
        "args": ["x"],
        "files": [
            {"path": "d/f.bin", "content": base64.b64encode(b"\x01").decode(), "encoding": "base64"}
        ],
        "limits": {"memory_bytes": 256 * 2**20, "output_bytes": 4096},
    }
    body = http.post("/execute", json=payload).json()
    assert body["stdout"] == "in ['x'] b'\\x01'\n"
    assert body["status"] == "ok" and body["exit_code"] == 0 and body["signal"] is None
    assert set(body["timings"]) == {"queue", "compile", "run", "total"}
    assert set(body["usage"]) == {"cpu_time", "memory_bytes"}
    assert body["truncated"] == {"stdout": False, "stderr": False}


def test_rust_compile_record_and_compile_error_output(http):
    ok = http.post("/execute", json={"language": "rust", "code": "fn main() {}"}).json()
    assert ok["compile"]["exit_code"] == 0
    bad = http.post("/execute", json={"language": "rust", "code": "fn main() { x }"}).json()
    assert (bad["success"], bad["status"]) == (False, "compile_error")
    assert "cannot find value `x`" in bad["output"]


def test_limit_above_maximum_is_400(http):
    answer = http.post(
        "/execute", json={"language": "py", "code": "", "limits": {"memory_bytes": 2**40}}
    )
    assert answer.status_code == 400
    assert "above the server's maximum" in answer.json()["error"]


def test_unknown_paths_and_methods_are_json(http):
    missing = http.get("/nope")
    assert missing.status_code == 404 and missing.json()["error"] == "Not Found"
    wrong = http.get("/execute")
    assert wrong.status_code == 405 and wrong.json()["success"] is False


def test_body_over_the_cap_is_413_without_running_anything(http):
    answer = http.post("/execute", json={"language": "python", "code": "#" * (5 * 2**20)})
    assert answer.status_code == 413
    assert answer.json()["error"].startswith("request body larger than")


def test_spellings_of_a_language_add_no_label_values_to_the_metrics(http):
    """A client picks how it spells a language ("Python ", "PY", ...): each spelling was
    once a label value, kept by the gateway for good and in every /metrics answer."""
    for spelling in ("Python ", " PY", "python3", "PyThOn"):
        answer = http.post("/execute", json={"language": spelling, "code": "print(1)"})
        assert answer.status_code == 200, answer.text
    text = http.get("/metrics").text
    labels = {line.split("}")[0] for line in text.splitlines() if "executions_total{" in line}
    assert {label.split('language="')[1].split('"')[0] for label in labels} <= set(BY_NAME)


def test_openapi_and_docs(http):
    spec = http.get("/openapi.json").json()
    assert {"/health", "/languages", "/execute", "/metrics"} <= set(spec["paths"])
    execute = spec["paths"]["/execute"]["post"]
    assert {"200", "400", "401", "413", "429", "503"} <= set(execute["responses"])
    assert spec["components"]["schemas"]["ExecuteRequest"]["examples"]
    docs = http.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_metrics(http):
    http.post("/execute", json={"language": "python", "code": "print(1)"})
    http.post("/execute", json={"language": "cobol", "code": ""})
    text = http.get("/metrics").text
    assert 'sandboxd_executions_total{language="python",status="ok"}' in text
    assert 'sandboxd_execution_seconds_bucket{le="0.5",phase="total"}' in text
    assert 'sandboxd_gateway_rejected_requests_total{reason="UnsupportedLanguage"}' in text
    assert 'sandboxd_pool_sandboxes{state="ready"}' in text
    assert "sandboxd_up 1.0" in text


def test_one_structured_log_line_per_request(gateway, http):
    request_id = http.post("/execute", json={"language": "python", "code": "print(1)"}).json()[
        "request_id"
    ]

    def lines_of_the_request() -> list[dict]:
        entries = [
            json.loads(line.split("sandboxd.gateway.access: ", 1)[1])
            for line in gateway.log().splitlines()
            if "sandboxd.gateway.access: " in line
        ]
        return [entry for entry in entries if entry["request_id"] == request_id]

    # The line is written once the answer has gone out: it may trail it a little.
    assert wait_for(lambda: bool(lines_of_the_request()), timeout=10)
    [line] = lines_of_the_request()
    assert (line["path"], line["status"], line["language"], line["result"]) == (
        "/execute",
        200,
        "python",
        "ok",
    )
    assert line["key_id"] == "uid:0" and "total" in line["timings"]  # root, on loopback


def test_every_error_class_has_an_http_status():
    classes = {
        cls
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.SandboxError)
    }
    assert classes <= set(HTTP_STATUS)
