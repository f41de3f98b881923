"""A fake Firecracker (v1.16.1 semantics): its command line, its REST API on a Unix socket,
and a VMM behind it that runs the microVM in QEMU (tests/fakes/firecracker_vmm.py).

Faithful to Firecracker (src/firecracker/src/api_server, src/vmm/src/rpc_interface.rs,
micro-http):

- transport: HTTP/1.1 on a Unix socket, at most 10 connections (the 11th gets micro-http's 503
  and is closed), requests handled one at a time by the VMM thread and answered when done;
  status lines without a reason phrase, ``Server: Firecracker API``, ``Connection:
  keep-alive``, compact JSON bodies, 204 without a body, ``Deprecation: true`` for deprecated
  inputs; bodies sized by Content-Length only; a body over ``--http-api-max-payload-size``
  (51200) gets micro-http's 400 ``{ "error": "...\\nAll previous unanswered requests will be
  dropped." }`` (and this fake then closes the connection); an API socket path that exists
  makes the process exit with 1;
- routing as parsed_request.rs: ``Empty PUT request.``, ``Empty PATCH request.``, ``GET request
  cannot have a body.``, ``Invalid request method and/or path: <METHOD> <segment>.``, path ids
  (non-empty, alphanumerics and ``_``, equal to the body's id), snapshot operation names;
- bodies are checked against the swagger spec beside this file (firecracker-api.yaml): types,
  required fields, enums, and unknown fields refused (Firecracker's deny_unknown_fields), all as
  400 ``An error occurred when deserializing the json body of a request: <serde-like text>.``;
- state rules: pre-boot-only and post-boot-only calls with Firecracker's fault messages,
  InstanceStart once, snapshot/load only on a fresh process (after logger/metrics at most),
  a failed restore answers 400 and ends the process (exit 1), /metrics once, GET / with
  ``Not started`` | ``Running`` | ``Paused``, PATCH /vm idempotent, snapshot/create only when
  Paused, files (kernel, initrd, drives) opened at PUT time, the vsock socket bound at PUT
  /vsock time (its path must be free), a guest reboot ends the process (exit 0);
- a VM's start (boot or snapshot load) opens ``/dev/kvm`` in the jail, the node the jailer
  made: on a mount with ``nodev`` it fails as Firecracker's does; through it the VM is made
  in KVM with its irqchip and PIT, as Firecracker makes it (firecracker_vmm.kvm_vm), so
  the host has the VM's ``kvm-pit/<pid>`` kernel thread until the process ends;
- network interfaces: the TAP is opened at PUT time (and again by a snapshot load, under
  ``network_overrides``) through the jail's ``/dev/net/tun`` in the network namespace the
  process runs in, with Firecracker's flags (IFF_TAP, IFF_NO_PI, IFF_VNET_HDR; a TAP
  only root could make, or another process holds, fails as on Firecracker); the guest
  gets a virtio-net device on that very TAP, with ``guest_mac``;
- the command line: Firecracker's flags (``--api-sock``, default /run/firecracker.socket,
  ``--id``, ``--config-file``, ``--no-api``, ``--log-path``, ``--level``, ``--metrics-path``,
  ``--http-api-max-payload-size``, ...), ``--version`` printing ``Firecracker v1.16.1``, exit
  153 for bad arguments, 152 for a bad configuration file.

Deviations:

- no chroot: the jail root is the directory of this program when the fake jailer started it
  (its ``<exec name>.pid`` there holds our pid), else ``/``; every path in the API and on the
  command line is taken relative to that root, as Firecracker sees it in its chroot, and a path
  leaving the jail (``..``, or a symlink out) is refused. So the jail must be reachable on the
  host by the jail's uid (its ancestors searchable), which a real chroot does not need;
- the serde texts after the deserializing prefix are close to serde's, not byte-equal (no
  line/column for schema errors); the logger writes Firecracker's lines at its default
  level (Info: the start, each API request with its body, each answer) to stdout, or to
  the log path once one is configured, but not its other modules' lines;
- DELETE (PCI hotplug preview, not in the spec) is answered as an unknown method;
- not supported, answered with a 400 ``fake firecracker: ...`` fault: MMDS on an interface
  (configs naming unknown interfaces fail as on Firecracker), interface PATCHes, vhost-user
  drives, pmem, memory hotplug, drive PATCHes that swap the backing file, Uffd snapshot
  memory; a balloon is accepted and reported, but the guest gets no balloon device, and
  interfaces' rate limiters are accepted and not enforced;
- a drive's rate limiter is QEMU's throttling at the same rates: its buckets' ``one_time_burst``
  is not given, and QEMU lets a device burst a little above the rate where Firecracker's
  bucket starts full (one refill's worth). A limit is a limit on both;
- snapshots: QEMU's vhost-user-vsock cannot migrate, so no guest state is saved. PUT
  /snapshot/create (VM Paused) writes the snapshot file as JSON (``"fake_firecracker_snapshot":
  1``, the VM's configuration) and the memory file: the kernel and initrd the VM booted from,
  then zeros, written, up to ``mem_size_mib`` (the guest's size, and its cost in page
  cache). PUT /snapshot/load (fresh process) checks both files, that the snapshot is one
  of these, and that the drives exist at the same jail paths,
  applies ``vsock_override``, binds the vsock socket (path must be free) and boots the saved
  configuration afresh, Paused unless ``resume_vm``: the guest's vsock connections are gone
  and its listeners come back, as after a real restore, but the guest starts from init. As
  with Firecracker, the restoring jail needs no kernel or initrd (they are in the memory file).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import json
import os
import queue
import shutil
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import yaml

from tests.fakes import firecracker_vmm
from tests.fakes.firecracker_vmm import Drive, Microvm, Nic, VmSpec, Vsock

VERSION = "1.16.1"
SNAPSHOT_VERSION = "10.0.0"
SPEC_PATH = Path(__file__).with_name("firecracker-api.yaml")
DEFAULT_API_SOCK = "/run/firecracker.socket"
DEFAULT_INSTANCE_ID = "anonymous-instance"
HTTP_MAX_PAYLOAD_SIZE = 51200
MAX_CONNECTIONS = 10
SNAPSHOT_MARKER = "fake_firecracker_snapshot"
DEFAULT_KERNEL_CMDLINE = (
    "reboot=k panic=1 nomodule 8250.nr_uarts=0 i8042.noaux i8042.nomux i8042.dumbkbd "
    "swiotlb=noforce"
)
# FcExitCode (src/vmm/src/lib.rs).
EXIT_OK, EXIT_GENERIC, EXIT_BAD_CONFIGURATION, EXIT_ARG_PARSING = 0, 1, 152, 153

POST_BOOT = "The requested operation is not supported after starting the microVM."
PRE_BOOT = "The requested operation is not supported before starting the microVM."
LOAD_NOT_ALLOWED = (
    "Load snapshot error: Loading a microVM snapshot not allowed after configuring "
    "boot-specific resources."
)
ID_MISMATCH = "The id from the path does not match the id from the body!"
_SERVER_FULL = (
    b"HTTP/1.1 503\r\nServer: Firecracker API\r\nConnection: close\r\n"
    b'Content-Length: 40\r\n\r\n{ "error": "Too many open connections" }'
)


class ApiError(Exception):
    """A 400 (or ``status``) answer with Firecracker's fault object."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class FatalApiError(ApiError):
    """Answered, and then the process exits (a failed snapshot restore)."""


