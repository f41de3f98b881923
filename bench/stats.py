"""Latency samples, their median and p95, and the side-by-side table the benches print."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Samples:
    name: str
    seconds: list[float] = field(default_factory=list)

    def time(self, action: Callable[[], object]) -> None:
        start = time.perf_counter()
        action()
        self.seconds.append(time.perf_counter() - start)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def p95(self) -> float:
        ordered = sorted(self.seconds)
        return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def interleave(runs: int, *pairs: tuple[Samples, Callable[[], object]]) -> None:
    """Run each action ``runs`` times, taking turns, so that all see the same machine."""
    for _ in range(runs):
        for samples, action in pairs:
            samples.time(action)


def table(rows: list[tuple[str, Samples, Samples]]) -> str:
    """One line per (label, measured, baseline): both medians and p95s, and their ratios."""
    header = (
        f"{'':34} {'median':>9} {'p95':>9} {'baseline':>22} {'median':>9} {'p95':>9}"
        f" {'ratio p50':>10} {'ratio p95':>10}"
    )
    lines = [header]
    for label, measured, baseline in rows:
        lines.append(
            f"{label:34} {measured.median * 1000:8.1f}ms {measured.p95 * 1000:8.1f}ms "
            f"{baseline.name:>22} {baseline.median * 1000:8.1f}ms {baseline.p95 * 1000:8.1f}ms"
            f" {measured.median / baseline.median:9.2f}x {measured.p95 / baseline.p95:9.2f}x"
        )
    return "\n".join(lines)
