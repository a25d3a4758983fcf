"""Pure status translation: what the cluster shows -> the QLoRAJob's status (the decision).

Input: the QLoRAJob body (its current status is the baseline for transitions), an
:class:`Observed` snapshot of the current run (batch/v1 Job, its Pods, the Job's
Events), ``now`` and the operator settings. Output: a :class:`StatusResult` with the
status fields the operator owns, the merge patch that brings the object there (empty
when nothing changed), the Events to post for the transitions, and the side effects
the caller must carry out (stop the run, delete pods). Nothing here calls the API or
reads the clock. The child objects are read through :mod:`qlora_operator.objects`, the
attempts kept by :mod:`qlora_operator.attempts`; the reasons live beside ``ConditionType``
in :mod:`qlora_operator.api`.

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

Complete and Failed are sticky for a run: once recorded they do not change (the Job
may be garbage-collected by its TTL, pods may vanish) until a new run starts.

Several nodes (an Indexed Job, see :mod:`qlora_operator.render`): the first failed pod
fails the Job, and :func:`compute_status` decides what the group does next:

- a permanent exit code (:data:`render.PERMANENT_EXIT_CODES`) in any pod of the run,
  or ``activeDeadlineSeconds`` exceeded: Failed, as for one node;
- a disruption (a pod with the ``DisruptionTarget`` condition), or the Job was
  suspended (the user, or Kueue preempting it): restart, not counted;
- anything else: restart, counted; past ``runPolicy.backoffLimit`` counted failures
  the job fails with BackoffLimitExceeded (with backoffLimit 0: the pod's reason).

A restart is Running=True with reason Restarting until every pod of the failed run
has stopped (a terminating trainer writes its checkpoint); then
:attr:`StatusResult.restart` asks the caller to start the next run, whose Job records
the count (:class:`render.GroupAttempt`). The attempts (with their ``node``) and the
progress of the failed run carry on into the next one; the group attempt is the
attempts' ``index``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from qlora_operator import render
from qlora_operator.api import (
    BACKOFF_LIMIT_EXCEEDED,
    CONTAINER_CONFIG_ERROR,
    ConditionType,
    DEADLINE_EXCEEDED,
    DISRUPTED,
    FINISHING,
    IMAGE_PULL_BACKOFF,
    IMAGE_PULL_FAILED,
    INVALID_SPEC,
    MERGE_CHECK_FAILED,
    NO_PROGRESS,
    PENDING,
    Phase,
    QUOTA_EXCEEDED,
    RESTARTING,
    RETRYING,
    SECRET_NOT_FOUND,
    SPEC_REJECTED,
    STARTING,
    STOPPED,
    SUCCEEDED,
    TERMINATED,
    TRAINER_RUNNING,
    UNSCHEDULABLE,
)
from qlora_operator.attempts import (
    SECRET_NOT_FOUND_MESSAGE,
    artifacts_from_pods,
    attach_checkpoint_decision,
    attempt_failed,
    attempt_finished,
    attempts_with_job_failure,
    describe_attempt,
    group_cause,
    latest_per_node,
    merge_attempts,
)
from qlora_operator.objects import (
    conditions_of,
    elapsed,
    fmt_time,
    job_result,
    job_suspended,
    parse_time,
    pod_finished,
    pod_over,
    pod_running_since,
    pod_sort_key,
    pod_terminated,
    pod_unschedulable,
    pod_waiting,
    queue_status,
    quota_event,
    quota_first_seen,
    quota_message,
    truncate,
)
from qlora_operator.render import GroupAttempt
from qlora_operator.settings import OperatorSettings
from qlora_trainer import contract


#: Display phase for the trainer's reported stage while its pod runs ("Done": the
#: trainer is finishing its last writes and exiting).
_STAGE_PHASE = {
    contract.STAGE_MERGING: Phase.merging.value,
    contract.STAGE_UPLOADING: Phase.uploading.value,
    contract.STAGE_DONE: Phase.uploading.value,
}
IMAGE_PULL_REASONS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"})
#: Running reasons that are worth a Warning event (the run cannot make progress).
WARNING_REASONS = frozenset({UNSCHEDULABLE, QUOTA_EXCEEDED, IMAGE_PULL_BACKOFF, SECRET_NOT_FOUND, CONTAINER_CONFIG_ERROR})

SPEC_REJECTED_TYPE = "SpecRejected"
CONDITION_ORDER = (
    ConditionType.running.value,
    ConditionType.complete.value,
    ConditionType.failed.value,
    ConditionType.suspended.value,
    ConditionType.stalled.value,
    SPEC_REJECTED_TYPE,
)
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


# --- inputs and outputs -----------------------------------------------------------


@dataclass(frozen=True)
class Observed:
    """What the cluster shows for the current run (gathered by the caller)."""

    run: int | None
    job_name: str | None
    job: Mapping[str, Any] | None = None
    pods: Sequence[Mapping[str, Any]] = ()
    job_events: Sequence[Mapping[str, Any]] = ()
    invalid_spec: str | None = None
    spec_rejected: str | None = None
    suspend_requested: bool = False
    queued: bool = False
    backoff_limit: int = 3
    active_deadline_seconds: int | None = None
    image: str = ""
    secret_name: str | None = None
    #: The run's fit check (:class:`qlora_operator.fitcheck.FitCheck`) while no GPU Job exists.
    fit_check: Any = None
    #: The Kueue Workload of the run's Job (queued runs; None without Kueue or before it made one).
    workload: Mapping[str, Any] | None = None
    local_queue: str = ""


@dataclass(frozen=True)
class EventSpec:
    """A Kubernetes Event to post on the QLoRAJob."""

    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class GroupRestart:
    """The next run of a failed group (nodes > 1): its number, its Job's annotations, why."""

    run: int
    group: GroupAttempt
    why: str


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


