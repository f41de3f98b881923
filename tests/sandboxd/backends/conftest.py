"""What the VM backends' tests share."""

from __future__ import annotations

import pytest

from tests.fakes.firecracker_bin import install_fakes


@pytest.fixture(scope="module", params=["qemu", "firecracker"])
def vm_backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The backend section of a daemon with each VM backend: qemu (software emulation
    here), and firecracker against the fake."""
    if request.param == "qemu":
        return {"name": "qemu"}
    firecracker, jailer = install_fakes(tmp_path_factory.mktemp("fake-bin"))
    return {"name": "firecracker", "firecracker_bin": str(firecracker), "jailer_bin": str(jailer)}
