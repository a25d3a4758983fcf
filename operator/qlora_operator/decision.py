"""The decision: what state the current run is in, from what the cluster shows (pure).

Input: an :class:`Observed` snapshot of the current run (batch/v1 Job, its Pods, the
Job's Events, the fit check, the Kueue Workload), the run's attempts (kept by
:mod:`qlora_operator.attempts`), its artifacts and progress, ``now`` and the operator
settings. Output: a :class:`State`: the value of each condition (a typed
:class:`ConditionValue`, set through the named state constructors below), the display
phase and message, and the side effects the caller must carry out (stop the run, delete
pods, restart the group). Nothing here calls the API or reads the clock;
:mod:`qlora_operator.status` turns the state into the status patch and the Events (its
docstring has the table of conditions and reasons).

Waiting states that fail the run once they last too long (a pod that cannot be
scheduled or created, an image that cannot be pulled, a container that cannot be
configured) all go through :func:`_wait_then_fail`.

One node (:func:`_one_node`) and several nodes (:func:`_group`, an Indexed Job, see
:mod:`qlora_operator.render`) share the pod states; a group differs in this: the first
failed pod fails the Job, and :func:`_group_failed` decides what the group does next:

- a permanent exit code (:data:`render.PERMANENT_EXIT_CODES`) in any pod of the run,
  or ``activeDeadlineSeconds`` exceeded: Failed, as for one node;
- a disruption (a pod with the ``DisruptionTarget`` condition), or the Job was
  suspended (the user, or Kueue preempting it): restart, not counted;
- anything else: restart, counted; past ``runPolicy.backoffLimit`` counted failures
  the job fails with BackoffLimitExceeded (with backoffLimit 0: the pod's reason).

A restart is Running=True with reason Restarting until every pod of the failed run
has stopped (a terminating trainer writes its checkpoint); then :attr:`State.restart`
asks the caller to start the next run, whose Job records the count
(:class:`render.GroupAttempt`). The attempts (with their ``node``) and the progress of
the failed run carry on into the next one; the group attempt is the attempts' ``index``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

from qlora_operator import render
from qlora_operator.api import (
    BACKOFF_LIMIT_EXCEEDED, CONTAINER_CONFIG_ERROR, DEADLINE_EXCEEDED, DISRUPTED, FINISHING, IMAGE_PULL_BACKOFF,
    IMAGE_PULL_FAILED, INVALID_SPEC, NO_PROGRESS, PENDING, Phase, QUOTA_EXCEEDED, RESTARTING, RETRYING,
    SECRET_NOT_FOUND, STARTING, STOPPED, SUCCEEDED, TERMINATED, TRAINER_RUNNING, UNSCHEDULABLE,
)
from qlora_operator.attempts import (
    SECRET_NOT_FOUND_MESSAGE,
    attempt_failed,
    describe_attempt,
    group_cause,
    latest_per_node,
)
from qlora_operator.objects import (
    elapsed, job_result, job_suspended, parse_time, pod_finished, pod_over, pod_running_since, pod_sort_key,
    pod_terminated, pod_unschedulable, pod_waiting, queue_status, quota_event, quota_first_seen, quota_message,
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
#: Attempt reasons of pods stopped because their group was already failing (not a cause).
CASUALTY_REASONS = (TERMINATED, STOPPED)


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
    #: The run's fit check (:class:`qlora_operator.fitcheck.FitCheck`) while no GPU Job exists.
    fit_check: Any = None
    #: The Kueue Workload of the run's Job (queued runs; None without Kueue or before it made one).
    workload: Mapping[str, Any] | None = None
    local_queue: str = ""


@dataclass(frozen=True)
class GroupRestart:
    """The next run of a failed group (nodes > 1): its number, its Job's annotations, why."""

    run: int
    group: GroupAttempt
    why: str


@dataclass(frozen=True)
class ConditionValue:
    """What one condition should say (``metav1.Condition`` without its times, see ``api.Condition``)."""

    status: Literal["True", "False"]
    reason: str  # CamelCase
    message: str = ""

    @property
    def is_true(self) -> bool:
        """``status`` is "True"."""
        return self.status == "True"


