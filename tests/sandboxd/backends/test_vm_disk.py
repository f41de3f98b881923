"""A VM's root disk is rate-limited (backend.vm_disk_bandwidth / vm_disk_iops): a job
that reads the image as fast as it can gets no more than the limit, on QEMU (its block
layer's throttling) and on Firecracker (the drive's rate limiter, which the fake hands to
QEMU at the same rates)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator

import pytest

from tests.conftest import IS_ROOT
from tests.daemon_process import Daemon, start_daemon, wait_for_warm

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(not IS_ROOT, reason="needs root: QEMU, cgroups"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU"),
]

RATE = 2 * 2**20  # bytes per second
READ = 8 * 2**20  # four seconds' worth: QEMU's allowed burst is a fraction of one
# Reads a part of the image's biggest library that nothing read before (the guest's page
# cache does not have it: nothing runs rustc's LLVM before this), in 1 MiB requests.
READER = f"""
import glob, json, os, time
path = max(glob.glob("/usr/lib/x86_64-linux-gnu/*.so*"), key=os.path.getsize)
fd = os.open(path, os.O_RDONLY)
offset = os.fstat(fd).st_size // 2
start = time.monotonic()
done = 0
while done < {READ}:
    done += len(os.pread(fd, 2**20, offset + done))
print(json.dumps({{"path": path, "bytes": done, "seconds": time.monotonic() - start}}))
"""


@pytest.fixture(scope="module")
def throttled(tmp_path_factory: pytest.TempPathFactory, vm_backend: dict) -> Iterator[Daemon]:
    backend = {**vm_backend, "vm_memory": 512 * 2**20, "vm_disk_bandwidth": RATE}
    daemon = start_daemon(
        tmp_path_factory.mktemp("vm-disk"),
        pool={"size": 1, "max_sandboxes": 2, "start_timeout": 120, "queue_timeout": 120},
        backend=backend,
    )
    yield daemon
    assert daemon.stop() == 0, daemon.log()


def test_a_job_reading_the_disk_flat_out_gets_no_more_than_the_limit(throttled):
    wait_for_warm(throttled.client, "python", timeout=120)
    result = throttled.client.execute("python", READER, timeout=60)
    assert result.status == "ok", result.stderr
    read = json.loads(result.stdout)
    assert read["bytes"] == READ, read
    # Unthrottled, the emulated disk gives these 8 MiB in well under a second here.
    assert read["bytes"] / read["seconds"] <= 1.5 * RATE, read


def test_status_says_what_each_vm_s_disk_may_do(throttled):
    described = throttled.client.status()["backend"]["disk"]
    assert described == "each VM's disk at most 2 MiB/s and 8192 requests/s"
