"""Pure status translation: what the cluster shows -> the QLoRAJob's status patch and Events.

Input: the QLoRAJob body (its current status is the baseline for transitions), an
:class:`Observed` snapshot of the current run (batch/v1 Job, its Pods, the Job's
Events), ``now`` and the operator settings. Output: a :class:`StatusResult` with the
status fields the operator owns, the merge patch that brings the object there (empty
when nothing changed), the Events to post for the transitions, and the side effects
the caller must carry out (stop the run, delete pods, restart the group). Nothing here
calls the API or reads the clock.

Conditions are the state machine; ``phase`` is a summary derived from them:

========== ===================================================================
Running    True while the run is active: from the creation of its Job until it
           completes, fails or is suspended. The reason says what the run waits
           for (Pending, Unschedulable, QuotaExceeded, ImagePullBackOff,
           SecretNotFound, Starting, Retrying, Restarting), TrainerRunning, or
           Finishing (the trainer exited 0, the Job is not marked Complete yet).
Complete   True once the Job succeeded; artifacts come from the trainer's
           termination message.
Failed     True with the cause: InvalidSpec, Unschedulable, QuotaExceeded,
           ImagePullFailed, SecretNotFound, the trainer's exit reason (OOMKilled,
           Killed, CudaOutOfMemory, InvalidData, InvalidConfig, NonFiniteLoss,
           StorageError, MergeCheckFailed: the adapter is listed in
           status.artifacts with the check's numbers, no mergedUri),
           DeadlineExceeded, BackoffLimitExceeded (the message carries the last
           attempt's reason).
Suspended  True while the Job is suspended (runPolicy.suspend, or a Kueue queue).
Stalled    True while the trainer runs but has not reported progress for longer
           than the stalled timeout.
SpecRejected  Present (True) only while a spec change is refused because a run is
           active; the change starts the next run once the active run finishes.
========== ===================================================================

:func:`compute_status` carries the attempts, progress and artifacts of the run over
from the recorded status (:mod:`qlora_operator.attempts`), asks
:func:`qlora_operator.decision.decide` for the run's state (one node and several
nodes are told apart there), and writes each condition as an ``api.Condition`` (keeping its
``lastTransitionTime`` while its status holds). Complete and Failed are sticky for a
run: once recorded they do not change (the Job may be garbage-collected by its TTL,
pods may vanish) until a new run starts. The child objects are read through
:mod:`qlora_operator.objects`; the reasons live beside ``ConditionType`` in
:mod:`qlora_operator.api`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from qlora_operator import render
from qlora_operator.api import (
    CONTAINER_CONFIG_ERROR,
    Condition,
    ConditionType,
    DISRUPTED,
    IMAGE_PULL_BACKOFF,
    INVALID_SPEC,
    MERGE_CHECK_FAILED,
    Phase,
    QUOTA_EXCEEDED,
    SECRET_NOT_FOUND,
    SPEC_REJECTED,
    TRAINER_RUNNING,
    UNSCHEDULABLE,
)
from qlora_operator.attempts import (
    artifacts_from_pods,
    attach_checkpoint_decision,
    attempt_failed,
    attempt_finished,
    attempts_with_job_failure,
    describe_attempt,
    merge_attempts,
)
from qlora_operator.decision import CASUALTY_REASONS, ConditionValue, GroupRestart, Observed, decide, true
from qlora_operator.objects import (
    conditions_of,
    fmt_time,
    job_result,
    job_suspended,
    pod_finished,
    queue_status,
    truncate,
)
from qlora_operator.settings import OperatorSettings

__all__ = [
    "EventSpec", "GroupRestart", "Observed", "StatusResult", "compute_status", "status_terminal", "transition_events",
]

#: Running reasons that are worth a Warning event (the run cannot make progress).
WARNING_REASONS = frozenset({UNSCHEDULABLE, QUOTA_EXCEEDED, IMAGE_PULL_BACKOFF, SECRET_NOT_FOUND, CONTAINER_CONFIG_ERROR})

RUNNING, COMPLETE, FAILED = ConditionType.running.value, ConditionType.complete.value, ConditionType.failed.value
SUSPENDED, STALLED = ConditionType.suspended.value, ConditionType.stalled.value
SPEC_REJECTED_TYPE = ConditionType.spec_rejected.value
CONDITION_ORDER = (RUNNING, COMPLETE, FAILED, SUSPENDED, STALLED, SPEC_REJECTED_TYPE)
#: Status fields the operator owns (``progress`` is the trainer's).
OWNED_FIELDS = (
    "observedGeneration",
    "run",
    "jobName",
    "phase",
    "conditions",
    "attempts",
    "artifacts",
    "startTime",
    "completionTime",
    "message",
)


# --- outputs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class EventSpec:
    """A Kubernetes Event to post on the QLoRAJob."""

    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class StatusResult:
    """Status the operator wants, the patch to get there, and what else to do."""

    status: dict[str, Any]
    patch: dict[str, Any]
    events: list[EventSpec] = field(default_factory=list)
    delete_pods: list[str] = field(default_factory=list)
    stop_reason: str | None = None  # the operator declared the run failed: stop its Job
    terminal: bool = False
    restart: GroupRestart | None = None  # start the next run of the group now

    @property
    def phase(self) -> str | None:
        """``status.phase`` as computed."""
        return self.status.get("phase")


def run_artifacts(obs: Observed, group: render.GroupAttempt) -> dict[str, Any] | None:
    """:func:`artifacts_from_pods` of the run, with the training ``run`` and the ``generation`` it started from."""
    arts = artifacts_from_pods(obs.pods)
    if arts is None:
        return None
    out: dict[str, Any] = {"run": group.training_run or obs.run, **arts}
    try:
        out["generation"] = int(((obs.job or {}).get("metadata") or {}).get("annotations", {})[render.ANN_GENERATION])
    except (KeyError, TypeError, ValueError):
        pass
    return out


# --- conditions --------------------------------------------------------------------------------


def _condition(old: Mapping[str, Any] | None, typ: str, value: ConditionValue, now: str, generation: int | None) -> dict[str, Any]:
    """Condition ``typ`` as written to the status (an ``api.Condition`` by its camelCase names):
    ``lastTransitionTime`` is the old one while the status holds, else ``now``."""
    keep = old is not None and old.get("status") == value.status and old.get("lastTransitionTime")
    cond = Condition.model_construct(  # built from our own values: no validation on the hot path
        type=typ, status=value.status, reason=value.reason, message=truncate(value.message),
        last_transition_time=old["lastTransitionTime"] if keep else now, observed_generation=generation,
    )
    return cond.model_dump(by_alias=True, exclude_none=True)


def _is_true(conds: Mapping[str, Mapping[str, Any]], typ: str) -> bool:
    cond = conds.get(typ)
    return bool(cond and cond.get("status") == "True")


# --- compute_status and its pieces ------------------------------------------------------------


@dataclass(frozen=True)
class _Baseline:
    """The recorded status and how the observed run relates to it."""

    old: dict[str, Any]
    old_conds: dict[str, Mapping[str, Any]]
    same_run: bool
    continuing: bool  # a group restart continues the failed run: attempts, progress, start time carry on
    nodes: int
    group: render.GroupAttempt

    @property
    def carry(self) -> bool:
        """The recorded attempts and progress belong to this run."""
        return self.same_run or self.continuing

    @property
    def old_attempts(self) -> list[Mapping[str, Any]]:
        """The recorded attempts of this run ([] for a new run)."""
        return list(self.old.get("attempts") or []) if self.carry else []


def _baseline(body: Mapping[str, Any], obs: Observed) -> _Baseline:
    old = dict(body.get("status") or {})
    same_run = obs.run is not None and old.get("run") == obs.run
    group = render.group_attempt_of(obs.job)
    return _Baseline(
        old=old, old_conds={c.get("type"): c for c in old.get("conditions") or [] if c.get("type")},
        same_run=same_run, continuing=not same_run and group.restart_of is not None and old.get("run") == group.restart_of,
        nodes=render.job_nodes(obs.job), group=group,
    )


def _current_attempts(base: _Baseline, obs: Observed, progress: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The run's attempts: the recorded ones merged with its pods, its Job's failure and checkpoint decision."""
    attempts = attach_checkpoint_decision(attempts_with_job_failure(merge_attempts(
        base.old_attempts, obs.pods, base.group.attempt if base.nodes > 1 else None
    ), obs.job), progress)
    evicted = conditions_of(obs.workload).get("Evicted") if obs.queued and obs.workload else None
    if evicted and evicted.get("status") == "True":
        # Kueue evicted the Workload (e.g. preempted it) and suspended the Job: the pods it
        # stopped (SIGTERM, exit 143; or deleted before their end was seen) are a disruption,
        # not a failure of the run.
        said = truncate(f"Kueue evicted the Workload ({evicted.get('reason')}): {evicted.get('message') or ''}")
        attempts = [{**a, "reason": DISRUPTED, "message": said} if a.get("reason") in CASUALTY_REASONS else a
                    for a in attempts]
    return attempts


