"""Pure run decisions: which run is current, and what to do about the spec.

A QLoRAJob has runs 1, 2, ... Run N's children carry the label ``qlora.dev/run=N``
and the spec they were started with (annotation ``qlora.dev/spec``, on the Job and
on the run's ConfigMap, which outlives a Job deleted by ``ttlSecondsAfterFinished``).
The current run is the highest of ``status.run`` and the run labels of the owned Jobs,
so a crash between creating a Job and recording it in the status never starts a
second Job: names are deterministic per run, and a new run is started only when the
spec differs from the *recorded* spec of the finished current run.

Actions:

``invalid``     the spec cannot be run (checks only the operator can make, e.g.
                ``resources.gpus`` above the operator's limit): Failed/InvalidSpec.
``create``      the current run has no Job yet: create its children.
``start-next``  the current run finished (or is suspended) and fields that start a
                run (``api.run_fields_changed``: not runPolicy, scheduling or the
                credentials Secret) changed since it started: start run N+1 (GitOps
                retraining). A suspended run's Job is deleted once run N+1's Job exists
                (it holds no pod; its checkpoints stay in storage under
                ``<output>/run-<N>/``, and run N+1 starts from step 0 under its own prefix).
``observe``     translate the current run's Job and pods into status. A change of
                training fields while the run is active is refused
                (``spec_rejected``): the active run keeps its spec, and the change
                starts the next run once this one finishes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from qlora_operator import render
from qlora_operator.api import (
    QLoRAJobSpec,
    multinode_name_problem,
    parse_spec,
    run_fields_changed,
    training_fields_changed,
)
from qlora_operator.objects import job_result, job_suspended
from qlora_operator.settings import OperatorSettings
from qlora_operator.status import status_terminal
from qlora_trainer.config import ConfigError


class Action(str, Enum):
    """What one reconcile does about the spec (the module docstring describes each)."""

    invalid = "invalid"
    create = "create"
    start_next = "start-next"
    observe = "observe"


@dataclass(frozen=True)
class Plan:
    """What one reconcile should do."""

    action: Action
    run: int  # the run the status describes (0: none yet)
    job: Mapping[str, Any] | None = None
    invalid: str | None = None
    spec_rejected: str | None = None
    changed_fields: tuple[str, ...] = ()


def validate(
    raw_spec: Mapping[str, Any] | None, settings: OperatorSettings, name: str | None = None
) -> tuple[QLoRAJobSpec | None, str | None]:
    """Parse the spec and apply the rules only the operator can check.

    ``name``: the QLoRAJob's ``metadata.name`` (checked for several nodes, as the CRD does).
    Returns ``(spec, None)`` or ``(None, message)``; the message names each field and what must hold.
    """
    try:
        spec = parse_spec(dict(raw_spec or {}))
    except ConfigError as err:
        return None, str(err)
    problems = []
    res = spec.resources
    # Per pod, as documented: the GPUs of a whole multi-node job are capped by ResourceQuota.
    if res.gpus > settings.max_gpus_per_job:
        problems.append(
            f"spec.resources.gpus: {res.gpus} GPUs requested, but this operator allows at most "
            f"{settings.max_gpus_per_job} per trainer pod (setting max_gpus_per_job): lower spec.resources.gpus"
        )
    name_problem = multinode_name_problem(name, res.nodes) if name is not None else None
    if name_problem:
        problems.append(name_problem)
    if problems:
        return None, "\n".join(problems)
    return spec, None


def owned(obj: Mapping[str, Any], uid: str) -> bool:
    """True when ``obj`` has a controller owner reference to the object with ``uid``."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("uid") == uid and ref.get("controller"):
            return True
    return False


def current_run(status: Mapping[str, Any] | None, jobs: Sequence[Mapping[str, Any]]) -> tuple[int, Mapping[str, Any] | None]:
    """(run number, its Job or None): the highest of ``status.run`` and the Jobs' run labels."""
    by_run: dict[int, Mapping[str, Any]] = {}
    for job in jobs:
        run = render.run_of(job)
        if run is not None:
            by_run[run] = job
    recorded = int((status or {}).get("run") or 0)
    run = max([recorded, *by_run.keys()])
    return run, by_run.get(run)


def run_finished(status: Mapping[str, Any] | None, run: int, job: Mapping[str, Any] | None) -> bool:
    """True when run ``run`` is over: its Job completed or failed, or the status says so."""
    if job is not None and job_result(job)[0] is not None:
        return True
    return status_terminal(status, run)


def decide(
    body: Mapping[str, Any],
    spec: QLoRAJobSpec | None,
    invalid: str | None,
    jobs: Sequence[Mapping[str, Any]],
    recorded_spec: Mapping[str, Any] | None,
) -> Plan:
    """What to do for the QLoRAJob ``body`` given its owned Jobs and the current run's recorded spec."""
    status = body.get("status") or {}
    run, job = current_run(status, jobs)
    if run == 0:
        if invalid:
            return Plan(Action.invalid, 0, invalid=invalid)
        return Plan(Action.create, 1)
    raw = dict(body.get("spec") or {})
    changes = tuple(training_fields_changed(dict(recorded_spec), raw)) if recorded_spec is not None else ()
    starting = tuple(run_fields_changed(dict(recorded_spec), raw)) if changes else ()
    if run_finished(status, run, job):
        if not starting:
            return Plan(Action.observe, run, job)
        if invalid:
            return Plan(Action.invalid, run, job, invalid=invalid, changed_fields=starting)
        return Plan(Action.start_next, run + 1, None, changed_fields=starting)
    if job is None:
        if invalid:
            return Plan(Action.invalid, run, None, invalid=invalid)
        return Plan(Action.create, run)
    if starting and job_suspended(job) and not invalid:
        # A suspended run (by the user or a Kueue queue) holds no pod: the changed spec
        # replaces it. The next run starts from step 0 under <output>/run-<N+1>/ (the
        # trainer resumes only checkpoints of its own run).
        return Plan(Action.start_next, run + 1, None, changed_fields=starting)
    rejected = None
    if starting:  # runPolicy / credentials changes apply from the next run; nothing to refuse
        listed = ", ".join(starting[:8]) + (", ..." if len(starting) > 8 else "")
        rejected = (
            f"{listed} changed while run {run} is active: training fields are immutable during a run. "
            f"Run {run} continues with the spec it started with; the changed spec starts run {run + 1} "
            f"when it finishes (revert the change to avoid that)."
        )
        if invalid:
            rejected += f" The changed spec is also invalid: {invalid}"
    return Plan(Action.observe, run, job, spec_rejected=rejected, changed_fields=starting)
