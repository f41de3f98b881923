"""Warm runtimes: a program run by a runtime started before its job behaves exactly as one
started cold, and no two sandboxes share random state.

Each program of the corpus runs on a daemon whose ready sandboxes hold their runtime
started (``pool.warm``, the default) and on one whose do not; the records must match
field by field, and the warm daemon must really have run it warm where it can.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from sandboxd.backends.namespaces import REAPER
from sandboxd.result import ExecutionResult
from tests.conftest import IS_ROOT
from tests.daemon_process import Daemon, start_daemon, wait_for_warm
from tests.host_state import (
    WARM_SOURCES,
    program_processes,
    sandbox_processes,
    wait_for,
    waiting_for_source,
)

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="needs root: real jails and cgroups")

PYTHON = {
    "hello": 'print("hello")',
    "identity": (
        "import sys, os, __main__\n"
        "print(__name__, __file__, sys.argv, sys.path[0], os.getcwd())\n"
        "print(__main__.__spec__, type(__main__.__loader__).__name__, __cached__)\n"
        "print(sorted(sys.modules))\n"
        "print(sys.flags, sys.dont_write_bytecode, sys.stdout.line_buffering)\n"
        "print(sorted(os.environ.items()))\n"
        "print(sorted(os.listdir('.')))\n"
    ),
    "limits_before_the_first_line": (
        "import resource\n"
        "print([resource.getrlimit(getattr(resource, 'RLIMIT_' + name))\n"
        "       for name in ('CPU', 'FSIZE', 'NPROC', 'CORE', 'NOFILE', 'STACK', 'AS')])\n"
    ),
    "reads_its_own_source": "print(open(__file__).read() == open('main.py').read(), end='')",
    "traceback": "def f(x):\n    return 1 / x\n\nprint('before')\nf(0)\n",
    "syntax_error": "print('never')\ndef broken(:\n    pass\n",
    "indentation_error": "if True:\nprint('x')\n",
    "exit_code": "import sys\nprint('out'); sys.exit(7)",
    "exit_message": "raise SystemExit('leaving now')",
    "thread_exception": (
        "import threading\n"
        "def boom():\n    raise RuntimeError('in a thread')\n"
        "t = threading.Thread(target=boom, name='worker'); t.start(); t.join()\n"
        "print('main goes on')\n"
    ),
    "atexit": (
        "import atexit, sys\n"
        "atexit.register(lambda: print('at exit', file=sys.stderr))\n"
        "print('body')\n"
    ),
    "stdin": "import sys\nprint(repr(input()), repr(sys.stdin.read()))",
    "writes_files": (
        "import os, pathlib\n"
        "pathlib.Path('out/deep').mkdir(parents=True)\n"
        "pathlib.Path('out/deep/x.txt').write_text('written')\n"
        "print(sorted(os.listdir('.')), pathlib.Path('out/deep/x.txt').read_text())\n"
    ),
    "signal_kills_itself": (
        "import os, signal\nprint('x', flush=True)\nos.kill(os.getpid(), signal.SIGTERM)"
    ),
    "signal_handler": (
        "import os, signal\n"
        "signal.signal(signal.SIGUSR1, lambda *a: print('caught', a[0]))\n"
        "os.kill(os.getpid(), signal.SIGUSR1)\n"
        "print(signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGPIPE))\n"
    ),
    "keyboard_interrupt": "raise KeyboardInterrupt",
    "memory_limit": "x = bytearray(600 * 2**20)\nprint(len(x))",
    "unicode_output": "print('héllo ✓ \\u00e9')",
    "empty_program": "",
    "leaves_a_child_running": (
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        "    time.sleep(30)\n"
        "    print('the child outlived its parent')\n"
        "    sys.exit()\n"
        "print('parent done')\n"
    ),
}
PYTHON["coding_cookie"] = "# -*- coding: latin-1 -*-\nprint('lat\xedn')\n"
# Programs that cannot run warm: they start cold on either daemon, and say so.
COLD = {"coding_cookie"}
TYPESCRIPT = {
    "hello": 'console.log("hello")',
    "identity": (
        "console.log(import.meta.main, Deno.args, import.meta.url, Deno.cwd());\n"
        "console.log(Deno.permissions.querySync({ name: 'read' }).state);\n"
        "console.log(Deno.permissions.querySync({ name: 'net' }).state);\n"
        "console.log([...Deno.readDirSync('.')].map((e) => e.name).sort());\n"
    ),
    "throws": (
        "function f(): never {\n  throw new Error('boom');\n}\nconsole.log('before');\nf();\n"
    ),
    "syntax_error": "console.log('never');\nconst = 1;\n",
    "exit_code": "console.log('out');\nDeno.exit(7);",
    "reads_stdin": (
        "const text = await new Response(Deno.stdin.readable).text();\n"
        "console.log(JSON.stringify(text));\n"
    ),
    "permission_denied": "console.log(Deno.readTextFileSync('/etc/hostname'));",
    "writes_files": (
        "Deno.writeTextFileSync('out.txt', 'written');\n"
        "console.log(Deno.readTextFileSync('out.txt'), Deno.readTextFileSync('main.ts').length);\n"
    ),
}
STDIN = "first line\nrest of it\n"


def fields(result: ExecutionResult) -> tuple[object, ...]:
    return (
        result.status,
        result.message,
        result.exit_code,
        result.signal,
        result.stdout,
        result.stderr,
        result.truncated,
    )


@pytest.fixture(scope="module")
def cold(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    daemon = start_daemon(tmp_path_factory.mktemp("cold"), pool={"warm": False})
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module", params=["python", "typescript"])
def warm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A daemon per language, so that its demand (and so its pool) is that language's."""
    daemon = start_daemon(tmp_path_factory.mktemp(f"warm-{request.param}"))
    yield request.param, daemon
    daemon.stop()


