"""Prometheus metrics of the operator, served on ``metrics_port`` (``/metrics``).

Operator health:

- ``qlora_jobs{phase}``: QLoRAJobs this operator knows, by phase.
- ``qlora_operator_reconcile_errors_total{kind}``: reconciles that failed (API trouble, bugs).
- ``qlora_operator_reconcile_duration_seconds{trigger}``: time per reconcile (handler
  latency), by what triggered it (``handler``: kopf spec handlers; ``watch``: watch
  events and retries; ``resync``: the periodic re-check of unfinished jobs).

Training, per QLoRAJob, labels ``namespace`` and ``name`` only (:class:`JobProgressCollector`),
from the trainer's progress reports (``status.progress``) as the reconciler last read them:

=============================================== ==============================================
``qlora_job_step``                              optimizer steps done (``progress.step``)
``qlora_job_total_steps``                       optimizer steps planned (``progress.totalSteps``)
``qlora_job_loss``                              training loss at the last logged step
``qlora_job_eval_loss``                         eval loss at the last evaluation
``qlora_job_tokens_per_second``                 real (non-padding) tokens per second
``qlora_job_gpu_memory_peak_bytes``             peak GPU memory PyTorch reserved on the
                                                reporting trainer's GPU (``gpuMemoryGiB`` x 2^30)
``qlora_job_progress_updated_timestamp_seconds`` when the trainer last reported (Unix time)
=============================================== ==============================================

A series exists only while its field is reported (no loss before the first logged step,
no GPU memory on CPU). Cardinality is bounded by the QLoRAJobs that are unfinished or
finished recently: a job's series go when the QLoRAJob is deleted, and
``metrics_finished_ttl_seconds`` after it finished (``status.completionTime``; Succeeded
or Failed), long enough for a few scrapes to record the final values. A new run of a
finished job brings them back.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter as _Tally
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric

from qlora_operator.api import Phase
from qlora_operator.objects import parse_time

log = logging.getLogger("qlora_operator.metrics")

PHASES = [p.value for p in Phase] + ["Unknown"]
#: Labels of the per-job training metrics (nothing else: bounded cardinality).
JOB_LABELS = ("namespace", "name")
#: Seconds the training metrics of a finished job stay exported (the setting's default).
DEFAULT_FINISHED_TTL_SECONDS = 600.0


@dataclass(frozen=True)
class JobMetric:
    """One per-job gauge: its name, help text, the ``status.progress`` key and a unit factor."""

    name: str
    documentation: str
    key: str
    scale: float = 1.0


JOB_METRICS = (
    JobMetric("qlora_job_step", "Optimizer steps done (status.progress.step)", "step"),
    JobMetric("qlora_job_total_steps", "Optimizer steps planned (status.progress.totalSteps)", "totalSteps"),
    JobMetric("qlora_job_loss", "Training loss at the last logged step (status.progress.loss)", "loss"),
    JobMetric("qlora_job_eval_loss", "Eval loss at the last evaluation (status.progress.evalLoss)", "evalLoss"),
    JobMetric(
        "qlora_job_tokens_per_second", "Real (non-padding) training tokens per second (status.progress.tokensPerSecond)",
        "tokensPerSecond",
    ),
    JobMetric(
        "qlora_job_gpu_memory_peak_bytes",
        "Peak GPU memory PyTorch reserved on the reporting trainer's GPU, bytes (status.progress.gpuMemoryGiB)",
        "gpuMemoryGiB", float(2**30),
    ),
)
UPDATED_METRIC = JobMetric(
    "qlora_job_progress_updated_timestamp_seconds",
    "When the trainer last reported progress, Unix time (status.progress.updatedAt)", "updatedAt",
)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def progress_samples(progress: Mapping[str, Any] | None) -> dict[str, float]:
    """``{metric name: value}`` from a ``status.progress`` mapping (absent, non-numeric and
    non-finite fields are left out; ``updatedAt`` becomes Unix seconds)."""
    progress = progress or {}
    out: dict[str, float] = {}
    for metric in JOB_METRICS:
        value = _number(progress.get(metric.key))
        if value is not None:
            out[metric.name] = value * metric.scale
    updated = parse_time(progress.get(UPDATED_METRIC.key))
    if updated is not None:
        out[UPDATED_METRIC.name] = updated.timestamp()
    return out


class JobProgressCollector:
    """The per-job training gauges, built at scrape time from the last progress seen.

    A custom collector rather than labelled :class:`Gauge` children: a job's series are
    dropped by not yielding them, so expiry needs no timer (it happens at the next scrape).

    Args:
        finished_ttl_seconds: how long a finished job's series stay (0: gone at once).
        clock: Unix time in seconds (for tests).
    """

    def __init__(self, finished_ttl_seconds: float = DEFAULT_FINISHED_TTL_SECONDS,
                 clock: Callable[[], float] = time.time) -> None:
        self.finished_ttl_seconds = finished_ttl_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._jobs: dict[tuple[str, str], tuple[dict[str, float], float | None]] = {}

    def update(self, namespace: str, name: str, progress: Mapping[str, Any] | None,
               finished_at: float | None = None) -> None:
        """Record the job's latest ``status.progress``; ``finished_at``: Unix time it finished
        (None while unfinished). A job finished longer than the TTL ago is not kept."""
        key = (namespace, name)
        samples = progress_samples(progress)
        with self._lock:
            old = self._jobs.get(key)
            if finished_at is not None and old is not None and old[1] is not None:
                finished_at = min(finished_at, old[1])  # first seen finished: the TTL is not restarted
            if not samples or self._expired(finished_at):
                self._jobs.pop(key, None)
                return
            self._jobs[key] = (samples, finished_at)

    def forget(self, namespace: str, name: str) -> None:
        """Drop the job's series (the QLoRAJob is gone)."""
        with self._lock:
            self._jobs.pop((namespace, name), None)

    def jobs(self) -> list[tuple[str, str]]:
        """The jobs with series now (expired ones pruned)."""
        with self._lock:
            self._prune()
            return sorted(self._jobs)

    def _expired(self, finished_at: float | None) -> bool:
        return finished_at is not None and self._clock() - finished_at >= self.finished_ttl_seconds

    def _prune(self) -> None:
        for key in [k for k, (_, finished) in self._jobs.items() if self._expired(finished)]:
            del self._jobs[key]

    def describe(self) -> list[Metric]:
        """The families (empty), so the registry knows the names."""
        return [GaugeMetricFamily(m.name, m.documentation, labels=JOB_LABELS) for m in (*JOB_METRICS, UPDATED_METRIC)]

    def collect(self) -> Iterator[Metric]:
        """One family per metric, one sample per job that reports the field."""
        with self._lock:
            self._prune()
            jobs = {key: dict(samples) for key, (samples, _) in self._jobs.items()}
        for metric in (*JOB_METRICS, UPDATED_METRIC):
            family = GaugeMetricFamily(metric.name, metric.documentation, labels=JOB_LABELS)
            for (namespace, name), samples in sorted(jobs.items()):
                if metric.name in samples:
                    family.add_metric([namespace, name], samples[metric.name])
            yield family


