"""The namespaces backend's own choices, without a jail."""

from __future__ import annotations

from pathlib import Path

from sandboxd.backends.namespaces import NamespacesBackend
from sandboxd.limits import Limits


async def test_an_image_without_a_c_compiler_runs_warm_jobs_through_the_agent(tmp_path: Path):
    """The reaper is built by the image's own cc; an image without one (no Rust in it)
    still serves every job, warm ones through the agent, and status says why."""
    limits = Limits(1.0, 1.0, 1.0, 2**26, 16, 2**16, 2**20)
    backend = NamespacesBackend(
        rootfs=tmp_path,
        agent=b"",
        instance="test",
        uid_base=1,
        cpus=1.0,
        workdir_bytes=2**20,
        default_limits=limits,
    )
    assert await backend._compiled_reaper() == b""
    assert backend.describe()["warm_jobs"] == (
        "through the agent: the image has no C compiler for the reaper"
    )
