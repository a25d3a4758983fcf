"""Prometheus metrics of the operator, served on ``metrics_port`` (``/metrics``).

- ``qlora_jobs{phase}``: QLoRAJobs this operator knows, by phase.
- ``qlora_operator_reconcile_errors_total{kind}``: reconciles that failed (API trouble, bugs).
- ``qlora_operator_reconcile_duration_seconds{trigger}``: time per reconcile (handler
  latency), by what triggered it (``handler``: kopf spec handlers; ``watch``: watch
  events and the periodic re-check).
"""

from __future__ import annotations

import logging
from collections import Counter as _Tally
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from qlora_operator.api import Phase

log = logging.getLogger("qlora_operator.metrics")

PHASES = [p.value for p in Phase] + ["Unknown"]


class Metrics:
    """The operator's metrics in their own registry (so tests can create several)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.jobs = Gauge("qlora_jobs", "QLoRAJobs by phase", ["phase"], registry=self.registry)
        self.errors = Counter(
            "qlora_operator_reconcile_errors_total", "Reconciles that failed, by kind of error", ["kind"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "qlora_operator_reconcile_duration_seconds", "Seconds per reconcile, by trigger", ["trigger"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        for phase in PHASES:
            self.jobs.labels(phase=phase).set(0)
        self._server: Any = None

    def observe(self, trigger: str, seconds: float, outcome: Any, error: BaseException | None) -> None:
        """Record one reconcile (the :class:`~qlora_operator.reconcile.Reconciler` callback)."""
        self.latency.labels(trigger=trigger).observe(seconds)
        if error is not None:
            self.errors.labels(kind=type(error).__name__).inc()

    def set_phases(self, phases: Mapping[Any, str | None]) -> None:
        """Set ``qlora_jobs`` from the known jobs' phases."""
        tally = _Tally(p or "Unknown" for p in phases.values())
        for phase in PHASES:
            self.jobs.labels(phase=phase).set(tally.get(phase, 0))

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Serve ``/metrics`` on ``port`` (0: not at all)."""
        if not port or self._server is not None:
            return
        self._server = start_http_server(port, addr=addr, registry=self.registry)
        log.info("serving metrics on %s:%s", addr, port)

    def shutdown(self) -> None:
        """Stop serving."""
        if self._server is not None:
            server, _thread = self._server
            server.shutdown()
            self._server = None