def true(reason: str, message: str = "") -> ConditionValue:
    """The condition holds, for ``reason``."""
    return ConditionValue("True", reason, message)


def false(reason: str, message: str = "") -> ConditionValue:
    """The condition does not hold, for ``reason``."""
    return ConditionValue("False", reason, message)


@dataclass
class State:
    """The decided state of the current run: each condition's value, phase, message, side effects."""

    running: ConditionValue
    complete: ConditionValue = false("NotCompleted")
    failed: ConditionValue = false("NoFailure")
    suspended: ConditionValue = false("NotSuspended")
    stalled: ConditionValue = false("NotRunning")
    phase: str = Phase.pending.value
    message: str = ""
    stop_reason: str | None = None  # the operator declared the run failed: stop its Job
    delete_pods: list[str] = field(default_factory=list)
    restart: GroupRestart | None = None  # start the next run of the group now


# --- the named states ---------------------------------------------------------------


def _waiting(reason: str, msg: str, phase: str) -> State:
    """Running=True: the run is active and waits for (or does) ``reason``."""
    return State(running=true(reason, msg), phase=phase, message=msg)


def _not_started(reason: str, msg: str) -> State:
    """Running=False, Pending: no GPU Job yet (being created, or the fit check runs)."""
    return State(running=false(reason, msg), phase=Phase.pending.value, message=msg)


def _failed(reason: str, msg: str) -> State:
    """Failed because the Job failed (nothing to stop)."""
    return State(
        running=false(reason, msg), failed=true(reason, msg), complete=false(reason),
        phase=Phase.failed.value, message=msg,
    )


def _stop_and_fail(reason: str, msg: str, delete: list[str] | None = None) -> State:
    """Failed by the operator while the Job is active: the caller stops the Job and deletes ``delete``."""
    return replace(_failed(reason, msg), stop_reason=reason, delete_pods=list(delete or []))


def _invalid(invalid_spec: str) -> State:
    """Failed with InvalidSpec: no run is started."""
    msg = truncate(invalid_spec)
    return State(
        running=false(INVALID_SPEC, "the spec is invalid: no run is started"), failed=true(INVALID_SPEC, msg),
        complete=false(INVALID_SPEC), phase=Phase.failed.value, message=msg,
    )


def _succeeded(artifacts: Mapping[str, Any] | None) -> State:
    """Complete: the Job succeeded; the message names the published artifacts."""
    if artifacts and artifacts.get("adapterUri"):
        msg = f"training finished; adapter at {artifacts['adapterUri']}"
        if artifacts.get("mergedUri"):
            msg += f", merged model at {artifacts['mergedUri']}"
    else:
        msg = "training finished, but the trainer reported no artifacts (no termination message)"
    return State(running=false("Completed", msg), complete=true(SUCCEEDED, msg), phase=Phase.succeeded.value, message=msg)


def _wait_then_fail(
    waited: float, limit: float, wait: tuple[str, str], fail: tuple[str, str], phase: str,
    delete: list[str] | None = None,
) -> State:
    """Running=True with ``wait`` (reason, message) while the run waited less than ``limit``
    seconds (``waited``, seconds, from :func:`objects.elapsed`); from then on Failed with ``fail``
    (reason, message), the Job stopped and the ``delete`` pods deleted."""
    if waited >= limit:
        return _stop_and_fail(*fail, delete=delete)
    return _waiting(*wait, phase)


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


def _suspended(obs: Observed) -> State:
    """Suspended: by runPolicy.suspend, by a Kueue queue (Queued), or otherwise."""
    if obs.suspend_requested:
        reason, msg, phase = "SuspendedByUser", "runPolicy.suspend is true: pods are stopped, checkpoints kept", Phase.suspended.value
    elif obs.queued:
        reason, msg = _queued_message(obs)
        phase = Phase.queued.value
    else:
        reason, msg, phase = "Suspended", f"Job {obs.job_name} is suspended", Phase.suspended.value
    return State(running=false(reason, msg), suspended=true(reason, msg), phase=phase, message=msg)


def _not_retried(attempt: Mapping[str, Any]) -> State:
    """Failed with the attempt's reason: its exit code is permanent (podFailurePolicy FailJob)."""
    return _failed(attempt.get("reason", "Failed"), f"{describe_attempt(attempt)}; this exit code is not retried")


