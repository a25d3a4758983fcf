"""Pure status translation: what the cluster shows -> the QLoRAJob's status.

Input: the QLoRAJob body (its current status is the baseline for transitions), an
:class:`Observed` snapshot of the current run (batch/v1 Job, its Pods, the Job's
Events), ``now`` and the operator settings. Output: a :class:`StatusResult` with the
status fields the operator owns, the merge patch that brings the object there (empty
when nothing changed), the Events to post for the transitions, and the side effects
the caller must carry out (stop the run, delete pods). Nothing here calls the API or
reads the clock.

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

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from qlora_operator import render
from qlora_operator.api import MAX_EXPORTS, ConditionType, MergeCheck, Phase, TrackingArtifacts
from qlora_operator.render import GroupAttempt
from qlora_operator.settings import OperatorSettings
from qlora_trainer import contract
from qlora_trainer.contract import parse_termination_message

# --- reasons ------------------------------------------------------------------

INVALID_SPEC = "InvalidSpec"
UNSCHEDULABLE = "Unschedulable"
QUOTA_EXCEEDED = "QuotaExceeded"
IMAGE_PULL_BACKOFF = "ImagePullBackOff"
IMAGE_PULL_FAILED = "ImagePullFailed"
SECRET_NOT_FOUND = "SecretNotFound"
CONTAINER_CONFIG_ERROR = "CreateContainerConfigError"
OOM_KILLED = "OOMKilled"
#: Exit 137 (SIGKILL) without the container runtime's ``OOMKilled``: killed after the
#: termination grace period, by a user (``kill -9``, a forced delete) or another process.
KILLED = contract.KILLED
MSG_KILLED = (
    "exit 137: the container got SIGKILL, and the container runtime reported no OOM kill (reason "
    "{reason}): killed after terminationGracePeriodSeconds because it did not stop on SIGTERM, by a "
    "forced delete or kill -9, or by another process; not a memory limit"
)
CUDA_OOM = contract.CUDA_OOM
INVALID_DATA = contract.INVALID_DATA
INVALID_CONFIG = contract.INVALID_CONFIG
NON_FINITE_LOSS = contract.NON_FINITE_LOSS
INSUFFICIENT_GPU_MEMORY = contract.INSUFFICIENT_GPU_MEMORY
#: Exit 8: the merged model failed its equivalence check; the adapter is published.
MERGE_CHECK_FAILED = contract.MERGE_CHECK_FAILED
STORAGE_ERROR = contract.STORAGE_ERROR
DEADLINE_EXCEEDED = "DeadlineExceeded"
BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
DISRUPTED = "Disrupted"
#: An exception the trainer has no name for (exit 1); the message is its last line.
TRAINER_ERROR = contract.TRAINER_ERROR
SUCCEEDED = contract.SUCCEEDED
TRAINER_RUNNING = "TrainerRunning"
PENDING = "Pending"
STARTING = "Starting"
RETRYING = "Retrying"
FINISHING = "Finishing"
RESTARTING = "Restarting"
#: An attempt whose pod was gone before its end was seen (its group's run had failed).
STOPPED = "Stopped"

#: Display phase for the trainer's reported stage while its pod runs ("Done": the
#: trainer is finishing its last writes and exiting).
_STAGE_PHASE = {
    contract.STAGE_MERGING: Phase.merging.value,
    contract.STAGE_UPLOADING: Phase.uploading.value,
    contract.STAGE_DONE: Phase.uploading.value,
}
TERMINATED = "Terminated"
SPEC_REJECTED = "SpecRejected"
NO_PROGRESS = "NoProgress"

#: qlora-train exit codes that name their reason alone -> attempt reasons (the contract's table).
EXIT_REASONS = contract.REASONS_BY_CODE
#: Exit codes whose termination message carries published artifacts (0, and 8: the adapter).
ARTIFACT_EXIT_CODES = contract.ARTIFACT_EXIT_CODES
#: URI fields of the termination message's ``artifacts`` copied into ``status.artifacts``.
ARTIFACT_URI_FIELDS = ("adapterUri", "mergedUri", "manifestUri", "lastCheckpointUri", "lossPlotUri")
#: Fields of ``artifacts.mergeCheck`` copied into ``status.artifacts.mergeCheck``: those of api.MergeCheck.
MERGE_CHECK_FIELDS = tuple(field.alias or name for name, field in MergeCheck.model_fields.items())
#: Fields of ``artifacts.tracking`` copied into ``status.artifacts.tracking``: those of api.TrackingArtifacts.
TRACKING_FIELDS = tuple(field.alias or name for name, field in TrackingArtifacts.model_fields.items())
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
MAX_ATTEMPTS = 100
MAX_MESSAGE = 2000
_SECRET_NOT_FOUND = re.compile(r'secret "?([^"\s]+)"? not found', re.IGNORECASE)
# The Job controller's message when a podFailurePolicy rule fails the Job (kubernetes
# pkg/controller/job/pod_failure_policy.go): it names the pod, and the exit code or condition.
_RULE_EXIT_CODE = re.compile(r"^Container \S+ for pod [^/\s]+/(\S+) failed with exit code (-?\d+) matching")
_RULE_CONDITION = re.compile(r"^Pod [^/\s]+/(\S+) has condition (\S+) matching")


# --- time -----------------------------------------------------------------------


def utcnow() -> datetime:
    """The current time (only callers outside this module use it)."""
    return datetime.now(timezone.utc)


def fmt_time(value: datetime) -> str:
    """RFC 3339 with seconds precision, as Kubernetes writes it."""
    return value.astimezone(timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: Any) -> datetime | None:
    """Parse an RFC 3339 timestamp; None when absent or unreadable."""
    if not value or not isinstance(value, str):
        return None
    text = value.strip().replace("Z", "+00:00")
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed


def _elapsed(now: datetime, since: Any) -> float:
    start = parse_time(since) if not isinstance(since, datetime) else since
    if start is None:
        return 0.0
    return max(0.0, (now - start).total_seconds())


def _truncate(text: Any, limit: int = MAX_MESSAGE) -> str:
    text = "" if text is None else str(text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


# --- Job and Pod inspection -----------------------------------------------------------


def _conditions(obj: Mapping[str, Any] | None) -> dict[str, Mapping[str, Any]]:
    if not obj:
        return {}
    return {c.get("type"): c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("type")}


def job_result(job: Mapping[str, Any] | None) -> tuple[str | None, str, str]:
    """(``"succeeded"`` | ``"failed"`` | None, reason, message) of a batch/v1 Job.

    ``FailureTarget`` and ``SuccessCriteriaMet`` (set before the terminal condition
    while pods wind down) count as the outcome already.
    """
    conds = _conditions(job)
    for kind, types in (("succeeded", ("Complete", "SuccessCriteriaMet")), ("failed", ("Failed", "FailureTarget"))):
        for typ in types:
            cond = conds.get(typ)
            if cond and cond.get("status") == "True":
                return kind, cond.get("reason") or "", cond.get("message") or ""
    return None, "", ""


def job_suspended(job: Mapping[str, Any] | None) -> bool:
    """True when the Job is suspended (spec)."""
    return bool(job and (job.get("spec") or {}).get("suspend"))


def _container_status(pod: Mapping[str, Any], name: str = "trainer") -> Mapping[str, Any]:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    for cs in statuses:
        if cs.get("name") == name:
            return cs
    return statuses[0] if statuses else {}


def pod_finished(pod: Mapping[str, Any]) -> bool:
    """True when the pod reached Succeeded or Failed."""
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def pod_over(pod: Mapping[str, Any]) -> bool:
    """True when the pod's attempt is over: the pod reached Succeeded or Failed, or its trainer
    container terminated (``restartPolicy: Never``: it never runs again).

    A real kubelet reports the container's end first and sets the pod's terminal phase only
    once the pod is torn down (its sandbox stopped): in between, the pod is still ``Running``
    (or ``Pending``) with a terminated trainer, and is neither running nor starting.
    """
    return pod_finished(pod) or (_container_status(pod).get("state") or {}).get("terminated") is not None


def pod_terminated(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The trainer container's terminated state, if any."""
    cs = _container_status(pod)
    term = (cs.get("state") or {}).get("terminated")
    if term is None and pod_finished(pod):
        term = (cs.get("lastState") or {}).get("terminated")
    return term


