"""Property-based: schemathesis generates requests from /openapi.json and checks that
the gateway never answers 5xx and that every answer matches the documented schema."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx

CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
    ]
)


def test_the_openapi_schema_holds_under_generated_requests(gateway, tmp_path):
    schemathesis = Path(sys.executable).parent / "schemathesis"
    done = subprocess.run(
        [
            str(schemathesis),
            "run",
            f"{gateway.url}/openapi.json",
            "--checks",
            CHECKS,
            "--max-examples",
            "40",
            "--workers",
            "1",
            "--request-timeout",
            "120",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,  # its cache goes there, not into the checkout
    )
    with httpx.Client(base_url=gateway.url, timeout=60) as http:  # what it left open
        for session in http.get("/sessions").json()["sessions"]:
            if session["state"] != "ended":
                http.delete(f"/sessions/{session['id']}")
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "passed" in done.stdout