def _out_of_retries(cause: Mapping[str, Any] | None, what: str, failures: int, limit: int, counted: str) -> State:
    """Failed after ``failures`` counted failures of ``limit`` (runPolicy.backoffLimit) allowed:
    with backoffLimit 0 the cause's own reason, else BackoffLimitExceeded naming it."""
    if limit == 0:
        reason = cause.get("reason", "Failed") if cause is not None else "JobFailed"
        return _failed(reason, f"{what}; runPolicy.backoffLimit is 0 (no retries)")
    reason = cause.get("reason", "Error") if cause is not None else "Error"
    return _failed(BACKOFF_LIMIT_EXCEEDED, f"{reason}: {failures} {counted} failed (runPolicy.backoffLimit {limit}); last {what}")


# --- the run as this decision sees it -------------------------------------------------------


@dataclass(frozen=True)
class _Run:
    """The current run's Job, pods and attempts, and what the decision needs besides."""

    obs: Observed
    attempts: list[dict[str, Any]]
    progress: Mapping[str, Any] | None
    now: datetime
    settings: OperatorSettings
    namespace: str
    nodes: int
    group: GroupAttempt
    pods: list[Mapping[str, Any]]
    active: list[Mapping[str, Any]]  # pods whose attempt is not over and that are not being deleted, oldest first
    index_of: dict[str, int]  # pod name -> attempt index

    def index(self, pod: Mapping[str, Any]) -> int:
        """The attempt index of ``pod`` (0 before it is recorded)."""
        return self.index_of.get(pod["metadata"]["name"], 0)

    def succeeded_pods(self) -> list[Mapping[str, Any]]:
        """The pods whose trainer exited 0."""
        return [p for p in self.pods if (pod_terminated(p) or {}).get("exitCode") == 0]


def decide(
    obs: Observed, attempts: list[dict[str, Any]], artifacts: dict[str, Any] | None,
    progress: Mapping[str, Any] | None, now: datetime, settings: OperatorSettings, namespace: str,
) -> State:
    """The state of the run ``obs`` shows (``namespace``: the QLoRAJob's, for messages)."""
    if obs.invalid_spec:
        return _invalid(obs.invalid_spec)
    if obs.job is None:
        return _before_job(obs)
    outcome, job_reason, job_message = job_result(obs.job)
    if outcome == "succeeded":
        return _succeeded(artifacts)
    pods = list(obs.pods)
    run = _Run(
        obs=obs, attempts=attempts, progress=progress, now=now, settings=settings, namespace=namespace,
        nodes=render.job_nodes(obs.job), group=render.group_attempt_of(obs.job), pods=pods,
        active=[
            p for p in sorted(pods, key=pod_sort_key)
            if not pod_over(p) and not (p.get("metadata") or {}).get("deletionTimestamp")
        ],
        index_of={a["podName"]: a["index"] for a in attempts},
    )
    if outcome == "failed":
        if run.nodes > 1 and job_reason != DEADLINE_EXCEEDED:
            return _group_failed(run, job_message)
        return _job_failed(obs, job_reason, job_message, attempts)
    if job_suspended(obs.job):
        return _suspended(obs)
    return _group(run) if run.nodes > 1 else _one_node(run)


def _before_job(obs: Observed) -> State:
    """No GPU Job: the fit check refused the run or still runs, or the Job is being created."""
    fit = obs.fit_check
    if fit is not None and fit.state == "failed":
        # Refused before the GPU Job exists: no GPU was requested and no weight was read.
        return _failed(fit.reason, truncate(f"{fit.message} (fit check Job {fit.job_name}; no GPU was requested)"))
    if fit is not None and fit.state == "running":
        return _not_started(fit.reason, f"checking that the model fits the requested GPUs before requesting them ({fit.message})")
    return _not_started(PENDING, f"creating Job {obs.job_name}" if obs.job_name else "waiting for the operator")


