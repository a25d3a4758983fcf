"""``status.attempts[]`` bookkeeping and the artifacts of a run (pure).

One attempt per trainer pod (a group of several nodes: one per pod and node), oldest
first, at most :data:`MAX_ATTEMPTS`: :func:`attempt_from_pod` reads a pod (its exit code
named by the pod contract, :mod:`qlora_trainer.contract`, and the kubelet's reason),
:func:`merge_attempts` folds the pods of a run into the recorded attempts (a finished
attempt never changes; one whose pod vanished is closed as Stopped) and
:func:`attempts_with_job_failure` completes them from the Job's podFailurePolicy message.
:func:`artifacts_from_pods` reads the published URIs from the termination message of the
pod that published them. :mod:`qlora_operator.status` decides from what these return.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from qlora_operator import render
from qlora_operator.api import (
    CONTAINER_CONFIG_ERROR,
    DEADLINE_EXCEEDED,
    DISRUPTED,
    KILLED,
    MAX_EXPORTS,
    MergeCheck,
    OOM_KILLED,
    SECRET_NOT_FOUND,
    STOPPED,
    TERMINATED,
    TRAINER_ERROR,
    TrackingArtifacts,
    UNSCHEDULABLE,
)
from qlora_operator.objects import (
    MAX_MESSAGE,
    conditions_of,
    job_result,
    pod_running_since,
    pod_sort_key,
    pod_terminated,
    pod_unschedulable,
    pod_waiting,
    truncate,
)
from qlora_trainer import contract
from qlora_trainer.contract import parse_termination_message


MSG_KILLED = (
    "exit 137: the container got SIGKILL, and the container runtime reported no OOM kill (reason "
    "{reason}): killed after terminationGracePeriodSeconds because it did not stop on SIGTERM, by a "
    "forced delete or kill -9, or by another process; not a memory limit"
)

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
MAX_ATTEMPTS = 100
#: The kubelet's message for a missing Secret (group 1: its name).
SECRET_NOT_FOUND_MESSAGE = re.compile(r'secret "?([^"\s]+)"? not found', re.IGNORECASE)
# The Job controller's message when a podFailurePolicy rule fails the Job (kubernetes
# pkg/controller/job/pod_failure_policy.go): it names the pod, and the exit code or condition.
_RULE_EXIT_CODE = re.compile(r"^Container \S+ for pod [^/\s]+/(\S+) failed with exit code (-?\d+) matching")
_RULE_CONDITION = re.compile(r"^Pod [^/\s]+/(\S+) has condition (\S+) matching")


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
    disruption = conditions_of(pod).get("DisruptionTarget")
    start = pstatus.get("startTime")
    if term is not None:
        tmsg = parse_termination_message(term.get("message"))
        exit_code = term.get("exitCode")
        if attempt["phase"] in ("Pending", "Running"):
            # The trainer container ended (restartPolicy Never) and the kubelet has not moved the
            # pod's phase yet: the attempt is over, its phase is the exit code's.
            attempt["phase"] = "Succeeded" if exit_code == 0 else "Failed"
        attempt["startTime"] = term.get("startedAt") or start
        attempt["finishTime"] = term.get("finishedAt")
        attempt["exitCode"] = exit_code
        attempt["reason"] = classify_exit(exit_code, term.get("reason"), tmsg)
        if disruption and disruption.get("status") == "True" and exit_code != 0:
            attempt["reason"] = DISRUPTED
            attempt["message"] = truncate(f"{disruption.get('reason')}: {disruption.get('message', '')}")
        elif tmsg is not None:
            if tmsg.get("message"):
                attempt["message"] = truncate(tmsg["message"])
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
            attempt["message"] = truncate(f"{disruption.get('reason')}: {disruption.get('message', '')}")
        else:
            attempt["reason"] = pstatus.get("reason") or "PodFailed"
            attempt["message"] = truncate(pstatus.get("message"))
    else:
        attempt["startTime"] = pod_running_since(pod) or start
        waiting = pod_waiting(pod)
        if waiting and waiting.get("reason") not in (None, "ContainerCreating", "PodInitializing"):
            attempt["reason"] = _waiting_reason(waiting)
            attempt["message"] = truncate(waiting.get("message"))
        elif pod_unschedulable(pod):
            attempt["reason"] = UNSCHEDULABLE
            attempt["message"] = truncate(pod_unschedulable(pod).get("message"))
    return {k: v for k, v in attempt.items() if v is not None and v != ""}


def _waiting_reason(waiting: Mapping[str, Any]) -> str:
    reason = waiting.get("reason") or ""
    if reason == CONTAINER_CONFIG_ERROR and SECRET_NOT_FOUND_MESSAGE.search(waiting.get("message") or ""):
        return SECRET_NOT_FOUND
    return reason


def attempt_finished(attempt: Mapping[str, Any]) -> bool:
    return "exitCode" in attempt or bool(attempt.get("finishTime")) or attempt.get("reason") in (
        DISRUPTED, "PodFailed", "Evicted", DEADLINE_EXCEEDED, STOPPED,
    )


def attempt_failed(attempt: Mapping[str, Any]) -> bool:
    return attempt_finished(attempt) and attempt.get("exitCode") != 0


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
        if attempt["podName"] not in listed and not attempt_finished(attempt):
            attempt.update(
                phase="Failed", reason=STOPPED,
                message=("stopped with its group: " if group else "stopped: ") + "the pod was deleted before its end was seen",
            )
    next_index = max((a.get("index", -1) for a in by_pod.values()), default=-1) + 1
    for pod in sorted(pods, key=pod_sort_key):
        name = (pod.get("metadata") or {}).get("name")
        if not name:
            continue
        old = by_pod.get(name)
        if old is not None and attempt_finished(old):
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
            attempt.update(phase="Failed", reason=DISRUPTED, message=truncate(f"the Job controller saw: {message}"))
        elif by_exit and attempt.get("reason") != TERMINATED:
            code = int(by_exit.group(2))
            attempt.update(phase="Failed", exitCode=code, reason=classify_exit(code, None, None),
                           message=truncate(f"the pod was deleted before its end was seen; the Job controller saw: {message}"))
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
    for pod in sorted(pods, key=pod_sort_key, reverse=True):
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
            attempt["checkpoint"] = truncate(message, 1024)
            if decision.get("decision") == contract.CHECKPOINT_RESUMED and isinstance(decision.get("fromStep"), int):
                attempt.setdefault("resumedFromStep", decision["fromStep"])
    return out


def describe_attempt(attempt: Mapping[str, Any]) -> str:
    node = f"node {attempt['node']}, " if attempt.get("node") is not None else ""
    text = f"attempt {attempt.get('index')} ({node}pod {attempt.get('podName')})"
    if "exitCode" in attempt:
        text += f" exited with code {attempt['exitCode']}"
    text += f" ({attempt.get('reason', 'Error')})"
    if attempt.get("message"):
        text += f": {attempt['message']}"
    return text


def latest_per_node(attempts: Sequence[Mapping[str, Any]], floor: int) -> list[Mapping[str, Any]]:
    """Each node's newest attempt from group attempt ``floor`` on (the run's pods), by node."""
    latest: dict[Any, Mapping[str, Any]] = {}
    for attempt in attempts:
        index, node = attempt.get("index", 0), attempt.get("node")
        if index >= floor and (node not in latest or index > latest[node].get("index", 0)):
            latest[node] = attempt
    return sorted(latest.values(), key=lambda a: a.get("node") or 0)


def group_cause(failed: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The attempt that failed the group: the first to finish, preferring real failures over
    pods stopped because the group was already failing (Terminated, Stopped)."""
    primary = [a for a in failed if a.get("reason") not in (TERMINATED, STOPPED)] or list(failed)
    if not primary:
        return None
    return min(primary, key=lambda a: (a.get("finishTime") or "~", a.get("node") or 0))
