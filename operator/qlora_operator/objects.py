"""Readers of the child objects the operator watches, and the time helpers (pure).

Thin accessors over the raw dicts of a batch/v1 Job, its Pods and Events, and a Kueue
Workload: the Job's outcome and suspension, the trainer container's state, the scheduler's
verdict, the quota refusals, the queue's view. Times are RFC 3339 strings as Kubernetes
writes them (:func:`fmt_time`, :func:`parse_time`); JSON merge patches (RFC 7386) are applied
and derived by :func:`merge_patch` and :func:`merge_diff`. Nothing here calls the API or decides
anything; :mod:`qlora_operator.attempts` and :mod:`qlora_operator.status` build on it, and
:mod:`qlora_operator.kube`, :mod:`~qlora_operator.plan` and :mod:`~qlora_operator.fitcheck`
read through it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from qlora_operator.api import UNSCHEDULABLE

#: Longest message kept in an attempt or condition (characters); :func:`truncate` cuts there.
MAX_MESSAGE = 2000


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


def elapsed(now: datetime, since: Any) -> float:
    start = parse_time(since) if not isinstance(since, datetime) else since
    if start is None:
        return 0.0
    return max(0.0, (now - start).total_seconds())


def truncate(text: Any, limit: int = MAX_MESSAGE) -> str:
    text = "" if text is None else str(text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- Job and Pod inspection -----------------------------------------------------------


def conditions_of(obj: Mapping[str, Any] | None) -> dict[str, Mapping[str, Any]]:
    if not obj:
        return {}
    return {c.get("type"): c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("type")}


def job_result(job: Mapping[str, Any] | None) -> tuple[str | None, str, str]:
    """(``"succeeded"`` | ``"failed"`` | None, reason, message) of a batch/v1 Job.

    ``FailureTarget`` and ``SuccessCriteriaMet`` (set before the terminal condition
    while pods wind down) count as the outcome already.
    """
    conds = conditions_of(job)
    for kind, types in (("succeeded", ("Complete", "SuccessCriteriaMet")), ("failed", ("Failed", "FailureTarget"))):
        for typ in types:
            cond = conds.get(typ)
            if cond and cond.get("status") == "True":
                return kind, cond.get("reason") or "", cond.get("message") or ""
    return None, "", ""


def job_suspended(job: Mapping[str, Any] | None) -> bool:
    """True when the Job is suspended (spec)."""
    return bool(job and (job.get("spec") or {}).get("suspend"))


def container_status(pod: Mapping[str, Any], name: str = "trainer") -> Mapping[str, Any]:
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
    return pod_finished(pod) or (container_status(pod).get("state") or {}).get("terminated") is not None


def pod_terminated(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The trainer container's terminated state, if any."""
    cs = container_status(pod)
    term = (cs.get("state") or {}).get("terminated")
    if term is None and pod_finished(pod):
        term = (cs.get("lastState") or {}).get("terminated")
    return term


def pod_waiting(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The trainer container's waiting state, if any."""
    return (container_status(pod).get("state") or {}).get("waiting")


def pod_running_since(pod: Mapping[str, Any]) -> str | None:
    """When the trainer container started running, if it runs."""
    running = (container_status(pod).get("state") or {}).get("running")
    if running is None:
        return None
    return running.get("startedAt") or (pod.get("status") or {}).get("startTime") or ""


def pod_unschedulable(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The PodScheduled=False/Unschedulable condition, if the scheduler cannot place the pod."""
    cond = conditions_of(pod).get("PodScheduled")
    if cond and cond.get("status") == "False" and cond.get("reason") == UNSCHEDULABLE:
        return cond
    return None


def pod_sort_key(pod: Mapping[str, Any]) -> tuple[str, str]:
    meta = pod.get("metadata") or {}
    return (meta.get("creationTimestamp") or "", meta.get("name") or "")


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


def quota_first_seen(events: Sequence[Mapping[str, Any]]) -> str | None:
    stamps = [
        e.get("firstTimestamp") or e.get("eventTime") or (e.get("metadata") or {}).get("creationTimestamp")
        for e in events
        if e.get("reason") == "FailedCreate" and "exceeded quota" in (e.get("message") or "")
    ]
    stamps = [s for s in stamps if s]
    return min(stamps) if stamps else None


def quota_message(event: Mapping[str, Any]) -> str:
    text = event.get("message") or ""
    idx = text.find("exceeded quota")
    return truncate(text[idx:] if idx >= 0 else text)


def queue_status(workload: Mapping[str, Any] | None, local_queue: str) -> dict[str, Any] | None:
    """``status.queue`` from a Kueue (v1beta2) Workload, or None without one (pure).

    ``reason``/``message``: of ``Evicted`` when it is True (``Preempted``: a higher-priority
    Workload took the quota), else of ``Admitted`` when True, else of ``QuotaReserved``
    (``Pending`` with Kueue's explanation while it waits). ``evictions``: the counts of
    ``status.schedulingStats.evictions`` (1 when only the Evicted condition tells).
    """
    if not workload:
        return None
    conds = conditions_of(workload)
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
        "message": truncate((source or {}).get("message")) or None,
        "evictions": max(evictions, 1 if evicted else 0),
    }
    return out


# --- JSON merge patches (RFC 7386) ------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """``patch`` applied to ``target`` as a JSON merge patch (RFC 7386: None deletes a key, objects merge)."""
    if not isinstance(patch, Mapping):
        return patch
    out = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def merge_diff(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch that turns ``before`` into ``after`` (``after``'s objects hold no None)."""
    patch: dict[str, Any] = {key: None for key in before if key not in after}
    for key, value in after.items():
        if key in before and before[key] == value:
            continue
        both = isinstance(value, Mapping) and isinstance(before.get(key), Mapping)
        patch[key] = merge_diff(before[key], value) if both else value
    return patch
