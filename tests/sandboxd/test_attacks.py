"""Every limit, attacked in each language where the attack makes sense.

Each attack must end with its own status and the output written before the limit hit;
the daemon must stay up, and nothing of the attacking sandbox may remain: no process,
no cgroup, no mount. The next job runs as if nothing happened.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import zipfile

import pytest

from sandboxd.backends.agent_bundle import agent_command
from sandboxd.backends.namespaces import AGENT, AGENT_MEMORY, OVERHEAD_PROCESSES, REAPER
from sandboxd.host.cgroups import CgroupLayout
from sandboxd.protocol import Status
from tests.host_state import mounts, program_processes, sandbox_cgroups, sandbox_processes, wait_for

LIMITS = {
    "wall_time": 3,
    "memory_bytes": 256 * 2**20,
    "output_bytes": 10_000,
    "file_size_bytes": 2**20,
    "processes": 32,
}

# name → {language: code}; every program first prints "start" (its partial output).
ATTACKS: dict[str, dict[str, str]] = {
    "infinite loop": {
        "python": "print('start', flush=True)\nwhile True: pass",
        "typescript": "console.log('start'); while (true) {}",
        "rust": 'fn main() { println!("start"); loop {} }',
    },
    "sleep forever": {
        "python": "import time\nprint('start', flush=True)\ntime.sleep(10**6)",
        "typescript": "console.log('start'); await new Promise(() => setInterval(() => {}, 1e6));",
        "rust": 'fn main() { println!("start"); std::thread::sleep(std::time::Duration::MAX); }',
    },
    "fork bomb": {
        "python": "import os\nprint('start', flush=True)\nwhile True:\n"
        "    try: os.fork()\n    except OSError: pass",
        "rust": 'use std::process::Command;\nfn main() { println!("start");\n'
        '  loop { let _ = Command::new("/proc/self/exe").spawn(); } }',
    },
    "memory bomb": {
        "python": "a = []\nprint('start', flush=True)\nwhile True: a.append(bytearray(10**7))",
        "typescript": "const a = []; console.log('start');\n"
        "while (true) a.push(new Uint8Array(1e7).fill(1));",
        "rust": 'fn main() { println!("start"); let mut v = Vec::new();\n'
        "  loop { v.push(vec![1u8; 10_000_000]); } }",
    },
    "endless output": {
        "python": "print('start', flush=True)\nwhile True: print('y' * 100)",
        "typescript": "console.log('start'); while (true) console.log('y'.repeat(100));",
        "rust": 'fn main() { println!("start"); loop { println!("{}", "y".repeat(100)); } }',
    },
    "huge file": {
        "python": "f = open('big', 'wb')\nprint('start', flush=True)\n"
        "while True: f.write(b'x' * 65536)",
        "typescript": "console.log('start');\n"
        "const f = Deno.openSync('big', { write: true, create: true });\n"
        "while (true) f.writeSync(new Uint8Array(65536));",
        "rust": 'use std::io::Write;\nfn main() { println!("start");\n'
        '  let mut f = std::fs::File::create("big").unwrap();\n'
        "  loop { f.write_all(&[0u8; 65536]).unwrap(); } }",
    },
    "uncaught exception": {
        "python": "print('start', flush=True)\nraise RuntimeError('boom')",
        "typescript": "console.log('start'); throw new Error('boom');",
        "rust": 'fn main() { println!("start"); panic!("boom"); }',
    },
    "segfault": {
        "python": "import ctypes\nprint('start', flush=True)\nctypes.string_at(0)",
        "rust": 'fn main() { println!("start");\n'
        "  unsafe { std::ptr::read_volatile(std::ptr::null::<i32>()); } }",
    },
}

EXPECTED = {
    "infinite loop": Status.TIMEOUT,
    "sleep forever": Status.TIMEOUT,
    "fork bomb": Status.TIMEOUT,
    "memory bomb": Status.MEMORY_LIMIT,
    "endless output": Status.OUTPUT_LIMIT,
    "huge file": Status.RUNTIME_ERROR,
    "uncaught exception": Status.RUNTIME_ERROR,
    "segfault": Status.RUNTIME_ERROR,
}

CASES = [(name, language) for name, codes in ATTACKS.items() for language in codes]

AGENT_COMMAND = " ".join(agent_command("/usr/bin/python3", AGENT)) + " "  # as /proc shows it

# A job with arguments goes through the agent; one that fits the warm runtime has the
# reaper as its jail's PID 1 (sandboxd.backends.direct_run) and the daemon as its agent.
SUPERVISORS = pytest.mark.parametrize(
    "args", [[], ["through", "the", "agent"]], ids=["direct", "agent"]
)


@pytest.fixture(scope="module", autouse=True)
def no_mount_leaks(daemon):
    before = mounts()
    yield
    assert mounts() == before


def assert_nothing_left(daemon, sandbox_id: str) -> None:
    assert wait_for(lambda: not any(p.name == sandbox_id for p in sandbox_cgroups(daemon.name)))
    assert wait_for(lambda: not program_processes(daemon.uid_base))
    assert daemon.client.health()["status"] == "healthy"
    assert list(daemon.run_dir.iterdir()) == []


@pytest.mark.parametrize(("attack", "language"), CASES, ids=[f"{a}-{lang}" for a, lang in CASES])
def test_attack(daemon, client, attack, language):
    result = client.execute(language, ATTACKS[attack][language], limits=LIMITS)
    assert result.status == EXPECTED[attack], (result.message, result.stderr[-500:])
    assert result.stdout.startswith("start\n")
    assert_nothing_left(daemon, result.sandbox_id)
    # The next job in the pool is unaffected.
    follow = client.execute("python", "print('next')")
    assert (follow.status, follow.stdout) == (Status.OK, "next\n")


def test_the_details_of_each_limit(client):
    endless = client.execute("python", "while True: print('y' * 99)", limits=LIMITS)
    assert endless.truncated == {"stdout": True, "stderr": False}
    assert len(endless.stdout.encode()) == LIMITS["output_bytes"]
    assert endless.message == "stdout went over the output limit of 10000 bytes"

    memory = client.execute("python", "x = bytearray(400 * 2**20)", limits=LIMITS)
    assert (memory.status, memory.signal) == (Status.MEMORY_LIMIT, signal.SIGKILL)
    assert memory.message == "memory limit of 256 MiB exceeded"

    big_file = client.execute("typescript", ATTACKS["huge file"]["typescript"], limits=LIMITS)
    assert big_file.signal == signal.SIGXFSZ
    assert big_file.message == f"file size limit of {2**20} bytes exceeded"

    cpu = client.execute("python", "while True: pass", limits={"cpu_time": 1})
    assert cpu.status == Status.TIMEOUT
    assert cpu.message == "CPU time limit of 1 s exceeded"
    assert cpu.usage["cpu_time"] >= 0.9  # the kernel accounts CPU time in ticks

    wall = client.execute("python", "import time; time.sleep(30)", timeout=1)
    assert wall.message == "wall time limit of 1 s exceeded"
    assert 1 <= wall.timings["run"] < 5

    forks = client.execute(
        "python",
        "import os\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n"
        "            import time; time.sleep(30)\n        n += 1\n"
        "except OSError as e:\n    print(n, e.errno)",
        limits={"processes": 10},
    )
    forked, errno = map(int, forks.stdout.split())
    assert forked < 10 and errno == 11  # EAGAIN: the process limit held


def test_compile_error_reports_the_compiler_output(client):
    result = client.execute("rust", 'fn main() { let x: i32 = "text"; }')
    assert result.status == Status.COMPILE_ERROR
    assert "mismatched types" in result.compile.stderr
    assert result.compile.exit_code == 1
    assert result.stdout == "" and result.exit_code is None


def test_compile_time_limit(client):
    # Deeply nested generics make rustc work for a long time.
    code = "\n".join(
        ["struct S0;"]
        + [f"type S{i} = (S{i - 1}, S{i - 1});" for i in range(1, 40)]
        + ['fn main() { let x: Option<S39> = None; println!("{:?}", x.is_none()); }']
    )
    result = client.execute("rust", code, limits={"compile_time": 1})
    assert result.status in (Status.TIMEOUT, Status.OK)
    if result.status == Status.TIMEOUT:
        assert result.message == "compile time limit of 1 s exceeded"


@pytest.mark.parametrize("language", ["python", "rust"])
def test_killing_the_agent_from_inside_fails(client, language):
    code = {
        "python": "import os, signal\nfor target in (1, -1):\n    try:\n"
        "        os.kill(target, signal.SIGKILL)\n    except OSError as e:\n"
        "        print('refused', e.errno)\nprint('alive')",
        "rust": "use std::process::Command;\nfn main() {\n"
        '  let _ = Command::new("kill").args(["-9", "1"]).status();\n'
        '  println!("alive"); }',
    }[language]
    result = client.execute(language, code)
    # The agent is PID 1 of the jail: signals from inside cannot reach it.
    assert result.status == Status.OK
    assert result.stdout.endswith("alive\n")


@pytest.fixture
def host_secret():
    """A file only the host has, which no sandbox may read."""
    path = "/etc/sandboxd-test-secret"
    secret = os.urandom(16).hex()
    with open(path, "w") as stream:
        stream.write(secret)
    yield path, secret
    os.unlink(path)


READERS = {
    "python": "import sys\nfor p in sys.argv[1:]:\n    try:\n        print(open(p).read())\n"
    "    except OSError as e:\n        print('refused', p, e.errno)",
    "typescript": "for (const p of Deno.args) { try { console.log(Deno.readTextFileSync(p)); }"
    " catch (e) { console.log('refused', p, e.name); } }",
    "rust": "fn main() { for p in std::env::args().skip(1) {\n"
    '  match std::fs::read_to_string(&p) { Ok(t) => println!("{}", t),'
    ' Err(e) => println!("refused {} {}", p, e) } } }',
}


@pytest.mark.parametrize("language", READERS)
def test_host_files_are_out_of_reach(daemon, client, language, host_secret):
    path, secret = host_secret
    targets = [
        path,
        f"/proc/1/root{path}",
        f"/proc/self/root{path}",
        "/etc/sandboxd/sandboxd.toml",
        str(daemon.config_file),
        str(daemon.socket),
    ]
    result = client.execute(language, READERS[language], args=targets)
    assert secret not in result.stdout + result.stderr
    assert "[daemon]" not in result.stdout  # no config file of the host either
    assert result.stdout.count("refused") == len(targets), result.stdout + result.stderr


WRITERS = {
    "python": "for p in ('/etc/evil', '/usr/bin/evil', '/opt/sandboxd/agent', '../evil'):\n"
    "    try:\n        open(p, 'w').write('x')\n        print('wrote', p)\n"
    "    except OSError as e:\n        print('refused', p, e.errno)",
    "typescript": "try { Deno.writeTextFileSync('/etc/evil', 'x'); console.log('wrote'); }"
    " catch (e) { console.log('refused', e.name); }",
    "rust": 'fn main() { match std::fs::write("/etc/evil", "x") {\n'
    '  Ok(_) => println!("wrote"), Err(e) => println!("refused {}", e) } }',
}


@pytest.mark.parametrize("language", WRITERS)
def test_writing_outside_the_workdir_fails(daemon, client, language):
    result = client.execute(language, WRITERS[language])
    assert "wrote" not in result.stdout
    assert "refused" in result.stdout
    image_root = client.status()["image"]["path"]
    assert not os.path.exists(f"{image_root}/rootfs/etc/evil")
    assert not os.path.exists(f"{image_root}/rootfs/evil")


def test_typescript_has_no_env_network_or_subprocess_permission(client):
    code = (
        "for (const [what, f] of [['env', () => Deno.env.get('PATH')],\n"
        "    ['run', () => new Deno.Command('/bin/sh').outputSync()],\n"
        "    ['read', () => Deno.readTextFileSync('/etc/passwd')]]) {\n"
        "  try { f(); console.log(what, 'allowed'); } catch (e) { console.log(what, e.name); }\n"
        "}\n"
        "try { await fetch('http://127.0.0.1:8000/'); } catch (e) { console.log('net', e.name); }\n"
        "Deno.writeTextFileSync('/work/ok.txt', 'fine');\n"
        "console.log(Deno.readTextFileSync('ok.txt'));"
    )
    result = client.execute("typescript", code)
    assert result.stdout.splitlines() == [
        "env NotCapable",
        "run NotCapable",
        "read NotCapable",
        "net NotCapable",
        "fine",
    ], result.stderr


@SUPERVISORS
def test_the_agent_dying_mid_job_is_reported_as_killed(daemon, client, args):
    """A crash of the jail's PID 1 (the agent, or the reaper; here: killed from the
    host) keeps the output so far."""
    outcome = {}

    def run() -> None:
        outcome["result"] = client.execute(
            "python", "import time\nprint('before', flush=True)\ntime.sleep(60)", args=args
        )

    thread = threading.Thread(target=run)
    thread.start()
    assert wait_for(lambda: bool(program_processes(daemon.uid_base)))
    time.sleep(0.3)  # let the output reach the daemon
    [agent] = busy_agents(daemon)
    os.kill(agent, signal.SIGKILL)
    thread.join(30)
    result = outcome["result"]
    assert result.status == Status.KILLED
    assert result.stdout == "before\n"
    assert_nothing_left(daemon, result.sandbox_id)


@SUPERVISORS
def test_an_agent_that_stops_responding_is_killed_from_outside(daemon, client, args):
    """The host enforces the wall time too: a frozen agent (or reaper) cannot hold a
    sandbox."""
    outcome = {}

    def run() -> None:
        outcome["result"] = client.execute(
            "python",
            "import time\nprint('before', flush=True)\ntime.sleep(60)",
            timeout=1,
            args=args,
        )

    thread = threading.Thread(target=run)
    thread.start()
    assert wait_for(lambda: bool(program_processes(daemon.uid_base)))
    time.sleep(0.3)
    [agent] = busy_agents(daemon)
    os.kill(agent, signal.SIGSTOP)
    thread.join(30)
    result = outcome["result"]
    assert result.status == Status.TIMEOUT
    assert "outlived its time limits" in result.message
    assert result.stdout == "before\n"
    assert_nothing_left(daemon, result.sandbox_id)


def busy_agents(daemon) -> list[int]:
    """Pids of the jails' PID 1s (agents, or reapers) whose program is running (not
    those waiting in the pool, whose only child, if any, is a warm runtime waiting for
    its source)."""
    programs = {str(pid) for pid in program_processes(daemon.uid_base)}
    return [
        pid
        for pid, cmd in sandbox_processes(daemon.uid_base).items()
        if cmd.startswith((AGENT_COMMAND, REAPER + " ")) and programs & set(_children(pid))
    ]


def _children(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            return children.read().split()
    except OSError:
        return []


@SUPERVISORS
def test_the_program_cannot_reach_the_agents_channel_or_memory(client, args):
    """Nor the reaper's: its socket to the daemon (which reports the program's exit) is
    one of its fds, which nobody in the jail may list or open."""
    code = (
        "import os\n"
        "for path, flags in (('/proc/1/fd/0', os.O_RDONLY), ('/proc/1/fd/1', os.O_WRONLY),\n"
        "                    ('/proc/1/mem', os.O_RDONLY), ('/proc/1/environ', os.O_RDONLY)):\n"
        "    try:\n"
        "        os.close(os.open(path, flags))\n"
        "        print('opened', path)\n"
        "    except OSError as e:\n"
        "        print('refused', path, e.errno)\n"
        "try:\n"
        "    print('listed', os.listdir('/proc/1/fd'))\n"
        "except OSError as e:\n"
        "    print('refused /proc/1/fd', e.errno)\n"
    )
    result = client.execute("python", code, args=args)
    assert "opened" not in result.stdout and "listed" not in result.stdout, result.stdout
    assert result.stdout.count("refused") == 5


def test_kernel_interfaces_exploits_start_from_are_refused(client):
    from sandboxd.host.seccomp import DENIED_X86_64

    names = [
        "bpf",
        "keyctl",
        "perf_event_open",
        "userfaultfd",
        "io_uring_setup",
        "ptrace",
        "mount",
        "unshare",
        "add_key",
        "open_by_handle_at",
        "init_module",
        "kexec_load",
    ]
    code = (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        f"for name, nr in {[(n, DENIED_X86_64[n]) for n in names]}:\n"
        "    result = libc.syscall(nr, 0, 0, 0, 0, 0)\n"
        "    print(name, result, ctypes.get_errno())\n"
        "print('getpid', libc.syscall(39) == os.getpid())\n"
    )
    result = client.execute("python", code)
    lines = result.stdout.splitlines()
    assert lines[-1] == "getpid True"
    assert lines[:-1] == [f"{name} -1 1" for name in names]  # EPERM from the filter


@SUPERVISORS
def test_signals_to_the_agent_change_nothing(client, args):
    """The program runs as the agent's uid in the jail: every signal it can name goes to
    PID 1 (the agent, or the reaper), which must ignore them all (the agent kept
    Python's SIGINT handler once)."""
    code = (
        "import os, signal\nsent = []\n"
        "for number in range(1, 65):\n"
        "    try:\n        os.kill(1, number)\n        sent.append(number)\n"
        "    except OSError:\n        pass\n"
        "print(len(sent), flush=True)\n"
        "import time; time.sleep(0.2)\nprint('alive')"
    )
    result = client.execute("python", code, args=args)
    assert (result.status, result.exit_code) == (Status.OK, 0), result.message
    assert result.stdout.split() == ["64", "alive"]  # each was sent, and none mattered


def test_busy_children_share_one_cpu_time_limit(client):
    code = (
        "import os\nprint('start', flush=True)\n"
        "for _ in range(8):\n    if os.fork() == 0:\n        while True: pass\n"
        "os.wait()"
    )
    result = client.execute("python", code, limits={"cpu_time": 2, "wall_time": 30})
    # Before: each process had its own 2 s, so they ran ~9 CPU-seconds and said "ok".
    assert result.status == Status.TIMEOUT
    assert result.message == "CPU time limit of 2 s exceeded"
    assert result.stdout == "start\n"
    assert 1.9 <= result.usage["cpu_time"] < 3
    assert result.timings["run"] < 10


def test_files_that_fill_the_memory_end_as_memory_limit_with_the_output_so_far(client):
    code = (
        "print('start', flush=True)\ni = 0\n"
        "while True:\n    open(f'/tmp/f{i}', 'wb').write(b'x' * 2**20); i += 1"
    )
    result = client.execute("python", code, limits={"memory_bytes": 64 * 2**20})
    assert result.status == Status.MEMORY_LIMIT, result.message
    assert result.message.startswith("memory limit of 64 MiB exceeded")
    assert result.stdout == "start\n"


def test_a_compiler_killed_for_memory_reports_memory_limit(client):
    elements = ",".join(str(i) for i in range(200_000))
    code = f'static A: [u64; 200000] = [{elements}];\nfn main() {{ println!("{{}}", A[7]); }}'
    result = client.execute("rust", code, limits={"memory_bytes": 64 * 2**20})
    # Before: "compile_error", as if the program were wrong.
    assert result.status == Status.MEMORY_LIMIT, (result.message, result.compile)
    assert result.message == "memory limit of 64 MiB exceeded"
    assert result.stdout == "" and result.exit_code is None


def test_a_compiler_flooding_its_output_reports_output_limit(client):
    code = "fn main() {\n" + 'let x: i32 = "no";\n' * 2000 + "}"
    result = client.execute("rust", code, limits={"output_bytes": 10_000})
    assert result.status == Status.OUTPUT_LIMIT, result.message
    assert result.message == "stderr went over the output limit of 10000 bytes"
    assert len(result.compile.stderr.encode()) == 10_000
    assert result.compile.truncated["stderr"] is True


SYSCALL_PROBE = (
    "import ctypes, os, socket\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "def call(name, nr, *args):\n"
    "    result = libc.syscall(nr, *args)\n"
    "    print(name, 'ok' if result >= 0 else ctypes.get_errno())\n"
    "    if result >= 0 and name.startswith('socket'):\n"
    "        os.close(result)\n"
    "for name, family, protocol in [\n"
    "        ('socket unix', 1, 0), ('socket inet', 2, 0), ('socket inet6', 10, 0),\n"
    "        ('socket netlink route', 16, 0), ('socket netlink audit', 16, 9),\n"
    "        ('socket vsock', 40, 0), ('socket packet', 17, 0), ('socket alg', 38, 0),\n"
    "        ('socket bluetooth', 31, 0), ('socket can', 29, 0)]:\n"
    "    call(name, 41, family, socket.SOCK_STREAM if family != 16 else 3, protocol)\n"
    "pair = (ctypes.c_int * 2)()\n"
    "call('socketpair unix', 53, 1, 1, 0, pair)\n"
    "call('socketpair inet', 53, 2, 1, 0, pair)\n"
    "call('modify_ldt', 154, 0, 0, 0)\n"
    "call('move_pages', 279, 0, 0, 0, 0, 0, 0)\n"
    "call('kcmp', 312, os.getpid(), os.getpid(), 0, 0, 0)\n"
    "call('personality query', 135, 0xffffffff)\n"
    "call('personality read-implies-exec', 135, 0x0400000)\n"
    "call('newer than reviewed', 463, 0, 0, 0, 0)\n"
    "call('no such syscall', 999)\n"
    "call('getpid', 39)\n"
)


def test_only_the_socket_families_and_calls_programs_need_are_allowed(client):
    result = client.execute("python", SYSCALL_PROBE)
    assert result.stdout.splitlines() == [
        "socket unix ok",
        "socket inet ok",
        "socket inet6 ok",
        "socket netlink route ok",
        "socket netlink audit 1",
        "socket vsock 1",  # not confined by the network namespace: reaches VMs and hosts
        "socket packet 1",
        "socket alg 1",
        "socket bluetooth 1",
        "socket can 1",
        "socketpair unix ok",
        "socketpair inet 1",
        "modify_ldt 1",
        "move_pages 1",
        "kcmp 1",
        "personality query ok",
        "personality read-implies-exec 1",
        "newer than reviewed 38",  # ENOSYS: as a kernel without it, so libc falls back
        "no such syscall 38",
        "getpid ok",
    ], result.stderr


def test_ready_sandboxes_have_the_default_limits_before_any_job(make_daemon):
    """A ready jail runs its agent already: it was unlimited until a job claimed it."""
    daemon = make_daemon(pool={"size": 2})  # its sandboxes never ran a job
    layout = CgroupLayout.detect()
    names = {path.name for path in sandbox_cgroups(daemon.name)}
    assert len(names) == 2
    for name in names:
        memory = layout.roots["memory"] / daemon.name / name
        pids = layout.roots["pids"] / daemon.name / name
        limit = memory / ("memory.max" if layout.version == 2 else "memory.limit_in_bytes")
        # The defaults (512 MiB, 64 processes) and what the agent takes beside them.
        assert int(limit.read_text()) == 512 * 2**20 + AGENT_MEMORY
        assert int((pids / "pids.max").read_text()) == 64 + OVERHEAD_PROCESSES


def test_sandboxes_run_the_agent_compiled_once_by_the_images_python(daemon):
    """Each sandbox would otherwise compile 900 lines before it can serve."""
    agents = [
        pid
        for pid, cmd in sandbox_processes(daemon.uid_base).items()
        if cmd.startswith(AGENT_COMMAND)  # not bubblewrap around it
    ]
    assert agents
    with zipfile.ZipFile(f"/proc/{agents[0]}/root{AGENT}") as bundle:
        names = bundle.namelist()
        assert "__main__.pyc" in names and "agent/stage.pyc" in names
        assert all(name.endswith(".pyc") for name in names)  # no source to compile
        assert bundle.read("agent/stage.pyc")[2:4] == b"\r\n"  # a .pyc's magic number
    assert "run the agent from source" not in daemon.log()
