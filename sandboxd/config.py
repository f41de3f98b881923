"""The daemon's configuration: built-in defaults, then the TOML file, then environment
variables, then command-line flags, each overriding the one before.

Every setting is declared once below with its default, its environment variables and its
check, so the loader, the error messages and ``contrib/sandboxd.toml`` cannot drift apart.
A bad value gives one :class:`ConfigError` naming where it came from (the file, the
variable or the flag), the key, and what was expected.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandboxd import protocol
from sandboxd.errors import ConfigError
from sandboxd.limits import LIMIT_SPECS, LimitBounds, default_bounds

DEFAULT_CONFIG_FILE = Path("/etc/sandboxd/sandboxd.toml")
DEFAULT_SOCKET = Path(protocol.DEFAULT_SOCKET)
LOG_LEVELS = ("debug", "info", "warning", "error")
BACKEND_NAMES = ("auto", "firecracker", "qemu", "namespaces")
VM_CHANNELS = ("auto", "virtio-serial", "vsock")  # how the daemon reaches a VM's agent


def _setting(default: Any, *, env: tuple[str, ...] = (), kind: str = "", check: str = "") -> Any:
    """Declare one setting: ``kind`` defaults to the default's type, ``check`` names a rule."""
    kind = kind or {bool: "bool", int: "int", float: "number", str: "str", tuple: "list"}.get(
        type(default), "path"
    )
    return field(default=default, metadata={"env": env, "kind": kind, "check": check})


@dataclass(frozen=True)
class DaemonConfig:
    socket: Path = _setting(DEFAULT_SOCKET, env=("SANDBOXD_SOCKET",))
    socket_group: str = _setting("sandboxd")
    log_level: str = _setting("info", env=("SANDBOXD_LOG_LEVEL", "RUST_LOG"), check="log_level")
    max_request_bytes: int = _setting(4 * 1024 * 1024, kind="size", check="positive")
    # What one client may hold in the daemon (sandboxd.peers): per peer uid, its open
    # connections and the bytes of its unanswered requests and unread stdin; per
    # connection, its requests running at once and each interactive job's stdin.
    max_connections_per_uid: int = _setting(64, check="positive")
    pending_bytes_per_uid: int = _setting(64 * 1024 * 1024, kind="size", check="positive")
    max_requests_per_connection: int = _setting(8, check="positive")
    stdin_buffer_bytes: int = _setting(1024 * 1024, kind="size", check="positive")
    request_timeout: float = _setting(10.0, check="positive")  # a started line, to arrive
    idle_timeout: float = _setting(120.0, check="positive")  # nothing running, nothing sent
    send_timeout: float = _setting(60.0, check="positive")  # a client that reads nothing
    # Names this instance's cgroups and lock, so two daemons on one host never touch
    # each other's sandboxes when one cleans up after a crash.
    name: str = _setting("sandboxd", check="name")
    run_dir: Path = _setting(Path("/run/sandboxd"), env=("SANDBOXD_RUN_DIR",))
    state_dir: Path = _setting(Path("/var/lib/sandboxd"), env=("SANDBOXD_STATE_DIR",))


@dataclass(frozen=True)
class PoolConfig:
    size: int = _setting(2, env=("SANDBOXD_POOL_SIZE",), check="non_negative")
    max_sandboxes: int = _setting(16, env=("SANDBOXD_MAX_SANDBOXES",), check="positive")
    queue_timeout: float = _setting(30.0, check="positive")
    start_timeout: float = _setting(60.0, check="positive")
    # Ready sandboxes of languages that warm hold their runtime already started.
    warm: bool = _setting(True)


@dataclass(frozen=True)
class BackendConfig:
    name: str = _setting("auto", env=("SANDBOXD_BACKEND",), check="backend")
    # Each sandbox runs as its own host uid from [uid_base, uid_base + max_sandboxes):
    # even a process that escaped its namespaces could not signal another sandbox.
    uid_base: int = _setting(900_000, check="positive")
    cpus: float = _setting(1.0, check="positive")
    rootfs_path: str = _setting("", env=("ROOTFS_PATH",))
    kernel_path: str = _setting("", env=("KERNEL_PATH",))
    agent_port: int = _setting(8080, env=("AGENT_PORT",), check="port")
    # VM backends: each sandbox's memory and vCPUs, whether `auto` may choose software
    # emulation (slow, but a real VM), and whether pools restore from a snapshot.
    vm_memory: int = _setting(1024 * 1024 * 1024, kind="size", check="positive")
    vm_cpus: int = _setting(1, check="positive")
    # How fast each VM may read its disk, per second (0: no limit): high enough that a
    # compiler's start is not slowed, low enough that one VM cannot take the host's disk.
    vm_disk_bandwidth: int = _setting(256 * 1024 * 1024, kind="size", check="non_negative")
    vm_disk_iops: int = _setting(8192, check="non_negative")
    allow_tcg: bool = _setting(False, env=("SANDBOXD_ALLOW_TCG",))
    snapshot: bool = _setting(True)
    vm_channel: str = _setting("auto", check="vm_channel")
    firecracker_bin: str = _setting("firecracker")  # a path, or a name on PATH
    jailer_bin: str = _setting("jailer")