@dataclass
class _Verdict:
    """The conditions as written, with the phase, message and side effects that go with them."""

    conditions: list[dict[str, Any]]
    phase: str | None
    message: str
    stop_reason: str | None = None
    delete: list[str] = field(default_factory=list)
    restart: GroupRestart | None = None


def _sticky(base: _Baseline, obs: Observed) -> _Verdict | None:
    """The recorded verdict when this run already completed or failed (not InvalidSpec), else None.

    Failed by the operator (e.g. ImagePullFailed) while the Job is still active: stop it (again).
    """
    conds = base.old_conds
    if not base.same_run or obs.invalid_spec or not (_is_true(conds, COMPLETE) or _is_true(conds, FAILED)):
        return None
    if conds.get(FAILED, {}).get("reason") == INVALID_SPEC:
        return None
    old = base.old
    verdict = _Verdict(
        conditions=[dict(conds[t]) for t in CONDITION_ORDER if t in conds and t != SPEC_REJECTED_TYPE],
        phase=old.get("phase") or (Phase.succeeded.value if _is_true(conds, COMPLETE) else Phase.failed.value),
        message=old.get("message") or "",
    )
    job = obs.job
    if _is_true(conds, FAILED) and job is not None and job_result(job)[0] is None and not job_suspended(job):
        verdict.stop_reason = conds[FAILED].get("reason") or "Failed"
        verdict.delete = [
            p["metadata"]["name"] for p in obs.pods
            if not pod_finished(p) and not (p.get("metadata") or {}).get("deletionTimestamp")
        ]
    return verdict


