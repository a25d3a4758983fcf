"""``status.queue`` and the Queued/Preempted state of a queued run, from Kueue's Workload (v1beta2)."""

from __future__ import annotations

from test_status import SETTINGS, at, conds, job, observe, pod, qj

from qlora_operator.objects import queue_status
from qlora_operator.status import compute_status

PENDING_MSG = ("couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu in flavor "
               "default-flavor, 1 more needed")


def workload(*conditions: tuple[str, str, str, str], cluster_queue: str | None = None, evictions: int = 0) -> dict:
    status: dict = {"conditions": [{"type": t, "status": v, "reason": r, "message": m} for t, v, r, m in conditions]}
    if cluster_queue:
        status["admission"] = {"clusterQueue": cluster_queue}
    if evictions:
        status["schedulingStats"] = {"evictions": [{"reason": "Preempted", "underlyingCause": "", "count": evictions}]}
    return {"metadata": {"name": "job-bot-train-abcde", "creationTimestamp": "2026-01-01T00:00:00Z"}, "status": status}


def test_no_workload_no_queue_status():
    assert queue_status(None, "team") is None


def test_pending_admitted_and_preempted_workloads():
    pending = queue_status(workload(("QuotaReserved", "False", "Pending", PENDING_MSG)), "team")
    assert pending == {"workload": "job-bot-train-abcde", "localQueue": "team", "clusterQueue": None,
                       "admitted": False, "reason": "Pending", "message": PENDING_MSG, "evictions": 0}
    admitted = queue_status(workload(("QuotaReserved", "True", "QuotaReserved", "Quota reserved in ClusterQueue cq"),
                                     ("Admitted", "True", "Admitted", "The workload is admitted"), cluster_queue="cq"),
                            "team")
    assert (admitted["admitted"], admitted["reason"], admitted["clusterQueue"]) == (True, "Admitted", "cq")
    preempted = queue_status(workload(("Evicted", "True", "Preempted", "Preempted to accommodate a workload"),
                                      ("QuotaReserved", "False", "Pending", PENDING_MSG), evictions=2), "team")
    assert (preempted["reason"], preempted["evictions"], preempted["admitted"]) == ("Preempted", 2, False)


def test_a_queued_run_shows_kueues_reason_in_phase_condition_and_message():
    wl = workload(("QuotaReserved", "False", "Pending", PENDING_MSG))
    result = compute_status(qj(), observe(job(suspend=True), queued=True, local_queue="team", workload=wl), at(3), SETTINGS)
    assert result.phase == "Queued"
    suspended = conds(result.status)["Suspended"]
    assert (suspended["status"], suspended["reason"]) == ("True", "Queued")
    assert "LocalQueue team" in suspended["message"] and "insufficient unused quota for nvidia.com/gpu" in suspended["message"]
    assert result.status["queue"]["reason"] == "Pending"


def test_a_preempted_run_says_it_resumes_from_its_checkpoint():
    wl = workload(("Evicted", "True", "Preempted", "Preempted to accommodate a higher priority workload"), evictions=1)
    result = compute_status(qj(), observe(job(suspend=True), queued=True, local_queue="team", workload=wl), at(3), SETTINGS)
    assert result.phase == "Queued" and not result.terminal
    suspended = conds(result.status)["Suspended"]
    assert suspended["reason"] == "Preempted" and "resumes from that checkpoint" in suspended["message"]
    assert result.status["queue"]["evictions"] == 1


def test_an_admitted_run_runs_and_a_run_without_a_queue_has_no_queue_status():
    wl = workload(("Admitted", "True", "Admitted", "The workload is admitted"), cluster_queue="cq")
    running = compute_status(qj(), observe(job(), [pod(running=2)], queued=True, local_queue="team", workload=wl),
                             at(5), SETTINGS)
    assert running.phase == "Running" and running.status["queue"]["admitted"] is True
    plain = compute_status(qj(), observe(job(), [pod(running=2)]), at(5), SETTINGS)
    assert plain.status.get("queue") is None and "queue" not in plain.patch


def test_pods_stopped_by_a_kueue_eviction_are_a_disruption_not_a_failure():
    wl = workload(("Evicted", "True", "Preempted", "Preempted to accommodate a higher priority workload"), evictions=1)
    stopped = pod(terminated={"exitCode": 143, "reason": "Error"})
    result = compute_status(qj(), observe(job(suspend=True), [stopped], queued=True, local_queue="team", workload=wl),
                            at(60), SETTINGS)
    attempt = result.status["attempts"][-1]
    assert attempt["reason"] == "Disrupted" and "Preempted" in attempt["message"], attempt
    assert result.phase == "Queued" and not result.terminal


def test_a_pod_deleted_by_the_eviction_before_its_end_was_seen_is_a_disruption_too():
    wl = workload(("Evicted", "True", "Preempted", "Preempted to accommodate a higher priority workload"), evictions=1)
    previous = [{"index": 0, "podName": "bot-train-aaaaa", "phase": "Running", "startTime": "2026-01-01T00:00:02Z"}]
    body = qj({"run": 1, "attempts": previous, "conditions": []})
    result = compute_status(body, observe(job(suspend=True), [], queued=True, local_queue="team", workload=wl),
                            at(60), SETTINGS)
    attempt = result.status["attempts"][0]
    assert attempt["reason"] == "Disrupted" and "Preempted" in attempt["message"], attempt
