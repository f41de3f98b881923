"""Prometheus metrics of the gateway: executions by language and status, latency
histograms by phase, the daemon's pool, and rejected requests by reason."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from sandboxd.languages import named

SESSION = "session"  # the label of a session's exec that names no language

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.executions = Counter(
            "sandboxd_executions",
            "Executions by language and result status",
            ["language", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "sandboxd_execution_seconds",
            "Execution latency by phase (queue, run, total)",
            ["phase"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.rejected = Counter(
            "sandboxd_gateway_rejected_requests",
            "Requests refused by the gateway or daemon",
            ["reason"],
            registry=self.registry,
        )
        self.pool = Gauge(
            "sandboxd_pool_sandboxes",
            "The daemon's pool, by state (ready, busy, held by sessions)",
            ["state"],
            registry=self.registry,
        )
        self.ready = Gauge(
            "sandboxd_pool_ready_sandboxes",
            "Ready sandboxes by the runtime they hold started (plain: none)",
            ["kind"],
            registry=self.registry,
        )
        self.ready_memory = Gauge(
            "sandboxd_pool_ready_memory_bytes",
            "Host memory the ready sandboxes hold while they wait",
            registry=self.registry,
        )
        self.up = Gauge("sandboxd_up", "1 if the daemon answered", registry=self.registry)

    def executed(self, language: str, record: dict[str, Any]) -> None:
        """Count a run of ``language`` as the client named it: labelled by the language
        it resolves to, so that spellings of one name ("Python ", "PY") cannot add
        label values (each kept for good) without end."""
        resolved = named(language)
        label = resolved.name if resolved else language if language == SESSION else "other"
        self.executions.labels(label, record["status"]).inc()
        timings = record["timings"]
        for phase in ("queue", "run", "total"):
            self.latency.labels(phase).observe(timings[phase])

    def render(self, health: dict[str, Any] | None) -> bytes:
        """The exposition text, with the pool as the daemon just reported it."""
        self.up.set(1 if health is not None else 0)
        pool = (health or {}).get("pool", {})
        for state in ("ready", "busy", "sessions"):
            self.pool.labels(state).set(pool.get(state, 0))
        for kind, count in pool.get("ready_by_kind", {}).items():
            self.ready.labels(kind).set(count)
        self.ready_memory.set(pool.get("ready_memory_bytes", 0))
        return generate_latest(self.registry)