def run_both(warm_daemon: Daemon, cold: Daemon, language: str, code: str, **options):
    warm_client, cold_client = warm_daemon.client, cold.client
    wait_for_warm(warm_client, language)
    return (
        warm_client.execute(language, code, **options),
        cold_client.execute(language, code, **options),
    )


def corpus(language: str) -> dict[str, str]:
    return PYTHON if language == "python" else TYPESCRIPT


def test_every_program_behaves_the_same_warm_and_cold(warm, cold):
    language, daemon = warm
    options = {"stdin": STDIN, "limits": {"memory_bytes": 256 * 2**20}}
    for name, code in corpus(language).items():
        warm_result, cold_result = run_both(daemon, cold, language, code, **options)
        assert fields(warm_result) == fields(cold_result), name
        assert (warm_result.warm, cold_result.warm) == (name not in COLD, False), name


def test_a_jobs_own_limits_hold_from_its_first_line_warm_as_cold(make_daemon, cold):
    """A ready runtime already has the rlimits of a job with the default limits; one
    with limits of its own has them set before its first line too."""
    daemon = make_daemon()
    limits = {"cpu_time": 3, "file_size_bytes": 123456, "processes": 17}
    code = PYTHON["limits_before_the_first_line"]
    warm_result, cold_result = run_both(daemon, cold, "python", code, limits=limits)
    assert fields(warm_result) == fields(cold_result)
    assert warm_result.warm
    assert "(3, 4), (123456, 123456), (17, 17)" in warm_result.stdout


def test_a_job_with_arguments_starts_cold_with_them(warm, cold):
    language, daemon = warm
    code = {"python": "import sys; print(sys.argv)", "typescript": "console.log(Deno.args)"}
    warm_result, cold_result = run_both(daemon, cold, language, code[language], args=["a", "b c"])
    assert fields(warm_result) == fields(cold_result)
    assert "'b c'" in warm_result.stdout.replace('"', "'")
    assert not warm_result.warm


