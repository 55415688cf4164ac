"""Prometheus metrics of the assist broker, served on `/metrics` (`pickcell broker --metrics-port`).

Each broker owns its own `CollectorRegistry`, so several brokers (tests) in one process do not collide.
Every refused message is counted in `pickcell_broker_refused_total{code, field, role}`: a client that
sends bad input shows up here as well as in the log (with its key name).
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class BrokerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.refused = Counter(
            "pickcell_broker_refused",
            "Messages refused, by error code name, offending field ('' = none) and the sender's role",
            ["code", "field", "role"],
            registry=r,
        )
        self.final_states = Counter(
            "pickcell_broker_final_states", "Requests that reached a final state", ["state"], registry=r
        )
        self.accepted = Counter("pickcell_broker_requests_accepted", "New requests journaled", registry=r)
        self.waiting = Gauge("pickcell_broker_waiting", "Requests waiting for an associate", registry=r)
        self.held = Gauge("pickcell_broker_held", "Requests held by an associate or console", registry=r)
        self.connections = Gauge(
            "pickcell_broker_connections", "Live connections by role", ["role"], registry=r
        )
        self.cut = Counter(
            "pickcell_broker_connections_cut", "Connections closed because their key was revoked", registry=r
        )
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def refusal(self, code_name: str, field: str | None, role: str | None) -> None:
        self.refused.labels(code=code_name, field=field or "", role=role or "none").inc()

    def refused_count(self, code_name: str, field: str | None = None, role: str | None = None) -> float:
        """Sum of the refusal counter over the labels given (tests and `status`)."""
        total = 0.0
        for metric in self.refused.collect():
            for s in metric.samples:
                if not s.name.endswith("_total"):
                    continue
                lab = s.labels
                if lab["code"] != code_name:
                    continue
                if field is not None and lab["field"] != field:
                    continue
                if role is not None and lab["role"] != role:
                    continue
                total += s.value
        return total

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Serve /metrics over HTTP; returns the bound port (pass 0 for a free one)."""
        self._server, self._thread = start_http_server(port, addr=addr, registry=self.registry)
        return int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