def _job_failed(obs: Observed, job_reason: str, job_message: str, attempts: Sequence[Mapping[str, Any]]) -> State:
    """The Job of a one-node run (or any run past its deadline) failed: say why."""
    failed = [a for a in attempts if attempt_failed(a) and a.get("reason") != DISRUPTED]
    last = failed[-1] if failed else None
    if job_reason == DEADLINE_EXCEEDED:
        msg = f"runPolicy.activeDeadlineSeconds ({obs.active_deadline_seconds}s) exceeded"
        if last is not None:
            msg += f"; last {describe_attempt(last)}"
        return _failed(DEADLINE_EXCEEDED, msg)
    if job_reason == "PodFailurePolicy" and last is not None:
        return _not_retried(last)
    if job_reason == BACKOFF_LIMIT_EXCEEDED and last is not None:
        return _out_of_retries(last, describe_attempt(last), len(failed), obs.backoff_limit, "attempts")
    if last is not None and not job_reason:
        return _failed(last.get("reason", "Failed"), describe_attempt(last))
    return _failed(job_reason or "JobFailed", truncate(job_message) or "the Job failed")


# --- one node ---------------------------------------------------------------------------------


def _one_node(run: _Run) -> State:
    """The active run of one node: its newest pod, else why no pod runs."""
    if run.active:
        pod = run.active[-1]
        name = pod["metadata"]["name"]
        started = pod_running_since(pod)
        if started is not None:
            node = (pod.get("spec") or {}).get("nodeName") or "?"
            return _trainer_running(run, f"attempt {run.index(pod)}: pod {name} is running on node {node}", started)
        return _pod_not_running(run, pod, f"pod {name}")
    done = run.succeeded_pods()
    if done:
        name = done[-1]["metadata"]["name"]
        return _finishing(run, f"attempt {run.index(done[-1])}: pod {name} succeeded; waiting for Job {run.obs.job_name} to complete")
    quota = _quota_state(run)
    if quota is not None:
        return quota
    failed = [a for a in run.attempts if attempt_failed(a)]
    if failed:
        return _waiting(RETRYING, f"{describe_attempt(failed[-1])}; waiting for the next attempt", Phase.pending.value)
    return _waiting(PENDING, f"Job {run.obs.job_name} created; waiting for its pod", Phase.pending.value)


# --- several nodes ------------------------------------------------------------------------------


def _group(run: _Run) -> State:
    """The active run of several nodes: the pod that says most about the group, else why none runs."""
    current = latest_per_node(run.attempts, run.group.attempt)
    real = [a for a in current if attempt_failed(a) and a.get("reason") not in CASUALTY_REASONS]
    if len(run.active) < run.nodes and not real:
        quota = _quota_state(run)
        if quota is not None:
            return quota
    if run.active:
        pod = _pick(run.active)
        started = pod_running_since(pod)
        if started is not None:  # _pick prefers pods that do not run: all active pods run
            first = min(pod_running_since(p) or started for p in run.active)
            return _trainer_running(run, _group_running_message(run, pod), first)
        running = sum(1 for p in run.active if pod_running_since(p) is not None)
        who = f"pod {pod['metadata']['name']} (node {render.pod_node_index(pod)})"
        return _pod_not_running(run, pod, who, f"; {running}/{run.nodes} nodes running")
    if real:  # the Job controller is about to fail the Job: the group restarts
        msg = f"{describe_attempt(group_cause(real) or real[-1])}; the group restarts"
        return _waiting(RESTARTING, msg, Phase.pending.value)
    done = run.succeeded_pods()
    if done:
        return _finishing(run, (
            f"attempt {run.group.attempt}: {len(done)}/{run.nodes} nodes succeeded; "
            f"waiting for Job {run.obs.job_name} to complete"
        ))
    quota = _quota_state(run)
    if quota is not None:
        return quota
    msg = f"Job {run.obs.job_name} created; waiting for its {run.nodes} pods"
    if run.group.restart_of is not None:
        msg = f"run {run.obs.run} (group attempt {run.group.attempt}) restarts run {run.group.restart_of}: " + msg
    return _waiting(PENDING, msg, Phase.pending.value)