def checkpoint_event(attempt: Mapping[str, Any]) -> EventSpec:
    """The Event of an attempt's checkpoint decision: CheckpointRefused (Warning) when the trainer
    refused checkpoints of its run, else ResumedFromCheckpoint or StartedFresh (Normal)."""
    message = f"pod {attempt.get('podName')}: {attempt.get('checkpoint')}"
    if "refused" in (attempt.get("checkpoint") or ""):
        return EventSpec("Warning", "CheckpointRefused", truncate(message))
    if "resumedFromStep" in attempt:
        return EventSpec("Normal", "ResumedFromCheckpoint", truncate(message))
    return EventSpec("Normal", "StartedFresh", truncate(message))


# --- the decision ---------------------------------------------------------------------------


@dataclass
class _State:
    running: tuple[str, str, str]
    complete: tuple[str, str, str] = ("False", "NotCompleted", "")
    failed: tuple[str, str, str] = ("False", "NoFailure", "")
    suspended: tuple[str, str, str] = ("False", "NotSuspended", "")
    stalled: tuple[str, str, str] = ("False", "NotRunning", "")
    phase: str = Phase.pending.value
    message: str = ""
    stop_reason: str | None = None
    delete_pods: list[str] = field(default_factory=list)
    restart: GroupRestart | None = None


