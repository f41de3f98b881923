"""The guest agent on its own: the protocol, limits it enforces, and what it refuses.

It runs here on the host's python3 without a jail (not --isolated), which is what the
agent must tolerate too: it never signals processes that are not its program's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sandboxd.backends.agent_bundle import agent_bundle
from sandboxd.protocol import AGENT_PROTOCOL


def agent_command(tmp_path: Path, workdir: Path) -> list[str]:
    """The agent as sandboxes run it: its bundle, by ``python3 -I``."""
    bundle = tmp_path / "agent.pyz"
    if not bundle.exists():
        bundle.write_bytes(agent_bundle())
    return [sys.executable, "-I", str(bundle), "--workdir", str(workdir)]


SYNC = json.dumps({"type": "sync", "nonce": 7}).encode() + b"\n"
LIMITS = {
    "wall_time": 10,
    "cpu_time": 10,
    "compile_time": 10,
    "processes": 64,
    "output_bytes": 10_000,
    "file_size_bytes": 10**7,
    "memory_bytes": 2**28,
}


def run_agent(tmp_path: Path, job: dict | None, raw: bytes | None = None) -> list[dict]:
    workdir = tmp_path / "work"
    workdir.mkdir()
    payload = SYNC + (
        raw if raw is not None else (json.dumps(job).encode() + b"\n" if job else b"")
    )
    done = subprocess.run(
        agent_command(tmp_path, workdir),
        input=payload,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def output(messages: list[dict], stream: str = "stdout", stage: str = "run") -> str:
    """What the agent streamed of one stream (its result does not carry it again)."""
    return "".join(
        m["data"]
        for m in messages
        if m["type"] == "output" and (m["stage"], m["stream"]) == (stage, stream)
    )


def python_job(code: str, **extra) -> dict:
    return {
        "type": "job",
        "files": [{"path": "main.py", "content": code}],
        "run": {"argv": [sys.executable, "main.py", *extra.pop("args", [])]},
        "limits": {**LIMITS, **extra.pop("limits", {})},
        **extra,
    }


def test_hello_then_output_then_result(tmp_path):
    hello, stage, *events, result = run_agent(
        tmp_path,
        python_job(
            "import sys\nprint(sys.stdin.read(), sys.argv[1:])\nsys.exit(4)",
            stdin="in",
            args=["a"],
        ),
    )
    assert hello == {"type": "hello", "protocol": AGENT_PROTOCOL, "pid": hello["pid"], "nonce": 7}
    assert stage == {"type": "stage", "stage": "run"}
    assert output(events) == "in ['a']\n"
    assert (result["type"], result["status"], result["exit_code"]) == ("result", "runtime_error", 4)
    assert "stdout" not in result and "stderr" not in result
    assert result["timings"]["run"] > 0


def test_output_over_the_cap_keeps_the_prefix_and_stops_the_program(tmp_path):
    *messages, result = run_agent(
        tmp_path,
        python_job(
            "import sys\nwhile True: sys.stdout.write('y' * 1000)",
            limits={"output_bytes": 5000},
        ),
    )
    assert result["status"] == "output_limit"
    assert output(messages) == "y" * 5000
    assert result["truncated"] == {"stdout": True, "stderr": False}


def test_wall_time(tmp_path):
    *messages, result = run_agent(
        tmp_path,
        python_job(
            "import time\nprint('started', flush=True)\ntime.sleep(60)",
            limits={"wall_time": 0.5},
        ),
    )
    assert result["status"] == "timeout"
    assert output(messages) == "started\n"
    assert result["message"] == "wall time limit of 0.5 s exceeded"
    assert result["timings"]["run"] < 5


def test_cpu_time(tmp_path):
    *_, result = run_agent(tmp_path, python_job("while True: pass", limits={"cpu_time": 1}))
    assert result["status"] == "timeout"
    assert "CPU time limit" in result["message"]
    assert result["usage"]["cpu_time"] >= 0.9  # the kernel accounts CPU time in ticks


def test_a_background_child_holding_the_pipes_does_not_hang_the_run(tmp_path):
    *messages, result = run_agent(
        tmp_path,
        python_job(
            "import subprocess\nsubprocess.Popen(['sleep', '30'])\nprint('parent done')",
            limits={"wall_time": 2},
        ),
    )
    # Not isolated, the agent may only kill the program's own process group: it does.
    assert result["status"] == "ok"
    assert output(messages) == "parent done\n"


def test_compile_stage_failure_stops_before_running(tmp_path):
    job = python_job("print('never')")
    failing = "import sys; print('bad syntax', file=sys.stderr); sys.exit(1)"
    job["compile"] = {"argv": [sys.executable, "-c", failing]}
    *messages, result = run_agent(tmp_path, job)
    assert result["status"] == "compile_error"
    assert output(messages, "stderr", "compile") == "bad syntax\n"
    assert [m["stage"] for m in messages if m["type"] == "stage"] == ["compile"]
    assert output(messages) == ""


@pytest.mark.parametrize("path", ["../escape.txt", "/tmp/abs.txt", "a/../../x"])
def test_file_paths_outside_the_workdir_are_refused(tmp_path, path):
    job = python_job("print(1)")
    job["files"].append({"path": path, "content": "x"})
    *_, result = run_agent(tmp_path, job)
    assert result["status"] == "internal_error"
    assert "refusing file path" in result["message"]
    assert not (tmp_path / "escape.txt").exists()


def test_a_symlink_in_the_workdir_is_never_followed(tmp_path):
    # The agent writes with O_NOFOLLOW at every level: even if a link were there first,
    # it would not write through it.
    (tmp_path / "outside").mkdir()
    job = python_job("print(1)")
    job["files"].append({"path": "link/x.txt", "content": "x"})
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "link").symlink_to(tmp_path / "outside")
    payload = SYNC + json.dumps(job).encode() + b"\n"
    done = subprocess.run(
        agent_command(tmp_path, workdir),
        input=payload,
        capture_output=True,
        timeout=60,
    )
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["status"] == "internal_error"
    assert list((tmp_path / "outside").iterdir()) == []


def test_malformed_job_gets_an_internal_error_result(tmp_path):
    *_, result = run_agent(tmp_path, {"type": "job", "files": []})
    assert result["status"] == "internal_error"


def test_a_line_that_is_not_json_gets_an_internal_error_result(tmp_path):
    [_, result] = run_agent(tmp_path, None, raw=b"not json\n")
    assert result["status"] == "internal_error"


def test_host_closing_the_channel_ends_the_agent_quietly(tmp_path):
    assert [m["type"] for m in run_agent(tmp_path, None)] == ["hello"]


def test_streamed_stdin_reaches_the_program_until_eof(tmp_path):
    job = python_job(
        "import sys\nfor line in sys.stdin:\n    print('got', line.strip(), flush=True)\n"
        "print('eof')",
        stdin="first\n",
        stdin_stream=True,
    )
    messages = [
        job,
        {"type": "stdin", "data": "second\nthi"},
        {"type": "stdin", "data": "rd\n"},
        {"type": "stdin", "data": "", "eof": True},
    ]
    raw = b"".join(json.dumps(m).encode() + b"\n" for m in messages)
    *messages, _ = run_agent(tmp_path, None, raw=raw)
    assert output(messages) == "got first\ngot second\ngot third\neof\n"


def test_streamed_stdin_ends_when_the_host_closes_the_channel(tmp_path):
    job = python_job("import sys\nprint(len(sys.stdin.read()))", stdin="abc", stdin_stream=True)
    *messages, _ = run_agent(tmp_path, job)
    assert output(messages) == "3\n"


def test_a_warm_runtime_that_opens_its_source_late_finds_its_files_and_limits(tmp_path):
    """A runtime slower to start than its job opens the real source file, not the FIFO,
    and runs at once: the other files and the rlimits must be in place before the source
    file is. This runtime waits for exactly that moment and runs the source then."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    late = (
        "import os, stat\n"
        "while stat.S_ISFIFO(os.stat('main.py').st_mode): pass\n"
        "exec(open('main.py').read())\n"
    )
    argv = [sys.executable, "-c", late]
    sync = {"type": "sync", "nonce": 7, "warm": {"argv": argv, "env": {}, "source": "main.py"}}
    code = (
        "import resource\n"
        "print(len(open('data/x.txt').read()), resource.getrlimit(resource.RLIMIT_CPU))"
    )
    job = {
        "type": "job",
        "files": [
            {"path": "main.py", "content": code},
            {"path": "data/x.txt", "content": "x" * 2**22},
        ],
        "run": {"argv": argv},
        "limits": {**LIMITS, "cpu_time": 3, "file_size_bytes": 2**23},
    }
    done = subprocess.run(
        agent_command(tmp_path, workdir),
        input=b"".join(json.dumps(m).encode() + b"\n" for m in (sync, job)),
        capture_output=True,
        timeout=60,
    )
    *events, result = [json.loads(line) for line in done.stdout.splitlines()]
    assert (result["status"], result["warm"]) == ("ok", True), (result, done.stderr)
    assert output(events) == f"{2**22} (3, 4)\n"