@dataclass(frozen=True)
class GatewayConfig:
    api_port: int = _setting(8000, env=("API_PORT",), check="port")
    bind: str = _setting("127.0.0.1", env=("SANDBOXD_BIND",))
    # Lines of "key-id:key"; without a file the gateway serves loopback only, unauthenticated.
    api_keys_file: str = _setting("", env=("SANDBOXD_API_KEYS_FILE",))
    rate_per_minute: float = _setting(600.0, check="positive")  # executions per key
    rate_burst: int = _setting(60, check="positive")
    concurrent_per_key: int = _setting(16, check="positive")
    max_body_bytes: int = _setting(4 * 1024 * 1024, kind="size", check="positive")
    body_timeout: float = _setting(10.0, check="positive")  # a request body, to arrive whole
    # After SIGTERM: how long /ready says "draining" while the gateway still serves, so a
    # load balancer moves new work elsewhere first (a few of its check intervals).
    drain_seconds: float = _setting(0.0, check="non_negative")


@dataclass(frozen=True)
class NetworkConfig:
    # Sandboxes get a network only if a job asks and this lists where it may go
    # (IPv4 networks); everything else is refused, the uplink host above all.
    allow: tuple[str, ...] = _setting((), env=("SANDBOXD_NETWORK_ALLOW",), check="networks")
    uplink_netns: str = _setting("")  # where egress leaves: "" is the host's own namespace
    subnet: str = _setting("10.213.0.0/16", check="subnet")  # a /30 of it per sandbox
    max_connections: int = _setting(256, check="positive")  # open at once, per sandbox