def _failure(obs: Observed, job_reason: str, job_message: str, attempts: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    failed = [a for a in attempts if attempt_failed(a) and a.get("reason") != DISRUPTED]
    last = failed[-1] if failed else None
    if job_reason == DEADLINE_EXCEEDED:
        msg = f"runPolicy.activeDeadlineSeconds ({obs.active_deadline_seconds}s) exceeded"
        if last is not None:
            msg += f"; last {describe_attempt(last)}"
        return DEADLINE_EXCEEDED, msg
    if job_reason == "PodFailurePolicy" and last is not None:
        return last.get("reason", "Failed"), f"{describe_attempt(last)}; this exit code is not retried"
    if job_reason == BACKOFF_LIMIT_EXCEEDED and last is not None:
        if obs.backoff_limit == 0:
            return last.get("reason", "Failed"), f"{describe_attempt(last)}; runPolicy.backoffLimit is 0 (no retries)"
        return BACKOFF_LIMIT_EXCEEDED, (
            f"{last.get('reason', 'Error')}: {len(failed)} attempts failed "
            f"(runPolicy.backoffLimit {obs.backoff_limit}); last {describe_attempt(last)}"
        )
    if last is not None and not job_reason:
        return last.get("reason", "Failed"), describe_attempt(last)
    return job_reason or "JobFailed", truncate(job_message) or "the Job failed"


def _failed_state(reason: str, msg: str) -> _State:
    """Failed because the Job failed (nothing to stop)."""
    return _State(
        running=("False", reason, msg), failed=("True", reason, msg), complete=("False", reason, ""),
        phase=Phase.failed.value, message=msg,
    )


def _queued_message(obs: Observed) -> tuple[str, str]:
    """(reason, message) of a queued run's suspended Job, from its Workload when there is one."""
    queue = queue_status(obs.workload, obs.local_queue)
    where = f"LocalQueue {obs.local_queue}" if obs.local_queue else "scheduling.queueName"
    if queue is None:
        return "Queued", f"waiting for Kueue to admit the Job ({where})"
    if queue["reason"] == "Preempted" or (queue["evictions"] and not queue["admitted"]):
        why = queue["message"] or queue["reason"] or "evicted"
        return "Preempted", (
            f"Kueue evicted the run's Workload {queue['workload']} ({queue['reason']}: {why}): its pods stop, the "
            "trainer checkpoints on SIGTERM, and the run resumes from that checkpoint when Kueue readmits it"
        )
    said = f": {queue['message']}" if queue["message"] else ""
    return "Queued", f"waiting for Kueue to admit Workload {queue['workload']} ({where}; {queue['reason'] or 'Pending'}{said})"


def _suspended_state(obs: Observed) -> _State:
    if obs.suspend_requested:
        reason, msg, phase = "SuspendedByUser", "runPolicy.suspend is true: pods are stopped, checkpoints kept", Phase.suspended.value
    elif obs.queued:
        reason, msg = _queued_message(obs)
        phase = Phase.queued.value
    else:
        reason, msg, phase = "Suspended", f"Job {obs.job_name} is suspended", Phase.suspended.value
    return _State(running=("False", reason, msg), suspended=("True", reason, msg), phase=phase, message=msg)


def _group_failed(
    obs: Observed, group: GroupAttempt, nodes: int, attempts: Sequence[Mapping[str, Any]],
    pods: Sequence[Mapping[str, Any]], job_message: str,
) -> _State:
    """The Job of a group run failed: fail the QLoRAJob, or restart the group as the next run."""
    current = latest_per_node(attempts, group.attempt)
    failed = [a for a in current if attempt_failed(a)]
    permanent = [a for a in failed if a.get("exitCode") in render.PERMANENT_EXIT_CODES]
    if permanent:
        cause = permanent[0]
        return _failed_state(cause.get("reason", "Failed"), f"{describe_attempt(cause)}; this exit code is not retried")
    disrupted = [a for a in failed if a.get("reason") == DISRUPTED]
    cause = disrupted[0] if disrupted else group_cause(failed)
    what = describe_attempt(cause) if cause is not None else (truncate(job_message) or f"Job {obs.job_name} failed")
    suspended = job_suspended(obs.job)
    counted = not (suspended or disrupted)
    failures = group.failures + (1 if counted else 0)
    if counted and failures > obs.backoff_limit:
        if obs.backoff_limit == 0:
            reason = cause.get("reason", "Failed") if cause is not None else "JobFailed"
            return _failed_state(reason, f"{what}; runPolicy.backoffLimit is 0 (no retries)")
        reason = cause.get("reason", "Error") if cause is not None else "Error"
        return _failed_state(BACKOFF_LIMIT_EXCEEDED, (
            f"{reason}: {failures} group attempts failed (runPolicy.backoffLimit {obs.backoff_limit}); last {what}"
        ))
    run = obs.run or 0
    if suspended:
        why = f"run {run} was suspended"
    elif disrupted:
        why = f"run {run} was disrupted: {what}; not counted against runPolicy.backoffLimit"
    else:
        why = f"run {run} failed: {what}; {failures} of runPolicy.backoffLimit {obs.backoff_limit} retries used"
    stopping = [p["metadata"]["name"] for p in pods if not pod_finished(p)]
    restart = None
    if stopping:
        msg = f"{why}; waiting for {len(stopping)} pod(s) to stop ({', '.join(sorted(stopping)[:4])}) before run {run + 1}"
    else:
        msg = f"{why}; restarting all {nodes} nodes as run {run + 1} from the newest checkpoint"
        restart = GroupRestart(
            run=run + 1, group=GroupAttempt(group.attempt + 1, failures, run, group.training_run or run), why=why
        )
    if suspended:
        state = _suspended_state(obs)
        state.restart = restart
        return state
    return _State(running=("True", RESTARTING, msg), phase=Phase.pending.value, message=msg, restart=restart)


def _pick(active: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The active pod that says most about a group: one that cannot be scheduled, then one
    waiting with a reason (image pull, missing Secret), then one not running yet, else the
    lowest node."""
    def waiting_reason(p: Mapping[str, Any]) -> bool:
        return (pod_waiting(p) or {}).get("reason") not in (None, "", "ContainerCreating", "PodInitializing")

    by_node = sorted(active, key=lambda p: (render.pod_node_index(p) or 0, pod_sort_key(p)))
    for test in (pod_unschedulable, waiting_reason, lambda p: pod_running_since(p) is None):
        for pod in by_node:
            if test(pod):
                return pod
    return by_node[0]


def _quota_state(obs: Observed, pods: Sequence[Mapping[str, Any]], now: datetime, settings: OperatorSettings) -> _State | None:
    """QuotaExceeded while the Job controller cannot create a pod (a FailedCreate newer than the last pod)."""
    quota = quota_event(obs.job_events)
    last_pod_created = max((pod_sort_key(p)[0] for p in pods), default="")
    if quota is None or (quota.get("lastTimestamp") or quota.get("eventTime") or "") < last_pod_created:
        return None
    waited = elapsed(now, quota_first_seen(obs.job_events))
    qmsg = quota_message(quota)
    if waited >= settings.unschedulable_timeout_seconds:
        msg = (
            f"the trainer pod could not be created for {int(waited)}s (timeout "
            f"{int(settings.unschedulable_timeout_seconds)}s): {qmsg}"
        )
        return _terminal(QUOTA_EXCEEDED, msg)
    msg = f"the trainer pod cannot be created: {qmsg}"
    return _State(running=("True", QUOTA_EXCEEDED, msg), phase=Phase.pending.value, message=msg)


def _decide(
    obs: Observed, attempts: list[dict[str, Any]], artifacts: dict[str, Any] | None,
    progress: Mapping[str, Any] | None, now: datetime, settings: OperatorSettings, namespace: str,
) -> _State:
    if obs.invalid_spec:
        msg = truncate(obs.invalid_spec)
        return _State(
            running=("False", INVALID_SPEC, "the spec is invalid: no run is started"),
            failed=("True", INVALID_SPEC, msg),
            complete=("False", INVALID_SPEC, ""),
            phase=Phase.failed.value,
            message=msg,
        )
    job = obs.job
    fit = obs.fit_check
    if job is None and fit is not None and fit.state == "failed":
        # Refused before the GPU Job exists: no GPU was requested and no weight was read.
        msg = truncate(f"{fit.message} (fit check Job {fit.job_name}; no GPU was requested)")
        return _failed_state(fit.reason, msg)
    if job is None and fit is not None and fit.state == "running":
        msg = f"checking that the model fits the requested GPUs before requesting them ({fit.message})"
        return _State(running=("False", fit.reason, msg), phase=Phase.pending.value, message=msg)
    if job is None:
        msg = f"creating Job {obs.job_name}" if obs.job_name else "waiting for the operator"
        return _State(running=("False", PENDING, msg), phase=Phase.pending.value, message=msg)

    nodes = render.job_nodes(job)
    group = render.group_attempt_of(job)
    pods = list(obs.pods)
    outcome, job_reason, job_message = job_result(job)
    if outcome == "succeeded":
        if artifacts and artifacts.get("adapterUri"):
            msg = f"training finished; adapter at {artifacts['adapterUri']}"
            if artifacts.get("mergedUri"):
                msg += f", merged model at {artifacts['mergedUri']}"
        else:
            msg = "training finished, but the trainer reported no artifacts (no termination message)"
        return _State(
            running=("False", "Completed", msg), complete=("True", SUCCEEDED, msg),
            phase=Phase.succeeded.value, message=msg,
        )
    if outcome == "failed":
        if nodes > 1 and job_reason != DEADLINE_EXCEEDED:
            return _group_failed(obs, group, nodes, attempts, pods, job_message)
        reason, msg = _failure(obs, job_reason, job_message, attempts)
        return _failed_state(reason, msg)

    if job_suspended(job):
        return _suspended_state(obs)

    active = [
        p for p in sorted(pods, key=pod_sort_key)
        if not pod_over(p) and not (p.get("metadata") or {}).get("deletionTimestamp")
    ]
    current = latest_per_node(attempts, group.attempt) if nodes > 1 else attempts
    index_of = {a["podName"]: a["index"] for a in attempts}
    if nodes > 1 and len(active) < nodes and not any(
        attempt_failed(a) and a.get("reason") not in (TERMINATED, STOPPED) for a in current
    ):
        quota = _quota_state(obs, pods, now, settings)
        if quota is not None:
            return quota
    if active:
        pod = _pick(active) if nodes > 1 else active[-1]
        name = pod["metadata"]["name"]
        idx = index_of.get(name, 0)
        who = f"pod {name} (node {render.pod_node_index(pod)})" if nodes > 1 else f"pod {name}"
        created = (pod.get("metadata") or {}).get("creationTimestamp")
        started = pod_running_since(pod)
        if started is not None:
            if nodes > 1:  # _pick prefers pods that do not run: all active pods run
                shown = sorted(active, key=lambda p: render.pod_node_index(p) or 0)
                where = ", ".join(
                    f"node {render.pod_node_index(p)}: {p['metadata']['name']} on {(p.get('spec') or {}).get('nodeName') or '?'}"
                    for p in shown[:8]
                ) + (f", ... ({len(shown) - 8} more)" if len(shown) > 8 else "")
                msg = f"attempt {idx}: {len(active)}/{nodes} nodes running ({where})"
                started = min(pod_running_since(p) or started for p in active)
            else:
                node = (pod.get("spec") or {}).get("nodeName") or "?"
                msg = f"attempt {idx}: pod {name} is running on node {node}"
            stage = (progress or {}).get("stage")
            phase = _STAGE_PHASE.get(stage or "", Phase.running.value)
            state = _State(running=("True", TRAINER_RUNNING, msg), phase=phase, message=msg)
            state.stalled = _stalled(progress, started, now, settings)
            if state.stalled[0] == "True":
                state.message = state.stalled[2]
            return state
        unsched = pod_unschedulable(pod)
        if unsched is not None:
            since = unsched.get("lastTransitionTime") or created
            waited = elapsed(now, since)
            sched_msg = truncate(unsched.get("message") or "no node fits")
            if waited >= settings.unschedulable_timeout_seconds:
                msg = (
                    f"{who} could not be scheduled for {int(waited)}s (unschedulable timeout "
                    f"{int(settings.unschedulable_timeout_seconds)}s): {sched_msg}"
                )
                return _terminal(UNSCHEDULABLE, msg, delete=[name])
            msg = f"{who} cannot be scheduled: {sched_msg}"
            return _State(running=("True", UNSCHEDULABLE, msg), phase=Phase.pending.value, message=msg)
        waiting = pod_waiting(pod) or {}
        wreason = waiting.get("reason") or ""
        wmsg = truncate(waiting.get("message") or wreason)
        since = (pod.get("status") or {}).get("startTime") or created
        if wreason in IMAGE_PULL_REASONS:
            waited = elapsed(now, since)
            if waited >= settings.image_pull_grace_seconds:
                msg = f"image {obs.image} could not be pulled for {int(waited)}s: {wmsg}; {who} deleted"
                return _terminal(IMAGE_PULL_FAILED, msg, delete=[name])
            msg = (
                f"pulling image {obs.image} failed ({wreason}): {wmsg}; the job fails if it cannot be "
                f"pulled within {int(settings.image_pull_grace_seconds)}s"
            )
            return _State(running=("True", IMAGE_PULL_BACKOFF, msg), phase=Phase.starting.value, message=msg)
        if wreason == CONTAINER_CONFIG_ERROR:
            waited = elapsed(now, since)
            missing = SECRET_NOT_FOUND_MESSAGE.search(waiting.get("message") or "")
            if missing:
                reason = SECRET_NOT_FOUND
                base = (
                    f"Secret {missing.group(1)!r} not found in namespace {namespace} "
                    f"(spec.storage.credentialsSecretRef.name): create it with keys AWS_ACCESS_KEY_ID and "
                    f"AWS_SECRET_ACCESS_KEY"
                )
            else:
                reason = CONTAINER_CONFIG_ERROR
                base = f"{who} cannot start: {wmsg}"
            if waited >= settings.container_config_grace_seconds:
                return _terminal(reason, f"{base}; gave up after {int(waited)}s", delete=[name])
            msg = f"{base}; the job fails if this lasts {int(settings.container_config_grace_seconds)}s"
            return _State(running=("True", reason, msg), phase=Phase.starting.value, message=msg)
        msg = f"attempt {idx}: {who} is starting" + (f" ({wreason})" if wreason else "")
        if nodes > 1:
            running = sum(1 for p in active if pod_running_since(p) is not None)
            msg += f"; {running}/{nodes} nodes running"
        scheduled = bool((pod.get("spec") or {}).get("nodeName"))
        return _State(
            running=("True", STARTING, msg),
            phase=Phase.starting.value if scheduled else Phase.pending.value,
            message=msg,
        )

    failed = [a for a in current if attempt_failed(a)]
    real = [a for a in failed if a.get("reason") not in (TERMINATED, STOPPED)]
    if nodes > 1 and real:  # the Job controller is about to fail the Job: the group restarts
        msg = f"{describe_attempt(group_cause(real) or real[-1])}; the group restarts"
        return _State(running=("True", RESTARTING, msg), phase=Phase.pending.value, message=msg)
    done = [p for p in pods if (pod_terminated(p) or {}).get("exitCode") == 0]
    if done:  # the trainer succeeded; the Job controller has not marked the Job Complete yet
        name = done[-1]["metadata"]["name"]
        if nodes > 1:
            msg = f"attempt {group.attempt}: {len(done)}/{nodes} nodes succeeded; waiting for Job {obs.job_name} to complete"
        else:
            msg = f"attempt {index_of.get(name, 0)}: pod {name} succeeded; waiting for Job {obs.job_name} to complete"
        stage = (progress or {}).get("stage")
        # The trainer exited 0: never show Running again (it would flip back from Uploading).
        phase = Phase.merging.value if stage == contract.STAGE_MERGING else Phase.uploading.value
        return _State(running=("True", FINISHING, msg), phase=phase, message=msg)
    quota = _quota_state(obs, pods, now, settings)
    if quota is not None:
        return quota
    if failed and nodes == 1:
        msg = f"{describe_attempt(failed[-1])}; waiting for the next attempt"
        return _State(running=("True", RETRYING, msg), phase=Phase.pending.value, message=msg)
    if nodes > 1:
        msg = f"Job {obs.job_name} created; waiting for its {nodes} pods"
        if group.restart_of is not None:
            msg = f"run {obs.run} (group attempt {group.attempt}) restarts run {group.restart_of}: " + msg
    else:
        msg = f"Job {obs.job_name} created; waiting for its pod"
    return _State(running=("True", PENDING, msg), phase=Phase.pending.value, message=msg)


def _terminal(reason: str, msg: str, delete: list[str] | None = None) -> _State:
    return _State(
        running=("False", reason, msg), failed=("True", reason, msg), complete=("False", reason, ""),
        phase=Phase.failed.value, message=msg, stop_reason=reason, delete_pods=list(delete or []),
    )


def _stalled(progress: Mapping[str, Any] | None, started: str, now: datetime, settings: OperatorSettings) -> tuple[str, str, str]:
    progress = progress or {}
    ref = parse_time(started)
    reported = parse_time(progress.get("updatedAt"))
    if reported is not None and (ref is None or reported > ref):
        ref = reported
    else:
        reported = None  # a report from an earlier attempt does not count
    if ref is None:
        return ("False", "ProgressReported", "")
    quiet = (now - ref).total_seconds()
    if quiet <= settings.stalled_timeout_seconds:
        return ("False", "ProgressReported", "")
    if reported is None:
        msg = f"the trainer has reported no progress in {int(quiet)}s since it started (stalled timeout {int(settings.stalled_timeout_seconds)}s)"
    else:
        msg = (
            f"no progress report for {int(quiet)}s (stalled timeout {int(settings.stalled_timeout_seconds)}s); "
            f"last report at {progress.get('updatedAt')}, step {progress.get('step')}"
        )
    return ("True", NO_PROGRESS, msg)


def _condition(old: Mapping[str, Any] | None, typ: str, value: tuple[str, str, str], now: str, generation: int | None) -> dict[str, Any]:
    status, reason, message = value
    keep = old is not None and old.get("status") == status and old.get("lastTransitionTime")
    cond = {
        "type": typ,
        "status": status,
        "reason": reason,
        "message": truncate(message),
        "lastTransitionTime": old["lastTransitionTime"] if keep else now,
    }
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond


def _is_true(conds: Mapping[str, Mapping[str, Any]], typ: str) -> bool:
    cond = conds.get(typ)
    return bool(cond and cond.get("status") == "True")


def compute_status(
    body: Mapping[str, Any], obs: Observed, now: datetime, settings: OperatorSettings
) -> StatusResult:
    """The status the QLoRAJob should have, the patch, the events and the side effects."""
    meta = body.get("metadata") or {}
    old = dict(body.get("status") or {})
    generation = meta.get("generation")
    namespace = meta.get("namespace", "")
    now_s = fmt_time(now)
    old_conds = {c.get("type"): c for c in old.get("conditions") or [] if c.get("type")}
    same_run = obs.run is not None and old.get("run") == obs.run
    nodes = render.job_nodes(obs.job)
    group = render.group_attempt_of(obs.job)
    # A group restart continues the failed run: its attempts, progress and start time carry on.
    continuing = not same_run and group.restart_of is not None and old.get("run") == group.restart_of
    carry = same_run or continuing
    progress = old.get("progress") if carry else None

    attempts = attach_checkpoint_decision(attempts_with_job_failure(merge_attempts(
        old.get("attempts") or [] if carry else [], obs.pods, group.attempt if nodes > 1 else None
    ), obs.job), progress)
    evicted = conditions_of(obs.workload).get("Evicted") if obs.queued and obs.workload else None
    if evicted and evicted.get("status") == "True":
        # Kueue evicted the Workload (e.g. preempted it) and suspended the Job: the pods it
        # stopped (SIGTERM, exit 143; or deleted before their end was seen) are a disruption,
        # not a failure of the run.
        said = truncate(f"Kueue evicted the Workload ({evicted.get('reason')}): {evicted.get('message') or ''}")
        attempts = [{**a, "reason": DISRUPTED, "message": said} if a.get("reason") in (TERMINATED, STOPPED) else a
                    for a in attempts]
    # This run's artifacts (a pod exited 0), else the ones recorded for this run; the
    # earlier run's recorded ones stay listed until this run completes (below).
    training_run = group.training_run or obs.run
    recorded = old.get("artifacts") or None
    recorded_here = bool(recorded) and same_run and recorded.get("run") in (None, training_run)
    artifacts = run_artifacts(obs, group) or (recorded if recorded_here else None)

    sticky = (
        same_run
        and not obs.invalid_spec
        and (_is_true(old_conds, "Complete") or _is_true(old_conds, "Failed"))
        and old_conds.get("Failed", {}).get("reason") != INVALID_SPEC
    )
    if sticky:
        conditions = [dict(old_conds[t]) for t in CONDITION_ORDER if t in old_conds and t != SPEC_REJECTED_TYPE]
        state_phase = old.get("phase") or (Phase.succeeded.value if _is_true(old_conds, "Complete") else Phase.failed.value)
        message = old.get("message") or ""
        stop_reason = None
        delete: list[str] = []
        restart = None
    else:
        state = _decide(obs, attempts, artifacts, progress, now, settings, namespace)
        values = {
            ConditionType.running.value: state.running,
            ConditionType.complete.value: state.complete,
            ConditionType.failed.value: state.failed,
            ConditionType.suspended.value: state.suspended,
            ConditionType.stalled.value: state.stalled,
        }
        if obs.spec_rejected and state.complete[0] != "True" and state.failed[0] != "True":
            values[SPEC_REJECTED_TYPE] = ("True", "TrainingFieldsImmutable", obs.spec_rejected)
        conditions = [
            _condition(old_conds.get(t), t, values[t], now_s, generation) for t in CONDITION_ORDER if t in values
        ]
        state_phase = state.phase
        message = state.message
        stop_reason = state.stop_reason
        delete = state.delete_pods
        restart = state.restart

    conds = {c["type"]: c for c in conditions}
    terminal = _is_true(conds, "Complete") or _is_true(conds, "Failed")
    job_status = (obs.job or {}).get("status") or {}
    start_time = (old.get("startTime") if continuing else None) or job_status.get("startTime") or (
        old.get("startTime") if same_run else None
    )
    completion = None
    if terminal:
        completion = (old.get("completionTime") if same_run else None) or job_status.get("completionTime") or now_s
    # A failed merge check ends the run with its adapter published (and the check's numbers):
    # those are this run's artifacts, listed like a completed run's.
    merge_check_failed = (
        _is_true(conds, "Failed") and conds["Failed"].get("reason") == MERGE_CHECK_FAILED
        and bool(artifacts) and bool(artifacts.get("adapterUri"))
    )
    if not _is_true(conds, "Complete") and not merge_check_failed:
        # Until this run completes, status.artifacts keeps the last successful run's
        # (artifacts.run names it; every run writes under its own <output>/run-<N>/, so
        # those stay valid in storage while this one trains).
        artifacts = None if recorded_here else recorded
    if sticky and _is_true(conds, "Failed") and obs.job is not None:
        # Failed by the operator (e.g. ImagePullFailed) while the Job is still active: stop it (again).
        if job_result(obs.job)[0] is None and not job_suspended(obs.job):
            stop_reason = conds["Failed"].get("reason") or "Failed"
            delete = [
                p["metadata"]["name"] for p in obs.pods
                if not pod_finished(p) and not (p.get("metadata") or {}).get("deletionTimestamp")
            ]

    desired: dict[str, Any] = {
        "observedGeneration": generation,
        "run": obs.run,
        "jobName": obs.job_name,
        "phase": state_phase,
        "conditions": conditions,
        "attempts": attempts,
        "artifacts": artifacts,
        "startTime": start_time,
        "completionTime": completion,
        "message": truncate(message) or None,
        "queue": queue_status(obs.workload, obs.local_queue) if obs.queued else None,
    }
    if obs.queued and obs.workload is None and same_run and old.get("queue"):
        desired["queue"] = old["queue"]  # not read this time (the Job is finished or gone): keep what was seen
    patch = {k: v for k, v in desired.items() if old.get(k) != v and not (v is None and k not in old)}
    if not carry and old.get("progress") is not None:
        patch["progress"] = None  # a new run: the previous run's progress is history
    events = transition_events(
        old_conds, conds, old.get("attempts") or [] if carry else [], attempts, terminal, group=nodes > 1
    )
    return StatusResult(
        status=desired, patch=patch, events=events, delete_pods=delete, stop_reason=stop_reason, terminal=terminal,
        restart=restart,
    )


def transition_events(
    old_conds: Mapping[str, Mapping[str, Any]],
    new_conds: Mapping[str, Mapping[str, Any]],
    old_attempts: Sequence[Mapping[str, Any]],
    new_attempts: Sequence[Mapping[str, Any]],
    terminal: bool,
    *,
    group: bool = False,
) -> list[EventSpec]:
    """One Event per transition: a failed attempt, a changed Running reason, a condition flip.

    ``group`` (nodes > 1): pods stopped because their group was already failing
    (Terminated, Stopped) get no event of their own when another pod of the same group
    attempt failed for a reason.
    """
    events: list[EventSpec] = []
    decided_before = {a.get("podName") for a in old_attempts if a.get("checkpoint")}
    events += [checkpoint_event(a) for a in new_attempts if a.get("checkpoint") and a.get("podName") not in decided_before]
    finished_before = {a.get("podName") for a in old_attempts if attempt_finished(a)}
    casualty = (TERMINATED, STOPPED)
    real_failure = {
        a.get("index") for a in new_attempts if attempt_failed(a) and a.get("reason") not in casualty
    } if group else set()
    for attempt in new_attempts:
        if attempt.get("podName") in finished_before or not attempt_failed(attempt):
            continue
        if group and attempt.get("reason") in casualty and attempt.get("index") in real_failure:
            continue
        tail = "" if terminal else ("; the group restarts" if group else "; the run will retry")
        events.append(EventSpec("Warning", attempt.get("reason") or "AttemptFailed", truncate(describe_attempt(attempt) + tail)))

    def changed(typ: str) -> tuple[Mapping[str, Any] | None, Mapping[str, Any] | None, bool]:
        old, new = old_conds.get(typ), new_conds.get(typ)
        if new is None:
            return old, new, old is not None
        if old is None:
            return old, new, True
        return old, new, old.get("status") != new.get("status") or old.get("reason") != new.get("reason")

    old, new, flip = changed("Running")
    if flip and new is not None and new.get("status") == "True":
        reason = new.get("reason") or "Running"
        kind = "Warning" if reason in WARNING_REASONS else "Normal"
        events.append(EventSpec(kind, "Running" if reason == TRAINER_RUNNING else reason, new.get("message") or ""))
    old, new, flip = changed("Complete")
    if flip and new is not None and new.get("status") == "True":
        events.append(EventSpec("Normal", "Completed", new.get("message") or ""))
    old, new, flip = changed("Failed")
    if flip and new is not None and new.get("status") == "True":
        events.append(EventSpec("Warning", new.get("reason") or "Failed", new.get("message") or ""))
    old, new, flip = changed("Suspended")
    if flip and new is not None:
        if new.get("status") == "True":
            events.append(EventSpec("Normal", new.get("reason") or "Suspended", new.get("message") or ""))
        elif old is not None and old.get("status") == "True":
            events.append(EventSpec("Normal", "Resumed", "the run is no longer suspended"))
    old, new, flip = changed("Stalled")
    if flip and new is not None:
        if new.get("status") == "True":
            events.append(EventSpec("Warning", "Stalled", new.get("message") or ""))
        elif old is not None and old.get("status") == "True":
            events.append(EventSpec("Normal", "ProgressResumed", "the trainer reports progress again"))
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
    return _is_true(conds, "Complete") or _is_true(conds, "Failed")
