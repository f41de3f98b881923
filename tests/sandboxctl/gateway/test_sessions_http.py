"""/sessions over HTTP: the agent loop, and ownership by API key."""

from __future__ import annotations

import httpx

from tests.sandboxctl.gateway.conftest import KEYS
from tests.sandboxctl.gateway.test_streaming import SSE, parse_sse
from tests.sandboxd.test_sessions import DRAW_PNG, expected_png


def test_an_agent_loop_over_http(http):
    created = http.post("/sessions", json={"language": "python", "idle_timeout": 60})
    assert created.status_code == 201, created.text
    session = created.json()
    base = f"/sessions/{session['id']}"
    assert http.put(f"{base}/files/data/scale.csv", content=b"x,3\ny,5\n").json() == {
        "path": "data/scale.csv",
        "size": 8,
    }
    drew = http.post(f"{base}/exec", json={"code": DRAW_PNG}).json()
    assert (drew["success"], drew["output"]) == (True, "drew 16 rows\n"), drew
    png = http.get(f"{base}/files/plot.png")
    assert png.headers["content-type"] == "application/octet-stream"
    assert png.content == expected_png()
    assert http.post(f"{base}/exec", json={"code": "x = 41", "cell": True}).json()["success"]
    cell = http.post(f"{base}/exec", json={"code": "print(x + 1)\nx + 1", "cell": True}).json()
    assert (cell["stdout"], cell["cell"]["value"], cell["cell"]["kept"]) == ("42\n", "42", True)
    streamed = {"code": "print(x, flush=True)", "cell": True}
    with http.stream("POST", f"{base}/exec", json=streamed, headers=SSE) as answer:
        *outputs, (last, result) = parse_sse("".join(answer.iter_text()))
    # print writes the value and its newline apart (the cell's stdout is unbuffered), and
    # a read may fall between them: the events' data together is the output.
    assert "".join(e["data"] for _, e in outputs) == "41\n" and last == "result"
    assert result["success"] and result["cell"]["kept"]
    names = {e["name"] for e in http.get(f"{base}/files").json()["entries"]}
    assert {"data", "plot.png", "main.py"} <= names
    assert http.get(f"{base}/files", params={"path": "data"}).json()["entries"][0]["name"] == (
        "scale.csv"
    )
    assert http.delete(f"{base}/files/data").status_code == 200
    assert http.get(f"{base}/files/data/scale.csv").status_code == 400
    assert http.get(base).json()["execs"] == 4
    assert session["id"] in {s["id"] for s in http.get("/sessions").json()["sessions"]}
    closed = http.delete(base).json()
    assert (closed["state"], closed["ended"]) == ("ended", "closed by its owner")
    gone = http.post(f"{base}/exec", json={"code": "print(1)"})
    assert gone.status_code == 404
    assert gone.json()["error"] == f"no session '{session['id']}'"


def test_another_key_can_neither_see_nor_use_a_session(keys_gateway):
    alice = httpx.Client(base_url=keys_gateway.url, headers={"X-API-Key": KEYS["alice"]})
    bob = httpx.Client(base_url=keys_gateway.url, headers={"X-API-Key": KEYS["bob"]})
    assert httpx.post(f"{keys_gateway.url}/sessions", json={}).status_code == 401
    with alice, bob:
        session_id = alice.post("/sessions", json={}).json()["id"]
        base = f"/sessions/{session_id}"
        alice.put(f"{base}/files/secret.txt", content=b"alice's")
        for method, path, body in (
            ("GET", base, None),
            ("POST", f"{base}/exec", {"code": "print(open('secret.txt').read())"}),
            ("GET", f"{base}/files/secret.txt", None),
            ("PUT", f"{base}/files/secret.txt", b"bob's"),
            ("GET", f"{base}/files", None),
            ("DELETE", f"{base}/files/secret.txt", None),
            ("DELETE", base, None),
        ):
            options = {"json": body} if isinstance(body, dict) else {"content": body}
            answer = bob.request(method, path, **options)
            assert answer.status_code == 404, (method, path, answer.text)
            assert answer.json()["error"] == f"no session '{session_id}'"
        assert bob.get("/sessions").json() == {"sessions": []}
        assert alice.get(f"{base}/files/secret.txt").content == b"alice's"
        assert alice.delete(base).status_code == 200
