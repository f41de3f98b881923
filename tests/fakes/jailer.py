"""A fake Firecracker jailer (v1.16.1 semantics: docs/jailer.md, src/jailer/src/env.rs).

Faithful: the flags (``--id``, ``--exec-file``, ``--uid``, ``--gid``, ``--chroot-base-dir``
(default /srv/jailer, must exist), ``--netns``, ``--daemonize``, ``--cgroup <file>=<value>``,
``--cgroup-version 1|2``, ``--parent-cgroup`` (default: the exec file's name),
``--resource-limit fsize=N|no-file=N`` (no-file defaults to 2048), ``--version``, and the
arguments after ``--`` for Firecracker), and the steps in the jailer's order: close fds >= 3
and clear the environment; validate the id (1-64 alphanumerics and hyphens), the exec file
(its name must contain "firecracker") and the paths; ``mkdir -p <base>/<exec name>/<id>/root``
(the chroot); copy the exec file to ``<chroot>/<exec name>`` owned by uid:gid; join the netns;
set the rlimits; real cgroups (v1: ``<controller mount>/<parent>/<id>`` per controller, the
values written, our pid into ``tasks``; v2: controllers enabled in the ancestors'
``cgroup.subtree_control``, ``<unified mount>/<parent>/<id>``, values, pid into
``cgroup.procs``; v2 without ``--cgroup`` joins the existing ``<parent>``); ``/``, ``/dev``,
``/dev/net``, ``/run`` in the chroot with mode 0700 owned by uid:gid; device nodes
``/dev/net/tun`` (10,200), ``/dev/kvm`` (10,232), ``/dev/urandom`` (1,9) owned by uid:gid;
with ``--daemonize`` a double fork, setsid and stdio on /dev/null; the pid file
``<chroot>/<exec name>.pid`` (which must not exist); then drop to uid:gid (no supplementary
groups) and exec the copy with ``--id <id> --start-time-us N --start-time-cpu-us N
--parent-cpu-time-us N`` and the extra arguments. Exit codes: 153 for bad arguments, 1 for
any other failure (with ``Jailer error: ...`` on stderr).

Deviations: no mount namespace, pivot_root or chroot (the fake Firecracker needs the host's
Python and QEMU): the copied binary is exec'd by its host path, and the fake Firecracker
takes the directory it runs from as its jail root (see firecracker_api.py). ``--new-pid-ns``
is refused.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import resource
import shutil
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

VERSION = "1.16.1"
EXIT_ARG_PARSING = 153
EXIT_ERROR = 1
DEFAULT_NO_FILE = 2048
FOLDER_MODE = 0o700
DEVICES = (("dev/net/tun", 10, 200), ("dev/kvm", 10, 232), ("dev/urandom", 1, 9))
_CLONE_NEWNET = 0x40000000
_VALUE_ARGS = {
    "id", "exec-file", "uid", "gid", "chroot-base-dir", "netns", "cgroup-version",
    "parent-cgroup",
}  # fmt: skip
_MULTI_ARGS = {"cgroup", "resource-limit"}
_FLAG_ARGS = {"daemonize", "new-pid-ns", "version", "help"}
_REQUIRED = ("id", "exec-file", "uid", "gid")


class JailerError(Exception):
    pass


class ArgError(Exception):
    pass


@dataclass
class Args:
    values: dict[str, str] = field(default_factory=dict)
    multi: dict[str, list[str]] = field(default_factory=dict)
    flags: set[str] = field(default_factory=set)
    extra: list[str] = field(default_factory=list)


def parse_args(argv: list[str]) -> Args:
    args = Args()
    items = iter(argv)
    for item in items:
        if item == "--":
            args.extra = list(items)
            break
        name = item[2:] if item.startswith("--") else ""
        if name in _FLAG_ARGS:
            args.flags.add(name)
            continue
        if name not in _VALUE_ARGS and name not in _MULTI_ARGS:
            raise ArgError(
                f"Found argument '{item}' which wasn't expected, or isn't valid in this context."
            )
        value = next(items, None)
        if value is None or value.startswith("--"):
            raise ArgError(f"The argument '{name}' requires a value, but none was supplied.")
        if name in _MULTI_ARGS:
            args.multi.setdefault(name, []).append(value)
        elif name in args.values:
            raise ArgError(f"The argument '{name}' was provided more than once.")
        else:
            args.values[name] = value
    if not args.flags & {"help", "version"}:
        for name in _REQUIRED:
            if name not in args.values:
                raise ArgError(f"Argument '{name}' required, but not found.")
    return args


def _time_us() -> int:
    return time.monotonic_ns() // 1000


def _cpu_time_us() -> int:
    return time.process_time_ns() // 1000


def sanitize_process() -> None:
    """Close every inherited fd but stdio, and clear the environment."""
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    os.environ.clear()


def validate_id(instance_id: str) -> None:
    if not 1 <= len(instance_id) <= 64:
        raise JailerError(f"Invalid instance ID: invalid len ({len(instance_id)})")
    for position, char in enumerate(instance_id):
        if not (char == "-" or char.isalnum()):
            raise JailerError(f"Invalid instance ID: invalid char ({char}) at position {position}")


def _number(value: str, kind: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise JailerError(f"Invalid {kind}: {value}") from None


def _mounts() -> list[tuple[str, str, list[str]]]:
    """(mount point, type, options) of /proc/mounts."""
    entries = []
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 4:
            entries.append((fields[1], fields[2], fields[3].split(",")))
    return entries


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(f"{value}\n")
    except OSError as exc:
        raise JailerError(f"Failed to write to {path}: {exc}") from None


@dataclass
class Cgroups:
    version: str
    parent: str
    instance_id: str
    settings: list[tuple[str, str]]

    def setup(self, pid: int) -> None:
        if self.version == "1":
            self._setup_v1(pid)
        else:
            self._setup_v2(pid)

    def _setup_v1(self, pid: int) -> None:
        mounts = _mounts()
        joined: set[Path] = set()
        for file, value in self.settings:
            controller = file.split(".", 1)[0]
            mount = next(
                (m for m, kind, opts in mounts if kind == "cgroup" and controller in opts), None
            )
            if mount is None:
                raise JailerError(f"Controller {controller} is unavailable")
            directory = Path(mount, self.parent, self.instance_id)
            self._mkdir(directory)
            if controller == "cpuset":
                self._inherit_cpuset(Path(mount), directory)
            _write(directory / file, value)
            joined.add(directory)
        for directory in joined:
            _write(directory / "tasks", str(pid))

    @staticmethod
    def _inherit_cpuset(mount: Path, directory: Path) -> None:
        """New cpusets start empty: copy cpus and mems down from the nearest ancestor."""
        for name in ("cpuset.cpus", "cpuset.mems"):
            chain = [directory, *directory.parents]
            chain = chain[: chain.index(mount) + 1]
            for child, parent in reversed(list(itertools.pairwise(chain))):
                if not (child / name).read_text().strip():
                    _write(child / name, (parent / name).read_text().strip())

    @staticmethod
    def _mkdir(directory: Path) -> None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise JailerError(f"Failed to create directory {directory}: {exc}") from None

    def _setup_v2(self, pid: int) -> None:
        unified = next((m for m, kind, _ in _mounts() if kind == "cgroup2"), None)
        if unified is None:
            raise JailerError("Hierarchy not found: cgroup2")
        root = Path(unified)
        parent = root / self.parent
        if not self.settings:
            # Without --cgroup the jailer only moves itself into the existing parent.
            if not parent.is_dir():
                raise JailerError(f"Hierarchy not found: {parent}")
            _write(parent / "cgroup.procs", str(pid))
            return
        controllers = {file.split(".", 1)[0] for file, _ in self.settings}
        available = (root / "cgroup.controllers").read_text().split()
        missing = sorted(controllers - set(available))
        if missing:
            raise JailerError(f"Controller {missing[0]} is unavailable")
        directory = parent / self.instance_id
        self._mkdir(directory)
        # The root and every ancestor down to the parent hand the controllers down.
        chain = [root]
        for part in PurePosixPath(self.parent).parts:
            chain.append(chain[-1] / part)
        for ancestor in chain:
            for controller in sorted(controllers):
                _write(ancestor / "cgroup.subtree_control", f"+{controller}")
        for file, value in self.settings:
            _write(directory / file, value)
        _write(directory / "cgroup.procs", str(pid))


def _resource_limits(specs: list[str]) -> list[tuple[int, int]]:
    limits = {"no-file": DEFAULT_NO_FILE}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep:
            raise JailerError(f"Invalid format for resources limits: {spec}")
        if name not in ("fsize", "no-file"):
            raise JailerError(f"Invalid resource argument: {name}")
        try:
            limits[name] = int(value)
        except ValueError as exc:
            raise JailerError(f"Invalid limit value for resource: {name}: {exc}") from None
    kinds = {"fsize": resource.RLIMIT_FSIZE, "no-file": resource.RLIMIT_NOFILE}
    return [(kinds[name], value) for name, value in limits.items()]


@dataclass
class Env:
    instance_id: str
    exec_file: Path
    uid: int
    gid: int
    chroot_dir: Path
    netns: str | None
    daemonize: bool
    cgroups: Cgroups | None
    rlimits: list[tuple[int, int]]
    extra: list[str]
    start_time_us: int
    start_cpu_us: int

    @classmethod
    def from_args(cls, args: Args, start_time_us: int, start_cpu_us: int) -> Env:
        values = args.values
        if "new-pid-ns" in args.flags:
            raise JailerError("fake jailer: --new-pid-ns is not supported")
        instance_id = values["id"]
        validate_id(instance_id)
        exec_file = Path(values["exec-file"])
        try:
            exec_file = exec_file.resolve(strict=True)
        except OSError as exc:
            raise JailerError(f"Failed to canonicalize path {exec_file}: {exc}") from None
        if not exec_file.is_file():
            raise JailerError(f"{exec_file} is not a file")
        if "firecracker" not in exec_file.name:
            raise JailerError(
                "Invalid filename. The filename of `--exec-file` option must contain "
                f'"firecracker": {exec_file.name}'
            )
        base = Path(values.get("chroot-base-dir", "/srv/jailer"))
        try:
            base = base.resolve(strict=True)
        except OSError as exc:
            raise JailerError(f"Failed to canonicalize path {base}: {exc}") from None
        if not base.is_dir():
            raise JailerError(f"{base} is not a directory")
        version = values.get("cgroup-version", "1")
        if version not in ("1", "2"):
            raise JailerError(f"{version} is an invalid cgroup version specifier")
        parent = values.get("parent-cgroup", exec_file.name)
        parts = PurePosixPath(parent).parts
        if PurePosixPath(parent).is_absolute() or ".." in parts or "." in parent.split("/"):
            raise JailerError(
                "Parent cgroup path is invalid. Path should not be absolute or contain '..' or '.'"
            )
        settings = []
        for spec in args.multi.get("cgroup", []):
            file, sep, value = spec.partition("=")
            if not sep or not file or not value or "." not in file:
                raise JailerError(f"Invalid format for cgroups: {spec}")
            settings.append((file, value))
        cgroups = None
        if settings or (version == "2" and "parent-cgroup" in values):
            cgroups = Cgroups(version, parent, instance_id, settings)
        return cls(
            instance_id=instance_id,
            exec_file=exec_file,
            uid=_number(values["uid"], "uid"),
            gid=_number(values["gid"], "gid"),
            chroot_dir=base / exec_file.name / instance_id / "root",
            netns=values.get("netns"),
            daemonize="daemonize" in args.flags,
            cgroups=cgroups,
            rlimits=_resource_limits(args.multi.get("resource-limit", [])),
            extra=args.extra,
            start_time_us=start_time_us,
            start_cpu_us=start_cpu_us,
        )

    def run(self) -> None:
        chroot = self.chroot_dir
        try:
            chroot.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise JailerError(f"Failed to create directory {chroot}: {exc}") from None
        exec_copy = chroot / self.exec_file.name
        if exec_copy.exists() and exec_copy.stat().st_nlink > 1:
            raise JailerError(f"Failed to copy {self.exec_file} to {exec_copy}: hard-linked")
        try:
            shutil.copy(self.exec_file, exec_copy)
            os.chown(exec_copy, self.uid, self.gid)
        except OSError as exc:
            raise JailerError(f"Failed to copy {self.exec_file} to {exec_copy}: {exc}") from None
        if self.netns is not None:
            self._join_netns(self.netns)
        for kind, value in self.rlimits:
            try:
                resource.setrlimit(kind, (value, value))
            except (OSError, ValueError) as exc:
                raise JailerError(f"Failed to set limit for resource: {exc}") from None
        if self.cgroups is not None:
            self.cgroups.setup(os.getpid())
        dev_null = os.open("/dev/null", os.O_RDWR) if self.daemonize else None
        for folder in ("", "dev", "dev/net", "run"):
            self._jailed_folder(chroot / folder)
        for name, major, minor in DEVICES:
            self._mknod(name, major, minor)
        parent_cpu_us = _cpu_time_us() - self.start_cpu_us
        if dev_null is not None:
            if os.fork():
                os._exit(0)
            os.setsid()
            if os.fork():
                os._exit(0)
            for fd in (0, 1, 2):
                os.dup2(dev_null, fd)
            os.close(dev_null)
        self._write_pid_file(chroot / f"{self.exec_file.name}.pid")
        argv = [
            str(exec_copy),
            "--id", self.instance_id,
            "--start-time-us", str(self.start_time_us),
            "--start-time-cpu-us", str(_cpu_time_us()),
            "--parent-cpu-time-us", str(parent_cpu_us),
            *self.extra,
        ]  # fmt: skip
        os.setgroups([])
        os.setgid(self.gid)
        os.setuid(self.uid)
        try:
            os.execv(exec_copy, argv)
        except OSError as exc:
            raise JailerError(f"Failed to exec into Firecracker: {exc}") from None

    @staticmethod
    def _join_netns(path: str) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise JailerError(f"Failed to open file {path}: {exc}") from None
        try:
            # os.setns only exists from Python 3.12.
            if ctypes.CDLL(None, use_errno=True).setns(fd, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        except OSError as exc:
            raise JailerError(f"Failed to join network namespace: netns: {exc}") from None
        finally:
            os.close(fd)

    def _jailed_folder(self, path: Path) -> None:
        try:
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(FOLDER_MODE)
            os.chown(path, self.uid, self.gid)
        except OSError as exc:
            raise JailerError(f"Failed to set up {path}: {exc}") from None

    def _mknod(self, name: str, major: int, minor: int) -> None:
        path = self.chroot_dir / name
        try:
            os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(major, minor))
            os.chown(path, self.uid, self.gid)
        except OSError as exc:
            if path.name == "urandom":  # only a warning: MMDS V2 is then unavailable
                print(f"Warning! Could not create /dev/urandom device inside jailer: {exc}.")
                print("MMDS version 2 will not be available to use.")
                return
            raise JailerError(
                f"Failed to create /{name} via mknod inside the jail: {exc}"
            ) from None

    @staticmethod
    def _write_pid_file(path: Path) -> None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            if exc.errno == errno.EEXIST:
                raise JailerError(f"Failed to write to {path}: File exists") from None
            raise JailerError(f"Failed to write to {path}: {exc}") from None
        with os.fdopen(fd, "w") as file:
            file.write(str(os.getpid()))


def main(argv: list[str] | None = None) -> int:
    start_time_us, start_cpu_us = _time_us(), _cpu_time_us()
    sanitize_process()
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except ArgError as exc:
        print(f"Arguments parsing error: {exc} \n\nFor more information try --help.")
        return EXIT_ARG_PARSING
    if args.flags & {"help", "version"}:
        print(f"Jailer v{VERSION}\n")
        return 0
    try:
        Env.from_args(args, start_time_us, start_cpu_us).run()
    except JailerError as exc:
        print(f"Jailer error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_ERROR  # run() only returns by exec'ing