def pod_waiting(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The trainer container's waiting state, if any."""
    return (_container_status(pod).get("state") or {}).get("waiting")


def pod_running_since(pod: Mapping[str, Any]) -> str | None:
    """When the trainer container started running, if it runs."""
    running = (_container_status(pod).get("state") or {}).get("running")
    if running is None:
        return None
    return running.get("startedAt") or (pod.get("status") or {}).get("startTime") or ""


def pod_unschedulable(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The PodScheduled=False/Unschedulable condition, if the scheduler cannot place the pod."""
    cond = _conditions(pod).get("PodScheduled")
    if cond and cond.get("status") == "False" and cond.get("reason") == UNSCHEDULABLE:
        return cond
    return None


def classify_exit(exit_code: int | None, container_reason: str | None, message: Mapping[str, Any] | None) -> str:
    """Attempt reason from the exit code (DESIGN.md section 4), the kubelet's reason, the trainer's.

    Only the container runtime knows whether the kernel's OOM killer struck, and says so
    with the reason ``OOMKilled`` (whatever the exit code). Exit 137 (SIGKILL, ``-9`` as a
    signal) without it is :data:`KILLED`: a SIGKILL after the termination grace period, a
    forced delete, a ``kill -9``.
    """
    if container_reason == OOM_KILLED:
        return OOM_KILLED
    if exit_code in (contract.EXIT_KILLED, -9):
        return KILLED
    if exit_code in EXIT_REASONS:
        return EXIT_REASONS[exit_code]
    if exit_code in (contract.EXIT_PREEMPTED, -15):  # SIGTERM: the pod was deleted (suspension, eviction, namespace deletion)
        return TERMINATED
    if message and isinstance(message.get("reason"), str) and message["reason"]:
        return message["reason"]
    if container_reason and container_reason not in ("Error", "Completed"):
        return container_reason
    if exit_code == contract.EXIT_UNEXPECTED:  # an exception the trainer has no name for (or a crash before it could report)
        return TRAINER_ERROR
    return f"ExitCode{exit_code}" if exit_code is not None else "Error"


def attempt_from_pod(pod: Mapping[str, Any], index: int, *, group: bool = False) -> dict[str, Any]:
    """One ``status.attempts[]`` entry from a trainer pod (``group``: with its ``node`` index)."""
    meta = pod.get("metadata") or {}
    pstatus = pod.get("status") or {}
    attempt: dict[str, Any] = {"index": index, "podName": meta.get("name", ""), "phase": pstatus.get("phase")}
    if group:
        attempt["node"] = render.pod_node_index(pod)
    term = pod_terminated(pod)
    disruption = _conditions(pod).get("DisruptionTarget")
    start = pstatus.get("startTime")
    if term is not None:
        tmsg = parse_termination_message(term.get("message"))
        exit_code = term.get("exitCode")
        attempt["startTime"] = term.get("startedAt") or start
        attempt["finishTime"] = term.get("finishedAt")
        attempt["exitCode"] = exit_code
        attempt["reason"] = classify_exit(exit_code, term.get("reason"), tmsg)
        if disruption and disruption.get("status") == "True" and exit_code != 0:
            attempt["reason"] = DISRUPTED
            attempt["message"] = _truncate(f"{disruption.get('reason')}: {disruption.get('message', '')}")
        elif tmsg is not None:
            if tmsg.get("message"):
                attempt["message"] = _truncate(tmsg["message"])
            if isinstance(tmsg.get("resumedFromStep"), int):
                attempt["resumedFromStep"] = tmsg["resumedFromStep"]
        elif term.get("message"):
            # FallbackToLogsOnError: the tail of the log; keep its end, where the error is
            # (for a crash the trainer could not report: the traceback's last line).
            text = str(term["message"]).strip()
            if attempt["reason"] == TRAINER_ERROR:
                text = [line for line in text.splitlines() if line.strip()][-1].strip()
            attempt["message"] = text[-MAX_MESSAGE:]
        if attempt["reason"] == KILLED:
            # Say what the exit code means first; what the trainer or its log said follows.
            head = MSG_KILLED.format(reason=term.get("reason") or "none")
            said = attempt.get("message")
            attempt["message"] = head + (f"; {said[-(MAX_MESSAGE - len(head) - 2):]}" if said else "")
    elif pstatus.get("phase") == "Failed":
        attempt["startTime"] = start
        attempt["finishTime"] = None
        if disruption and disruption.get("status") == "True":
            attempt["reason"] = DISRUPTED
            attempt["message"] = _truncate(f"{disruption.get('reason')}: {disruption.get('message', '')}")
        else:
            attempt["reason"] = pstatus.get("reason") or "PodFailed"
            attempt["message"] = _truncate(pstatus.get("message"))
    else:
        attempt["startTime"] = pod_running_since(pod) or start
        waiting = pod_waiting(pod)
        if waiting and waiting.get("reason") not in (None, "ContainerCreating", "PodInitializing"):
            attempt["reason"] = _waiting_reason(waiting)
            attempt["message"] = _truncate(waiting.get("message"))
        elif pod_unschedulable(pod):
            attempt["reason"] = UNSCHEDULABLE
            attempt["message"] = _truncate(pod_unschedulable(pod).get("message"))
    return {k: v for k, v in attempt.items() if v is not None and v != ""}


def _waiting_reason(waiting: Mapping[str, Any]) -> str:
    reason = waiting.get("reason") or ""
    if reason == CONTAINER_CONFIG_ERROR and _SECRET_NOT_FOUND.search(waiting.get("message") or ""):
        return SECRET_NOT_FOUND
    return reason


def _attempt_finished(attempt: Mapping[str, Any]) -> bool:
    return "exitCode" in attempt or bool(attempt.get("finishTime")) or attempt.get("reason") in (
        DISRUPTED, "PodFailed", "Evicted", DEADLINE_EXCEEDED, STOPPED,
    )


def _attempt_failed(attempt: Mapping[str, Any]) -> bool:
    return _attempt_finished(attempt) and attempt.get("exitCode") != 0


def _pod_sort_key(pod: Mapping[str, Any]) -> tuple[str, str]:
    meta = pod.get("metadata") or {}
    return (meta.get("creationTimestamp") or "", meta.get("name") or "")


def merge_attempts(
    previous: Sequence[Mapping[str, Any]], pods: Sequence[Mapping[str, Any]], group_attempt: int | None = None
) -> list[dict[str, Any]]:
    """Attempts of the run: the recorded ones (pods may be gone) updated from the pods, oldest first.

    One node (``group_attempt`` None): each new pod is the next attempt. Several nodes:
    each pod has its ``node``, and a new pod is attempt ``group_attempt`` (the run's group
    attempt) or, when that node already had an attempt there (the Job was suspended and
    resumed), the node's next. Either way an unfinished attempt whose pod is gone (it
    ended and was deleted between two reconciles, or the Job went) is closed as Stopped,
    never left Running; :func:`attempts_with_job_failure` may say more from the Job.
    Sorted by attempt, then node; the newest :data:`MAX_ATTEMPTS` kept.
    """
    group = group_attempt is not None
    by_pod: dict[str, dict[str, Any]] = {a["podName"]: dict(a) for a in previous if a.get("podName")}
    listed = {(p.get("metadata") or {}).get("name") for p in pods}
    for attempt in by_pod.values():
        if attempt["podName"] not in listed and not _attempt_finished(attempt):
            attempt.update(
                phase="Failed", reason=STOPPED,
                message=("stopped with its group: " if group else "stopped: ") + "the pod was deleted before its end was seen",
            )
    next_index = max((a.get("index", -1) for a in by_pod.values()), default=-1) + 1
    for pod in sorted(pods, key=_pod_sort_key):
        name = (pod.get("metadata") or {}).get("name")
        if not name:
            continue
        old = by_pod.get(name)
        if old is not None and _attempt_finished(old):
            continue  # a finished attempt is history: it does not change
        if group:
            node = render.pod_node_index(pod)
            seen = [a.get("index", 0) for a in by_pod.values() if a.get("node") == node]
            index = old["index"] if old is not None else max([group_attempt, *(i + 1 for i in seen)])
        else:
            index = old["index"] if old is not None else next_index
            if old is None:
                next_index += 1
        new = attempt_from_pod(pod, index, group=group)
        if old is not None:
            for key in ("resumedFromStep", "startTime", "checkpoint"):
                if key not in new and key in old:
                    new[key] = old[key]
        by_pod[name] = new
    attempts = sorted(by_pod.values(), key=lambda a: (a.get("index", 0), a.get("node") or 0, a.get("podName", "")))
    return attempts[-MAX_ATTEMPTS:]


def attempts_with_job_failure(attempts: Sequence[Mapping[str, Any]], job: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """Attempts completed from the Job's failure message where the pods were not seen ending.

    A pod can end and be deleted (the Job controller removes the remaining pods of a failed
    Job) between two reconciles; its attempt is then closed as Stopped, or Terminated when
    only the SIGTERM was seen. The Job's ``FailureTarget``/``Failed`` condition still names
    the pod the podFailurePolicy matched and why: a ``DisruptionTarget`` condition makes that
    attempt Disrupted, an exit code gives it its exit code and reason. Attempts seen with a
    reason of their own are left as they are. Pure: returns new dicts.
    """
    out = [dict(a) for a in attempts]
    outcome, reason, message = job_result(job)
    if outcome != "failed" or reason != "PodFailurePolicy":
        return out
    by_condition, by_exit = _RULE_CONDITION.match(message), _RULE_EXIT_CODE.match(message)
    rule = by_condition or by_exit
    if rule is None:
        return out
    for attempt in out:
        if attempt.get("podName") != rule.group(1) or attempt.get("reason") not in (STOPPED, TERMINATED, None):
            continue
        if by_condition and by_condition.group(2) == "DisruptionTarget":
            attempt.update(phase="Failed", reason=DISRUPTED, message=_truncate(f"the Job controller saw: {message}"))
        elif by_exit and attempt.get("reason") != TERMINATED:
            code = int(by_exit.group(2))
            attempt.update(phase="Failed", exitCode=code, reason=classify_exit(code, None, None),
                           message=_truncate(f"the pod was deleted before its end was seen; the Job controller saw: {message}"))
    return out


def exports_from_artifacts(arts: Mapping[str, Any]) -> list[dict[str, str]]:
    """The well-formed entries of a termination message's ``artifacts.exports`` (``format``, ``uri``,
    optional ``quantization`` and ``file``: short strings), at most ``api.MAX_EXPORTS``; others dropped."""
    raw = arts.get("exports")
    if not isinstance(raw, list):
        return []
    out = []
    for item in raw[:MAX_EXPORTS]:
        if not isinstance(item, Mapping):
            continue
        fmt, uri = item.get("format"), item.get("uri")
        if not (isinstance(fmt, str) and 0 < len(fmt) <= 16 and isinstance(uri, str) and 0 < len(uri) <= 4096):
            continue
        entry = {"format": fmt, "uri": uri}
        quant = item.get("quantization")
        if isinstance(quant, str) and 0 < len(quant) <= 16:
            entry["quantization"] = quant
        file = item.get("file")
        if isinstance(file, str) and 0 < len(file) <= 4096:
            entry["file"] = file
        out.append(entry)
    return out


def _merge_check(value: Any) -> dict[str, Any] | None:
    """The :data:`MERGE_CHECK_FIELDS` of a termination message's ``mergeCheck`` (scalars only)."""
    if not isinstance(value, dict):
        return None
    keep = {
        k: v for k, v in value.items()
        if k in MERGE_CHECK_FIELDS and isinstance(v, (bool, int, float, str)) and not (isinstance(v, str) and len(v) > 253)
    }
    return keep or None