def _group_running_message(run: _Run, pod: Mapping[str, Any]) -> str:
    """"attempt N: k/n nodes running (node 0: pod on node, ...)" (at most 8 listed)."""
    shown = sorted(run.active, key=lambda p: render.pod_node_index(p) or 0)
    where = ", ".join(
        f"node {render.pod_node_index(p)}: {p['metadata']['name']} on {(p.get('spec') or {}).get('nodeName') or '?'}"
        for p in shown[:8]
    ) + (f", ... ({len(shown) - 8} more)" if len(shown) > 8 else "")
    return f"attempt {run.index(pod)}: {len(run.active)}/{run.nodes} nodes running ({where})"


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


def _group_failed(run: _Run, job_message: str) -> State:
    """The Job of a group run failed: fail the QLoRAJob, or restart the group as the next run."""
    obs, group = run.obs, run.group
    failed = [a for a in latest_per_node(run.attempts, group.attempt) if attempt_failed(a)]
    permanent = [a for a in failed if a.get("exitCode") in render.PERMANENT_EXIT_CODES]
    if permanent:
        return _not_retried(permanent[0])
    disrupted = [a for a in failed if a.get("reason") == DISRUPTED]
    cause = disrupted[0] if disrupted else group_cause(failed)
    what = describe_attempt(cause) if cause is not None else (truncate(job_message) or f"Job {obs.job_name} failed")
    suspended = job_suspended(obs.job)
    counted = not (suspended or disrupted)
    failures = group.failures + (1 if counted else 0)
    if counted and failures > obs.backoff_limit:
        return _out_of_retries(cause, what, failures, obs.backoff_limit, "group attempts")
    number = obs.run or 0
    if suspended:
        why = f"run {number} was suspended"
    elif disrupted:
        why = f"run {number} was disrupted: {what}; not counted against runPolicy.backoffLimit"
    else:
        why = f"run {number} failed: {what}; {failures} of runPolicy.backoffLimit {obs.backoff_limit} retries used"
    stopping = [p["metadata"]["name"] for p in run.pods if not pod_finished(p)]
    restart = None
    if stopping:
        msg = f"{why}; waiting for {len(stopping)} pod(s) to stop ({', '.join(sorted(stopping)[:4])}) before run {number + 1}"
    else:
        msg = f"{why}; restarting all {run.nodes} nodes as run {number + 1} from the newest checkpoint"
        restart = GroupRestart(
            run=number + 1, group=GroupAttempt(group.attempt + 1, failures, number, group.training_run or number), why=why
        )
    if suspended:
        return replace(_suspended(obs), restart=restart)
    return replace(_waiting(RESTARTING, msg, Phase.pending.value), restart=restart)


# --- the pod states both share ----------------------------------------------------------------


def _trainer_running(run: _Run, msg: str, started: str) -> State:
    """Running=True, TrainerRunning (phase from the trainer's stage); Stalled when it went quiet."""
    phase = _STAGE_PHASE.get((run.progress or {}).get("stage") or "", Phase.running.value)
    state = _waiting(TRAINER_RUNNING, msg, phase)
    state.stalled = _stalled(run.progress, started, run.now, run.settings)
    if state.stalled.is_true:
        state.message = state.stalled.message
    return state


def _finishing(run: _Run, msg: str) -> State:
    """Running=True, Finishing: the trainer exited 0; the Job controller has not marked the Job Complete yet."""
    # Never show Running again (it would flip back from Uploading).
    stage = (run.progress or {}).get("stage")
    return _waiting(FINISHING, msg, Phase.merging.value if stage == contract.STAGE_MERGING else Phase.uploading.value)