def _decided(
    base: _Baseline, obs: Observed, attempts: list[dict[str, Any]], artifacts: dict[str, Any] | None,
    progress: Mapping[str, Any] | None, now: datetime, settings: OperatorSettings, namespace: str,
    generation: int | None,
) -> _Verdict:
    """The verdict of :func:`decision.decide`, its conditions written with their transition times."""
    state = decide(obs, attempts, artifacts, progress, now, settings, namespace)
    values = {RUNNING: state.running, COMPLETE: state.complete, FAILED: state.failed,
              SUSPENDED: state.suspended, STALLED: state.stalled}
    if obs.spec_rejected and not state.complete.is_true and not state.failed.is_true:
        values[SPEC_REJECTED_TYPE] = true("TrainingFieldsImmutable", obs.spec_rejected)
    now_s = fmt_time(now)
    return _Verdict(
        conditions=[_condition(base.old_conds.get(t), t, values[t], now_s, generation) for t in CONDITION_ORDER if t in values],
        phase=state.phase, message=state.message, stop_reason=state.stop_reason, delete=state.delete_pods,
        restart=state.restart,
    )


def _listed_artifacts(
    conds: Mapping[str, Mapping[str, Any]], artifacts: dict[str, Any] | None, recorded: dict[str, Any] | None,
    recorded_here: bool,
) -> dict[str, Any] | None:
    """``status.artifacts``: this run's once it completed (or failed its merge check with the adapter
    published: those are listed like a completed run's); until then the last successful run's
    (``artifacts.run`` names it; every run writes under its own ``<output>/run-<N>/``)."""
    merge_check_failed = (
        _is_true(conds, FAILED) and conds[FAILED].get("reason") == MERGE_CHECK_FAILED
        and bool(artifacts) and bool(artifacts.get("adapterUri"))
    )
    if _is_true(conds, COMPLETE) or merge_check_failed:
        return artifacts
    return None if recorded_here else recorded


