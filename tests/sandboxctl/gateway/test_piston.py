"""Piston's v2 API, driven by the npm piston-client (tests/clients, installed by
``make deps``) as a judge or bot written against Piston drives it, and by raw requests
for what that client cannot send."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import trio
from pyston import File, PystonClient
from pyston.exceptions import ExecutionError

from tests.sandboxctl.gateway.ws_client import WebSocketClosed, connect

CLIENTS = Path(__file__).parents[2] / "clients"


def piston_client(gateway, *calls: dict) -> list[dict]:
    """The answers piston-client gets for ``calls`` (runtimes, or execute)."""
    if shutil.which("node") is None or not (CLIENTS / "node_modules/piston-client").is_dir():
        pytest.fail("the npm test clients are missing: run make deps")
    done = subprocess.run(
        ["node", str(CLIENTS / "piston_calls.mjs"), gateway.url, json.dumps(list(calls))],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def execute(language: str, code: str, **options) -> dict:
    return {"method": "execute", "language": language, "code": code, "options": options}


def test_piston_client_runs_every_language(gateway):
    runtimes, python, typescript, rust = piston_client(
        gateway,
        {"method": "runtimes"},
        # piston-client sends args ["1", "2", "3"] unless told otherwise.
        execute("python", "import sys; print(sys.argv[1:], input())", stdin="in"),
        execute("typescript", "console.log(Deno.args.join(','))", args=["a", "b"]),
        execute("rust", 'fn main() { println!("rs"); eprintln!("err"); std::process::exit(2) }'),
    )
    languages = {runtime["language"]: runtime for runtime in runtimes}
    assert set(languages) == {"python", "typescript", "rust"}
    assert languages["typescript"]["runtime"] == "deno" and "py" in languages["python"]["aliases"]
    assert python["language"] == "python" and python["version"] == languages["python"]["version"]
    assert python["run"]["stdout"] == "['1', '2', '3'] in\n"
    assert (python["run"]["code"], python["run"]["status"], python["run"]["signal"]) == (
        0,
        None,
        None,
    )
    assert "compile" not in python
    assert typescript["run"]["output"] == "a,b\n"
    assert rust["compile"]["code"] == 0 and rust["compile"]["status"] is None
    run = rust["run"]
    assert (run["stdout"], run["stderr"], run["code"], run["status"]) == ("rs\n", "err\n", 2, "RE")
    assert run["message"] == "Exited with error status 2"
    assert run["wall_time"] >= 0 and run["memory"] > 0


def test_piston_client_sees_compile_errors_timeouts_and_signals(gateway):
    broken, slow, killed, flood = piston_client(
        gateway,
        execute("rust", "fn main() { let x: u8 = 300; }"),
        execute("python", "while True: pass", runTimeout=1000),
        execute("python", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"),
        execute("python", "print('x' * 10**8)"),
    )
    # A compile that failed: Piston answers it as the run too.
    assert broken["compile"]["status"] == "RE" and "error" in broken["compile"]["stderr"]
    assert broken["run"] == broken["compile"]
    assert (slow["run"]["status"], slow["run"]["signal"]) == ("TO", "SIGKILL")
    assert slow["run"]["message"] == "wall time limit of 1 s exceeded"
    assert (killed["run"]["status"], killed["run"]["signal"]) == ("SG", "SIGTERM")
    assert (flood["run"]["status"], flood["run"]["signal"]) == ("OL", "SIGKILL")


def test_what_piston_refuses_is_refused_in_its_words(http):
    def post(body: object) -> httpx.Response:
        return http.post("/api/v2/execute", json=body)

    hello = {"language": "python", "version": "*", "files": [{"content": "print(1)"}]}
    assert post(hello).json()["run"]["stdout"] == "1\n"
    for body, message in (
        ({**hello, "language": None}, "language is required as a string"),
        ({**hello, "version": 3}, "version is required as a string"),
        ({**hello, "files": "x"}, "files is required as an array"),
        ({**hello, "files": [{"content": 1}]}, "files[0].content is required as a string"),
        ({**hello, "language": "go"}, "go-* runtime is unknown"),
        ({**hello, "version": "2.7"}, "python-2.7 runtime is unknown"),
        ({**hello, "run_timeout": "1"}, "If specified, run_timeout must be a number"),
        (
            {**hello, "run_timeout": 10**9},
            "run_timeout cannot exceed the configured limit of 300000",
        ),
    ):
        answer = post(body)
        assert (answer.status_code, answer.json()) == (400, {"message": message}), body
    plain = http.post(
        "/api/v2/execute", content=b"language=python", headers={"content-type": "text/plain"}
    )
    assert plain.status_code == 415
    assert plain.json() == {"message": "requests must be of type application/json"}
    encoded = {
        **hello,
        "files": [
            {"name": "main.py", "content": "print(open('data.txt').read())"},
            {"name": "data.txt", "content": "6869", "encoding": "hex"},
        ],
    }
    assert post(encoded).json()["run"]["stdout"] == "hi\n"


def test_the_piston_api_takes_the_gateways_keys(keyed_gateway):
    hello = {"language": "python", "version": "*", "files": [{"content": "print(1)"}]}
    assert httpx.post(f"{keyed_gateway.url}/api/v2/execute", json=hello).status_code == 401


async def piston_socket(gateway, *sent: dict, wait: float = 0.0) -> tuple[list[dict], int]:
    """What Piston's WebSocket answers to ``sent`` (after ``wait``): its messages and the
    close code."""
    url = gateway.url.replace("http://", "ws://") + "/api/v2/connect"
    received = []
    async with connect(url) as ws:
        await trio.sleep(wait)
        for message in sent:
            await ws.send(message)
        with trio.fail_after(60):
            try:
                while True:
                    received.append(await ws.receive())
            except WebSocketClosed as closed:
                return received, closed.code
    raise AssertionError("not closed")


INIT = {"type": "init", "language": "python", "version": "*"}


async def test_the_piston_websocket_runs_an_interactive_program(gateway):
    code = "name = input()\nprint('hello', name)\nimport sys; print('bye', file=sys.stderr)"
    init = {**INIT, "files": [{"content": code}]}
    messages, closed = await piston_socket(
        gateway, init, {"type": "data", "stream": "stdin", "data": "piston\n"}
    )
    assert closed == 4999
    runtime, stage, *data, exit_ = messages
    assert (runtime["type"], runtime["language"]) == ("runtime", "python")
    assert stage == {"type": "stage", "stage": "run"}
    out = "".join(m["data"] for m in data if m["stream"] == "stdout")
    err = "".join(m["data"] for m in data if m["stream"] == "stderr")
    assert (out, err) == ("hello piston\n", "bye\n")
    assert exit_ == {"type": "exit", "stage": "run", "code": 0, "signal": None}


async def test_the_piston_websocket_compiles_then_runs(gateway):
    init = {**INIT, "language": "rust", "files": [{"content": 'fn main() { println!("rs") }'}]}
    messages, closed = await piston_socket(gateway, init)
    kinds = [(m["type"], m.get("stage")) for m in messages if m["type"] != "data"]
    assert kinds == [
        ("runtime", None), ("stage", "compile"), ("exit", "compile"),
        ("stage", "run"), ("exit", "run"),
    ]  # fmt: skip
    assert closed == 4999


async def test_the_piston_websocket_closes_with_pistons_codes(gateway):
    slow = {**INIT, "files": [{"content": "import time; time.sleep(30)"}]}
    signalled, closed = await piston_socket(gateway, slow, {"type": "signal", "signal": "SIGTERM"})
    assert closed == 4999 and signalled[-1] == {
        "type": "exit", "stage": "run", "code": None, "signal": "SIGKILL",
    }  # fmt: skip
    for sent, code in (
        ([{"type": "data", "stream": "stdin", "data": "x"}], 4003),
        ([slow, {"type": "data", "stream": "stdout", "data": "x"}], 4004),
        ([slow, {"type": "signal", "signal": "SIGNOPE"}], 4005),
        ([slow, slow], 4000),
    ):
        assert (await piston_socket(gateway, *sent))[1] == code, sent
    refused, closed = await piston_socket(gateway, {**INIT, "language": "go", "files": []})
    assert closed == 4002 and refused == [
        {"type": "error", "message": "files is required as an array"}
    ]
    assert (await piston_socket(gateway, wait=1.5))[1] == 4001


# The client is from 2021: it uses aiohttp's deprecated verify_ssl, and its __del__
# schedules a close on a loop that has ended.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_the_python_client_aiopyston_runs_every_language_and_is_told_of_errors(gateway):
    async def calls() -> dict:
        client = PystonClient(base_url=f"{gateway.url}/api/v2/")  # its calls end with "/"
        try:
            answers = {"languages": await client.languages()}
            for name, language, code, options in (
                ("python", "python", "print(input()[::-1])", {"stdin": "abc"}),
                ("typescript", "typescript", "console.log(6 * 7)", {}),
                ("rust", "rust", 'fn main() { println!("rs") }', {}),
                ("broken", "rust", "fn main() { let x: u8 = ; }", {}),
                ("slow", "python", "while True: pass", {"run_timeout": 1000}),
            ):
                answers[name] = (await client.execute(language, [File(code)], **options)).raw_json
            try:
                await client.execute("cobol", [File("DISPLAY 'x'.")])
            except ExecutionError as exc:
                answers["refused"] = str(exc)
            return answers
        finally:
            await client.close_session()

    answers = asyncio.run(calls())
    assert answers["languages"] == {"python", "typescript", "rust"}
    assert answers["python"]["run"]["stdout"] == "cba\n"
    assert answers["typescript"]["run"]["output"] == "42\n"
    assert (answers["rust"]["compile"]["code"], answers["rust"]["run"]["stdout"]) == (0, "rs\n")
    assert answers["broken"]["compile"]["code"] != 0 and "broken" not in answers["broken"]
    assert answers["slow"]["run"]["status"] == "TO"
    assert "cobol" in answers["refused"]