def _deserializing(detail: str) -> ApiError:
    return ApiError(f"An error occurred when deserializing the json body of a request: {detail}.")


def _rates(limiter: dict[str, Any]) -> tuple[int, int]:
    """(bytes, ops) per second of a RateLimiter: each bucket's size per refill_time ms; a
    bucket of size or refill_time 0 is no limit, as in Firecracker's TokenBucket::new."""
    rates = []
    for name in ("bandwidth", "ops"):
        bucket = limiter.get(name) or {}
        size, refill = bucket.get("size", 0), bucket.get("refill_time", 0)
        rates.append(size * 1000 // refill if size and refill else 0)
    return rates[0], rates[1]


def os_error_text(error: OSError) -> str:
    """An io::Error as Rust displays it."""
    if error.errno is None:
        return str(error)
    return f"{error.strerror} (os error {error.errno})"


# The swagger spec, made strict as Firecracker's serde structs are.


def _strict(schema: Any) -> None:
    if isinstance(schema, dict):
        if schema.get("type") == "object" and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        for value in schema.values():
            _strict(value)
    elif isinstance(schema, list):
        for value in schema:
            _strict(value)


def load_definitions() -> dict[str, Any]:
    spec = yaml.safe_load(SPEC_PATH.read_text())
    definitions = copy.deepcopy(spec["definitions"])
    _strict(definitions)
    # Firecracker checks the vCPU count itself, with its own message (machine_config.rs).
    for bound in ("minimum", "maximum"):
        definitions["MachineConfiguration"]["properties"]["vcpu_count"].pop(bound)
    # PATCH /machine-config takes the same fields, all optional.
    definitions["MachineConfigurationUpdate"] = {
        **definitions["MachineConfiguration"],
        "required": [],
    }
    return definitions


_DEFINITIONS = load_definitions()


def _serde_value(value: Any) -> str:
    if isinstance(value, bool):
        return f"boolean `{str(value).lower()}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, float):
        return f"floating point `{value}`"
    if isinstance(value, str):
        return f"string {json.dumps(value)}"
    if value is None:
        return "null"
    return "sequence" if isinstance(value, list) else "map"


_EXPECTED = {
    "string": "a string",
    "integer": "an integer",
    "boolean": "a boolean",
    "object": "a map",
    "array": "a sequence",
}


def _serde_message(error: jsonschema.ValidationError) -> str:
    schema, instance = error.schema, error.instance
    if error.validator == "additionalProperties":
        known = list(schema.get("properties", {}))
        unknown = next(k for k in instance if k not in known)
        expected = ", ".join(f"`{k}`" for k in known)
        return (
            f"unknown field `{unknown}`, expected {'one of ' if len(known) > 1 else ''}{expected}"
        )
    if error.validator == "required":
        missing = next(k for k in error.validator_value if k not in instance)
        return f"missing field `{missing}`"
    if error.validator == "enum" and isinstance(instance, str):
        variants = ", ".join(f"`{v}`" for v in error.validator_value)
        return f"unknown variant `{instance}`, expected one of {variants}"
    if error.validator == "type":
        expected = _EXPECTED.get(str(error.validator_value), str(error.validator_value))
        return f"invalid type: {_serde_value(instance)}, expected {expected}"
    return f"invalid value: {_serde_value(instance)}, {error.message}"


def parse_body(raw: bytes, definition: str | None) -> Any:
    """The JSON body, checked against a spec definition (if any) as serde would."""
    try:
        value = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise _deserializing(f"invalid unicode code point: {exc.reason}") from None
    except json.JSONDecodeError as exc:
        message = {"Expecting value": "expected value", "Extra data": "trailing characters"}.get(
            exc.msg, exc.msg[:1].lower() + exc.msg[1:]
        )
        raise _deserializing(f"{message} at line {exc.lineno} column {exc.colno}") from None
    if definition is None:
        return value
    schema = {"$ref": f"#/definitions/{definition}", "definitions": _DEFINITIONS}
    errors = list(jsonschema.Draft4Validator(schema).iter_errors(value))
    if errors:
        first = min(errors, key=lambda e: (len(e.absolute_path), e.validator != "type"))
        raise _deserializing(_serde_message(first))
    return value


# Routing, as src/firecracker/src/api_server/parsed_request.rs.


@dataclass
class Action:
    name: str
    body: Any = None
    deprecated: bool = False


def _checked_id(token: str | None) -> str:
    if not token:
        raise ApiError("The ID cannot be empty.")
    if not all(c == "_" or c.isalnum() for c in token):
        raise ApiError("API Resource IDs can only contain alphanumeric characters and underscores.")
    return token


def _with_id(name: str, raw: bytes, definition: str, token: str | None, key: str) -> Action:
    item_id = _checked_id(token)
    body = parse_body(raw, definition)
    if body[key] != item_id:
        raise ApiError(ID_MISMATCH)
    return Action(name, body)


def _invalid(method: str, segment: str) -> ApiError:
    return ApiError(f"Invalid request method and/or path: {method} {segment}.")


def route(method: str, path: str, raw: bytes | None) -> Action:
    """The VMM action of a request, or the ApiError Firecracker answers at parse time."""
    tokens = path.lstrip("/").split("/")
    if tokens and tokens[-1] == "":
        tokens.pop()  # Rust's split_terminator
    first = tokens[0] if tokens else ""
    rest = tokens[1] if len(tokens) > 1 else None
    if method == "GET":
        if raw is not None:
            raise ApiError("GET request cannot have a body.")
        simple = {
            "": "GetVmInstanceInfo",
            "version": "GetVmmVersion",
            "machine-config": "GetVmMachineConfig",
            "mmds": "GetMMDS",
        }
        if first in simple:
            return Action(simple[first])
        if first == "vm" and rest == "config":
            return Action("GetFullVmConfig")
        if first == "hotplug" and rest == "memory":
            return Action("GetMemoryHotplugStatus")
        if first == "balloon":
            balloon = {None: "GetBalloonConfig", "statistics": "GetBalloonStats"}
            if rest in balloon:
                return Action(balloon[rest])
            if rest == "hinting" and tokens[2:3] == ["status"]:
                return Action("GetFreePageHintingStatus")
        raise _invalid(method, first)
    if method == "PUT":
        if raw is None:
            raise ApiError("Empty PUT request.")
        return _route_put(first, rest, raw)
    if method == "PATCH":
        if first == "balloon":
            return _route_patch_balloon(tokens, raw)
        if raw is None:
            raise ApiError("Empty PATCH request.")
        return _route_patch(first, rest, raw)
    raise _invalid(method, first)


_PUT_SIMPLE = {
    "boot-source": ("ConfigureBootSource", "BootSource"),
    "cpu-config": ("PutCpuConfiguration", "CpuConfig"),
    "logger": ("ConfigureLogger", "Logger"),
    "serial": ("ConfigureSerial", "SerialDevice"),
    "machine-config": ("UpdateMachineConfiguration", "MachineConfiguration"),
    "metrics": ("ConfigureMetrics", "Metrics"),
    "entropy": ("SetEntropyDevice", "EntropyDevice"),
    "balloon": ("SetBalloonDevice", "Balloon"),
}


def _route_put(first: str, rest: str | None, raw: bytes) -> Action:
    if first in _PUT_SIMPLE:
        name, definition = _PUT_SIMPLE[first]
        action = Action(name, parse_body(raw, definition))
        if first == "machine-config":
            action.deprecated = "cpu_template" in action.body
            # PUT resets the optionals it omits.
            defaults = {"smt": False, "track_dirty_pages": False, "huge_pages": "None"}
            action.body = {**defaults, "cpu_template": "None", **action.body}
        return action
    if first == "actions":
        body = parse_body(raw, "InstanceActionInfo")
        names = {"InstanceStart": "StartMicroVm"}
        return Action(names.get(body["action_type"], body["action_type"]))
    if first == "drives":
        return _with_id("InsertBlockDevice", raw, "Drive", rest, "drive_id")
    if first == "network-interfaces":
        return _with_id("InsertNetworkDevice", raw, "NetworkInterface", rest, "iface_id")
    if first == "pmem":
        return _with_id("InsertPmemDevice", raw, "Pmem", rest, "id")
    if first == "vsock":
        body = parse_body(raw, "Vsock")
        return Action("SetVsockDevice", body, deprecated="vsock_id" in body)
    if first == "mmds":
        if rest is None:
            return Action("PutMMDS", parse_body(raw, None))  # any JSON value, as serde_json
        if rest == "config":
            body = parse_body(raw, "MmdsConfig")
            return Action(
                "SetMmdsConfiguration", body, deprecated=body.get("version", "V1") == "V1"
            )
        raise _invalid("PUT", first)
    if first == "hotplug" and rest == "memory":
        return Action("SetMemoryHotplugDevice", parse_body(raw, "MemoryHotplugConfig"))
    if first == "snapshot":
        if rest is None:
            raise ApiError("Missing snapshot operation type.")
        if rest == "create":
            return Action("CreateSnapshot", parse_body(raw, "SnapshotCreateParams"))
        if rest == "load":
            return _route_load(raw)
        raise _invalid("PUT", f"/snapshot/{rest}")
    raise _invalid("PUT", first)


def _route_load(raw: bytes) -> Action:
    body = parse_body(raw, "SnapshotLoadParams")
    if "mem_backend" in body and "mem_file_path" in body:
        raise _deserializing(
            "too many fields: either `mem_backend` or `mem_file_path` exclusively is required"
        )
    if "mem_backend" not in body and "mem_file_path" not in body:
        raise _deserializing("missing field: either `mem_backend` or `mem_file_path` is required")
    deprecated = "mem_file_path" in body or "enable_diff_snapshots" in body
    return Action("LoadSnapshot", body, deprecated=deprecated)


def _route_patch(first: str, rest: str | None, raw: bytes) -> Action:
    if first == "drives":
        return _with_id("UpdateBlockDevice", raw, "PartialDrive", rest, "drive_id")
    if first == "network-interfaces":
        return _with_id("UpdateNetworkInterface", raw, "PartialNetworkInterface", rest, "iface_id")
    if first == "machine-config":
        body = parse_body(raw, "MachineConfigurationUpdate")
        if not body:
            raise ApiError("Empty PATCH request.")
        return Action("UpdateMachineConfiguration", body, deprecated="cpu_template" in body)
    if first == "mmds":
        return Action("PatchMMDS", parse_body(raw, None))
    if first == "vm":
        body = parse_body(raw, "Vm")
        return Action("Pause" if body["state"] == "Paused" else "Resume")
    if first == "hotplug" and rest == "memory":
        return Action("UpdateMemoryHotplugSize", parse_body(raw, "MemoryHotplugSizeUpdate"))
    raise _invalid("PATCH", first)


def _route_patch_balloon(tokens: list[str], raw: bytes | None) -> Action:
    rest = tokens[1:]
    if rest == ["hinting", "start"]:
        return Action("StartFreePageHinting", parse_body(raw, "BalloonStartCmd") if raw else {})
    if rest == ["hinting", "stop"]:
        return Action("StopFreePageHinting")
    if raw is None:
        raise ApiError("Empty PATCH request.")
    if not rest:
        return Action("UpdateBalloon", parse_body(raw, "BalloonUpdate"))
    if rest == ["statistics"]:
        return Action("UpdateBalloonStatistics", parse_body(raw, "BalloonStatsUpdate"))
    raise _invalid("PATCH", "balloon")


PRE_BOOT_ONLY = {
    "ConfigureBootSource", "ConfigureLogger", "ConfigureMetrics", "ConfigureSerial",
    "InsertBlockDevice", "InsertPmemDevice", "InsertNetworkDevice", "LoadSnapshot",
    "PutCpuConfiguration", "SetBalloonDevice", "SetVsockDevice", "SetMmdsConfiguration",
    "SetEntropyDevice", "SetMemoryHotplugDevice", "StartMicroVm", "UpdateMachineConfiguration",
}  # fmt: skip
POST_BOOT_ONLY = {
    "CreateSnapshot", "FlushMetrics", "Pause", "Resume", "GetBalloonStats",
    "GetMemoryHotplugStatus", "UpdateBalloon", "UpdateBalloonStatistics", "UpdateBlockDevice",
    "UpdateMemoryHotplugSize", "UpdateNetworkInterface", "StartFreePageHinting",
    "GetFreePageHintingStatus", "StopFreePageHinting", "SendCtrlAltDel",
}  # fmt: skip
# Configuring any of these makes a later snapshot load fail (rpc_interface.rs boot_path).
BOOT_PATH = {
    "ConfigureBootSource", "InsertBlockDevice", "InsertPmemDevice", "InsertNetworkDevice",
    "SetBalloonDevice", "SetVsockDevice", "SetMmdsConfiguration", "SetEntropyDevice",
    "SetMemoryHotplugDevice", "UpdateMachineConfiguration",
}  # fmt: skip


class TapError(Exception):
    """Firecracker's TapError, by its text."""


IFACE_NAME_MAX_LEN = 16
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000


def _unsupported(what: str) -> ApiError:
    return ApiError(f"fake firecracker: {what} are not supported")


# Paths as seen from inside the jail.


@dataclass(frozen=True)
class JailFs:
    root: Path

    def host(self, path: str) -> Path:
        """The host path of a path seen from inside the jail (cwd = the jail's /)."""
        if self.root == Path("/"):
            return Path(path)
        inner = PurePosixPath("/", path)
        if ".." in inner.parts:
            raise OSError(errno.EACCES, f"fake firecracker: {path} leaves the jail")
        host = self.root.joinpath(*inner.parts[1:])
        resolved = Path(os.path.realpath(host))
        if resolved != self.root and self.root not in resolved.parents:
            raise OSError(errno.EACCES, f"fake firecracker: {path} leaves the jail")
        return host


def jail_root(program: str) -> Path:
    """The jail the fake jailer started us in: the program's directory, if its pid file there
    names us (the jailer writes it just before exec); else "/"."""
    here = Path(os.path.realpath(program))
    with contextlib.suppress(OSError, ValueError):
        pid_file = here.parent / f"{here.name}.pid"
        if int(pid_file.read_text().strip()) == os.getpid():
            return here.parent
    return Path("/")


# The VMM: resources and state, handled on one thread as Firecracker's VMM thread does.


@dataclass
class Opened:
    """A file Firecracker opened at PUT time."""

    fd: int
    host: Path

    @property
    def qemu_path(self) -> str:
        return f"/dev/fd/{self.fd}"

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


@dataclass
class Resources:
    boot_source: dict[str, Any] | None = None
    kernel: Opened | None = None
    initrd: Opened | None = None
    drives: list[dict[str, Any]] = field(default_factory=list)
    drive_files: dict[str, Opened] = field(default_factory=dict)
    machine: dict[str, Any] = field(
        default_factory=lambda: {
            "vcpu_count": 1,
            "mem_size_mib": 128,
            "smt": False,
            "track_dirty_pages": False,
            "huge_pages": "None",
        }
    )
    vsock: dict[str, Any] | None = None
    vsock_device: Vsock | None = None
    entropy: dict[str, Any] | None = None
    balloon: dict[str, Any] | None = None
    logger: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    serial: dict[str, Any] | None = None
    cpu_config: dict[str, Any] | None = None
    mmds_config: dict[str, Any] | None = None
    network_interfaces: list[dict[str, Any]] = field(default_factory=list)
    taps: dict[str, Opened] = field(default_factory=dict)  # iface_id: its open TAP


LOG_LEVELS = ("Off", "Error", "Warning", "Info", "Debug", "Trace")


class Logger:
    """Firecracker's logger: to stdout until a log path is configured, at Info unless
    ``--level`` or the logger's ``level`` says otherwise. Writes block, as Firecracker's
    do: a VMM whose stdout nobody reads stops in its next line."""

    def __init__(self, instance_id: str, level: str = "Info") -> None:
        self.instance_id = instance_id
        self.level = level
        self._lock = threading.Lock()
        self._fd = 1

    def configure(self, fd: int | None, level: str | None) -> None:
        with self._lock:
            if fd is not None:
                self._fd = fd
            if level is not None:
                self.level = level

    def info(self, module: str, message: str) -> None:
        if LOG_LEVELS.index(self.level) < LOG_LEVELS.index("Info"):
            return
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        line = f"{stamp}.000000000 [{self.instance_id}:{module}] {message}\n".encode()
        with self._lock:
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view) :]