@dataclass(frozen=True)
class SessionsConfig:
    # Sessions hold a sandbox of the pool each between calls: so many at most, per
    # owner (a peer uid) and in all; 0 in all means half of pool.max_sandboxes.
    max_per_owner: int = _setting(4, check="positive")
    max_total: int = _setting(0, check="non_negative")
    idle_timeout: float = _setting(600.0, check="positive")  # no call for this long: ended
    max_ttl: float = _setting(3600.0, check="positive")  # the longest a session may live
    max_file_bytes: int = _setting(8 * 1024 * 1024, kind="size", check="positive")
    # Users who may open sessions on behalf of their own clients, each client an owner of
    # its own (the HTTP gateway, for its API keys); root always may.
    delegates: tuple[str, ...] = _setting(("sandboxd-gateway",))
    # This host's name among the nodes of a cluster: its session ids start with
    # "<node>-", so that a load balancer sends each session's calls to the node that
    # holds it (contrib/haproxy.cfg). "" on a host alone.
    node: str = _setting("", env=("SANDBOXD_NODE",), check="node")

    def total(self, max_sandboxes: int) -> int:
        """The sessions the server holds at once: always room for one-shot jobs."""
        return self.max_total or max(1, max_sandboxes // 2)


@dataclass(frozen=True)
class Config:
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    sessions: SessionsConfig = field(default_factory=SessionsConfig)
    limits: Mapping[str, LimitBounds] = field(default_factory=default_bounds)
    source: str = "built-in defaults"


SECTIONS: dict[str, type] = {
    "daemon": DaemonConfig,
    "pool": PoolConfig,
    "backend": BackendConfig,
    "gateway": GatewayConfig,
    "network": NetworkConfig,
    "sessions": SessionsConfig,
}

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_RUST_LOG_LEVELS = {"trace": "debug", "warn": "warning"}


def parse_size(value: Any) -> int:
    """Bytes from an integer or a string like ``"64MiB"`` / ``"2G"``; ValueError if neither."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(value)
    number, unit = int(match.group(1)), match.group(2).upper()
    return number * 1024 ** "_KMGT".index(unit) if unit else number


def _coerce(kind: str, value: Any) -> Any:
    """Convert a TOML, environment or flag value to ``kind``; ValueError if it is not one."""
    if kind == "bool":
        if isinstance(value, bool):
            return value
        lowered = str(value).strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(value)
    if kind == "size":
        return parse_size(value)
    if kind == "list":  # a TOML array, or a comma-separated string (environment, flags)
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
            raise ValueError(value)
        return tuple(item.strip() for item in items if item.strip())
    if isinstance(value, bool):
        raise ValueError(value)
    if kind == "int":
        if isinstance(value, float) or (
            isinstance(value, str) and not value.strip().lstrip("-").isdigit()
        ):
            raise ValueError(value)
        return int(value)
    if kind == "number":
        return float(value)
    if not isinstance(value, str | Path):
        raise ValueError(value)
    return Path(value) if kind == "path" else str(value)


_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "positive": (lambda v: v > 0, "a number greater than 0"),
    "non_negative": (lambda v: v >= 0, "a number of at least 0"),
    "port": (lambda v: 0 < v < 65536, "a port number (1-65535)"),
    "backend": (lambda v: v in BACKEND_NAMES, "one of " + ", ".join(BACKEND_NAMES)),
    "vm_channel": (lambda v: v in VM_CHANNELS, "one of " + ", ".join(VM_CHANNELS)),
    "log_level": (lambda v: v in LOG_LEVELS, "one of " + ", ".join(LOG_LEVELS)),
    "networks": (lambda v: all(_ipv4_network(n) for n in v), "IPv4 networks like 192.0.2.0/24"),
    "subnet": (
        lambda v: _ipv4_network(v) and 8 <= ipaddress.ip_network(v).prefixlen <= 24,
        "an IPv4 network from /8 to /24, like 10.213.0.0/16",
    ),
    "name": (
        lambda v: re.fullmatch(r"[a-z][a-z0-9_-]{0,31}", v) is not None,
        "a short lowercase name (letters, digits, - and _)",
    ),
    "node": (
        lambda v: re.fullmatch(r"([a-z0-9][a-z0-9-]{0,31})?", v) is not None,
        'a short lowercase name of letters, digits and -, or "" (no cluster)',
    ),
}


def _ipv4_network(text: str) -> bool:
    try:
        return ipaddress.ip_network(text).version == 4
    except ValueError:
        return False


_KIND_WORDS = {
    "int": "an integer",
    "number": "a number",
    "size": 'a size in bytes (an integer or a string like "64MiB")',
    "bool": "true or false",
    "str": "a string",
    "path": "a path",
    "list": "a list of strings",
}


def _normalise(key: str, value: Any) -> Any:
    if key == "daemon.log_level" and isinstance(value, str):
        level = value.strip().lower()
        # RUST_LOG may carry "target=level" filters; the most verbose level wins.
        levels = [
            _RUST_LOG_LEVELS.get(part.rsplit("=", 1)[-1], part.rsplit("=", 1)[-1])
            for part in level.split(",")
            if part
        ]
        known = [lv for lv in levels if lv in LOG_LEVELS]
        return min(known, key=LOG_LEVELS.index) if known and len(known) == len(levels) else level
    return value


def _apply(values: dict[str, Any], key: str, raw: Any, source: str) -> None:
    """Check one setting and store it, or raise ConfigError naming source, key and rule."""
    section, name = key.split(".", 1)
    meta = {f.name: f for f in dataclasses.fields(SECTIONS[section])}[name].metadata
    expected = _KIND_WORDS[meta["kind"]]
    try:
        value = _normalise(key, _coerce(meta["kind"], raw))
    except (ValueError, TypeError):
        raise ConfigError(f"{source}: {key}: expected {expected}, got {raw!r}") from None
    if meta["check"]:
        ok, words = _CHECKS[meta["check"]]
        if not ok(value):
            raise ConfigError(f"{source}: {key}: expected {words}, got {raw!r}")
    values[key] = value


def _read_file(path: Path, values: dict[str, Any], limits: dict[str, LimitBounds]) -> None:
    try:
        with path.open("rb") as stream:
            document = tomllib.load(stream)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    for section, table in document.items():
        if section == "limits":
            _read_limits(path, table, limits)
            continue
        if section not in SECTIONS:
            known = ", ".join([*SECTIONS, "limits"])
            raise ConfigError(f"{path}: [{section}]: unknown section (known: {known})")
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {section}: expected a table [{section}]")
        names = {f.name for f in dataclasses.fields(SECTIONS[section])}
        for name, raw in table.items():
            if name not in names:
                raise ConfigError(
                    f"{path}: {section}.{name}: unknown key (known: {', '.join(sorted(names))})"
                )
            _apply(values, f"{section}.{name}", raw, str(path))


def _read_limits(path: Path, table: Any, limits: dict[str, LimitBounds]) -> None:
    specs = {spec.name: spec for spec in LIMIT_SPECS}
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: limits: expected a table [limits.<name>]")
    for name, bounds in table.items():
        if name not in specs:
            raise ConfigError(f"{path}: limits.{name}: unknown limit (known: {', '.join(specs)})")
        if not isinstance(bounds, dict) or not set(bounds) <= {"default", "maximum"}:
            raise ConfigError(
                f"{path}: limits.{name}: expected a table with default and/or maximum"
            )
        spec = specs[name]
        kind = "number" if spec.unit == "seconds" else "size"
        current = {"default": limits[name].default, "maximum": limits[name].maximum}
        for which, raw in bounds.items():
            try:
                value = _coerce(kind, raw)
            except (ValueError, TypeError):
                value = 0
            if value <= 0 or value < spec.minimum:
                least = (
                    f"at least {spec.format(spec.minimum)}" if spec.minimum else "greater than 0"
                )
                raise ConfigError(
                    f"{path}: limits.{name}.{which}: "
                    f"expected {_KIND_WORDS[kind]} {least}, got {raw!r}"
                )
            current[which] = value
        if current["default"] > current["maximum"]:
            raise ConfigError(
                f"{path}: limits.{name}: default {current['default']:g} "
                f"is above maximum {current['maximum']:g}"
            )
        limits[name] = LimitBounds(**current)


def load_config(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, tuple[Any, str]] | None = None,
) -> Config:
    """Build the configuration.

    ``path`` is the file named by a flag; without it ``SANDBOXD_CONFIG`` or the default
    file is read when present. ``overrides`` maps ``section.key`` to ``(value, flag)``
    for values given on the command line. Raises ConfigError.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    limits = dict(default_bounds())
    sources = []
    explicit = path or (
        Path(environ["SANDBOXD_CONFIG"]) if environ.get("SANDBOXD_CONFIG") else None
    )
    config_file = explicit or DEFAULT_CONFIG_FILE
    if explicit is not None or config_file.exists():
        _read_file(config_file, values, limits)
        sources.append(str(config_file))
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            for variable in reversed(f.metadata["env"]):  # the first name listed wins
                if environ.get(variable):
                    _apply(
                        values,
                        f"{section}.{f.name}",
                        environ[variable],
                        f"environment variable {variable}",
                    )
                    sources.append(variable)
    for key, (raw, flag) in (overrides or {}).items():
        if raw is not None:
            _apply(values, key, raw, flag)
            sources.append(flag)
    parts = {
        section: cls(
            **{k.split(".", 1)[1]: v for k, v in values.items() if k.startswith(section + ".")}
        )
        for section, cls in SECTIONS.items()
    }
    config = Config(**parts, limits=limits, source=", ".join(sources) or "built-in defaults")
    subnet = ipaddress.IPv4Network(config.network.subnet)  # both checked as IPv4 above
    for allowed in config.network.allow:
        if ipaddress.IPv4Network(allowed).subnet_of(subnet):
            raise ConfigError(
                f"{config.source}: network.allow: {allowed} is in network.subnet {subnet}, "
                "the sandboxes' own addresses: sandboxes never reach one another"
            )
    if config.daemon.pending_bytes_per_uid < config.daemon.max_request_bytes:
        raise ConfigError(
            f"{config.source}: daemon.pending_bytes_per_uid: expected at least "
            f"daemon.max_request_bytes ({config.daemon.max_request_bytes}), "
            f"got {config.daemon.pending_bytes_per_uid}"
        )
    sessions = config.sessions.total(config.pool.max_sandboxes)
    if config.pool.max_sandboxes > 1 and sessions >= config.pool.max_sandboxes:
        raise ConfigError(
            f"{config.source}: sessions.max_total: expected fewer than pool.max_sandboxes "
            f"({config.pool.max_sandboxes}): one-shot jobs need room too, got {sessions}"
        )
    if config.pool.size > config.pool.max_sandboxes:
        raise ConfigError(
            f"{config.source}: pool.size: expected at most pool.max_sandboxes "
            f"({config.pool.max_sandboxes}), got {config.pool.size}"
        )
    return config
