"""The fake Firecracker and jailer are faithful where the firecracker backend relies on them:
the API's transport, validation and state rules, the jail the jailer builds, and a real
guest reached over hybrid vsock through jailer + API."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import NetNS, netns

from sandboxd.backends.agent_bundle import agent_bundle
from sandboxd.backends.vm import initramfs
from sandboxd.images import Image
from tests.fakes.firecracker_bin import install_fakes
from tests.host_state import wait_for

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root: jails, uids and cgroups")
JAIL_UID = JAIL_GID = 65534
CGROUP_ROOT = Path("/sys/fs/cgroup")


@pytest.fixture(scope="module")
def bins(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return install_fakes(tmp_path_factory.mktemp("bin"))


def exchange(
    sock_path: Path, request: bytes, timeout: float = 30
) -> tuple[str, dict[str, str], bytes]:
    """One raw HTTP exchange: status line, headers (lowercase names), body."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(str(sock_path))
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {data!r}"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
        while len(body) < int(headers.get("content-length", 0)):
            body += sock.recv(65536)
        return lines[0], headers, body


class Api:
    """A client for one fake Firecracker's API socket."""

    def __init__(self, sock_path: Path) -> None:
        self.sock_path = sock_path

    def call(self, method: str, path: str, body: object = None) -> tuple[int, object]:
        raw = b"" if body is None else json.dumps(body).encode()
        request = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n"
        if raw:
            request += f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n"
        status, _, payload = exchange(self.sock_path, request.encode() + b"\r\n" + raw)
        return int(status.split()[1]), json.loads(payload) if payload else None

    def ok(self, method: str, path: str, body: object = None) -> object:
        status, payload = self.call(method, path, body)
        assert status in (200, 204), (method, path, payload)
        return payload

    def fault(self, method: str, path: str, body: object = None) -> str:
        status, payload = self.call(method, path, body)
        assert status == 400, (method, path, status, payload)
        assert isinstance(payload, dict)
        return payload["fault_message"]