def test_sandboxes_draw_their_own_random_state(warm):
    """Hash seed, ``random`` and ``os.urandom`` differ between warm sandboxes: each
    runtime started on its own, none was copied from another."""
    language, daemon = warm
    code = {
        "python": (
            "import os, random\nprint(hash('sandboxd'), random.random(), os.urandom(8).hex())"
        ),
        "typescript": (
            "console.log(Math.random(), "
            "Array.from(crypto.getRandomValues(new Uint8Array(8))).join(','))"
        ),
    }[language]
    client = daemon.client
    seen = []
    for _ in range(4):
        wait_for_warm(client, language)
        result = client.execute(language, code)
        assert result.ok and result.warm, result
        seen.append(result.stdout.split())
    for position in range(len(seen[0])):
        values = [draw[position] for draw in seen]
        assert len(set(values)) == len(values), values


JAIL_PROCESSES = (
    "import os\n"
    "for pid in sorted(filter(str.isdigit, os.listdir('/proc')), key=int):\n"
    "    with open(f'/proc/{pid}/cmdline', 'rb') as cmdline:\n"
    "        print(pid, cmdline.read().split(b'\\0')[0].decode())\n"
)


def test_a_job_that_fits_its_warm_runtime_runs_without_an_agent(make_daemon):
    """Its jail's PID 1 is the reaper (guest/reaper.c), and the daemon does the agent's
    part: the job pays for one interpreter, its own. A job that does not fit (here: it
    has arguments) has the reaper exec the agent first, and starts cold."""
    daemon = make_daemon(pool={"size": 1})
    client = daemon.client
    wait_for_warm(client, "python")
    direct = client.execute("python", JAIL_PROCESSES)
    assert direct.warm, direct
    assert [line.split()[1] for line in direct.stdout.splitlines()] == [REAPER, "python3"]
    wait_for_warm(client, "python")
    through_agent = client.execute("python", JAIL_PROCESSES, args=["x"])
    assert not through_agent.warm, through_agent
    lines = through_agent.stdout.splitlines()
    assert [line.split()[1] for line in lines] == ["/usr/bin/python3", "python3"]


LISTING = "import os, sys; print(sys.argv, sorted(os.listdir('.')))"


def test_a_program_that_ran_and_died_silently_is_reported_not_run_again(make_daemon):
    """A warm program killed by a signal without a word (here, its own SIGKILL) did
    run: its record says so, and it is not run a second time, cold."""
    daemon = make_daemon(pool={"size": 1})
    wait_for_warm(daemon.client, "python")
    result = daemon.client.execute("python", "import os, signal; os.kill(os.getpid(), 9)")
    assert (result.signal, result.warm, result.stdout, result.stderr) == (9, True, "", "")


def waiting_runtime(daemon: Daemon) -> int:
    """The pid of the one warm python runtime of ``daemon``'s pool, once it waits for
    its source (the sandbox is ready once it started; it opens its FIFO a little later)."""

    def waiting() -> list[int]:
        return [
            pid
            for pid, cmd in sandbox_processes(daemon.uid_base).items()
            if cmd == "python3 main.py" and waiting_for_source(pid)
        ]

    wait_for(waiting)
    [pid] = waiting()
    return pid


def test_a_warm_runtime_that_died_waiting_gives_a_cold_start(make_daemon):
    """Killed from outside while its sandbox waits (the OOM killer, an operator): the
    next job there starts cold, and nothing of the dead runtime is left."""
    daemon = make_daemon(pool={"size": 1})
    client = daemon.client
    wait_for_warm(client, "python")
    os.kill(waiting_runtime(daemon), signal.SIGKILL)
    result = client.execute("python", "import sys; print(sys.argv)")
    assert (result.status, result.stdout, result.warm) == ("ok", "['main.py']\n", False)
    assert wait_for(lambda: not program_processes(daemon.uid_base))


STAGED = ".main.py.sandboxd"  # where the daemon writes a warm job's source first


def jail_pid(daemon: Daemon) -> int:
    """The host pid of the PID 1 (the reaper) of ``daemon``'s one sandbox."""
    [reaper] = [
        pid for pid, cmd in sandbox_processes(daemon.uid_base).items() if cmd.startswith(REAPER)
    ]
    return reaper


