"""sandboxctl against a real daemon: live output, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from sandboxctl.cli import main
from tests.conftest import needs_root


@pytest.fixture
def run(daemon):
    def invoke(*args: str, input: str | None = None):
        return CliRunner().invoke(main, ["--socket", str(daemon.socket), *args], input=input)

    return invoke


def test_exec_prints_and_exits_zero(run):
    result = run("exec", "-l", "python", "-c", "print(2+2)")
    assert (result.exit_code, result.stdout, result.stderr) == (0, "4\n", "")


def test_exec_passes_stderr_and_the_exit_code_through(run):
    result = run(
        "exec", "-l", "python", "-c", 'import sys; print("x", file=sys.stderr); sys.exit(3)'
    )
    assert (result.exit_code, result.stdout, result.stderr) == (3, "", "x\n")


def test_exec_from_stdin_with_args_and_stdin_text(run):
    result = run(
        "exec",
        "-l",
        "py",
        "-",
        "--stdin",
        "data",
        "-a",
        "one",
        "-a",
        "two",
        input="import sys; print(sys.stdin.read(), sys.argv[1:])",
    )
    assert (result.exit_code, result.stdout) == (0, "data ['one', 'two']\n")


def test_exec_from_a_file_with_an_extra_file(run, tmp_path):
    (tmp_path / "prog.py").write_text("print(open('data/x.txt').read())")
    (tmp_path / "x.txt").write_text("from a file")
    result = run(
        "exec",
        "-l",
        "python",
        str(tmp_path / "prog.py"),
        "--file",
        f"{tmp_path / 'x.txt'}:data/x.txt",
    )
    assert (result.exit_code, result.stdout) == (0, "from a file\n")


def test_exec_json_prints_the_whole_record(run):
    result = run("exec", "-l", "python", "-c", "print('hi')", "--json")
    record = json.loads(result.stdout)
    assert result.exit_code == 0
    assert (record["status"], record["stdout"], record["exit_code"]) == ("ok", "hi\n", 0)
    assert set(record["timings"]) == {"queue", "compile", "run", "total"}


def test_exec_timeout_exits_124_with_a_reason(run):
    result = run(
        "exec",
        "-l",
        "python",
        "-c",
        "import time; print('a', flush=True); time.sleep(30)",
        "--timeout",
        "0.5",
    )
    assert result.exit_code == 124
    assert result.stdout == "a\n"
    assert result.stderr == "sandboxctl: timeout: wall time limit of 0.5 s exceeded\n"


def test_killed_by_a_signal_exits_128_plus_n(run):
    result = run(
        "exec", "-l", "python", "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
    )
    assert result.exit_code == 128 + 11


def test_refused_request_is_one_line_and_exit_2(run):
    result = run("exec", "-l", "go", "-c", "package main")
    assert result.exit_code == 2
    assert result.stderr == "Error: Unsupported language: go (known: python, typescript, rust)\n"


def test_limit_above_maximum_is_one_line(run):
    result = run("exec", "-l", "python", "-c", "", "--limit", "memory_bytes=99999999999")
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: limits.memory_bytes of 99999999999 bytes is above")


def test_usage_errors(run):
    assert run("exec", "-l", "python").exit_code == 2
    assert run("exec", "-l", "python", "-c", "1", "--limit", "nonsense").exit_code == 2


def test_health_languages_status(run):
    health = run("health")
    assert health.exit_code == 0 and health.stdout.startswith("healthy: backend namespaces")
    languages = run("languages", "--json")
    assert json.loads(languages.stdout)["languages"] == ["python", "typescript", "rust"]
    status = run("status")
    assert "namespaces" in status.stdout and "weaker than a VM" in status.stdout
    assert "warm_jobs: direct: the daemon runs a job that fits a warm runtime" in status.stdout


# What the command `sandboxctl exec` runs has no need of: the other commands' modules,
# and libraries a command line starts slower for (pathlib and what it imports: 3 ms).
NOT_FOR_EXEC = ("sandboxctl.session_command", "sandboxctl.shell_command", "pathlib", "trio")
LOADED = (
    "import atexit, sys\n"
    "atexit.register(lambda: print(*sorted(sys.modules), file=sys.stderr))\n"
    "from sandboxctl.cli import main\n"
    "main(sys.argv[1:])\n"
)


def test_exec_loads_only_what_it_needs(daemon):
    """sandboxctl starts as a new process for every program it runs: what it imports is
    paid for each time."""
    argv = ["--socket", str(daemon.socket), "exec", "-l", "python", "-c", "print(2+2)"]
    done = subprocess.run(
        [sys.executable, "-c", LOADED, *argv], capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout) == (0, "4\n"), done.stderr
    loaded = set(done.stderr.split())
    assert "sandboxctl.exec_command" in loaded
    assert not loaded & set(NOT_FOR_EXEC)


def test_daemon_not_running_is_one_line_and_exit_125(tmp_path):
    result = CliRunner().invoke(main, ["--socket", str(tmp_path / "none.sock"), "health"])
    assert result.exit_code == 125
    assert (
        result.stderr == f"Error: sandboxd is not running (no socket at {tmp_path / 'none.sock'})\n"
    )


def test_socket_from_the_environment(daemon):
    result = CliRunner().invoke(main, ["health"], env={"SANDBOXD_SOCKET": str(daemon.socket)})
    assert result.exit_code == 0


@needs_root
def test_no_permission_on_the_socket_explains_the_group(daemon):
    # The test daemon's socket is root's, mode 0660, with no sandboxd group: a plain
    # user is refused, and is told how to fix it, without a traceback.
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child becomes nobody and runs the CLI
        try:
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            result = CliRunner().invoke(main, ["--socket", str(daemon.socket), "health"])
            os.write(write_end, json.dumps([result.exit_code, result.stderr]).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        exit_code, stderr = json.loads(pipe.read())
    os.waitpid(pid, 0)
    assert exit_code == 125
    assert stderr.startswith("Error: no permission to use")
    assert "sandboxd group" in stderr
    assert "Traceback" not in stderr


HELLOS = {
    "python": ('print("Hello Python!")', "Hello Python!\n"),
    "typescript": ('console.log("Hello TypeScript!")', "Hello TypeScript!\n"),
    "rust": ('fn main() { println!("Hello Rust!"); }', "Hello Rust!\n"),
}
ECHOES = {
    "py": "import sys\nprint(sys.stdin.read().strip().upper(), *sys.argv[1:])",
    "ts": "const text = new TextDecoder().decode(await new Response(Deno.stdin.readable)"
    ".arrayBuffer());\nconsole.log(text.trim().toUpperCase(), ...Deno.args);",
    "rs": "use std::io::Read;\nfn main() { let mut s = String::new();\n"
    "  std::io::stdin().read_to_string(&mut s).unwrap();\n"
    "  let args: Vec<String> = std::env::args().skip(1).collect();\n"
    '  println!("{} {}", s.trim().to_uppercase(), args.join(" ")); }',
}


@pytest.mark.parametrize("language", HELLOS)
def test_hello_world_in_each_language(run, language):
    code, expected = HELLOS[language]
    result = run("exec", "-l", language, "-c", code)
    assert (result.exit_code, result.stdout, result.stderr) == (0, expected, "")


@pytest.mark.parametrize("alias", ECHOES)
def test_stdin_and_arguments_in_each_language(run, alias):
    result = run(
        "exec", "-l", alias, "-c", ECHOES[alias], "--stdin", "shout\n", "-a", "one", "-a", "two"
    )
    assert (result.exit_code, result.stdout) == (0, "SHOUT one two\n"), result.stderr


def test_compile_errors_go_to_stderr_and_exit_1(run):
    result = run("exec", "-l", "rust", "-c", "fn main() { nope }")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "cannot find value `nope`" in result.stderr
    assert result.stderr.endswith("sandboxctl: compile_error: compilation failed\n")
