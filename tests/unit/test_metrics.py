"""The operator's Prometheus metrics (qlora_operator.metrics) in a real prometheus-client registry.

The per-job training gauges come from ``status.progress`` as a reconcile read it
(:class:`qlora_operator.reconcile.Outcome`); the wiring through the handlers' reconciler is
tested in test_status.py (``test_handlers_export_training_metrics...``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from qlora_operator.metrics import JOB_METRICS, UPDATED_METRIC, Metrics
from qlora_operator.settings import OperatorSettings

T0 = 1_770_000_000.0  # Unix seconds
PROGRESS = {
    "step": 12, "totalSteps": 60, "epoch": 0.4, "loss": 1.25, "evalLoss": 1.5, "learningRate": 0.0002,
    "tokensPerSecond": 4059.5, "gpuMemoryGiB": 6.5, "etaSeconds": 30, "progress": "12/60", "stage": "Training",
    "updatedAt": "2026-02-02T02:40:00Z",
}


@dataclass
class Outcome:
    """What the metrics read of :class:`qlora_operator.reconcile.Outcome`."""

    progress: dict[str, Any] | None = None
    terminal: bool = False
    completion_time: str | None = None
    gone: bool = False
    retry: str | None = None


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def value(metrics: Metrics, name: str, namespace: str = "team-a", job: str = "bot") -> float | None:
    return metrics.registry.get_sample_value(name, {"namespace": namespace, "name": job})


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def metrics(clock: Clock) -> Metrics:
    return Metrics(CollectorRegistry(), finished_ttl_seconds=600, clock=clock)


def test_progress_becomes_one_gauge_per_field_labelled_by_namespace_and_name(metrics: Metrics):
    metrics.observe_job("team-a", "bot", Outcome(progress=PROGRESS))
    assert value(metrics, "qlora_job_step") == 12
    assert value(metrics, "qlora_job_total_steps") == 60
    assert value(metrics, "qlora_job_loss") == 1.25
    assert value(metrics, "qlora_job_eval_loss") == 1.5
    assert value(metrics, "qlora_job_tokens_per_second") == 4059.5
    assert value(metrics, "qlora_job_gpu_memory_peak_bytes") == 6.5 * 2**30  # GiB -> bytes (base unit)
    assert value(metrics, "qlora_job_progress_updated_timestamp_seconds") == 1_770_000_000.0
    text = generate_latest(metrics.registry).decode()
    job_lines = [line for line in text.splitlines() if line.startswith("qlora_job_")]
    assert len(job_lines) == len(JOB_METRICS) + 1
    assert all('{name="bot",namespace="team-a"}' in line for line in job_lines), job_lines  # no other label


def test_fields_not_reported_have_no_series(metrics: Metrics):
    metrics.observe_job("team-a", "bot", Outcome(progress={"step": 0, "totalSteps": 60, "loss": float("nan"),
                                                         "stage": "Training", "tokensPerSecond": True}))
    assert value(metrics, "qlora_job_step") == 0 and value(metrics, "qlora_job_total_steps") == 60
    for name in ("qlora_job_loss", "qlora_job_eval_loss", "qlora_job_gpu_memory_peak_bytes",
                 "qlora_job_tokens_per_second", UPDATED_METRIC.name):
        assert value(metrics, name) is None, name
    metrics.observe_job("team-a", "empty", Outcome(progress=None))
    assert metrics.progress.jobs() == [("team-a", "bot")]


def test_jobs_are_kept_apart_and_updated_in_place(metrics: Metrics):
    metrics.observe_job("team-a", "bot", Outcome(progress=PROGRESS))
    metrics.observe_job("team-b", "bot", Outcome(progress={**PROGRESS, "step": 3}))
    metrics.observe_job("team-a", "bot", Outcome(progress={**PROGRESS, "step": 13, "loss": 1.0}))
    assert value(metrics, "qlora_job_step", "team-a") == 13 and value(metrics, "qlora_job_loss", "team-a") == 1.0
    assert value(metrics, "qlora_job_step", "team-b") == 3


def test_a_failed_reconcile_keeps_the_last_values(metrics: Metrics):
    metrics.observe_job("team-a", "bot", Outcome(progress=PROGRESS))
    metrics.observe_job("team-a", "bot", Outcome(retry="GET ...: 503"))
    metrics.observe_job("team-a", "bot", None)
    assert value(metrics, "qlora_job_step") == 12


@pytest.mark.parametrize("how", ["gone", "deleted"])
def test_a_deleted_job_loses_its_series(metrics: Metrics, how: str):
    metrics.observe_job("team-a", "bot", Outcome(progress=PROGRESS))
    metrics.observe_job("team-a", "other", Outcome(progress=PROGRESS))
    if how == "gone":
        metrics.observe_job("team-a", "bot", Outcome(gone=True))
    else:
        metrics.forget_job("team-a", "bot")
    assert value(metrics, "qlora_job_step") is None
    assert value(metrics, "qlora_job_step", job="other") == 12


def test_a_finished_job_keeps_its_final_values_for_the_ttl_then_loses_them(metrics: Metrics, clock: Clock):
    done = "2026-02-02T02:40:00Z"  # T0
    metrics.observe_job("team-a", "bot", Outcome(progress=PROGRESS, terminal=True, completion_time=done))
    clock.now = T0 + 599
    assert value(metrics, "qlora_job_loss") == 1.25
    clock.now = T0 + 600
    assert value(metrics, "qlora_job_loss") is None  # dropped at the scrape: no timer needed
    assert metrics.progress.jobs() == []
    metrics.observe_job("team-a", "bot", Outcome(progress=PROGRESS, terminal=True, completion_time=done))
    assert value(metrics, "qlora_job_loss") is None, "a job finished longer ago than the TTL is not exported again"
    metrics.observe_job("team-a", "bot", Outcome(progress={**PROGRESS, "step": 1}))  # a new run of the same job
    assert value(metrics, "qlora_job_step") == 1


def test_a_job_that_finished_long_before_the_operator_started_is_not_exported(metrics: Metrics):
    metrics.observe_job("team-a", "bot", Outcome(progress=PROGRESS, terminal=True, completion_time="2026-01-01T00:00:00Z"))
    assert value(metrics, "qlora_job_step") is None


def test_without_completion_time_the_ttl_runs_from_when_the_job_was_first_seen_finished(metrics: Metrics, clock: Clock):
    metrics.observe_job("team-a", "bot", Outcome(progress=PROGRESS, terminal=True))
    clock.now = T0 + 500
    metrics.observe_job("team-a", "bot", Outcome(progress=PROGRESS, terminal=True))  # reconciled again
    clock.now = T0 + 600
    assert value(metrics, "qlora_job_step") is None


def test_ttl_zero_drops_a_finished_job_at_once(clock: Clock):
    metrics = Metrics(CollectorRegistry(), finished_ttl_seconds=0, clock=clock)
    metrics.observe_job("team-a", "bot", Outcome(progress=PROGRESS, terminal=True, completion_time="2026-02-02T02:40:00Z"))
    assert value(metrics, "qlora_job_step") is None


def test_cardinality_is_bounded_by_live_and_recently_finished_jobs(metrics: Metrics, clock: Clock):
    for i in range(200):
        finished = i % 2 == 0
        metrics.observe_job("team-a", f"job-{i}", Outcome(progress=PROGRESS, terminal=finished,
                                                        completion_time="2026-02-02T02:40:00Z" if finished else None))
    assert len(metrics.progress.jobs()) == 200
    clock.now = T0 + 3600
    assert len(metrics.progress.jobs()) == 100  # the finished half expired
    samples = [s for family in metrics.registry.collect() if family.name.startswith("qlora_job_") for s in family.samples]
    assert len(samples) == 100 * (len(JOB_METRICS) + 1)


def test_two_registries_do_not_clash_and_settings_give_the_ttl():
    a, b = Metrics(), Metrics.for_settings(OperatorSettings(metrics_finished_ttl_seconds=5))
    assert b.progress.finished_ttl_seconds == 5 and a.progress.finished_ttl_seconds == 600
    a.observe_job("ns", "x", Outcome(progress=PROGRESS))
    assert b.registry.get_sample_value("qlora_job_step", {"namespace": "ns", "name": "x"}) is None