FREEZER = Path("/sys/fs/cgroup/freezer")  # cgroup v1's: a SIGKILL does not thaw


@contextmanager
def frozen(pid: int) -> Iterator[None]:
    """``pid`` held by the v1 freezer, where it leaves a wait for a signal but does not
    run on: as a killed process the scheduler has not come back to yet."""
    cgroup = FREEZER / f"sandboxd-test-{pid}"
    cgroup.mkdir()
    try:
        (cgroup / "cgroup.procs").write_text(str(pid))
        (cgroup / "freezer.state").write_text("FROZEN")
        assert wait_for(lambda: (cgroup / "freezer.state").read_text().strip() == "FROZEN")
        yield
    finally:
        (cgroup / "freezer.state").write_text("THAWED")
        assert wait_for(lambda: not (cgroup / "cgroup.procs").read_text().split())
        cgroup.rmdir()


@pytest.mark.skipif(not FREEZER.is_dir(), reason="needs cgroup v1's freezer")
def test_a_warm_runtime_killed_but_not_yet_dead_as_its_job_came_gives_a_cold_start(
    make_daemon,
):
    """Killed as it waited for its source, it left the FIFO (no reader any more) but is
    not a zombie yet: a job that finds it so does not take it for one still starting
    (that would open the source later); it starts cold."""
    daemon = make_daemon(pool={"size": 1})
    client = daemon.client
    wait_for_warm(client, "python")
    runtime = waiting_runtime(daemon)
    directory = Path(f"/proc/{jail_pid(daemon)}/root{WARM_SOURCES[0].rsplit('/', 1)[0]}")
    with ThreadPoolExecutor(1) as executor:
        with frozen(runtime):
            os.kill(runtime, signal.SIGKILL)
            files = [{"path": "data.txt", "content": "x"}]
            job = executor.submit(client.execute, "python", LISTING, files=files)
            # The job's files are written and its staged source is gone: renamed into
            # place for the runtime, or removed for a cold start. Decided; it may die.
            assert wait_for(
                lambda: (
                    job.done()
                    or ((directory / "data.txt").is_file() and not (directory / STAGED).exists())
                )
            )
        result = job.result(timeout=60)
    listed = "['main.py'] ['data.txt', 'main.py']\n"
    assert (result.status, result.stdout, result.warm) == ("ok", listed, False)
    assert wait_for(lambda: not program_processes(daemon.uid_base))


def test_a_warm_runtime_killed_as_its_job_came_gives_a_cold_start(make_daemon):
    """Killed so late that the daemon has written the job's files before it hears of
    the exit (here the reaper, stopped, reports it only later): it finds the runtime
    dead, the program never ran, so the job starts cold, and nothing of the warm
    attempt is left in its directory."""
    daemon = make_daemon(pool={"size": 1})
    client = daemon.client
    wait_for_warm(client, "python")
    runtime = waiting_runtime(daemon)
    reaper = jail_pid(daemon)
    directory = WARM_SOURCES[0].rsplit("/", 1)[0]
    data = Path(f"/proc/{reaper}/root{directory}/data.txt")
    with ThreadPoolExecutor(1) as executor:
        os.kill(reaper, signal.SIGSTOP)
        try:
            os.kill(runtime, signal.SIGKILL)
            files = [{"path": "data.txt", "content": "x"}]
            job = executor.submit(client.execute, "python", LISTING, files=files)
            # The daemon has written the job's files: next it meets the dead runtime.
            assert wait_for(lambda: data.is_file() or job.done())
        finally:
            os.kill(reaper, signal.SIGCONT)
        result = job.result(timeout=60)
    listed = "['main.py'] ['data.txt', 'main.py']\n"
    assert (result.status, result.stdout, result.warm) == ("ok", listed, False)
    assert wait_for(lambda: not program_processes(daemon.uid_base))
