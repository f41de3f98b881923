"""The backends, and the choice among them that ``backend = auto`` makes.

The choice really probes the host and says why in words that end up in the log and in
``sandboxctl status``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from sandboxd.backends.base import Backend, Sandbox, SandboxState
from sandboxd.backends.namespaces import NamespacesBackend
from sandboxd.config import Config
from sandboxd.errors import ConfigError, LaunchError
from sandboxd.images import Image

__all__ = ["Backend", "Sandbox", "SandboxState", "choose_backend"]

NOT_BUILT = ("firecracker", "qemu")


def agent_source() -> Path:
    return Path(str(resources.files("guest").joinpath("agent.py")))


def choose_backend(config: Config, image: Image) -> tuple[Backend, str]:
    """The backend this daemon will use and why; ConfigError/LaunchError if none can run."""
    wanted = config.backend.name
    if wanted in NOT_BUILT:
        raise ConfigError(
            f"{config.source}: backend.name: the {wanted} backend is not part of this "
            "version of sandboxd yet; use namespaces or auto"
        )
    try:
        works = NamespacesBackend.probe(config.backend.uid_base)
    except LaunchError as exc:
        raise LaunchError(f"no backend can run on this host: {exc.message}", **exc.data) from exc
    reason = f"namespaces: {works}"
    if wanted == "auto":
        reason = (
            f"auto: the {' and '.join(NOT_BUILT)} backends are not part of this version; {reason}"
        )
    backend = NamespacesBackend(
        rootfs=image.rootfs,
        agent_source=agent_source(),
        instance=config.daemon.name,
        uid_base=config.backend.uid_base,
        cpus=config.backend.cpus,
        workdir_bytes=int(config.limits["memory_bytes"].maximum),
        max_message_bytes=_max_agent_message(config),
    )
    return backend, reason


def _max_agent_message(config: Config) -> int:
    # A result line carries both streams, JSON-escaped (at worst 6 bytes per byte).
    return int(12 * config.limits["output_bytes"].maximum + 4 * config.daemon.max_request_bytes)
