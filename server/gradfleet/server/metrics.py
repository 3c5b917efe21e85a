"""Prometheus metrics of one server (its own registry, so servers in one process don't clash)."""

from __future__ import annotations

import logging
import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)


class ServerMetrics:
    """Counters and histograms named `gradfleet_*`, optionally served over HTTP."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.steps_applied = Counter(
            "gradfleet_steps_applied", "Optimiser steps applied.", ["job"], registry=r
        )
        self.gradient_bytes_in = Counter(
            "gradfleet_gradient_bytes_in", "Gradient bytes received.", registry=r
        )
        self.weight_bytes_out = Counter(
            "gradfleet_weight_bytes_out", "Weight bytes sent to pullers.", registry=r
        )
        self.pushes = Counter(
            "gradfleet_pushes",
            "Gradient pushes by outcome.",
            ["outcome"],
            registry=r,
        )
        self.pushes_rejected = Counter(
            "gradfleet_pushes_rejected", "Rejected requests by reason.", ["reason"], registry=r
        )
        self.staleness = Histogram(
            "gradfleet_staleness_steps",
            "Version minus the step a gradient was computed on (async mode).",
            buckets=(0, 1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.step_latency = Histogram(
            "gradfleet_step_latency_seconds",
            "From the first gradient of a step to the applied update.",
            registry=r,
        )
        self.jobs = Gauge("gradfleet_jobs", "Jobs held by the server.", registry=r)
        self.active_streams = Gauge(
            "gradfleet_active_streams", "Pull and push streams in flight.", registry=r
        )
        self._http: Any = None
        self._lock = threading.Lock()
        self._by_outcome: dict[str, Any] = {}

    def reject(self, reason: str) -> None:
        self.pushes_rejected.labels(reason=reason).inc()

    def pushed(self, outcome: str, count: int = 1) -> None:
        """Count pushes by outcome name; the labelled child is looked up once per outcome
        (labels() costs several times an increment, on every step's path)."""
        child = self._by_outcome.get(outcome)
        if child is None:
            child = self._by_outcome.setdefault(outcome, self.pushes.labels(outcome=outcome))
        child.inc(count)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Expose /metrics on `port` (0 picks a free one); returns the bound port."""
        with self._lock:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
            self._http = server
            bound = int(server.server_address[1])
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        with self._lock:
            if self._http is not None:
                self._http.shutdown()
                self._http.server_close()
                self._http = None