@pytest.fixture
def firecracker(bins: tuple[Path, Path], tmp_path: Path) -> Iterator[tuple[Api, subprocess.Popen]]:
    """A fake Firecracker started directly (no jail), with its API socket in tmp_path."""
    sock = tmp_path / "api.sock"
    process = subprocess.Popen(
        [bins[0], "--api-sock", sock, "--id", "test-vm"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_for(sock.exists), "the API socket"
        yield Api(sock), process
    finally:
        process.kill()
        process.wait()


def test_it_logs_to_stdout_at_firecracker_s_default_level_and_blocks_when_unread(
    bins: tuple[Path, Path], tmp_path: Path
):
    sock = tmp_path / "api.sock"
    read, write = os.pipe()
    process = subprocess.Popen([bins[0], "--api-sock", sock, "--id", "vm1"], stdout=write)
    os.close(write)
    try:
        assert wait_for(sock.exists), "the API socket"
        status, _, _ = exchange(sock, b"GET / HTTP/1.1\r\n\r\n")
        assert status.startswith("HTTP/1.1 200")
        lines = os.read(read, 65536).decode().splitlines()
        assert lines[0].endswith("[vm1:main] Running Firecracker v1.16.1"), lines
        assert any('received a Get request on "/"' in line for line in lines), lines
        # Nobody reads its stdout now: once the pipe is full, the API answers no more.
        big = b'{"vcpu_count": 1, "mem_size_mib": 128}' + b" " * 40000
        put = b"PUT /machine-config HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(big) + big
        with pytest.raises(TimeoutError):
            for _ in range(4):
                exchange(sock, put, timeout=2)
    finally:
        process.kill()
        process.wait()
        os.close(read)


PREFIX = "An error occurred when deserializing the json body of a request: "


def test_version_and_bad_arguments(bins: tuple[Path, Path]):
    firecracker, jailer = bins
    done = subprocess.run([firecracker, "--version"], capture_output=True, text=True)
    assert (done.returncode, done.stdout.strip()) == (0, "Firecracker v1.16.1")
    done = subprocess.run([jailer, "--version"], capture_output=True, text=True)
    assert (done.returncode, done.stdout.strip()) == (0, "Jailer v1.16.1")
    done = subprocess.run([firecracker, "--api-sok", "x"], capture_output=True, text=True)
    assert done.returncode == 153
    assert "Found argument '--api-sok' which wasn't expected" in done.stderr
    done = subprocess.run([jailer, "--exec-file", firecracker], capture_output=True, text=True)
    assert done.returncode == 153
    assert "Argument 'id' required, but not found." in done.stdout


def test_an_existing_api_socket_path_ends_firecracker(bins: tuple[Path, Path], tmp_path: Path):
    stale = tmp_path / "api.sock"
    stale.touch()
    done = subprocess.run([bins[0], "--api-sock", stale], capture_output=True, timeout=30)
    assert done.returncode == 1


def test_responses_are_micro_http_s(firecracker):
    api, _ = firecracker
    status, headers, body = exchange(api.sock_path, b"GET / HTTP/1.1\r\n\r\n")
    assert status == "HTTP/1.1 200 "
    assert headers["server"] == "Firecracker API"
    assert headers["connection"] == "keep-alive"
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {
        "id": "test-vm",
        "state": "Not started",
        "vmm_version": "1.16.1",
        "app_name": "Firecracker",
    }
    raw = b'{"vcpu_count": 2, "mem_size_mib": 256}'
    request = b"PUT /machine-config HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(raw), raw)
    status, headers, body = exchange(api.sock_path, request)
    assert (status, body) == ("HTTP/1.1 204 ", b"")
    assert "content-length" not in headers
    assert api.ok("GET", "/machine-config") == {
        "vcpu_count": 2,
        "mem_size_mib": 256,
        "smt": False,
        "track_dirty_pages": False,
        "huge_pages": "None",
    }
    assert api.ok("GET", "/version") == {"firecracker_version": "1.16.1"}


@pytest.mark.parametrize(
    ("method", "path", "body", "message"),
    [
        ("PUT", "/boot-source", {"kernel_image_path": "/k", "kernel": 1},
         PREFIX + "unknown field `kernel`, expected one of `boot_args`, `initrd_path`, "
         "`kernel_image_path`."),
        ("PUT", "/machine-config", {"vcpu_count": 1}, PREFIX + "missing field `mem_size_mib`."),
        ("PUT", "/machine-config", {"vcpu_count": "2", "mem_size_mib": 128},
         PREFIX + 'invalid type: string "2", expected an integer.'),
        ("PUT", "/actions", {"action_type": "Boot"},
         PREFIX + "unknown variant `Boot`, expected one of `FlushMetrics`, `InstanceStart`, "
         "`SendCtrlAltDel`."),
        ("PUT", "/drives/root", {"drive_id": "rootfs", "is_root_device": True},
         "The id from the path does not match the id from the body!"),
        ("PUT", "/drives/ro-ot", {"drive_id": "ro-ot", "is_root_device": True},
         "API Resource IDs can only contain alphanumeric characters and underscores."),
        ("PUT", "/drives", {"drive_id": "a", "is_root_device": True}, "The ID cannot be empty."),
        ("PUT", "/boot-source", None, "Empty PUT request."),
        ("PATCH", "/vm", None, "Empty PATCH request."),
        ("PATCH", "/machine-config", {}, "Empty PATCH request."),
        ("GET", "/", {}, "GET request cannot have a body."),
        ("GET", "/boot-source", None, "Invalid request method and/or path: GET boot-source."),
        ("PUT", "/nothing/here", {}, "Invalid request method and/or path: PUT nothing."),
        ("PUT", "/snapshot/take", {}, "Invalid request method and/or path: PUT /snapshot/take."),
        ("PUT", "/snapshot/load", {"snapshot_path": "s"},
         PREFIX + "missing field: either `mem_backend` or `mem_file_path` is required."),
        ("PUT", "/machine-config", {"vcpu_count": 33, "mem_size_mib": 128},
         "Machine config error: The number of vCPUs must be greater than 0, less than 32 and "
         "must be 1 or an even number if SMT is enabled."),
        ("PUT", "/network-interfaces/eth0",
         {"iface_id": "eth0", "host_dev_name": "a123456789abcdef"},
         "Could not create the network device: Open tap device failed: Invalid interface name"),
    ],
)  # fmt: skip
def test_requests_are_checked_like_firecracker(firecracker, method, path, body, message):
    api, _ = firecracker
    assert api.fault(method, path, body) == message


def test_bodies_over_the_payload_limit_are_refused_by_the_http_layer(firecracker):
    api, _ = firecracker
    raw = json.dumps({"kernel_image_path": "x" * 51200}).encode()
    request = b"PUT /boot-source HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(raw)
    status, _, body = exchange(api.sock_path, request + raw)
    assert status == "HTTP/1.1 400 "
    assert b"larger than the limit of 51200" in body
    assert b"\nAll previous unanswered requests will be dropped." in body


def test_calls_are_gated_by_the_vm_s_state(firecracker, tmp_path: Path):
    api, process = firecracker
    pre_boot = "The requested operation is not supported before starting the microVM."
    assert api.fault("PATCH", "/vm", {"state": "Paused"}) == pre_boot
    assert api.fault("PUT", "/actions", {"action_type": "FlushMetrics"}) == pre_boot
    snapshot = {"snapshot_path": "s", "mem_file_path": "m"}
    assert api.fault("PUT", "/snapshot/create", snapshot) == pre_boot
    assert (
        api.fault("PUT", "/actions", {"action_type": "InstanceStart"})
        == "Start microvm error: Cannot start microvm without kernel configuration."
    )
    assert api.fault("PUT", "/boot-source", {"kernel_image_path": str(tmp_path / "none")}) == (
        "Boot source error: The kernel file cannot be opened: No such file or directory "
        "(os error 2)"
    )
    metrics = {"metrics_path": str(tmp_path / "metrics")}
    api.ok("PUT", "/metrics", metrics)
    assert (tmp_path / "metrics").exists()
    assert (
        api.fault("PUT", "/metrics", metrics)
        == "Metrics error: Reinitialization of metrics not allowed."
    )
    # The vsock's socket is bound at once, and its path must be free.
    api.ok("PUT", "/vsock", {"guest_cid": 3, "uds_path": str(tmp_path / "v.sock")})
    assert stat.S_ISSOCK((tmp_path / "v.sock").stat().st_mode)
    (tmp_path / "taken").touch()
    assert "UnixBind" in api.fault(
        "PUT", "/vsock", {"guest_cid": 3, "uds_path": str(tmp_path / "taken")}
    )
    # Configured now: a snapshot can no longer be loaded, and the process goes on.
    assert api.fault("PUT", "/snapshot/load", {**snapshot, "resume_vm": True}) == (
        "Load snapshot error: Loading a microVM snapshot not allowed after configuring "
        "boot-specific resources."
    )
    assert api.ok("GET", "/")["state"] == "Not started"
    assert process.poll() is None


def test_a_failed_snapshot_load_ends_firecracker(firecracker, tmp_path: Path):
    api, process = firecracker
    api.ok("PUT", "/logger", {"log_path": str(tmp_path / "log"), "level": "Debug"})
    load = {"snapshot_path": str(tmp_path / "none"), "mem_file_path": str(tmp_path / "m")}
    raw = json.dumps(load).encode()
    request = b"PUT /snapshot/load HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(raw)
    status, headers, body = exchange(api.sock_path, request + raw)
    assert status == "HTTP/1.1 400 "
    assert json.loads(body)["fault_message"].startswith(
        "Load snapshot error: Failed to restore from snapshot: "
    )
    assert headers["deprecation"] == "true"  # mem_file_path
    assert process.wait(timeout=10) == 1


class Jail:
    """The fake jailer's launches in a fresh base directory; cleaned up at the end."""

    def __init__(self, bins: tuple[Path, Path], base: Path) -> None:
        self.firecracker, self.jailer = bins
        self.base = base
        self.parent = f"fakefc-test-{uuid.uuid4().hex[:8]}"
        self.processes: list[subprocess.Popen] = []

    def chroot(self, vm_id: str) -> Path:
        return self.base / "firecracker" / vm_id / "root"

    def argv(self, vm_id: str, *extra: str, fc_args: tuple[str, ...] = ()) -> list[str]:
        return [
            str(self.jailer), "--id", vm_id, "--exec-file", str(self.firecracker),
            "--uid", str(JAIL_UID), "--gid", str(JAIL_GID), "--chroot-base-dir", str(self.base),
            "--parent-cgroup", self.parent, *extra, "--", *fc_args,
        ]  # fmt: skip

    def start(self, vm_id: str, *extra: str, fc_args: tuple[str, ...] = (), **kw) -> Api:
        kw.setdefault("stdout", subprocess.DEVNULL)
        process = subprocess.Popen(
            self.argv(vm_id, *extra, fc_args=fc_args), stdin=subprocess.DEVNULL, **kw
        )
        self.processes.append(process)
        sock = self.chroot(vm_id) / "run" / "firecracker.socket"
        assert wait_for(lambda: sock.exists() or process.poll() is not None), "the API socket"
        assert process.poll() is None, f"the jail ended with {process.returncode}"
        return Api(sock)

    def cleanup(self) -> None:
        for process in self.processes:
            process.kill()
            process.wait()
        for controller in ("memory", "pids", "cpu", "unified"):
            parent = CGROUP_ROOT / controller / self.parent
            if parent.is_dir():
                for child in parent.iterdir():
                    if child.is_dir():
                        child.rmdir()
                parent.rmdir()
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def jail(bins: tuple[Path, Path]) -> Iterator[Jail]:
    if not IS_ROOT:
        pytest.skip("needs root: jails, uids and cgroups")
    # Not under tmp_path: the jail uid must be able to reach its jail (there is no chroot).
    base = Path(tempfile.mkdtemp(prefix="fakefc-jails-", dir="/tmp"))
    base.chmod(0o755)
    jails = Jail(bins, base)
    try:
        yield jails
    finally:
        jails.cleanup()


def test_a_jail_on_a_nodev_mount_cannot_open_kvm_so_no_vm_starts(bins: tuple[Path, Path]):
    if not IS_ROOT:
        pytest.skip("needs root: jails, uids and mounts")
    base = Path(tempfile.mkdtemp(prefix="fakefc-nodev-", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "nodev,mode=0755", "fakefc", base], check=True)
    jails = Jail(bins, base)
    try:
        api = jails.start("nodev-vm")
        kernel = jails.chroot("nodev-vm") / "vmlinux"
        kernel.write_bytes(b"not booted: the start fails before")
        api.ok("PUT", "/boot-source", {"kernel_image_path": "/vmlinux"})
        fault = api.fault("PUT", "/actions", {"action_type": "InstanceStart"})
        assert fault.startswith("Start microvm error: Cannot open /dev/kvm: Permission denied")
    finally:
        jails.cleanup()
        subprocess.run(["umount", base], check=True)
        base.rmdir()


def _owner(path: Path) -> tuple[int, int]:
    info = path.lstat()
    return info.st_uid, info.st_gid


@needs_root
def test_the_jailer_builds_firecracker_s_jail(jail: Jail):
    api = jail.start(
        "vm-1",
        "--cgroup", "memory.limit_in_bytes=268435456",
        "--cgroup", "pids.max=64",
        "--cgroup", "cpu.shares=512",
        "--resource-limit", "no-file=1024",
    )  # fmt: skip
    process = jail.processes[-1]
    root = jail.chroot("vm-1")
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    for folder in ("", "dev", "dev/net", "run"):
        assert _owner(root / folder) == (JAIL_UID, JAIL_GID), folder
    binary = root / "firecracker"
    assert binary.read_bytes() == jail.firecracker.read_bytes()
    assert binary.stat().st_nlink == 1  # a copy, not a link
    assert _owner(binary) == (JAIL_UID, JAIL_GID)
    for name, major, minor in (
        ("dev/kvm", 10, 232),
        ("dev/net/tun", 10, 200),
        ("dev/urandom", 1, 9),
    ):
        info = (root / name).lstat()
        assert stat.S_ISCHR(info.st_mode), name
        assert (os.major(info.st_rdev), os.minor(info.st_rdev)) == (major, minor)
        assert (info.st_uid, info.st_gid) == (JAIL_UID, JAIL_GID)
    # No --daemonize: the jailer exec'd in place, so the spawned pid is Firecracker's.
    assert (root / "firecracker.pid").read_text() == str(process.pid)
    assert stat.S_ISSOCK((root / "run" / "firecracker.socket").stat().st_mode)
    status = Path(f"/proc/{process.pid}/status").read_text()
    assert f"Uid:\t{JAIL_UID}\t{JAIL_UID}" in status
    assert re.search(r"^Groups:\s*$", status, re.MULTILINE)
    assert Path(f"/proc/{process.pid}/environ").read_bytes() == b""
    cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")
    assert b"--start-time-us" in cmdline and b"--parent-cpu-time-us" in cmdline
    assert (
        "Max open files            1024                 1024"
        in Path(f"/proc/{process.pid}/limits").read_text()
    )
    for controller, file, value in (
        ("memory", "memory.limit_in_bytes", "268435456"),
        ("pids", "pids.max", "64"),
        ("cpu", "cpu.shares", "512"),
    ):
        cgroup = CGROUP_ROOT / controller / jail.parent / "vm-1"
        assert (cgroup / file).read_text().strip() == value
        assert str(process.pid) in (cgroup / "tasks").read_text().split()
    assert api.ok("GET", "/")["id"] == "vm-1"
    # API paths are the jail's: "/" is the chroot, and nothing leads out of it.
    (root / "vmlinux").write_bytes(b"not really a kernel")
    (root / "vmlinux").chmod(0o644)
    api.ok("PUT", "/boot-source", {"kernel_image_path": "/vmlinux"})
    assert "leaves the jail" in api.fault("PUT", "/boot-source", {"kernel_image_path": "../x"})
    os.symlink("/etc/hostname", root / "escape")
    assert "leaves the jail" in api.fault("PUT", "/boot-source", {"kernel_image_path": "/escape"})
    api.ok("PUT", "/vsock", {"guest_cid": 3, "uds_path": "/v.sock"})
    assert stat.S_ISSOCK((root / "v.sock").stat().st_mode)


@needs_root
def test_network_interfaces_open_a_tap_of_the_jail_s_namespace_as_firecracker_does(jail: Jail):
    # The TAPs live in a namespace this test makes (the jailer's --netns), as the backend's
    # do: one that the jail's uid owns, which it may open, and one that it does not.
    namespace = f"fakefc-net-{uuid.uuid4().hex[:8]}"
    netns.create(namespace)
    try:
        with NetNS(namespace) as ns:
            ns.link("add", ifname="tap0", kind="tuntap", mode="tap", uid=JAIL_UID)
            ns.link("add", ifname="roots", kind="tuntap", mode="tap", uid=0)
        api = jail.start("net-vm", "--netns", f"{netns.NETNS_RUN_DIR}/{namespace}")
        mac = "02:00:00:00:00:01"
        body = {"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": mac}
        assert api.call("PUT", "/network-interfaces/eth0", body)[0] == 204
        status, config = api.call("GET", "/vm/config")
        assert (status, config["network-interfaces"]) == (200, [body])
        # The MAC of another interface; a TAP the uid may not attach; one that is missing
        # (only root could make it); one taken by another interface.
        assert (
            api.fault(
                "PUT",
                "/network-interfaces/eth1",
                {**body, "iface_id": "eth1", "host_dev_name": "x"},
            )
            == f"The MAC address is already in use: {mac}"
        )
        refused = "Could not create the network device: Open tap device failed: "
        for name, why in (("roots", "Operation not permitted (os error 1)"),
                          ("gone", "Operation not permitted (os error 1)"),
                          ("tap0", "Device or resource busy (os error 16)")):  # fmt: skip
            assert api.fault(
                "PUT", "/network-interfaces/eth1", {"iface_id": "eth1", "host_dev_name": name}
            ) == (
                f"{refused}Error while creating ifreq structure: {why}. Invalid TUN/TAP Backend "
                f"provided by {name}. Check our documentation on setting up the network devices."
            )
    finally:
        jail.cleanup()
        netns.remove(namespace)


def test_the_jailer_refuses_a_used_jail_and_bad_ids(jail: Jail):
    jail.start("vm-2")
    jail.processes[-1].kill()
    done = subprocess.run(jail.argv("vm-2"), capture_output=True, text=True, timeout=30)
    # A jail is for one launch: its device nodes exist, and so does its pid file.
    assert (done.returncode, done.stderr.strip()) == (
        1,
        "Jailer error: Failed to create /dev/net/tun via mknod inside the jail: "
        "[Errno 17] File exists",
    )
    shutil.rmtree(jail.chroot("vm-2") / "dev")
    done = subprocess.run(jail.argv("vm-2"), capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "firecracker.pid: File exists" in done.stderr
    done = subprocess.run(jail.argv("vm_2"), capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stderr.strip()) == (
        1,
        "Jailer error: Invalid instance ID: invalid char (_) at position 2",
    )


@needs_root
def test_the_jailer_joins_a_cgroup_v2_parent_and_daemonizes(jail: Jail):
    parent = CGROUP_ROOT / "unified" / jail.parent
    parent.mkdir()
    done = subprocess.run(
        jail.argv("vm-3", "--cgroup-version", "2", "--daemonize"), timeout=30, capture_output=True
    )
    assert done.returncode == 0, done.stderr  # the jailer's parent returns at once
    pid_file = jail.chroot("vm-3") / "firecracker.pid"
    assert wait_for(lambda: pid_file.exists() and pid_file.read_text()), "the pid file"
    pid = int(pid_file.read_text())
    try:
        assert wait_for((jail.chroot("vm-3") / "run" / "firecracker.socket").exists), "the socket"
        assert str(pid) in (parent / "cgroup.procs").read_text().split()
        # A new session, and the daemon is not its leader (the double fork).
        assert os.getsid(pid) not in (os.getsid(0), pid)
    finally:
        os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: not Path(f"/proc/{pid}").exists()), "the daemon's end"


AGENT_PORT = 52  # where the guest agent listens on vsock by default
BOOT_ARGS = "console=ttyS0 reboot=k panic=1 quiet i8042.noaux i8042.nomux i8042.dumbkbd"


def _vm_files(image: Image) -> tuple[Path, bytes]:
    """The image's VM directory and an initramfs with the real guest agent."""
    assert image.vm_dir is not None
    modules = image.manifest["vm"]["modules"]
    return image.vm_dir, initramfs.build(image.vm_dir, modules, agent_bundle())


def _place(source: Path, destination: Path) -> None:
    """Put a host file into a jail, as the backend does: a hard link."""
    os.link(source, destination)


def _agent_hello(uds: Path, nonce: int, timeout: float = 120.0) -> dict:
    """Connect to the guest agent through hybrid vsock and sync with it."""
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            try:
                sock.connect(str(uds))
                sock.sendall(f"CONNECT {AGENT_PORT}\n".encode())
                reader = sock.makefile("rb")
                answer = reader.readline()
            except OSError:
                answer = b""
            if answer.startswith(b"OK "):
                assert int(answer.split()[1]) >= 2**30  # a host port as Firecracker assigns
                sock.sendall(json.dumps({"type": "sync", "nonce": nonce}).encode() + b"\n")
                return json.loads(reader.readline())
        if time.monotonic() > deadline:
            raise TimeoutError("the guest agent never answered on vsock")
        time.sleep(0.2)  # no listener yet: Firecracker closes without a word


@pytest.mark.vm
@pytest.mark.image
@pytest.mark.slow
@needs_root
def test_a_jailed_vm_boots_serves_vsock_snapshots_and_restores(
    jail: Jail, tmp_path: Path, vm_image: Image
):
    vm_dir, ramdisk = _vm_files(vm_image)
    console = (tmp_path / "console").open("wb")
    api = jail.start("vm-e2e", stdout=console, stderr=subprocess.STDOUT)
    root = jail.chroot("vm-e2e")
    _place(vm_dir / "vmlinux", root / "vmlinux")
    _place(vm_dir / "rootfs.ext4", root / "rootfs.ext4")
    (root / "initrd.img").write_bytes(ramdisk)
    (root / "initrd.img").chmod(0o644)
    boot = {"kernel_image_path": "/vmlinux", "initrd_path": "/initrd.img", "boot_args": BOOT_ARGS}
    api.ok("PUT", "/boot-source", boot)
    rootfs = {"drive_id": "rootfs", "path_on_host": "/rootfs.ext4", "is_root_device": False}
    api.ok("PUT", "/drives/rootfs", {**rootfs, "is_read_only": True})
    api.ok("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 512})
    api.ok("PUT", "/vsock", {"guest_cid": 3, "uds_path": "/v.sock"})
    api.ok("PUT", "/entropy", {})
    api.ok("PUT", "/actions", {"action_type": "InstanceStart"})
    assert api.ok("GET", "/")["state"] == "Running"
    assert api.fault("PUT", "/actions", {"action_type": "InstanceStart"}) == (
        "The requested operation is not supported after starting the microVM."
    )
    try:
        hello = _agent_hello(root / "v.sock", nonce=1)
    finally:
        console.flush()
    assert (hello["type"], hello["nonce"], hello["pid"]) == ("hello", 1, 1), hello

    snapshot = {"snapshot_path": "/snap", "mem_file_path": "/mem"}
    assert "save/restore unavailable while running" in api.fault(
        "PUT", "/snapshot/create", snapshot
    )
    api.ok("PATCH", "/vm", {"state": "Paused"})
    api.ok("PATCH", "/vm", {"state": "Paused"})  # idempotent
    assert api.ok("GET", "/")["state"] == "Paused"
    api.ok("PUT", "/snapshot/create", snapshot)
    assert (root / "mem").stat().st_size >= 512 * 2**20
    api.ok("PATCH", "/vm", {"state": "Resumed"})
    assert api.ok("GET", "/")["state"] == "Running"
    first = jail.processes[-1]
    first.kill()  # one VM at a time on this host
    first.wait()

    # A fresh jail: the snapshot, its memory and the disk at the same jail paths.
    restored = jail.start("vm-restored", stdout=console, stderr=subprocess.STDOUT)
    new_root = jail.chroot("vm-restored")
    for name in ("snap", "mem", "rootfs.ext4"):
        _place(root / name, new_root / name)
    api = restored
    load = {
        "snapshot_path": "/snap",
        "mem_backend": {"backend_type": "File", "backend_path": "/mem"},
        "vsock_override": {"uds_path": "/restored.sock"},
        "resume_vm": True,
    }
    api.ok("PUT", "/snapshot/load", load)
    assert api.ok("GET", "/")["state"] == "Running"
    assert api.ok("GET", "/vm/config")["vsock"] == {"guest_cid": 3, "uds_path": "/restored.sock"}
    try:
        hello = _agent_hello(new_root / "restored.sock", nonce=2)
    finally:
        console.close()
    assert (hello["type"], hello["nonce"]) == ("hello", 2), hello