def _pod_not_running(run: _Run, pod: Mapping[str, Any], who: str, starting_note: str = "") -> State:
    """An active pod whose trainer does not run yet: unschedulable, image pull or container
    config trouble (each failing the run after its grace period), else starting."""
    name = pod["metadata"]["name"]
    created = (pod.get("metadata") or {}).get("creationTimestamp")
    settings = run.settings
    unsched = pod_unschedulable(pod)
    if unsched is not None:
        waited = elapsed(run.now, unsched.get("lastTransitionTime") or created)
        why = truncate(unsched.get("message") or "no node fits")
        limit = settings.unschedulable_timeout_seconds
        return _wait_then_fail(
            waited, limit, (UNSCHEDULABLE, f"{who} cannot be scheduled: {why}"),
            (UNSCHEDULABLE, f"{who} could not be scheduled for {int(waited)}s (unschedulable timeout {int(limit)}s): {why}"),
            Phase.pending.value, delete=[name],
        )
    waiting = pod_waiting(pod) or {}
    wreason = waiting.get("reason") or ""
    wmsg = truncate(waiting.get("message") or wreason)
    waited = elapsed(run.now, (pod.get("status") or {}).get("startTime") or created)
    if wreason in IMAGE_PULL_REASONS:
        image, limit = run.obs.image, settings.image_pull_grace_seconds
        return _wait_then_fail(
            waited, limit,
            (IMAGE_PULL_BACKOFF, f"pulling image {image} failed ({wreason}): {wmsg}; the job fails if it cannot be "
                                 f"pulled within {int(limit)}s"),
            (IMAGE_PULL_FAILED, f"image {image} could not be pulled for {int(waited)}s: {wmsg}; {who} deleted"),
            Phase.starting.value, delete=[name],
        )
    if wreason == CONTAINER_CONFIG_ERROR:
        missing = SECRET_NOT_FOUND_MESSAGE.search(waiting.get("message") or "")
        if missing:
            reason = SECRET_NOT_FOUND
            base = (
                f"Secret {missing.group(1)!r} not found in namespace {run.namespace} "
                f"(spec.storage.credentialsSecretRef.name): create it with keys AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY"
            )
        else:
            reason, base = CONTAINER_CONFIG_ERROR, f"{who} cannot start: {wmsg}"
        limit = settings.container_config_grace_seconds
        return _wait_then_fail(
            waited, limit, (reason, f"{base}; the job fails if this lasts {int(limit)}s"),
            (reason, f"{base}; gave up after {int(waited)}s"), Phase.starting.value, delete=[name],
        )
    msg = f"attempt {run.index(pod)}: {who} is starting" + (f" ({wreason})" if wreason else "") + starting_note
    scheduled = bool((pod.get("spec") or {}).get("nodeName"))
    return _waiting(STARTING, msg, Phase.starting.value if scheduled else Phase.pending.value)


def _quota_state(run: _Run) -> State | None:
    """QuotaExceeded while the Job controller cannot create a pod (a FailedCreate newer than the
    last pod), failing the run after the unschedulable timeout; None when no such event."""
    events = run.obs.job_events
    quota = quota_event(events)
    last_pod_created = max((pod_sort_key(p)[0] for p in run.pods), default="")
    if quota is None or (quota.get("lastTimestamp") or quota.get("eventTime") or "") < last_pod_created:
        return None
    waited = elapsed(run.now, quota_first_seen(events))
    why = quota_message(quota)
    limit = run.settings.unschedulable_timeout_seconds
    return _wait_then_fail(
        waited, limit, (QUOTA_EXCEEDED, f"the trainer pod cannot be created: {why}"),
        (QUOTA_EXCEEDED, f"the trainer pod could not be created for {int(waited)}s (timeout {int(limit)}s): {why}"),
        Phase.pending.value,
    )


def _stalled(progress: Mapping[str, Any] | None, started: str, now: datetime, settings: OperatorSettings) -> ConditionValue:
    """Stalled=True when neither the pod's start nor the trainer's last report (of this attempt)
    is within ``settings.stalled_timeout_seconds`` of ``now``."""
    progress = progress or {}
    ref = parse_time(started)
    reported = parse_time(progress.get("updatedAt"))
    if reported is not None and (ref is None or reported > ref):
        ref = reported
    else:
        reported = None  # a report from an earlier attempt does not count
    if ref is None:
        return false("ProgressReported")
    quiet = (now - ref).total_seconds()
    limit = settings.stalled_timeout_seconds
    if quiet <= limit:
        return false("ProgressReported")
    if reported is None:
        return true(NO_PROGRESS, f"the trainer has reported no progress in {int(quiet)}s since it started (stalled timeout {int(limit)}s)")
    return true(NO_PROGRESS, (
        f"no progress report for {int(quiet)}s (stalled timeout {int(limit)}s); "
        f"last report at {progress.get('updatedAt')}, step {progress.get('step')}"
    ))
