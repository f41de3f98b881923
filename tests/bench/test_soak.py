"""A short soak with every fault `make soak` injects: nothing wrong, nothing lost but
what a SIGKILL or a kill from outside took, nothing refused, nothing left behind."""

from __future__ import annotations

from bench.soak import run_soak
from tests.conftest import needs_root


@needs_root
def test_a_short_soak_with_faults():
    report = run_soak(jobs=240, concurrency=16, seconds=600)
    summary = "\n".join(report.lines())
    assert report.jobs == 240, summary
    assert report.outcomes["wrong"] == 0, summary
    assert report.outcomes["lost?"] == 0, summary  # lost only in flight at a SIGKILL
    assert report.outcomes["refused"] == 0, summary
    assert report.outcomes["right"] >= 150, summary
    assert set(report.left.values()) == {0}, summary