def log_level(text: str) -> str:
    """A level as Firecracker's --level and logger take it (Warn is Warning)."""
    name = text.capitalize()
    return "Warning" if name == "Warn" else name


class Vmm:
    """Firecracker's PrebootApiController and RuntimeApiController, over a QEMU microVM."""

    def __init__(self, instance_id: str, fs: JailFs, mmds_size_limit: int, logger: Logger) -> None:
        self.instance_id = instance_id
        self.logger = logger
        self.fs = fs
        self.mmds_size_limit = mmds_size_limit
        self.res = Resources()
        self.state = "Not started"
        self.boot_path = False
        self.metrics_file: int | None = None
        self.mmds: Any = None
        self.vm: Microvm | None = None
        self.kvm_vm: int | None = None  # the VM's fd in KVM, once it started
        self.restored = False
        self._restored_files: dict[str, Opened] = {}  # a restored VM's kernel and initrd
        self.on_exit: Callable[[int], None] = lambda code: None
        self.console_noise = 0  # bytes of console output at each start (main's knob)

    @property
    def started(self) -> bool:
        return self.state != "Not started"

    def handle(self, action: Action) -> Any:
        """Run an action; its data (None for 204) or an ApiError."""
        if self.started and action.name in PRE_BOOT_ONLY:
            raise ApiError(POST_BOOT)
        if not self.started and action.name in POST_BOOT_ONLY:
            raise ApiError(PRE_BOOT)
        if action.name in BOOT_PATH:
            self.boot_path = True
        handler = getattr(self, f"_{action.name}", None)
        if handler is None:
            raise ApiError(f"fake firecracker: {action.name} is not supported")
        return handler(action.body)

    # Information.

    def _GetVmInstanceInfo(self, _body: None) -> dict[str, Any]:
        return {
            "id": self.instance_id,
            "state": self.state,
            "vmm_version": VERSION,
            "app_name": "Firecracker",
        }

    def _GetVmmVersion(self, _body: None) -> dict[str, Any]:
        return {"firecracker_version": VERSION}

    def _GetVmMachineConfig(self, _body: None) -> dict[str, Any]:
        return dict(self.res.machine)

    def _GetFullVmConfig(self, _body: None) -> dict[str, Any]:
        res = self.res
        return {
            "balloon": res.balloon,
            "drives": res.drives,
            # A restored VM has no boot source (GET /vm/config in the spec).
            "boot-source": None if self.restored else res.boot_source,
            "cpu-config": res.cpu_config,
            "logger": res.logger,
            "machine-config": res.machine,
            "metrics": res.metrics,
            "mmds-config": res.mmds_config,
            "network-interfaces": res.network_interfaces,
            "vsock": res.vsock,
            "entropy": res.entropy,
        }

    # Pre-boot configuration.

    def _open(self, path: str, writable: bool = False) -> Opened:
        host = self.fs.host(path)
        return Opened(os.open(host, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC), host)

    def _ConfigureBootSource(self, body: dict[str, Any]) -> None:
        try:
            kernel = self._open(body["kernel_image_path"])
        except OSError as exc:
            raise ApiError(
                f"Boot source error: The kernel file cannot be opened: {os_error_text(exc)}"
            ) from None
        initrd = None
        if "initrd_path" in body:
            try:
                initrd = self._open(body["initrd_path"])
            except OSError as exc:
                kernel.close()
                raise ApiError(
                    "Boot source error: The initrd file cannot be opened due to invalid path or "
                    f"invalid permissions. {os_error_text(exc)}"
                ) from None
        for old in (self.res.kernel, self.res.initrd):
            if old is not None:
                old.close()
        self.res.boot_source, self.res.kernel, self.res.initrd = body, kernel, initrd

    def _InsertBlockDevice(self, body: dict[str, Any]) -> None:
        drive_id = body["drive_id"]
        if "socket" in body:
            raise _unsupported("vhost-user block devices")
        if body["is_root_device"] and any(
            d["is_root_device"] and d["drive_id"] != drive_id for d in self.res.drives
        ):
            raise ApiError("Drive config error: A root block device already exists!")
        if "path_on_host" not in body:
            raise ApiError("Drive config error: path_on_host is required for virtio-block")
        try:
            opened = self._open(body["path_on_host"], writable=not body.get("is_read_only"))
        except OSError as exc:
            raise ApiError(
                "Drive config error: Unable to create the virtio block device: "
                f"BackingFile({os_error_text(exc)}, {json.dumps(body['path_on_host'])})"
            ) from None
        config = {"cache_type": "Unsafe", "io_engine": "Sync", "is_read_only": False, **body}
        drives = [d for d in self.res.drives if d["drive_id"] != drive_id]
        old = self.res.drive_files.pop(drive_id, None)
        if old is not None:
            old.close()
        self.res.drive_files[drive_id] = opened
        # The root device comes first: the guest sees it as /dev/vda.
        position = next(
            (i for i, d in enumerate(self.res.drives) if d["drive_id"] == drive_id), len(drives)
        )
        drives.insert(0 if config["is_root_device"] else position, config)
        self.res.drives = drives

    def _InsertNetworkDevice(self, body: dict[str, Any]) -> None:
        iface_id, mac = body["iface_id"], body.get("guest_mac")
        others = [i for i in self.res.network_interfaces if i["iface_id"] != iface_id]
        if mac is not None and any(i.get("guest_mac") == mac for i in others):
            raise ApiError(f"The MAC address is already in use: {mac}")
        old = self.res.taps.pop(iface_id, None)
        if old is not None:
            old.close()
        try:
            self.res.taps[iface_id] = self._open_tap(body["host_dev_name"])
        except TapError as exc:
            raise ApiError(
                f"Could not create the network device: Open tap device failed: {exc}"
            ) from None
        self.res.network_interfaces = [*others, body]

    def _open_tap(self, name: str) -> Opened:
        """Tap::open_named, through the jail's /dev/net/tun."""
        try:
            fd = os.open(self.fs.host("/dev/net/tun"), os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise TapError(f"Couldn't open /dev/net/tun: {os_error_text(exc)}") from None
        if len(name.encode()) >= IFACE_NAME_MAX_LEN:
            os.close(fd)
            raise TapError("Invalid interface name")
        try:
            request = struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            fcntl.ioctl(fd, TUNSETIFF, request)
        except OSError as exc:
            os.close(fd)
            raise TapError(
                f"Error while creating ifreq structure: {os_error_text(exc)}. Invalid TUN/TAP "
                f"Backend provided by {name}. Check our documentation on setting up the network "
                "devices."
            ) from None
        return Opened(fd, self.fs.host("/dev/net/tun"))

    def _InsertPmemDevice(self, _body: dict[str, Any]) -> None:
        raise _unsupported("pmem devices")

    def _SetMemoryHotplugDevice(self, _body: dict[str, Any]) -> None:
        raise _unsupported("hotpluggable memory devices")

    def _UpdateMachineConfiguration(self, body: dict[str, Any]) -> None:
        merged = {**self.res.machine, **body}
        vcpus = merged["vcpu_count"]
        if vcpus == 0 or vcpus > 32 or (merged["smt"] and vcpus > 1 and vcpus % 2):
            raise ApiError(
                "Machine config error: The number of vCPUs must be greater than 0, less than 32 "
                "and must be 1 or an even number if SMT is enabled."
            )
        divisor = 2 if merged["huge_pages"] == "2M" else 1
        if merged["mem_size_mib"] <= 0 or merged["mem_size_mib"] % divisor:
            raise ApiError(
                "Machine config error: The memory size (MiB) is either 0, or not a multiple of "
                "the configured page size."
            )
        if merged.get("cpu_template") == "None":
            del merged["cpu_template"]
        self.res.machine = merged

    def _SetVsockDevice(self, body: dict[str, Any]) -> None:
        firecracker_vmm.close_listener(self.res.vsock_device)
        self.res.vsock_device = None
        self.res.vsock_device = self._bind_vsock(body["guest_cid"], body["uds_path"])
        self.res.vsock = {k: v for k, v in body.items() if k != "vsock_id"}

    def _bind_vsock(self, guest_cid: int, uds_path: str) -> Vsock:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            host = self.fs.host(uds_path)
            sock.bind(str(host))
            sock.listen(16)
        except OSError as exc:
            sock.close()
            kind = "AddrInUse" if exc.errno == errno.EADDRINUSE else "Other"
            detail = f'Os {{ code: {exc.errno}, kind: {kind}, message: "{exc.strerror}" }}'
            raise ApiError(
                f"Vsock config error: Cannot create backend for vsock device: UnixBind({detail})"
            ) from None
        return Vsock(guest_cid, host, sock)

    def _SetEntropyDevice(self, body: dict[str, Any]) -> None:
        self.res.entropy = body

    def _SetBalloonDevice(self, body: dict[str, Any]) -> None:
        self.res.balloon = {
            "stats_polling_interval_s": 0,
            "free_page_hinting": False,
            "free_page_reporting": False,
            **body,
        }

    def _PutCpuConfiguration(self, body: dict[str, Any]) -> None:
        self.res.cpu_config = body  # CPU templates mean nothing to TCG

    def _ConfigureSerial(self, body: dict[str, Any]) -> None:
        self.res.serial = body

    def _ConfigureLogger(self, body: dict[str, Any]) -> None:
        fd = None
        if "log_path" in body:
            try:
                fd = self._create(body["log_path"])
            except OSError as exc:
                raise ApiError(f"Logger error: {os_error_text(exc)}") from None
            os.set_blocking(fd, True)
        level = body.get("level")
        self.logger.configure(fd, log_level(level) if isinstance(level, str) else None)
        self.res.logger = body

    def _create(self, path: str) -> int:
        """Open or create a log or metrics file or FIFO, as open_file_nonblock does."""
        flags = os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC
        return os.open(self.fs.host(path), flags, 0o600)

    def _ConfigureMetrics(self, body: dict[str, Any]) -> None:
        if self.metrics_file is not None:
            raise ApiError("Metrics error: Reinitialization of metrics not allowed.")
        try:
            self.metrics_file = self._create(body["metrics_path"])
        except OSError as exc:
            raise ApiError(f"Metrics error: {os_error_text(exc)}") from None
        self.res.metrics = body

    def _SetMmdsConfiguration(self, body: dict[str, Any]) -> None:
        if not body["network_interfaces"]:
            raise ApiError(
                "MMDS config error: The list of network interface IDs that allow forwarding "
                "MMDS requests is empty."
            )
        known = {i["iface_id"] for i in self.res.network_interfaces}
        if not set(body["network_interfaces"]) <= known:
            raise ApiError(
                "MMDS config error: The list of network interface IDs provided contains at "
                "least one ID that does not correspond to any existing network interface."
            )
        raise _unsupported("MMDS on network interfaces")

    # MMDS data store: any time.

    def _PutMMDS(self, body: Any) -> None:
        if len(json.dumps(body)) > self.mmds_size_limit:
            raise ApiError(
                "MMDS limit exceeded error: The MMDS patch request doesn't fit.", status=413
            )
        self.mmds = body

    def _PatchMMDS(self, body: Any) -> None:
        if self.mmds is None:
            raise ApiError("MMDS error: The MMDS data store is not initialized.")
        self._PutMMDS(_merge_patch(self.mmds, body))

    def _GetMMDS(self, _body: None) -> Any:
        return {} if self.mmds is None else self.mmds

    # Balloon (configuration only: the guest has no balloon device).

    def _GetBalloonConfig(self, _body: None) -> dict[str, Any]:
        if self.res.balloon is None:
            raise ApiError("Balloon config error: No balloon device found.")
        return self.res.balloon

    def _UpdateBalloon(self, body: dict[str, Any]) -> None:
        if self.res.balloon is None:
            raise ApiError("Balloon update error: Device not found.")
        self.res.balloon["amount_mib"] = body["amount_mib"]

    def _GetBalloonStats(self, _body: None) -> None:
        raise ApiError("Balloon config error: Statistics for the balloon device are not enabled.")

    # Start, run, pause, snapshot.

    def _cmdline(self) -> str:
        boot = self.res.boot_source or {}
        words = [boot.get("boot_args", DEFAULT_KERNEL_CMDLINE), "pci=off"]
        root = next((d for d in self.res.drives if d["is_root_device"]), None)
        if root is not None:
            words.append(
                f"root=PARTUUID={root['partuuid']}" if "partuuid" in root else "root=/dev/vda"
            )
            words.append("ro" if root["is_read_only"] else "rw")
        return " ".join(w for w in words if w)

    def _spec(self, kernel: str, initrd: str | None, cmdline: str, fds: list[int]) -> VmSpec:
        res = self.res
        drives = [
            Drive(d["drive_id"], res.drive_files[d["drive_id"]].qemu_path, d["is_read_only"],
                  d["cache_type"], *_rates(d.get("rate_limiter") or {}))
            for d in res.drives
        ]  # fmt: skip
        serial_out = None
        if res.serial and "serial_out_path" in res.serial:
            serial_out = self.fs.host(res.serial["serial_out_path"])
        return VmSpec(
            kernel=kernel,
            initrd=initrd,
            cmdline=cmdline,
            vcpus=res.machine["vcpu_count"],
            mem_mib=res.machine["mem_size_mib"],
            drives=drives,
            vsock=res.vsock_device,
            entropy=res.entropy is not None,
            serial_out=serial_out,
            nics=[
                Nic(res.taps[i["iface_id"]].fd, i.get("guest_mac")) for i in res.network_interfaces
            ],
            pass_fds=[
                *fds,
                *(f.fd for f in res.drive_files.values()),
                *(f.fd for f in res.taps.values()),
            ],
        )

    def _boot(self, spec: VmSpec, paused: bool) -> None:
        # Firecracker opens /dev/kvm in its jail (the node the jailer made) to build the
        # VM: a jail on a mount with nodev cannot, and the start fails here.
        try:
            kvm = os.open(self.fs.host("/dev/kvm"), os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise ApiError(
                f"Start microvm error: Cannot open /dev/kvm: {os_error_text(exc)}"
            ) from None
        try:
            self.kvm_vm = firecracker_vmm.kvm_vm(kvm)
        except OSError as exc:
            raise ApiError(
                f"Start microvm error: Cannot create the VM: {os_error_text(exc)}"
            ) from None
        finally:
            os.close(kvm)
        if self.console_noise and spec.serial_out is None:
            _write_console_noise(self.console_noise)
        vm = Microvm(spec, self.on_exit)
        try:
            vm.start(paused=paused)
        except OSError as exc:
            vm.stop()
            raise ApiError(f"Start microvm error: {os_error_text(exc)}") from None
        self.vm = vm
        self.state = "Paused" if paused else "Running"

    def _StartMicroVm(self, _body: None) -> None:
        res = self.res
        if res.kernel is None:
            raise ApiError(
                "Start microvm error: Cannot start microvm without kernel configuration."
            )
        fds = [res.kernel.fd] + ([res.initrd.fd] if res.initrd else [])
        initrd = res.initrd.qemu_path if res.initrd else None
        self._boot(self._spec(res.kernel.qemu_path, initrd, self._cmdline(), fds), paused=False)

    def _Pause(self, _body: None) -> None:
        assert self.vm is not None
        self.vm.pause()
        self.state = "Paused"

    def _Resume(self, _body: None) -> None:
        assert self.vm is not None
        self.vm.resume()
        self.state = "Running"

    def _SendCtrlAltDel(self, _body: None) -> None:
        assert self.vm is not None
        self.vm.send_ctrl_alt_del()

    def _FlushMetrics(self, _body: None) -> None:
        if self.metrics_file is None or self.res.metrics is None:
            return
        line: dict[str, Any] = {"utc_timestamp_ms": int(time.time() * 1000)}
        if self.res.metrics.get("emit_id"):
            line["id"] = self.instance_id
        if "properties" in self.res.metrics:
            line["properties"] = self.res.metrics["properties"]
        with contextlib.suppress(BlockingIOError):
            os.write(self.metrics_file, json.dumps(line).encode() + b"\n")

    def _UpdateBlockDevice(self, body: dict[str, Any]) -> None:
        if body["drive_id"] not in self.res.drive_files:
            raise ApiError("Drive config error: Unable to patch the block device: DeviceNotFound")
        if "path_on_host" in body:
            raise ApiError("fake firecracker: changing a drive's backing file is not supported")

    def _UpdateNetworkInterface(self, _body: dict[str, Any]) -> None:
        raise _unsupported("network interface updates")

    def _CreateSnapshot(self, body: dict[str, Any]) -> None:
        assert self.vm is not None
        if self.state != "Paused":
            raise ApiError(
                "Create snapshot error: Cannot save the microVM state: Operation not allowed: "
                "save/restore unavailable while running"
            )
        if body.get("snapshot_type") == "Diff" and not self.res.machine["track_dirty_pages"]:
            raise ApiError(
                "Create snapshot error: Diff snapshots are not allowed on uVMs with dirty page "
                "tracking disabled."
            )
        try:
            self._write_snapshot(body["snapshot_path"], body["mem_file_path"])
        except OSError as exc:
            raise ApiError(f"Create snapshot error: {os_error_text(exc)}") from None

    def _write_snapshot(self, snapshot_path: str, mem_path: str) -> None:
        res = self.res
        layout: dict[str, Any] = {}
        with open(self.fs.host(mem_path), "wb") as mem:
            for name, path in (("kernel", self._boot_file("kernel")),
                               ("initrd", self._boot_file("initrd"))):  # fmt: skip
                if path is None:
                    continue
                offset = mem.tell()
                with open(path, "rb") as src:
                    shutil.copyfileobj(src, mem, 1 << 20)
                layout[name] = {"offset": offset, "size": mem.tell() - offset}
            # The guest's whole memory, really written: its size and its page cache.
            zeros = bytes(1 << 20)
            while mem.tell() < res.machine["mem_size_mib"] << 20:
                mem.write(zeros[: (res.machine["mem_size_mib"] << 20) - mem.tell()])
        snapshot = {
            SNAPSHOT_MARKER: 1,
            "snapshot_version": SNAPSHOT_VERSION,
            "firecracker_version": VERSION,
            "cmdline": self.vm.spec.cmdline if self.vm else "",
            "memory": layout,
            "machine-config": res.machine,
            "drives": res.drives,
            "vsock": res.vsock,
            "entropy": res.entropy,
            "balloon": res.balloon,
            "network-interfaces": res.network_interfaces,
        }
        Path(self.fs.host(snapshot_path)).write_text(json.dumps(snapshot))

    def _boot_file(self, name: str) -> str | None:
        """The booted kernel or initrd, readable through the fd this process holds."""
        if self.restored:
            opened = self._restored_files.get(name)
        else:
            opened = self.res.kernel if name == "kernel" else self.res.initrd
        return f"/proc/self/fd/{opened.fd}" if opened is not None else None

    def _LoadSnapshot(self, body: dict[str, Any]) -> None:
        if self.boot_path:
            raise ApiError(LOAD_NOT_ALLOWED)
        try:
            self._restore(body)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            detail = os_error_text(exc) if isinstance(exc, OSError) else str(exc)
            raise FatalApiError(
                f"Load snapshot error: Failed to restore from snapshot: {detail}"
            ) from None

    def _restore(self, body: dict[str, Any]) -> None:
        backend = body.get("mem_backend", {"backend_type": "File",
                                           "backend_path": body.get("mem_file_path")})  # fmt: skip
        if backend["backend_type"] != "File":
            raise ValueError("fake firecracker: Uffd memory backends are not supported")
        snapshot = json.loads(self.fs.host(body["snapshot_path"]).read_text())
        if not isinstance(snapshot, dict) or snapshot.get(SNAPSHOT_MARKER) != 1:
            raise ValueError("fake firecracker: not a snapshot of the fake Firecracker")
        if snapshot["snapshot_version"].split(".")[0] != SNAPSHOT_VERSION.split(".")[0]:
            raise ValueError(f"unsupported snapshot version {snapshot['snapshot_version']}")
        mem = self.fs.host(backend["backend_path"])
        with open(mem, "rb") as src:
            for name, place in snapshot["memory"].items():
                src.seek(place["offset"])
                data = src.read(place["size"])
                if len(data) != place["size"]:
                    raise ValueError("the memory file is shorter than the snapshot says")
                # In memory, not on disk: gone with the process however it ends.
                fd = os.memfd_create(f"fake-firecracker-{name}", os.MFD_CLOEXEC)
                os.write(fd, data)
                self._restored_files[name] = Opened(fd, mem)
        res = self.res
        res.machine, res.entropy, res.balloon = (
            snapshot["machine-config"],
            snapshot["entropy"],
            snapshot["balloon"],
        )
        for drive in snapshot["drives"]:
            writable = not drive["is_read_only"]
            res.drive_files[drive["drive_id"]] = self._open(drive["path_on_host"], writable)
        res.drives = snapshot["drives"]
        # The TAPs must exist under the same names (or those of network_overrides).
        overrides = {o["iface_id"]: o["host_dev_name"] for o in body.get("network_overrides", [])}
        for interface in snapshot["network-interfaces"]:
            interface = {**interface}
            name = overrides.get(interface["iface_id"], interface["host_dev_name"])
            interface["host_dev_name"] = name
            try:
                res.taps[interface["iface_id"]] = self._open_tap(name)
            except TapError as exc:
                raise ValueError(f"Open tap device failed: {exc}") from None
            res.network_interfaces.append(interface)
        if snapshot["vsock"] is not None:
            vsock = dict(snapshot["vsock"])
            if "vsock_override" in body:
                vsock["uds_path"] = body["vsock_override"]["uds_path"]
            try:
                res.vsock_device = self._bind_vsock(vsock["guest_cid"], vsock["uds_path"])
            except ApiError as exc:
                raise ValueError(exc.message) from None
            res.vsock = vsock
        self.restored = True
        files = self._restored_files
        spec = self._spec(
            files["kernel"].qemu_path,
            files["initrd"].qemu_path if "initrd" in files else None,
            snapshot["cmdline"],
            [f.fd for f in files.values()],
        )
        try:
            self._boot(spec, paused=not body.get("resume_vm", False))
        except ApiError as exc:
            raise ValueError(exc.message) from None

    def shutdown(self) -> None:
        """Stop the guest and release what the process holds."""
        if self.vm is not None:
            self.vm.stop()
        if self.kvm_vm is not None:
            os.close(self.kvm_vm)
        firecracker_vmm.close_listener(self.res.vsock_device if self.vm is None else None)


def _write_console_noise(size: int) -> None:
    """``size`` bytes of kernel-like console lines on stdout, written as the serial console
    writes: blocking while nobody reads, so the VM's start waits for its reader."""
    line = b"[    0.000000] fake console: a guest that logs its whole boot here\n"
    written = 0
    while written < size:
        view = memoryview(line)
        while view:
            view = view[os.write(1, view) :]
        written += len(line)


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch, as PATCH /mmds applies."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


# The HTTP side (micro-http).


@dataclass
class _Work:
    action: Action
    reply: queue.Queue[tuple[int, bytes]] = field(default_factory=queue.Queue)
    sent: threading.Event = field(default_factory=threading.Event)


def _response(status: int, body: bytes | None = None, deprecated: bool = False) -> bytes:
    head = f"HTTP/1.1 {status} \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n"
    if deprecated:
        head += "Deprecation: true\r\n"
    if status != 204:
        body = body or b""
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + (body if status != 204 and body else b"")


def _fault(message: str) -> bytes:
    return json.dumps({"fault_message": message}, separators=(",", ":")).encode()


def _parse_error(message: str) -> bytes:
    # micro-http's own error body: a raw newline inside, so not quite JSON.
    body = f'{{ "error": "{message}\nAll previous unanswered requests will be dropped." }}'
    return _response(400, body.encode())


class _BadRequest(Exception):
    pass


class ApiServer:
    """HTTP/1.1 on a Unix socket; every request goes to the VMM thread through ``submit``."""

    def __init__(
        self,
        listener: socket.socket,
        submit: Callable[[_Work], None],
        payload_limit: int,
        logger: Logger,
    ) -> None:
        self._logger = logger
        self._listener = listener
        self._submit = submit
        self._payload_limit = payload_limit
        self._slots = threading.Semaphore(MAX_CONNECTIONS)

    def start(self) -> None:
        threading.Thread(target=self._accept, name="fc_api", daemon=True).start()

    def _accept(self) -> None:
        while True:
            conn, _ = self._listener.accept()
            if not self._slots.acquire(blocking=False):
                with contextlib.suppress(OSError):
                    conn.sendall(_SERVER_FULL)
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                reader = conn.makefile("rb")
                for method, target, body in self._requests(reader, conn):
                    self._answer(conn, method, target, body)
        except (OSError, _BadRequest):
            pass
        finally:
            self._slots.release()

    def _requests(
        self, reader: Any, conn: socket.socket
    ) -> Iterator[tuple[str, str, bytes | None]]:
        while True:
            line = reader.readline(65536)
            if not line:
                return
            if line in (b"\r\n", b"\n"):
                continue
            parts = line.decode("latin-1").split()
            headers: dict[str, str] = {}
            while (header := reader.readline(65536)) not in (b"\r\n", b"\n", b""):
                name, _, value = header.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            if len(parts) != 3 or parts[2] not in ("HTTP/1.0", "HTTP/1.1"):
                conn.sendall(_parse_error("Invalid HTTP request line."))
                raise _BadRequest
            if "transfer-encoding" in headers:
                conn.sendall(_parse_error("Invalid header. Reason: Unsupported Transfer-Encoding"))
                raise _BadRequest
            try:
                length = int(headers.get("content-length", "0"))
            except ValueError:
                conn.sendall(_parse_error("Invalid header. Reason: Invalid Content-Length"))
                raise _BadRequest from None
            if length > self._payload_limit:
                conn.sendall(
                    _parse_error(
                        f"Request payload with size {length} is larger than the limit of "
                        f"{self._payload_limit} allowed by server."
                    )
                )
                raise _BadRequest
            if headers.get("expect", "").lower() == "100-continue":
                conn.sendall(b"HTTP/1.1 100 \r\nServer: Firecracker API\r\n\r\n")
            body = reader.read(length) if length else None
            if body is not None and len(body) < length:
                return
            target = parts[1]
            if "://" in target:  # absolute-form
                target = "/" + target.split("://", 1)[1].partition("/")[2]
            yield parts[0], target.split("?", 1)[0], body

    def _answer(self, conn: socket.socket, method: str, target: str, body: bytes | None) -> None:
        shown = f' with body "{body.decode(errors="replace")}"' if body else ""
        self._logger.info(
            "fc_api",
            f'The API server received a {method.capitalize()} request on "{target}"{shown}.',
        )
        try:
            action = route(method, target, body)
        except ApiError as exc:
            conn.sendall(_response(exc.status, _fault(exc.message)))
            return
        work = _Work(action)
        self._submit(work)
        status, payload = work.reply.get()
        if status < 300:
            self._logger.info(
                "fc_api", f"The request was executed successfully. Status code: {status}."
            )
        try:
            conn.sendall(_response(status, payload, action.deprecated))
        finally:
            work.sent.set()


class Firecracker:
    """The process: API thread(s) in front, the VMM on the calling (main) thread."""

    def __init__(self, vmm: Vmm) -> None:
        self.vmm = vmm
        self._work: queue.Queue[_Work | int] = queue.Queue()
        vmm.on_exit = self._work.put

    def submit(self, work: _Work) -> None:
        self._work.put(work)

    def execute(self, action: Action) -> tuple[int, bytes, bool]:
        """One action's answer, and whether the process must exit after it."""
        try:
            data = self.vmm.handle(action)
        except FatalApiError as exc:
            return exc.status, _fault(exc.message), True
        except ApiError as exc:
            return exc.status, _fault(exc.message), False
        if data is None:
            return 204, b"", False
        return 200, json.dumps(data, separators=(",", ":")).encode(), False

    def run(self) -> int:
        """Serve until the microVM ends; the exit code."""
        while True:
            item = self._work.get()
            if isinstance(item, int):
                code = item
                break
            status, payload, fatal = self.execute(item.action)
            item.reply.put((status, payload))
            if fatal:
                item.sent.wait(5)
                code = EXIT_GENERIC
                break
        self.vmm.shutdown()
        return code


# The command line (utils::arg_parser as Firecracker's main.rs declares it).

_VALUE_ARGS = {
    "api-sock", "id", "seccomp-filter", "start-time-us", "start-time-cpu-us",
    "parent-cpu-time-us", "config-file", "metadata", "log-path", "level", "module",
    "metrics-path", "describe-snapshot", "http-api-max-payload-size", "mmds-size-limit",
}  # fmt: skip
_FLAG_ARGS = {
    "no-seccomp", "no-api", "show-level", "show-log-origin", "boot-timer", "version",
    "snapshot-version", "enable-pci", "help",
}  # fmt: skip


class ArgError(Exception):
    pass


def parse_args(argv: list[str]) -> dict[str, str | bool]:
    args: dict[str, str | bool] = {}
    items = iter(argv)
    for item in items:
        name = item[2:] if item.startswith("--") else None
        if name in _FLAG_ARGS:
            value: str | bool = True
        elif name in _VALUE_ARGS:
            value = next(items, "")
            if not value or value.startswith("--"):
                raise ArgError(f"The argument '{name}' requires a value, but none was supplied.")
        else:
            raise ArgError(
                f"Found argument '{item}' which wasn't expected, or isn't valid in this context."
            )
        if name in args:
            raise ArgError(f"The argument '{name}' was provided more than once.")
        args[name] = value
    if "no-api" in args and "config-file" not in args:
        raise ArgError("Argument 'config-file' required, but not found.")
    if "no-seccomp" in args and "seccomp-filter" in args:
        raise ArgError("Argument 'seccomp-filter' cannot be used together with 'no-seccomp'.")
    return args


def _valid_instance_id(instance_id: str) -> bool:
    return 1 <= len(instance_id) <= 64 and all(c == "-" or c.isalnum() for c in instance_id)


_CONFIG_FILE_SECTIONS = [
    ("logger", "ConfigureLogger", "Logger"),
    ("metrics", "ConfigureMetrics", "Metrics"),
    ("boot-source", "ConfigureBootSource", "BootSource"),
    ("machine-config", "UpdateMachineConfiguration", "MachineConfiguration"),
    ("cpu-config", "PutCpuConfiguration", "CpuConfig"),
    ("balloon", "SetBalloonDevice", "Balloon"),
    ("vsock", "SetVsockDevice", "Vsock"),
    ("entropy", "SetEntropyDevice", "EntropyDevice"),
    ("mmds-config", "SetMmdsConfiguration", "MmdsConfig"),
]


def configure_from_file(firecracker: Firecracker, text: str) -> str | None:
    """Boot from a --config-file; the error, if it fails."""
    try:
        config = json.loads(text)
        actions = []
        for key, name, definition in _CONFIG_FILE_SECTIONS:
            if config.get(key) is not None:
                actions.append(
                    Action(name, parse_body(json.dumps(config[key]).encode(), definition))
                )
        for drive in config.get("drives", []):
            actions.append(
                Action("InsertBlockDevice", parse_body(json.dumps(drive).encode(), "Drive"))
            )
        for net in config.get("network-interfaces", []):
            actions.append(Action("InsertNetworkDevice", net))
        actions.append(Action("StartMicroVm"))
        for action in actions:
            status, payload, _ = firecracker.execute(action)
            if status >= 400:
                return json.loads(payload)["fault_message"]
    except (ApiError, ValueError) as exc:
        return str(exc)
    return None


def main(argv: list[str] | None = None, console_noise: int = 0) -> int:
    """The fake's command line; ``console_noise`` bytes of console lines written to stdout
    as each VM starts, as a guest whose kernel logs its boot there does (a test's knob:
    ``install_fakes``)."""
    program = sys.argv[0]
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
    except ArgError as exc:
        print(
            f"Arguments parsing error: {exc} \n\nFor more information try --help.", file=sys.stderr
        )
        return EXIT_ARG_PARSING
    if args.get("help") or args.get("version"):
        print(f"Firecracker v{VERSION}\n")
        return EXIT_OK
    if args.get("snapshot-version"):
        print(f"v{SNAPSHOT_VERSION}")
        return EXIT_OK
    fs = JailFs(jail_root(program))
    if "describe-snapshot" in args:
        try:
            snapshot = json.loads(fs.host(str(args["describe-snapshot"])).read_text())
            print(f"v{snapshot['snapshot_version']}")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"Error: PrintSnapshotDataFormat({exc})", file=sys.stderr)
            return EXIT_GENERIC
        return EXIT_OK
    instance_id = str(args.get("id", DEFAULT_INSTANCE_ID))
    if not _valid_instance_id(instance_id):
        # Firecracker panics here (`expect("Invalid instance ID")`), and panics abort.
        print("Firecracker panicked: Invalid instance ID", file=sys.stderr, flush=True)
        os.abort()
    level = args.get("level")
    if isinstance(level, str) and log_level(level) not in LOG_LEVELS:
        print(f"Error: InvalidLogLevel({level})", file=sys.stderr)
        return EXIT_BAD_CONFIGURATION
    logger = Logger(instance_id, log_level(level) if isinstance(level, str) else "Info")
    logger.info("main", f"Running Firecracker v{VERSION}")
    payload_limit = int(args.get("http-api-max-payload-size", HTTP_MAX_PAYLOAD_SIZE))
    mmds_limit = int(args.get("mmds-size-limit", payload_limit))
    vmm = Vmm(instance_id, fs, mmds_limit, logger)
    vmm.console_noise = console_noise
    firecracker = Firecracker(vmm)
    for flag, action in (("log-path", "ConfigureLogger"), ("metrics-path", "ConfigureMetrics")):
        if flag in args:
            key = "log_path" if flag == "log-path" else "metrics_path"
            status, payload, _ = firecracker.execute(Action(action, {key: args[flag]}))
            if status >= 400:
                print(f"Error: {json.loads(payload)['fault_message']}", file=sys.stderr)
                return EXIT_GENERIC
    if not args.get("no-api"):
        sock_path = fs.host(str(args.get("api-sock", DEFAULT_API_SOCK)))
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if os.path.lexists(sock_path):
                raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))
            listener.bind(str(sock_path))
            listener.listen(MAX_CONNECTIONS)
        except OSError as exc:
            print(f'Error: RunWithApi(FailedToBindSocket("{sock_path}")): {exc}', file=sys.stderr)
            return EXIT_GENERIC
        ApiServer(listener, firecracker.submit, payload_limit, logger).start()
        logger.info("fc_api", "API server started.")
    if "config-file" in args:
        try:
            text = fs.host(str(args["config-file"])).read_text()
        except OSError as exc:
            print(f"Unable to open or read from the configuration file: {exc}", file=sys.stderr)
            return EXIT_BAD_CONFIGURATION
        error = configure_from_file(firecracker, text)
        if error is not None:
            print(f"Error: BuildMicroVMFromJson({error})", file=sys.stderr)
            vmm.shutdown()
            return EXIT_BAD_CONFIGURATION
    return firecracker.run()