class Metrics:
    """The operator's metrics in their own registry (so tests can create several).

    Args:
        registry: where to register (a new one by default).
        finished_ttl_seconds: how long a finished job's training series stay.
        clock: Unix time in seconds (for tests).
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, *,
        finished_ttl_seconds: float = DEFAULT_FINISHED_TTL_SECONDS, clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self._clock = clock
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
        self.progress = JobProgressCollector(finished_ttl_seconds, clock)
        self.registry.register(self.progress)
        for phase in PHASES:
            self.jobs.labels(phase=phase).set(0)
        self._server: Any = None

    @classmethod
    def for_settings(cls, settings: Any) -> Metrics:
        """Metrics with the operator settings' ``metrics_finished_ttl_seconds``."""
        return cls(finished_ttl_seconds=settings.metrics_finished_ttl_seconds)

    def observe(self, trigger: str, seconds: float, outcome: Any, error: BaseException | None) -> None:
        """Record one reconcile (the :class:`~qlora_operator.reconcile.Reconciler` callback)."""
        self.latency.labels(trigger=trigger).observe(seconds)
        if error is not None:
            self.errors.labels(kind=type(error).__name__).inc()

    def observe_job(self, namespace: str, name: str, outcome: Any) -> None:
        """Update the job's training series from a reconcile's
        :class:`~qlora_operator.reconcile.Outcome` (``progress``, ``terminal``, ``completion_time``).

        A gone QLoRAJob loses its series; a reconcile that failed (``outcome.retry``) changes nothing.
        """
        if outcome is None:
            return
        if getattr(outcome, "gone", False):
            self.progress.forget(namespace, name)
            return
        if getattr(outcome, "retry", None) is not None:
            return
        finished_at = None
        if getattr(outcome, "terminal", False):
            completed = parse_time(getattr(outcome, "completion_time", None))
            finished_at = completed.timestamp() if completed is not None else self._clock()
        self.progress.update(namespace, name, getattr(outcome, "progress", None), finished_at)

    def forget_job(self, namespace: str, name: str) -> None:
        """The QLoRAJob was deleted: drop its training series."""
        self.progress.forget(namespace, name)

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
