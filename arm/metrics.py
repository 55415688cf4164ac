"""Prometheus metrics of a running cell, served on `/metrics`.

Each cell owns its own `CollectorRegistry` so several cells (or tests) in one process don't collide.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from grasping.types import Plan


class CellMetrics:
    def __init__(self, cell_id: str = "cell-1", registry: CollectorRegistry | None = None) -> None:
        self.cell_id = cell_id
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.attempts = Counter("pickcell_pick_attempts", "Pick attempts executed", registry=r)
        self.picks = Counter("pickcell_picks", "Successful picks", registry=r)
        self.failures = Counter("pickcell_pick_failures", "Failed picks by reason", ["reason"], registry=r)
        self.assists = Counter("pickcell_assists", "Assist requests by state", ["state"], registry=r)
        self.events = Counter("pickcell_events", "Other counted events", ["event"], registry=r)
        self.estops = Counter("pickcell_protective_stops", "Protective stops triggered", registry=r)
        self.plan_latency = Histogram(
            "pickcell_plan_latency_seconds",
            "Wall time from frame to plan",
            buckets=(0.02, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0),
            registry=r,
        )
        self.cycle_time = Histogram(
            "pickcell_cycle_seconds",
            "Robot seconds per pick-and-place cycle",
            buckets=(2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 60),
            registry=r,
        )
        self.model = Info("pickcell_model", "Model version in use", registry=r)
        self.up = Gauge("pickcell_broker_connected", "1 when the assist broker is reachable", registry=r)
        self.model.info({"version": "none"})
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def count(self, name: str) -> None:
        if name == "attempts":
            self.attempts.inc()
        elif name == "picks":
            self.picks.inc()
        elif name.startswith("failures_"):
            self.failures.labels(reason=name.removeprefix("failures_")).inc()
        elif name.startswith("assists_"):
            self.assists.labels(state=name.removeprefix("assists_")).inc()
        elif name == "estop":
            self.estops.inc()
        else:
            self.events.labels(event=name).inc()

    def observe_plan(self, plan: Plan) -> None:
        self.plan_latency.observe(plan.latency_ms / 1000.0)

    def observe_cycle(self, robot_seconds: float) -> None:
        self.cycle_time.observe(robot_seconds)

    def set_model(self, version: str) -> None:
        self.model.info({"version": version})

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Serve /metrics over HTTP; returns the bound port (pass 0 for a free one)."""
        self._server, self._thread = start_http_server(port, addr=addr, registry=self.registry)
        return int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