def _patch(base: _Baseline, desired: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch from the recorded status to ``desired`` (a new run also drops the old progress)."""
    old = base.old
    patch = {k: v for k, v in desired.items() if old.get(k) != v and not (v is None and k not in old)}
    if not base.carry and old.get("progress") is not None:
        patch["progress"] = None  # a new run: the previous run's progress is history
    return patch


def compute_status(
    body: Mapping[str, Any], obs: Observed, now: datetime, settings: OperatorSettings
) -> StatusResult:
    """The status the QLoRAJob should have, the patch, the events and the side effects."""
    meta = body.get("metadata") or {}
    base = _baseline(body, obs)
    old = base.old
    progress = old.get("progress") if base.carry else None
    attempts = _current_attempts(base, obs, progress)
    # This run's artifacts (a pod exited 0), else the ones recorded for this run; the
    # earlier run's recorded ones stay listed until this run completes (_listed_artifacts).
    recorded = old.get("artifacts") or None
    recorded_here = bool(recorded) and base.same_run and recorded.get("run") in (None, base.group.training_run or obs.run)
    artifacts = run_artifacts(obs, base.group) or (recorded if recorded_here else None)

    verdict = _sticky(base, obs) or _decided(
        base, obs, attempts, artifacts, progress, now, settings, meta.get("namespace", ""), meta.get("generation")
    )
    conds = {c["type"]: c for c in verdict.conditions}
    terminal = _is_true(conds, COMPLETE) or _is_true(conds, FAILED)
    job_status = (obs.job or {}).get("status") or {}
    start_time = (old.get("startTime") if base.continuing else None) or job_status.get("startTime") or (
        old.get("startTime") if base.same_run else None
    )
    completion = None
    if terminal:
        completion = (old.get("completionTime") if base.same_run else None) or job_status.get("completionTime") or fmt_time(now)
    desired: dict[str, Any] = {
        "observedGeneration": meta.get("generation"),
        "run": obs.run,
        "jobName": obs.job_name,
        "phase": verdict.phase,
        "conditions": verdict.conditions,
        "attempts": attempts,
        "artifacts": _listed_artifacts(conds, artifacts, recorded, recorded_here),
        "startTime": start_time,
        "completionTime": completion,
        "message": truncate(verdict.message) or None,
        "queue": queue_status(obs.workload, obs.local_queue) if obs.queued else None,
    }
    if obs.queued and obs.workload is None and base.same_run and old.get("queue"):
        desired["queue"] = old["queue"]  # not read this time (the Job is finished or gone): keep what was seen
    events = transition_events(base.old_conds, conds, base.old_attempts, attempts, terminal, group=base.nodes > 1)
    return StatusResult(
        status=desired, patch=_patch(base, desired), events=events, delete_pods=verdict.delete,
        stop_reason=verdict.stop_reason, terminal=terminal, restart=verdict.restart,
    )


# --- events ----------------------------------------------------------------------------------


def checkpoint_event(attempt: Mapping[str, Any]) -> EventSpec:
    """The Event of an attempt's checkpoint decision: CheckpointRefused (Warning) when the trainer
    refused checkpoints of its run, else ResumedFromCheckpoint or StartedFresh (Normal)."""
    message = f"pod {attempt.get('podName')}: {attempt.get('checkpoint')}"
    if "refused" in (attempt.get("checkpoint") or ""):
        return EventSpec("Warning", "CheckpointRefused", truncate(message))
    if "resumedFromStep" in attempt:
        return EventSpec("Normal", "ResumedFromCheckpoint", truncate(message))
    return EventSpec("Normal", "StartedFresh", truncate(message))


#: (type, reason) of the Event when a condition turns True; None: the condition's own reason.
_TURNED_TRUE = {
    COMPLETE: ("Normal", "Completed"),
    FAILED: ("Warning", None),
    SUSPENDED: ("Normal", None),
    STALLED: ("Warning", "Stalled"),
}
#: (reason, message) of the Normal Event when a condition that was True turns False.
_TURNED_FALSE = {
    SUSPENDED: ("Resumed", "the run is no longer suspended"),
    STALLED: ("ProgressResumed", "the trainer reports progress again"),
}


def _condition_event(typ: str, old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> EventSpec | None:
    """The Event of condition ``typ`` changing from ``old`` to ``new`` (status or reason), if any."""
    message = new.get("message") or ""
    if new.get("status") == "True":
        if typ == RUNNING:
            reason = new.get("reason") or "Running"
            kind = "Warning" if reason in WARNING_REASONS else "Normal"
            return EventSpec(kind, "Running" if reason == TRAINER_RUNNING else reason, message)
        kind, reason = _TURNED_TRUE[typ]
        return EventSpec(kind, reason or new.get("reason") or typ, message)
    if typ in _TURNED_FALSE and old is not None and old.get("status") == "True":
        return EventSpec("Normal", *_TURNED_FALSE[typ])
    return None


def transition_events(
    old_conds: Mapping[str, Mapping[str, Any]],
    new_conds: Mapping[str, Mapping[str, Any]],
    old_attempts: Sequence[Mapping[str, Any]],
    new_attempts: Sequence[Mapping[str, Any]],
    terminal: bool,
    *,
    group: bool = False,
) -> list[EventSpec]:
    """One Event per transition: a checkpoint decision, a failed attempt, a changed Running reason, a condition flip.

    ``group`` (nodes > 1): pods stopped because their group was already failing
    (Terminated, Stopped) get no event of their own when another pod of the same group
    attempt failed for a reason.
    """
    events: list[EventSpec] = []
    decided_before = {a.get("podName") for a in old_attempts if a.get("checkpoint")}
    events += [checkpoint_event(a) for a in new_attempts if a.get("checkpoint") and a.get("podName") not in decided_before]
    finished_before = {a.get("podName") for a in old_attempts if attempt_finished(a)}
    real_failure = {
        a.get("index") for a in new_attempts if attempt_failed(a) and a.get("reason") not in CASUALTY_REASONS
    } if group else set()
    for attempt in new_attempts:
        if attempt.get("podName") in finished_before or not attempt_failed(attempt):
            continue
        if group and attempt.get("reason") in CASUALTY_REASONS and attempt.get("index") in real_failure:
            continue
        tail = "" if terminal else ("; the group restarts" if group else "; the run will retry")
        events.append(EventSpec("Warning", attempt.get("reason") or "AttemptFailed", truncate(describe_attempt(attempt) + tail)))
    for typ in (RUNNING, COMPLETE, FAILED, SUSPENDED, STALLED):
        old, new = old_conds.get(typ), new_conds.get(typ)
        if new is None or (old is not None and (old.get("status"), old.get("reason")) == (new.get("status"), new.get("reason"))):
            continue
        event = _condition_event(typ, old, new)
        if event is not None:
            events.append(event)
    old, new = old_conds.get(SPEC_REJECTED_TYPE), new_conds.get(SPEC_REJECTED_TYPE)
    if new is not None and (old is None or old.get("message") != new.get("message")):
        events.append(EventSpec("Warning", SPEC_REJECTED, new.get("message") or ""))
    return events


def status_terminal(status: Mapping[str, Any] | None, run: int | None = None) -> bool:
    """True when ``status`` records a finished run (``run`` given: that run)."""
    status = status or {}
    if run is not None and status.get("run") != run:
        return False
    conds = {c.get("type"): c for c in status.get("conditions") or []}
    return _is_true(conds, COMPLETE) or _is_true(conds, FAILED)