def _tracking(value: Any) -> dict[str, str] | None:
    """The :data:`TRACKING_FIELDS` of a termination message's ``tracking`` (short strings only)."""
    if not isinstance(value, dict):
        return None
    keep = {k: v for k, v in value.items() if k in TRACKING_FIELDS and isinstance(v, str) and 0 < len(v) <= 4096}
    return keep or None


def artifacts_from_pods(pods: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Artifact URIs (and ``mergeCheck``) from the termination message of the newest pod that
    exited with one of :data:`ARTIFACT_EXIT_CODES` (0, or 8 with the adapter published);
    never from another failed pod."""
    for pod in sorted(pods, key=_pod_sort_key, reverse=True):
        term = pod_terminated(pod)
        if term is None or term.get("exitCode") not in ARTIFACT_EXIT_CODES:
            continue
        tmsg = parse_termination_message(term.get("message")) or {}
        arts = tmsg.get("artifacts")
        if isinstance(arts, dict):
            keep: dict[str, Any] = {k: v for k, v in arts.items() if k in ARTIFACT_URI_FIELDS and isinstance(v, str) and v}
            exports = exports_from_artifacts(arts)
            if exports:
                keep["exports"] = exports
            check = _merge_check(arts.get("mergeCheck"))
            if check:
                keep["mergeCheck"] = check
            tracking = _tracking(arts.get("tracking"))
            if tracking:
                keep["tracking"] = tracking
            if keep:
                return keep
    return None


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


def attach_checkpoint_decision(
    attempts: Sequence[Mapping[str, Any]], progress: Mapping[str, Any] | None
) -> list[dict[str, Any]]:
    """Attempts with the trainer's ``progress.checkpoint`` (what the pod resumed from, or why it
    started fresh) copied into the attempt of the pod that reported it, once. Pure."""
    out = [dict(a) for a in attempts]
    decision = (progress or {}).get("checkpoint") or {}
    pod, message = decision.get("podName"), decision.get("message")
    if not pod or not message:
        return out
    for attempt in out:
        if attempt.get("podName") == pod and "checkpoint" not in attempt:
            attempt["checkpoint"] = _truncate(message, 1024)
            if decision.get("decision") == contract.CHECKPOINT_RESUMED and isinstance(decision.get("fromStep"), int):
                attempt.setdefault("resumedFromStep", decision["fromStep"])
    return out


def checkpoint_event(attempt: Mapping[str, Any]) -> EventSpec:
    """The Event of an attempt's checkpoint decision: CheckpointRefused (Warning) when the trainer
    refused checkpoints of its run, else ResumedFromCheckpoint or StartedFresh (Normal)."""
    message = f"pod {attempt.get('podName')}: {attempt.get('checkpoint')}"
    if "refused" in (attempt.get("checkpoint") or ""):
        return EventSpec("Warning", "CheckpointRefused", _truncate(message))
    if "resumedFromStep" in attempt:
        return EventSpec("Normal", "ResumedFromCheckpoint", _truncate(message))
    return EventSpec("Normal", "StartedFresh", _truncate(message))


def quota_event(events: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The newest FailedCreate event saying a ResourceQuota was exceeded, if any."""
    found = [
        e
        for e in events
        if e.get("reason") == "FailedCreate" and "exceeded quota" in (e.get("message") or "")
    ]
    if not found:
        return None
    return max(found, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")


def _event_first_seen(events: Sequence[Mapping[str, Any]]) -> str | None:
    stamps = [
        e.get("firstTimestamp") or e.get("eventTime") or (e.get("metadata") or {}).get("creationTimestamp")
        for e in events
        if e.get("reason") == "FailedCreate" and "exceeded quota" in (e.get("message") or "")
    ]
    stamps = [s for s in stamps if s]
    return min(stamps) if stamps else None


def _quota_message(event: Mapping[str, Any]) -> str:
    text = event.get("message") or ""
    idx = text.find("exceeded quota")
    return _truncate(text[idx:] if idx >= 0 else text)


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


def _describe(attempt: Mapping[str, Any]) -> str:
    node = f"node {attempt['node']}, " if attempt.get("node") is not None else ""
    text = f"attempt {attempt.get('index')} ({node}pod {attempt.get('podName')})"
    if "exitCode" in attempt:
        text += f" exited with code {attempt['exitCode']}"
    text += f" ({attempt.get('reason', 'Error')})"
    if attempt.get("message"):
        text += f": {attempt['message']}"
    return text


def _failure(obs: Observed, job_reason: str, job_message: str, attempts: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    failed = [a for a in attempts if _attempt_failed(a) and a.get("reason") != DISRUPTED]
    last = failed[-1] if failed else None
    if job_reason == DEADLINE_EXCEEDED:
        msg = f"runPolicy.activeDeadlineSeconds ({obs.active_deadline_seconds}s) exceeded"
        if last is not None:
            msg += f"; last {_describe(last)}"
        return DEADLINE_EXCEEDED, msg
    if job_reason == "PodFailurePolicy" and last is not None:
        return last.get("reason", "Failed"), f"{_describe(last)}; this exit code is not retried"
    if job_reason == BACKOFF_LIMIT_EXCEEDED and last is not None:
        if obs.backoff_limit == 0:
            return last.get("reason", "Failed"), f"{_describe(last)}; runPolicy.backoffLimit is 0 (no retries)"
        return BACKOFF_LIMIT_EXCEEDED, (
            f"{last.get('reason', 'Error')}: {len(failed)} attempts failed "
            f"(runPolicy.backoffLimit {obs.backoff_limit}); last {_describe(last)}"
        )
    if last is not None and not job_reason:
        return last.get("reason", "Failed"), _describe(last)
    return job_reason or "JobFailed", _truncate(job_message) or "the Job failed"


def _failed_state(reason: str, msg: str) -> _State:
    """Failed because the Job failed (nothing to stop)."""
    return _State(
        running=("False", reason, msg), failed=("True", reason, msg), complete=("False", reason, ""),
        phase=Phase.failed.value, message=msg,
    )


def queue_status(workload: Mapping[str, Any] | None, local_queue: str) -> dict[str, Any] | None:
    """``status.queue`` from a Kueue (v1beta2) Workload, or None without one (pure).

    ``reason``/``message``: of ``Evicted`` when it is True (``Preempted``: a higher-priority
    Workload took the quota), else of ``Admitted`` when True, else of ``QuotaReserved``
    (``Pending`` with Kueue's explanation while it waits). ``evictions``: the counts of
    ``status.schedulingStats.evictions`` (1 when only the Evicted condition tells).
    """
    if not workload:
        return None
    conds = _conditions(workload)
    wstatus = workload.get("status") or {}
    admitted = (conds.get("Admitted") or {}).get("status") == "True"
    evicted = (conds.get("Evicted") or {}).get("status") == "True"
    source = conds.get("Evicted") if evicted else conds.get("Admitted") if admitted else conds.get("QuotaReserved")
    evictions = sum(int(e.get("count") or 0) for e in (wstatus.get("schedulingStats") or {}).get("evictions") or [])
    out = {
        "workload": (workload.get("metadata") or {}).get("name"),
        "localQueue": local_queue or None,
        "clusterQueue": (wstatus.get("admission") or {}).get("clusterQueue"),
        "admitted": admitted,
        "reason": (source or {}).get("reason"),
        "message": _truncate((source or {}).get("message")) or None,
        "evictions": max(evictions, 1 if evicted else 0),
    }
    return out


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


def _latest_per_node(attempts: Sequence[Mapping[str, Any]], floor: int) -> list[Mapping[str, Any]]:
    """Each node's newest attempt from group attempt ``floor`` on (the run's pods), by node."""
    latest: dict[Any, Mapping[str, Any]] = {}
    for attempt in attempts:
        index, node = attempt.get("index", 0), attempt.get("node")
        if index >= floor and (node not in latest or index > latest[node].get("index", 0)):
            latest[node] = attempt
    return sorted(latest.values(), key=lambda a: a.get("node") or 0)


def _group_cause(failed: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The attempt that failed the group: the first to finish, preferring real failures over
    pods stopped because the group was already failing (Terminated, Stopped)."""
    primary = [a for a in failed if a.get("reason") not in (TERMINATED, STOPPED)] or list(failed)
    if not primary:
        return None
    return min(primary, key=lambda a: (a.get("finishTime") or "~", a.get("node") or 0))


def _group_failed(
    obs: Observed, group: GroupAttempt, nodes: int, attempts: Sequence[Mapping[str, Any]],
    pods: Sequence[Mapping[str, Any]], job_message: str,
) -> _State:
    """The Job of a group run failed: fail the QLoRAJob, or restart the group as the next run."""
    current = _latest_per_node(attempts, group.attempt)
    failed = [a for a in current if _attempt_failed(a)]
    permanent = [a for a in failed if a.get("exitCode") in render.PERMANENT_EXIT_CODES]
    if permanent:
        cause = permanent[0]
        return _failed_state(cause.get("reason", "Failed"), f"{_describe(cause)}; this exit code is not retried")
    disrupted = [a for a in failed if a.get("reason") == DISRUPTED]
    cause = disrupted[0] if disrupted else _group_cause(failed)
    what = _describe(cause) if cause is not None else (_truncate(job_message) or f"Job {obs.job_name} failed")
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

    by_node = sorted(active, key=lambda p: (render.pod_node_index(p) or 0, _pod_sort_key(p)))
    for test in (pod_unschedulable, waiting_reason, lambda p: pod_running_since(p) is None):
        for pod in by_node:
            if test(pod):
                return pod
    return by_node[0]


def _quota_state(obs: Observed, pods: Sequence[Mapping[str, Any]], now: datetime, settings: OperatorSettings) -> _State | None:
    """QuotaExceeded while the Job controller cannot create a pod (a FailedCreate newer than the last pod)."""
    quota = quota_event(obs.job_events)
    last_pod_created = max((_pod_sort_key(p)[0] for p in pods), default="")
    if quota is None or (quota.get("lastTimestamp") or quota.get("eventTime") or "") < last_pod_created:
        return None
    waited = _elapsed(now, _event_first_seen(obs.job_events))
    qmsg = _quota_message(quota)
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
        msg = _truncate(obs.invalid_spec)
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
        msg = _truncate(f"{fit.message} (fit check Job {fit.job_name}; no GPU was requested)")
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
        p for p in sorted(pods, key=_pod_sort_key)
        if not pod_over(p) and not (p.get("metadata") or {}).get("deletionTimestamp")
    ]
    current = _latest_per_node(attempts, group.attempt) if nodes > 1 else attempts
    index_of = {a["podName"]: a["index"] for a in attempts}
    if nodes > 1 and len(active) < nodes and not any(
        _attempt_failed(a) and a.get("reason") not in (TERMINATED, STOPPED) for a in current
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
            waited = _elapsed(now, since)
            sched_msg = _truncate(unsched.get("message") or "no node fits")
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
        wmsg = _truncate(waiting.get("message") or wreason)
        since = (pod.get("status") or {}).get("startTime") or created
        if wreason in IMAGE_PULL_REASONS:
            waited = _elapsed(now, since)
            if waited >= settings.image_pull_grace_seconds:
                msg = f"image {obs.image} could not be pulled for {int(waited)}s: {wmsg}; {who} deleted"
                return _terminal(IMAGE_PULL_FAILED, msg, delete=[name])
            msg = (
                f"pulling image {obs.image} failed ({wreason}): {wmsg}; the job fails if it cannot be "
                f"pulled within {int(settings.image_pull_grace_seconds)}s"
            )
            return _State(running=("True", IMAGE_PULL_BACKOFF, msg), phase=Phase.starting.value, message=msg)
        if wreason == CONTAINER_CONFIG_ERROR:
            waited = _elapsed(now, since)
            missing = _SECRET_NOT_FOUND.search(waiting.get("message") or "")
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

    failed = [a for a in current if _attempt_failed(a)]
    real = [a for a in failed if a.get("reason") not in (TERMINATED, STOPPED)]
    if nodes > 1 and real:  # the Job controller is about to fail the Job: the group restarts
        msg = f"{_describe(_group_cause(real) or real[-1])}; the group restarts"
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
        msg = f"{_describe(failed[-1])}; waiting for the next attempt"
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
        "message": _truncate(message),
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
    evicted = _conditions(obs.workload).get("Evicted") if obs.queued and obs.workload else None
    if evicted and evicted.get("status") == "True":
        # Kueue evicted the Workload (e.g. preempted it) and suspended the Job: the pods it
        # stopped (SIGTERM, exit 143; or deleted before their end was seen) are a disruption,
        # not a failure of the run.
        said = _truncate(f"Kueue evicted the Workload ({evicted.get('reason')}): {evicted.get('message') or ''}")
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
        "message": _truncate(message) or None,
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
    finished_before = {a.get("podName") for a in old_attempts if _attempt_finished(a)}
    casualty = (TERMINATED, STOPPED)
    real_failure = {
        a.get("index") for a in new_attempts if _attempt_failed(a) and a.get("reason") not in casualty
    } if group else set()
    for attempt in new_attempts:
        if attempt.get("podName") in finished_before or not _attempt_failed(attempt):
            continue
        if group and attempt.get("reason") in casualty and attempt.get("index") in real_failure:
            continue
        tail = "" if terminal else ("; the group restarts" if group else "; the run will retry")
        events.append(EventSpec("Warning", attempt.get("reason") or "AttemptFailed", _truncate(_describe(attempt) + tail)))

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
