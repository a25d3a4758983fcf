"""Table-driven tests of the pure status translation (qlora_operator.status) and run planning (qlora_operator.plan)."""

from __future__ import annotations

import copy
import json
from datetime import datetime, timedelta, timezone

import pytest

from qlora_operator import attempts as attempts_mod
from qlora_operator import objects, plan, render
from qlora_operator import status as status_mod
from qlora_operator.api import QLoRAJobStatus
from qlora_operator.attempts import classify_exit, merge_attempts
from qlora_operator.objects import fmt_time
from qlora_operator.settings import OperatorSettings
from qlora_operator.status import Observed, compute_status
from qlora_trainer.contract import parse_termination_message

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
SETTINGS = OperatorSettings(
    stalled_timeout_seconds=300,
    image_pull_grace_seconds=120,
    container_config_grace_seconds=60,
    unschedulable_timeout_seconds=600,
)
SPEC = {
    "model": {"uri": "s3://models/m/"},
    "dataset": {"uri": "s3://data/a.jsonl"},
    "output": {"uri": "s3://out/a/"},
    "storage": {"credentialsSecretRef": {"name": "s3-creds"}},
}


def ts(seconds: float = 0) -> str:
    return fmt_time(T0 + timedelta(seconds=seconds))


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def qj(status: dict | None = None, generation: int = 1, spec: dict | None = None) -> dict:
    out = {
        "apiVersion": "qlora.dev/v1alpha1",
        "kind": "QLoRAJob",
        "metadata": {"name": "bot", "namespace": "ns", "uid": "uid-1", "generation": generation},
        "spec": copy.deepcopy(spec or SPEC),
    }
    if status is not None:
        out["status"] = status
    return out


def job(
    *conditions: tuple[str, str, str],
    suspend: bool = False,
    run: int = 1,
    spec: dict | None = None,
    group: render.GroupAttempt | None = None,
    **status,
) -> dict:
    """The rendered Job of run ``run`` with ``status`` and ``conditions`` ((type, reason, message) triples)."""
    body = qj(spec=spec)
    parsed, invalid = plan.validate(body["spec"], SETTINGS, body["metadata"]["name"])
    assert invalid is None, invalid
    out = render.render_job(body, parsed, SETTINGS, run, group)
    out["metadata"]["uid"] = f"job-uid-{run}"
    out["spec"]["suspend"] = suspend
    out["status"] = {"startTime": ts(0), **status}
    if conditions:
        out["status"]["conditions"] = [
            {"type": t, "status": "True", "reason": r, "message": m, "lastTransitionTime": ts(100)} for t, r, m in conditions
        ]
    return out


def pod(
    name: str = "bot-train-aaaaa",
    created: float = 1,
    *,
    phase: str = "Pending",
    node: str | None = "node-1",
    running: float | None = None,
    terminated: dict | None = None,
    waiting: tuple[str, str] | None = None,
    unschedulable: tuple[str, float] | None = None,
    disruption: str | None = None,
    deleting: bool = False,
    torn_down: bool = True,
) -> dict:
    """A trainer pod. With ``terminated``, its phase becomes Succeeded/Failed unless
    ``torn_down`` is False: a real kubelet reports the container's end before it sets the
    pod's terminal phase (once the sandbox is stopped), so ``phase`` stays as given."""
    meta = {"name": name, "namespace": "ns", "creationTimestamp": ts(created), "labels": {render.LABEL_JOB: "bot", render.LABEL_RUN: "1"}}
    if deleting:
        meta["deletionTimestamp"] = ts(created + 1)
    status: dict = {"phase": phase, "conditions": []}
    spec: dict = {}
    if node:
        spec["nodeName"] = node
        status["startTime"] = ts(created + 1)
    state: dict = {}
    if running is not None:
        state["running"] = {"startedAt": ts(running)}
        status["phase"] = "Running"
    if terminated is not None:
        term = {"startedAt": ts(created + 2), "finishedAt": ts(created + 50), **terminated}
        if isinstance(term.get("message"), dict):
            term["message"] = json.dumps(term["message"])
        state["terminated"] = term
        if torn_down:
            status["phase"] = "Succeeded" if term.get("exitCode") == 0 else "Failed"
    if waiting is not None:
        state["waiting"] = {"reason": waiting[0], "message": waiting[1]}
    if unschedulable is not None:
        status["conditions"].append(
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": unschedulable[0],
             "lastTransitionTime": ts(unschedulable[1])}
        )
    if disruption:
        status["conditions"].append({"type": "DisruptionTarget", "status": "True", "reason": disruption, "message": "preempted"})
    if state:
        status["containerStatuses"] = [{"name": "trainer", "state": state, "lastState": {}}]
    return {"metadata": meta, "spec": spec, "status": status}


def observe(job_obj=None, pods=(), events=(), run=1, **kw) -> Observed:
    defaults = dict(backoff_limit=3, image="ghcr.io/x/trainer:1")
    defaults.update(kw)
    return Observed(run=run, job_name=render.job_name("bot", run) if run else None, job=job_obj, pods=list(pods), job_events=list(events), **defaults)


def conds(status: dict) -> dict:
    return {c["type"]: c for c in status["conditions"]}


def apply(body: dict, patch: dict) -> dict:
    out = copy.deepcopy(body)
    status = out.setdefault("status", {})
    for key, value in patch.items():
        if value is None:
            status.pop(key, None)
        else:
            status[key] = value
    return out


TERM_OK = {
    "exitCode": 0,
    "reason": "Completed",
    "message": {
        "exitCode": 0,
        "reason": "Succeeded",
        "message": "done",
        "artifacts": {"adapterUri": "s3://out/a/adapter/", "manifestUri": "s3://out/a/adapter/manifest.json",
                      "mergedUri": None, "lastCheckpointUri": "s3://out/a/checkpoints/step-20/"},
        "resumedFromStep": 10,
        "metrics": {"trainLoss": 1.2},
    },
}

QUOTA_EVENT = {
    "reason": "FailedCreate",
    "type": "Warning",
    "message": 'Error creating: pods "bot-train-x" is forbidden: exceeded quota: gpu-quota, requested: requests.nvidia.com/gpu=1, used: requests.nvidia.com/gpu=0, limited: requests.nvidia.com/gpu=0',
    "firstTimestamp": ts(2),
    "lastTimestamp": ts(20),
}


# --- the state table ------------------------------------------------------------------------------

CASES = [
    # id, observed, now (s), phase, {type: (status, reason)}, message fragment, events [(type, reason)], side effects
    ("no-job-yet", dict(job_obj=None), 0, "Pending", {"Running": ("False", "Pending")}, "creating Job bot-train", [], {}),
    ("job-no-pod", dict(job_obj=job()), 1, "Pending", {"Running": ("True", "Pending")}, "waiting for its pod", [("Normal", "Pending")], {}),
    (
        "unschedulable",
        dict(job_obj=job(), pods=[pod(node=None, unschedulable=("0/2 nodes are available: 2 Insufficient nvidia.com/gpu.", 2))]),
        30, "Pending", {"Running": ("True", "Unschedulable"), "Failed": ("False", "NoFailure")},
        "2 Insufficient nvidia.com/gpu", [("Warning", "Unschedulable")], {},
    ),
    (
        "unschedulable-timeout",
        dict(job_obj=job(), pods=[pod(node=None, unschedulable=("0/2 nodes are available: 2 Insufficient nvidia.com/gpu.", 2))]),
        700, "Failed", {"Running": ("False", "Unschedulable"), "Failed": ("True", "Unschedulable")},
        "could not be scheduled for 698s", [("Warning", "Unschedulable")], {"stop": "Unschedulable", "delete": ["bot-train-aaaaa"]},
    ),
    (
        "image-pull-backoff",
        dict(job_obj=job(), pods=[pod(waiting=("ImagePullBackOff", 'Back-off pulling image "ghcr.io/x/trainer:1"'))]),
        30, "Starting", {"Running": ("True", "ImagePullBackOff")}, "ghcr.io/x/trainer:1", [("Warning", "ImagePullBackOff")], {},
    ),
    (
        "image-pull-failed",
        dict(job_obj=job(), pods=[pod(waiting=("ErrImagePull", "not found"))]),
        200, "Failed", {"Failed": ("True", "ImagePullFailed")}, "image ghcr.io/x/trainer:1 could not be pulled",
        [("Warning", "ImagePullFailed")], {"stop": "ImagePullFailed", "delete": ["bot-train-aaaaa"]},
    ),
    (
        "secret-missing",
        dict(job_obj=job(), pods=[pod(waiting=("CreateContainerConfigError", 'secret "s3-creds" not found'))]),
        20, "Starting", {"Running": ("True", "SecretNotFound")}, "Secret 's3-creds' not found", [("Warning", "SecretNotFound")], {},
    ),
    (
        "secret-missing-timeout",
        dict(job_obj=job(), pods=[pod(waiting=("CreateContainerConfigError", 'secret "s3-creds" not found'))]),
        100, "Failed", {"Failed": ("True", "SecretNotFound")}, "spec.storage.credentialsSecretRef.name",
        [("Warning", "SecretNotFound")], {"stop": "SecretNotFound", "delete": ["bot-train-aaaaa"]},
    ),
    (
        "quota",
        dict(job_obj=job(), events=[QUOTA_EVENT]),
        30, "Pending", {"Running": ("True", "QuotaExceeded")}, "exceeded quota: gpu-quota", [("Warning", "QuotaExceeded")], {},
    ),
    (
        "quota-timeout",
        dict(job_obj=job(), events=[QUOTA_EVENT]),
        700, "Failed", {"Failed": ("True", "QuotaExceeded")}, "exceeded quota: gpu-quota", [("Warning", "QuotaExceeded")],
        {"stop": "QuotaExceeded"},
    ),
    (
        "starting",
        dict(job_obj=job(), pods=[pod(waiting=("ContainerCreating", ""))]),
        5, "Starting", {"Running": ("True", "Starting")}, "is starting", [("Normal", "Starting")], {},
    ),
    (
        "running",
        dict(job_obj=job(), pods=[pod(running=5)]),
        10, "Running", {"Running": ("True", "TrainerRunning"), "Stalled": ("False", "ProgressReported")},
        "running on node node-1", [("Normal", "Running")], {},
    ),
    (
        "stalled-no-report",
        dict(job_obj=job(), pods=[pod(running=5)]),
        400, "Running", {"Running": ("True", "TrainerRunning"), "Stalled": ("True", "NoProgress")},
        "no progress in 395s", [("Normal", "Running"), ("Warning", "Stalled")], {},
    ),
    (
        "complete",
        dict(job_obj=job(("Complete", "CompletionsReached", "")), pods=[pod(terminated=TERM_OK)]),
        200, "Succeeded", {"Complete": ("True", "Succeeded"), "Running": ("False", "Completed"), "Failed": ("False", "NoFailure")},
        "adapter at s3://out/a/adapter/", [("Normal", "Completed")], {},
    ),
    (
        "complete-without-message",
        dict(job_obj=job(("Complete", "CompletionsReached", "")), pods=[pod(terminated={"exitCode": 0, "reason": "Completed"})]),
        200, "Succeeded", {"Complete": ("True", "Succeeded")}, "reported no artifacts", [("Normal", "Completed")], {},
    ),
    (
        "trainer-done-job-not-yet-complete",
        dict(job_obj=job(), pods=[pod(terminated=TERM_OK)]),
        60, "Uploading", {"Running": ("True", "Finishing"), "Complete": ("False", "NotCompleted")},
        "succeeded; waiting for Job bot-train", [("Normal", "Finishing")], {},
    ),
    (
        # a real kubelet: the trainer exited 0, the pod is still Running until its sandbox stops
        "trainer-done-pod-not-torn-down-yet",
        dict(job_obj=job(), pods=[pod(phase="Running", terminated=TERM_OK, torn_down=False)]),
        60, "Uploading", {"Running": ("True", "Finishing")}, "succeeded; waiting for Job bot-train",
        [("Normal", "Finishing")], {},
    ),
    (
        "trainer-killed-pod-not-torn-down-yet",
        dict(job_obj=job(), pods=[pod(phase="Running", terminated={"exitCode": 137, "reason": "Error"}, torn_down=False)]),
        60, "Pending", {"Running": ("True", "Retrying")}, "exited with code 137 (Killed)",
        [("Warning", "Killed"), ("Normal", "Retrying")], {},
    ),
    (
        "suspended-by-user",
        dict(job_obj=job(suspend=True), suspend_requested=True),
        5, "Suspended", {"Suspended": ("True", "SuspendedByUser"), "Running": ("False", "SuspendedByUser")},
        "checkpoints kept", [("Normal", "SuspendedByUser")], {},
    ),
    (
        "queued-in-kueue",
        dict(job_obj=job(suspend=True), queued=True),
        5, "Queued", {"Suspended": ("True", "Queued")}, "Kueue", [("Normal", "Queued")], {},
    ),
    (
        "invalid-spec",
        dict(job_obj=None, run=None, invalid_spec="spec.resources.gpus: 9 GPUs requested"),
        0, "Failed", {"Failed": ("True", "InvalidSpec"), "Running": ("False", "InvalidSpec")},
        "spec.resources.gpus", [("Warning", "InvalidSpec")], {},
    ),
    (
        "deadline",
        dict(job_obj=job(("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")),
             pods=[pod(terminated={"exitCode": 143, "reason": "Error"})], active_deadline_seconds=60),
        200, "Failed", {"Failed": ("True", "DeadlineExceeded")}, "runPolicy.activeDeadlineSeconds (60s) exceeded",
        [("Warning", "Terminated"), ("Warning", "DeadlineExceeded")], {},
    ),
    (
        "disrupted-pod-then-retry",
        dict(job_obj=job(), pods=[pod(terminated={"exitCode": 143, "reason": "Error"}, disruption="PreemptionByScheduler")]),
        200, "Pending", {"Running": ("True", "Retrying")}, "Disrupted", [("Warning", "Disrupted"), ("Normal", "Retrying")], {},
    ),
]


@pytest.mark.parametrize(
    ("case", "obs", "now", "phase", "expected", "fragment", "events", "effects"), CASES, ids=[c[0] for c in CASES]
)
def test_status_table(case, obs, now, phase, expected, fragment, events, effects):
    result = compute_status(qj(), observe(**obs), at(now), SETTINGS)
    status = result.status
    assert status["phase"] == phase
    got = conds(status)
    assert set(got) >= {"Running", "Complete", "Failed", "Suspended", "Stalled"}
    for typ, (st, reason) in expected.items():
        assert (got[typ]["status"], got[typ]["reason"]) == (st, reason), (typ, got[typ])
    text = " ".join(c["message"] for c in status["conditions"]) + " " + (status.get("message") or "")
    assert fragment in text
    assert [(e.type, e.reason) for e in result.events] == events
    assert result.stop_reason == effects.get("stop")
    assert result.delete_pods == effects.get("delete", [])
    assert result.terminal is (phase in ("Succeeded", "Failed"))
    for cond in status["conditions"]:
        assert cond["observedGeneration"] == 1
        assert cond["reason"].isidentifier() or cond["reason"].replace(",", "").isalnum()


# --- trainer exit codes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exit_code", "container_reason", "reason"),
    [
        (0, "Completed", "Succeeded"),
        (2, "Error", "InvalidConfig"),
        (3, "Error", "InvalidData"),
        (4, "Error", "StorageError"),
        (5, "Error", "CudaOutOfMemory"),
        (6, "Error", "NonFiniteLoss"),
        (7, "Error", "InsufficientGPUMemory"),
        (8, "Error", "MergeCheckFailed"),
        (137, "OOMKilled", "OOMKilled"),
        (137, "Error", "Killed"),  # SIGKILL without the runtime's OOM kill: grace period over, kill -9
        (-9, None, "Killed"),
        (1, "OOMKilled", "OOMKilled"),  # the runtime saw an OOM kill (e.g. of a worker) whatever the exit code
        (1, "Error", "TrainerError"),
        (139, "Error", "ExitCode139"),
        (143, "Error", "Terminated"),
        (128, "StartError", "StartError"),
    ],
)
def test_exit_codes(exit_code, container_reason, reason):
    assert classify_exit(exit_code, container_reason, None) == reason


@pytest.mark.parametrize(
    ("exit_code", "job_reason", "backoff", "reason", "fragments"),
    [
        (3, "PodFailurePolicy", 3, "InvalidData", ["exited with code 3", "bad row at line 7", "not retried"]),
        (2, "PodFailurePolicy", 3, "InvalidConfig", ["exited with code 2"]),
        (6, "PodFailurePolicy", 3, "NonFiniteLoss", ["exited with code 6"]),
        (137, "BackoffLimitExceeded", 0, "OOMKilled", ["exited with code 137", "backoffLimit is 0"]),
        (5, "BackoffLimitExceeded", 0, "CudaOutOfMemory", ["exited with code 5"]),
        (4, "BackoffLimitExceeded", 0, "StorageError", ["exited with code 4"]),
    ],
)
def test_single_attempt_failures(exit_code, job_reason, backoff, reason, fragments):
    term = {"exitCode": exit_code, "reason": "OOMKilled" if exit_code == 137 else "Error",
            "message": {"exitCode": exit_code, "reason": "x", "message": "bad row at line 7"}}
    result = compute_status(
        qj(), observe(job(("Failed", job_reason, "")), [pod(terminated=term)], backoff_limit=backoff), at(300), SETTINGS
    )
    failed = conds(result.status)["Failed"]
    assert (failed["status"], failed["reason"]) == ("True", reason)
    for fragment in fragments:
        assert fragment in failed["message"]
    assert result.status["attempts"][0]["exitCode"] == exit_code
    assert result.status["attempts"][0]["reason"] == reason
    assert ("Warning", reason) in [(e.type, e.reason) for e in result.events]
    assert result.status["artifacts"] is None
    assert result.status["completionTime"] == ts(300)


@pytest.mark.parametrize(
    ("term", "fragments"),
    [
        ({"exitCode": 137, "reason": "Error"}, ["SIGKILL", "reported no OOM kill (reason Error)"]),
        ({"exitCode": 137, "reason": "Error", "message": "step 40/60\nsaving checkpoint step-40"},
         ["SIGKILL", "not a memory limit; step 40/60\nsaving checkpoint step-40"]),
        ({"exitCode": 137, "reason": "Error", "message": json.dumps(
            {"exitCode": 137, "reason": "Killed", "message": "node 0: worker rank 1 was killed by signal 9 first"})},
         ["SIGKILL", "worker rank 1 was killed by signal 9"]),
        ({"exitCode": 137, "reason": "Error", "message": "x" * 5000}, ["SIGKILL", "xxxx"]),
    ],
)
def test_sigkill_without_oom_kill_is_killed_and_says_so(term, fragments):
    attempt = attempts_mod.attempt_from_pod(pod(terminated=term), 0)
    assert attempt["reason"] == "Killed"
    assert attempt["message"].startswith("exit 137: the container got SIGKILL")
    assert len(attempt["message"]) <= objects.MAX_MESSAGE
    for fragment in fragments:
        assert fragment in attempt["message"]
    oom = attempts_mod.attempt_from_pod(pod(terminated={**term, "reason": "OOMKilled"}), 0)
    assert oom["reason"] == "OOMKilled" and "SIGKILL" not in oom.get("message", "")


def test_sigkill_failure_names_killed_not_oomkilled():
    term = {"exitCode": 137, "reason": "Error"}
    result = compute_status(
        qj(), observe(job(("Failed", "BackoffLimitExceeded", "")), [pod(terminated=term)], backoff_limit=0), at(300), SETTINGS
    )
    failed = conds(result.status)["Failed"]
    assert failed["reason"] == "Killed"
    assert "exited with code 137 (Killed)" in failed["message"] and "no OOM kill" in failed["message"]
    assert ("Warning", "Killed") in [(e.type, e.reason) for e in result.events]


def test_backoff_limit_exceeded_carries_the_last_reason():
    pods = [
        pod("bot-train-a", 1, terminated={"exitCode": 4, "reason": "Error"}),
        pod("bot-train-b", 60, terminated={"exitCode": 137, "reason": "OOMKilled"}),
        pod("bot-train-c", 120, terminated={"exitCode": 137, "reason": "OOMKilled", "message": "killed"}),
    ]
    result = compute_status(qj(), observe(job(("Failed", "BackoffLimitExceeded", "")), pods, backoff_limit=2), at(400), SETTINGS)
    failed = conds(result.status)["Failed"]
    assert failed["reason"] == "BackoffLimitExceeded"
    assert failed["message"].startswith("OOMKilled: 3 attempts failed (runPolicy.backoffLimit 2)")
    assert "bot-train-c" in failed["message"]
    assert [a["reason"] for a in result.status["attempts"]] == ["StorageError", "OOMKilled", "OOMKilled"]
    assert [a["index"] for a in result.status["attempts"]] == [0, 1, 2]


def test_retry_after_storage_error_then_success():
    first = pod("bot-train-a", 1, terminated={"exitCode": 4, "reason": "Error", "message": {"exitCode": 4, "reason": "StorageError", "message": "S3 unreachable"}})
    body = qj()
    r1 = compute_status(body, observe(job(), [first]), at(60), SETTINGS)
    assert conds(r1.status)["Running"]["reason"] == "Retrying"
    assert [(e.type, e.reason) for e in r1.events] == [("Warning", "StorageError"), ("Normal", "Retrying")]
    assert "S3 unreachable" in r1.events[0].message and "will retry" in r1.events[0].message
    body = apply(body, r1.patch)
    second = pod("bot-train-b", 70, terminated=TERM_OK)
    r2 = compute_status(body, observe(job(("Complete", "CompletionsReached", "")), [first, second]), at(200), SETTINGS)
    assert conds(r2.status)["Complete"]["status"] == "True"
    assert [a["reason"] for a in r2.status["attempts"]] == ["StorageError", "Succeeded"]
    assert r2.status["attempts"][1]["resumedFromStep"] == 10
    assert r2.status["artifacts"] == {
        "run": 1, "generation": 1,
        "adapterUri": "s3://out/a/adapter/", "manifestUri": "s3://out/a/adapter/manifest.json",
        "lastCheckpointUri": "s3://out/a/checkpoints/step-20/",
    }
    assert [(e.type, e.reason) for e in r2.events] == [("Normal", "Completed")]  # the StorageError event is not repeated


# --- transitions, idempotence, stickiness -------------------------------------------------------------


def test_recompute_is_idempotent_and_keeps_transition_times():
    body = qj()
    obs = observe(job(), [pod(running=5)])
    r1 = compute_status(body, obs, at(10), SETTINGS)
    body = apply(body, r1.patch)
    r2 = compute_status(body, obs, at(50), SETTINGS)
    assert r2.patch == {} and r2.events == []
    # the reason changes (stage), status does not: lastTransitionTime stays
    body["status"]["progress"] = {"stage": "Merging", "updatedAt": ts(45), "step": 20}
    r3 = compute_status(body, obs, at(60), SETTINGS)
    assert r3.patch["phase"] == "Merging"
    assert conds(r3.status)["Running"]["lastTransitionTime"] == ts(10)


def test_phase_never_goes_back_to_running_at_the_end_of_a_run():
    """Trainer stages Uploading -> Done, pod exits 0, Job completes: phase Uploading until Succeeded."""
    body = apply(qj(), compute_status(qj(), observe(job(), [pod(running=5)]), at(10), SETTINGS).patch)
    phases = []
    for t, stage, pods_now in ((20, "Uploading", [pod(running=5)]), (30, "Done", [pod(running=5)]),
                               (40, "Done", [pod(terminated=TERM_OK)])):
        body["status"]["progress"] = {"stage": stage, "updatedAt": ts(t), "step": 20}
        result = compute_status(body, observe(job(), pods_now), at(t), SETTINGS)
        body = apply(body, result.patch)
        phases.append(result.status["phase"])
    assert phases == ["Uploading", "Uploading", "Uploading"]


def test_a_pod_being_torn_down_is_never_shown_starting():
    """What the real kubelet shows (tests/node/test_real_node_failures.py): the trainer's end
    first, the pod's terminal phase later. A killed attempt goes Running -> Retrying, the next
    Running -> Finishing -> Completed; never back to Starting."""
    killed = {"exitCode": 137, "reason": "Error"}
    first, second = "bot-train-a", "bot-train-b"
    steps = [
        (10, job(), [pod(first, running=5)]),
        (20, job(), [pod(first, phase="Running", terminated=killed, torn_down=False)]),
        (21, job(), [pod(first, terminated=killed)]),
        (40, job(), [pod(first, terminated=killed), pod(second, 30, running=35)]),
        (90, job(), [pod(first, terminated=killed), pod(second, 30, phase="Running", terminated=TERM_OK, torn_down=False)]),
        (91, job(), [pod(first, terminated=killed), pod(second, 30, terminated=TERM_OK)]),
        (92, job(("Complete", "CompletionsReached", "")), [pod(first, terminated=killed), pod(second, 30, terminated=TERM_OK)]),
    ]
    body, seen = qj(), []
    for t, job_now, pods_now in steps:
        result = compute_status(body, observe(job_now, pods_now), at(t), SETTINGS)
        body = apply(body, result.patch)
        seen.append((result.status["phase"], conds(result.status)["Running"]["reason"]))
    assert seen == [("Running", "TrainerRunning"), ("Pending", "Retrying"), ("Pending", "Retrying"),
                    ("Running", "TrainerRunning"), ("Uploading", "Finishing"), ("Uploading", "Finishing"),
                    ("Succeeded", "Completed")]
    assert [(a["podName"], a["reason"]) for a in body["status"]["attempts"]] == [(first, "Killed"), (second, "Succeeded")]


def test_transition_time_changes_when_status_flips():
    body = qj()
    body = apply(body, compute_status(body, observe(job(), [pod(running=5)]), at(10), SETTINGS).patch)
    done = compute_status(body, observe(job(("Complete", "CompletionsReached", "")), [pod(terminated=TERM_OK)]), at(99), SETTINGS)
    c = conds(done.status)
    assert c["Running"]["status"] == "False" and c["Running"]["lastTransitionTime"] == ts(99)
    assert c["Complete"]["lastTransitionTime"] == ts(99)
    assert c["Failed"]["lastTransitionTime"] == ts(10)  # False before, False now


def test_stalled_uses_the_last_progress_report():
    body = qj(status={"run": 1, "progress": {"step": 7, "updatedAt": ts(100), "stage": "Training"}})
    fresh = compute_status(body, observe(job(), [pod(running=5)]), at(350), SETTINGS)
    assert conds(fresh.status)["Stalled"]["status"] == "False"
    stale = compute_status(body, observe(job(), [pod(running=5)]), at(500), SETTINGS)
    stalled = conds(stale.status)["Stalled"]
    assert (stalled["status"], stalled["reason"]) == ("True", "NoProgress")
    assert "step 7" in stalled["message"] and "400s" in stalled["message"]
    # a report from an earlier attempt does not count for a pod that started later
    new_pod = compute_status(body, observe(job(), [pod(running=450)]), at(500), SETTINGS)
    assert conds(new_pod.status)["Stalled"]["status"] == "False"


def test_terminal_status_is_sticky_when_the_job_is_gone():
    body = qj()
    done = compute_status(body, observe(job(("Complete", "CompletionsReached", "")), [pod(terminated=TERM_OK)]), at(100), SETTINGS)
    body = apply(body, done.patch)
    # ttlSecondsAfterFinished removed the Job and its pods
    later = compute_status(body, observe(None, []), at(5000), SETTINGS)
    assert later.patch == {} and later.events == []
    assert later.status["artifacts"]["adapterUri"] == "s3://out/a/adapter/"
    assert later.terminal


def test_failed_by_operator_stops_an_active_job_again():
    body = qj()
    failed = compute_status(body, observe(job(), [pod(waiting=("ErrImagePull", "nope"))]), at(500), SETTINGS)
    body = apply(body, failed.patch)
    again = compute_status(body, observe(job(), [pod(waiting=("ErrImagePull", "nope"))]), at(520), SETTINGS)
    assert again.stop_reason == "ImagePullFailed" and again.delete_pods == ["bot-train-aaaaa"]
    assert again.patch == {} and again.events == []
    stopped = compute_status(body, observe(job(suspend=True), []), at(530), SETTINGS)
    assert stopped.stop_reason is None and conds(stopped.status)["Failed"]["reason"] == "ImagePullFailed"


def test_attempts_survive_deleted_pods():
    body = qj()
    first = pod("bot-train-a", 1, terminated={"exitCode": 137, "reason": "OOMKilled"})
    body = apply(body, compute_status(body, observe(job(), [first]), at(60), SETTINGS).patch)
    second = pod("bot-train-b", 70, running=75)
    r = compute_status(body, observe(job(), [second]), at(80), SETTINGS)  # the first pod was garbage-collected
    assert [(a["podName"], a["index"]) for a in r.status["attempts"]] == [("bot-train-a", 0), ("bot-train-b", 1)]
    assert r.status["attempts"][0]["reason"] == "OOMKilled"


def test_merge_attempts_keeps_finished_history():
    old = [{"index": 0, "podName": "p", "exitCode": 4, "reason": "StorageError", "finishTime": ts(5)}]
    changed = pod("p", 1, terminated={"exitCode": 0, "reason": "Completed"})
    assert merge_attempts(old, [changed]) == old


def test_new_run_resets_the_status_but_keeps_the_last_published_artifacts():
    done = {
        "run": 1, "jobName": "bot-train", "phase": "Succeeded", "observedGeneration": 1,
        "conditions": [
            {"type": "Running", "status": "False", "reason": "Completed", "message": "", "lastTransitionTime": ts(50)},
            {"type": "Complete", "status": "True", "reason": "Succeeded", "message": "x", "lastTransitionTime": ts(50)},
        ],
        "attempts": [{"index": 0, "podName": "bot-train-a", "exitCode": 0, "reason": "Succeeded"}],
        "artifacts": {"adapterUri": "s3://out/a/adapter/"},
        "progress": {"step": 20, "totalSteps": 20},
        "startTime": ts(0), "completionTime": ts(50),
    }
    body = qj(status=done, generation=2)
    r = compute_status(body, observe(None, [], run=2), at(100), SETTINGS)
    assert r.patch["run"] == 2 and r.patch["jobName"] == "bot-train-r2"
    assert r.patch["attempts"] == []
    for key in ("progress", "startTime", "completionTime"):
        assert key in r.patch and r.patch[key] is None
    # Run 1's adapter stays listed (its own prefix is untouched) until run 2 completes.
    assert "artifacts" not in r.patch and r.status["artifacts"] == {"adapterUri": "s3://out/a/adapter/"}
    c = conds(r.status)
    assert c["Complete"]["status"] == "False" and c["Complete"]["lastTransitionTime"] == ts(100)
    assert c["Running"]["observedGeneration"] == 2
    assert r.status["phase"] == "Pending"


def test_spec_rejected_condition_and_event():
    body = qj()
    message = "spec.dataset.uri changed while run 1 is active"
    r = compute_status(body, observe(job(), [pod(running=5)], spec_rejected=message), at(10), SETTINGS)
    rejected = conds(r.status)["SpecRejected"]
    assert (rejected["status"], rejected["reason"]) == ("True", "TrainingFieldsImmutable")
    assert ("Warning", "SpecRejected") in [(e.type, e.reason) for e in r.events]
    body = apply(body, r.patch)
    cleared = compute_status(body, observe(job(), [pod(running=5)]), at(20), SETTINGS)
    assert "SpecRejected" not in conds(cleared.status)
    assert cleared.events == []


def test_resumed_and_suspended_events():
    body = qj()
    body = apply(body, compute_status(body, observe(job(suspend=True), [], suspend_requested=True), at(10), SETTINGS).patch)
    r = compute_status(body, observe(job(), [pod(running=20)]), at(30), SETTINGS)
    assert ("Normal", "Resumed") in [(e.type, e.reason) for e in r.events]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"exitCode": 3, "reason": "InvalidData"}', {"exitCode": 3, "reason": "InvalidData"}),
        ("Traceback (most recent call last): ...", None),
        ("", None),
        ("[1, 2]", None),
    ],
)
def test_parse_termination_message(text, expected):
    assert parse_termination_message(text) == expected


MERGE_CHECK = {
    "passed": True, "dtype": "bfloat16", "onto": "nf4-dequantised", "maxAbsLogitDiff": 1.16, "tolerance": 3.0,
    "top1Agreement": 1.0, "minTop1Agreement": 0.95, "greedyTokensAgree": 80, "greedyTokens": 80,
}


def test_merge_check_is_copied_into_status_artifacts():
    term = copy.deepcopy(TERM_OK)
    term["message"]["artifacts"].update(
        mergedUri="s3://out/a/merged/", mergeCheck={**MERGE_CHECK, "prompts": ["not copied"], "junk": {"x": 1}}
    )
    r = compute_status(qj(), observe(job(("Complete", "", "")), [pod(terminated=term)]), at(100), SETTINGS)
    assert r.status["phase"] == "Succeeded"
    assert r.status["artifacts"]["mergedUri"] == "s3://out/a/merged/"
    assert r.status["artifacts"]["mergeCheck"] == MERGE_CHECK  # the summary fields only
    QLoRAJobStatus.model_validate(r.status)  # the shape the CRD's status schema accepts


TRACKING = {"mlflowRunId": "a" * 32, "mlflowExperimentId": "4", "tensorboardUri": "s3://out/a/run-1/tensorboard",
            "mlflowRunUri": "http://mlflow:5000/#/experiments/4/runs/" + "a" * 32}


@pytest.mark.parametrize(
    ("tracking", "expected"),
    [
        (TRACKING, TRACKING),
        ({**TRACKING, "password": "not copied", "mlflowExperimentId": 4, "mlflowRunUri": "x" * 5000},
         {"mlflowRunId": "a" * 32, "tensorboardUri": "s3://out/a/run-1/tensorboard"}),  # strings <= 4 KiB only
        ({"mlflowRunId": ""}, None),
        ("a" * 32, None),
    ],
    ids=["copied", "filtered", "empty", "not-an-object"],
)
def test_tracking_is_copied_into_status_artifacts(tracking, expected):
    term = copy.deepcopy(TERM_OK)
    term["message"]["artifacts"]["tracking"] = tracking
    r = compute_status(qj(), observe(job(("Complete", "", "")), [pod(terminated=term)]), at(100), SETTINGS)
    assert r.status["artifacts"].get("tracking") == expected
    assert r.status["artifacts"]["adapterUri"] == TERM_OK["message"]["artifacts"]["adapterUri"]
    QLoRAJobStatus.model_validate(r.status)  # the shape the CRD's status schema accepts


def test_failed_merge_check_fails_the_job_and_lists_the_adapter_without_a_merged_model():
    check = {**MERGE_CHECK, "passed": False, "maxAbsLogitDiff": 18.3, "top1Agreement": 0.41, "greedyTokensAgree": 30}
    message = ("bfloat16 merge onto nf4-dequantised answers differently from base + adapter: max |logit diff| 18.3 "
               "(tolerance 3); the adapter is published, the merged model is not")
    term = {"exitCode": 8, "reason": "Error", "message": {
        "exitCode": 8, "reason": "MergeCheckFailed", "message": message,
        "artifacts": {"adapterUri": "s3://out/a/adapter/", "manifestUri": "s3://out/a/adapter/manifest.json",
                      "mergeCheck": check},
    }}
    r = compute_status(qj(), observe(job(("Failed", "PodFailurePolicy", "")), [pod(terminated=term)]), at(300), SETTINGS)
    failed = conds(r.status)["Failed"]
    assert (failed["status"], failed["reason"]) == ("True", "MergeCheckFailed")
    assert "max |logit diff| 18.3" in failed["message"] and "not retried" in failed["message"]
    assert r.status["phase"] == "Failed" and r.terminal
    assert r.status["artifacts"]["adapterUri"] == "s3://out/a/adapter/"
    assert "mergedUri" not in r.status["artifacts"] and r.status["artifacts"]["mergeCheck"] == check
    assert ("Warning", "MergeCheckFailed") in [(e.type, e.reason) for e in r.events]
    QLoRAJobStatus.model_validate(r.status)


def test_artifacts_never_from_a_failed_attempt():
    term = dict(TERM_OK, exitCode=4)
    r = compute_status(qj(), observe(job(), [pod(terminated=term)]), at(100), SETTINGS)
    assert r.status["artifacts"] is None


def test_log_tail_message_on_failure():
    term = {"exitCode": 1, "reason": "Error", "message": "line\n" * 3 + "RuntimeError: boom"}
    r = compute_status(qj(), observe(job(("Failed", "BackoffLimitExceeded", "")), [pod(terminated=term)], backoff_limit=0), at(100), SETTINGS)
    assert r.status["attempts"][0]["message"].endswith("RuntimeError: boom")


# --- planning -------------------------------------------------------------------------------------


def recorded(spec: dict) -> dict:
    parsed, _ = plan.validate(spec, SETTINGS)
    return render.canonical_spec(parsed)


def changed_spec(**updates) -> dict:
    spec = copy.deepcopy(SPEC)
    for key, value in updates.items():
        spec[key] = value
    return spec


def complete_status(run: int = 1) -> dict:
    return {"run": run, "conditions": [{"type": "Complete", "status": "True", "reason": "Succeeded", "lastTransitionTime": ts(0)}]}


PLAN_CASES = [
    # id, status, spec, jobs, recorded spec, action, run, rejected?
    ("fresh", None, SPEC, [], None, "create", 1, False),
    ("active-unchanged", {"run": 1}, SPEC, [job()], SPEC, "observe", 1, False),
    ("active-dataset-changed", {"run": 1}, changed_spec(dataset={"uri": "s3://data/b.jsonl"}), [job()], SPEC, "observe", 1, True),
    ("active-suspend-changed", {"run": 1}, changed_spec(runPolicy={"suspend": True}), [job()], SPEC, "observe", 1, False),
    ("suspended-dataset-changed", {"run": 1}, changed_spec(dataset={"uri": "s3://data/b.jsonl"}), [job(suspend=True)], SPEC, "start-next", 2, False),
    ("active-scheduling-changed", {"run": 1}, changed_spec(scheduling={"nodeSelector": {"a": "b"}}), [job()], SPEC, "observe", 1, False),
    ("complete-unchanged", complete_status(), SPEC, [job(("Complete", "CompletionsReached", ""))], SPEC, "observe", 1, False),
    ("complete-dataset-changed", complete_status(), changed_spec(dataset={"uri": "s3://data/b.jsonl"}), [job(("Complete", "CompletionsReached", ""))], SPEC, "start-next", 2, False),
    ("failed-job-lr-changed", {"run": 1}, changed_spec(training={"learningRate": 0.001}), [job(("Failed", "BackoffLimitExceeded", ""))], SPEC, "start-next", 2, False),
    ("complete-backoff-limit-changed", complete_status(), changed_spec(runPolicy={"backoffLimit": 7}), [job(("Complete", "CompletionsReached", ""))], SPEC, "observe", 1, False),
    ("complete-secret-rotated", complete_status(), changed_spec(storage={**SPEC.get("storage", {}), "credentialsSecretRef": {"name": "rotated"}}), [job(("Complete", "CompletionsReached", ""))], SPEC, "observe", 1, False),
    ("suspended-backoff-limit-changed", {"run": 1}, changed_spec(runPolicy={"suspend": True, "backoffLimit": 7}), [job(suspend=True)], SPEC, "observe", 1, False),
    ("ttl-deleted-unchanged", complete_status(), SPEC, [], SPEC, "observe", 1, False),
    ("ttl-deleted-changed", complete_status(), changed_spec(lora={"r": 8}), [], SPEC, "start-next", 2, False),
    ("crash-before-job-of-run-2", {"run": 2}, SPEC, [job(("Complete", "CompletionsReached", ""))], None, "create", 2, False),
    ("job-of-run-2-not-yet-in-status", complete_status(), changed_spec(dataset={"uri": "s3://data/b.jsonl"}), [job(("Complete", "CompletionsReached", "")), job(run=2, spec=changed_spec(dataset={"uri": "s3://data/b.jsonl"}))], changed_spec(dataset={"uri": "s3://data/b.jsonl"}), "observe", 2, False),
]


@pytest.mark.parametrize(("case", "status", "spec", "jobs", "rec", "action", "run", "rejected"), PLAN_CASES, ids=[c[0] for c in PLAN_CASES])
def test_plan_table(case, status, spec, jobs, rec, action, run, rejected):
    body = qj(status=status, spec=spec)
    parsed, invalid = plan.validate(body["spec"], SETTINGS)
    result = plan.decide(body, parsed, invalid, jobs, recorded(rec) if rec else None)
    assert (result.action, result.run) == (action, run)
    assert isinstance(result.action, plan.Action)
    assert bool(result.changed_fields) is (action == "start-next" or rejected)
    assert bool(result.spec_rejected) is rejected
    if rejected:
        assert "spec.dataset.uri" in result.spec_rejected and "run 2" in result.spec_rejected


def test_plan_invalid_spec_only_the_operator_sees():
    spec = changed_spec(resources={"gpus": 9})
    parsed, invalid = plan.validate(spec, OperatorSettings(max_gpus_per_job=8))
    assert parsed is None
    assert invalid.startswith("spec.resources.gpus: 9 GPUs requested") and "at most 8" in invalid
    result = plan.decide(qj(spec=spec), parsed, invalid, [], None)
    assert result.action == "invalid" and result.run == 0


def test_plan_invalid_change_on_a_finished_job():
    spec = changed_spec(resources={"gpus": 9})
    parsed, invalid = plan.validate(spec, SETTINGS)
    result = plan.decide(qj(status=complete_status(), spec=spec), parsed, invalid, [job(("Complete", "CompletionsReached", ""))], recorded(SPEC))
    assert result.action == "invalid" and "spec.resources.gpus" in result.invalid


def test_owned_filter():
    j = job()
    assert plan.owned(j, "uid-1")
    assert not plan.owned(j, "uid-2")


# --- the reconcile glue, against an in-memory API ---------------------------------------------------


class FakeKube:
    """Just enough of qlora_operator.kube.Kube, in memory (create twice -> the existing object)."""

    def __init__(self, body: dict):
        self.body = copy.deepcopy(body)
        self.objects: dict[tuple[str, str], dict] = {}
        self.calls: list[str] = []
        self.events: list[tuple[str, str]] = []
        self.pods: dict[int, list[dict]] = {}

    def get_qlorajob(self, namespace, name):
        return copy.deepcopy(self.body)

    def patch_qlorajob_status(self, namespace, name, patch):
        self.calls.append("patch-status")
        status = self.body.setdefault("status", {})
        for key, value in patch.items():
            if value is None:
                status.pop(key, None)
            else:
                status[key] = copy.deepcopy(value)
        return copy.deepcopy(self.body)

    def list_jobs(self, namespace, name):
        return [copy.deepcopy(o) for (k, _), o in self.objects.items() if k == "Job"]

    def get_config_map(self, namespace, name):
        return copy.deepcopy(self.objects.get(("ConfigMap", name)))

    def create_or_adopt(self, obj, owner_uid):
        key = (obj["kind"], obj["metadata"]["name"])
        if key in self.objects:
            return copy.deepcopy(self.objects[key]), "exists"
        self.calls.append(f"create-{obj['kind']}")
        stored = copy.deepcopy(obj)
        stored["metadata"]["uid"] = f"uid-{len(self.objects)}"
        self.objects[key] = stored
        return copy.deepcopy(stored), "created"

    def list_pods(self, namespace, name, run):
        return copy.deepcopy(self.pods.get(run, []))

    def list_job_events(self, namespace, job):
        return []

    def patch_job(self, namespace, name, patch):
        self.calls.append("patch-job")
        job = self.objects[("Job", name)]
        job["spec"].update(patch.get("spec", {}))
        ann = job["metadata"].setdefault("annotations", {})
        for key, value in ((patch.get("metadata") or {}).get("annotations") or {}).items():
            if value is None:
                ann.pop(key, None)
            else:
                ann[key] = value
        return copy.deepcopy(job)

    def delete(self, api_version, kind, namespace, name, **_):
        self.calls.append(f"delete-{kind}")
        return self.objects.pop((kind, name), None) is not None

    def delete_pod(self, namespace, name):
        self.calls.append("delete-pod")
        return True

    def create_event(self, body, type_, reason, message):
        self.events.append((type_, reason))


def test_reconcile_is_idempotent():
    from qlora_operator.reconcile import reconcile

    api = FakeKube(qj())
    out = reconcile(api, SETTINGS, "ns", "bot", ensure=True, now=lambda: at(0))
    assert out.phase == "Pending" and not out.terminal
    kinds = sorted(k for k, _ in api.objects)
    assert kinds == ["ConfigMap", "Job", "Role", "RoleBinding", "ServiceAccount"]
    assert api.body["status"]["run"] == 1 and api.body["status"]["jobName"] == "bot-train"
    assert ("Normal", "JobCreated") in api.events
    api.calls.clear()
    api.events.clear()
    for i in range(3):  # again and again: nothing new is created, nothing changes
        reconcile(api, SETTINGS, "ns", "bot", ensure=True, now=lambda: at(1 + i))
    assert api.calls == [] and api.events == []


def test_reconcile_spec_change_after_completion_starts_exactly_one_run():
    from qlora_operator.reconcile import reconcile

    api = FakeKube(qj())
    reconcile(api, SETTINGS, "ns", "bot", now=lambda: at(0))
    api.objects[("Job", "bot-train")]["status"] = {"conditions": [{"type": "Complete", "status": "True", "reason": "CompletionsReached"}]}
    reconcile(api, SETTINGS, "ns", "bot", now=lambda: at(10))
    assert api.body["status"]["phase"] == "Succeeded"
    api.body["spec"]["dataset"]["uri"] = "s3://data/b.jsonl"
    api.body["metadata"]["generation"] = 2
    patches = []
    for i in range(3):
        api.calls.clear()
        reconcile(api, SETTINGS, "ns", "bot", ensure=True, now=lambda: at(20 + i))
        patches.append(api.calls.count("patch-status"))
        if i == 0:
            assert api.calls.index("patch-status") < api.calls.index("create-ConfigMap"), api.calls
    assert patches == [2, 0, 0]  # run 2 recorded before its children, then observed; then nothing changes
    assert sorted(name for kind, name in api.objects if kind == "Job") == ["bot-train", "bot-train-r2"]
    assert api.body["status"]["run"] == 2 and api.body["status"]["observedGeneration"] == 2
    assert [e for e in api.events if e[1] == "RunStarted"] == [("Normal", "RunStarted")]
    assert "s3://data/b.jsonl" in api.objects[("ConfigMap", "bot-config-r2")]["data"]["config.json"]


def test_reconcile_outcome_carries_the_progress_it_read():
    from qlora_operator.reconcile import reconcile

    api = FakeKube(qj())
    assert reconcile(api, SETTINGS, "ns", "bot", now=lambda: at(0)).progress is None
    api.body["status"]["progress"] = {"step": 5, "totalSteps": 60, "loss": 2.5}
    out = reconcile(api, SETTINGS, "ns", "bot", now=lambda: at(1))
    assert out.progress == {"step": 5, "totalSteps": 60, "loss": 2.5} and out.completion_time is None


def test_handlers_export_training_metrics_from_the_reconciled_status():
    import asyncio

    import kopf
    from prometheus_client import CollectorRegistry

    from qlora_operator import handlers
    from qlora_operator.metrics import Metrics

    api = FakeKube(qj())
    runtime = handlers.Runtime(settings=SETTINGS, kube=api, metrics=Metrics(CollectorRegistry()))
    memo = kopf.Memo(runtime=runtime)
    labels = {"namespace": "ns", "name": "bot"}

    async def scenario() -> list:
        seen = []
        reconciler = handlers._reconciler(memo)
        await reconciler.reconcile_now("ns", "bot")
        api.body["status"]["progress"] = {"step": 7, "totalSteps": 60, "tokensPerSecond": 900.0, "gpuMemoryGiB": 1.5}
        await reconciler.reconcile_now("ns", "bot", ensure=False, trigger="watch")
        seen.append(runtime.metrics.registry.get_sample_value("qlora_job_step", labels))
        seen.append(runtime.metrics.registry.get_sample_value("qlora_job_gpu_memory_peak_bytes", labels))
        seen.append(runtime.metrics.registry.get_sample_value("qlora_jobs", {"phase": "Pending"}))
        await handlers.qlorajob_event(event={"type": "DELETED"}, namespace="ns", name="bot", memo=memo)
        seen.append(runtime.metrics.registry.get_sample_value("qlora_job_step", labels))
        return seen

    assert asyncio.run(scenario()) == [7, 1.5 * 2**30, 1, None]


def test_reconcile_invalid_spec():
    from qlora_operator.reconcile import reconcile

    api = FakeKube(qj(spec=changed_spec(resources={"gpus": 9})))
    out = reconcile(api, OperatorSettings(max_gpus_per_job=8), "ns", "bot", now=lambda: at(0))
    assert out.invalid and "spec.resources.gpus" in out.invalid
    assert api.objects == {}
    assert conds(api.body["status"])["Failed"]["reason"] == "InvalidSpec"
    assert api.events == [("Warning", "InvalidSpec")]


def test_reconcile_suspend_and_resume_patch_the_job():
    from qlora_operator.reconcile import reconcile

    api = FakeKube(qj())
    reconcile(api, SETTINGS, "ns", "bot", now=lambda: at(0))
    api.body["spec"]["runPolicy"] = {"suspend": True}
    reconcile(api, SETTINGS, "ns", "bot", now=lambda: at(1))
    assert api.objects[("Job", "bot-train")]["spec"]["suspend"] is True
    assert api.objects[("Job", "bot-train")]["metadata"]["annotations"][render.ANN_USER_SUSPENDED] == "true"
    assert api.body["status"]["phase"] == "Suspended"
    api.body["spec"]["runPolicy"] = {"suspend": False}
    reconcile(api, SETTINGS, "ns", "bot", now=lambda: at(2))
    assert api.objects[("Job", "bot-train")]["spec"]["suspend"] is False
    assert render.ANN_USER_SUSPENDED not in api.objects[("Job", "bot-train")]["metadata"]["annotations"]


# --- several nodes: group status and restarts (issue 10) --------------------------------------------

GROUP_SPEC = {**SPEC, "resources": {"nodes": 2, "gpus": 1}}


def gjob(*conditions, run: int = 1, group: render.GroupAttempt | None = None, suspend: bool = False, **status) -> dict:
    """:func:`job` of the two-node :data:`GROUP_SPEC`."""
    return job(*conditions, suspend=suspend, run=run, spec=GROUP_SPEC, group=group, **status)


def gpod(index: int, run: int = 1, created: float = 1, **kw) -> dict:
    """Pod of node ``index`` of run ``run`` (``node``: the Kubernetes Node it is bound to)."""
    name = f"{render.job_name('bot', run)}-{index}-x{created:g}".replace(".", "")
    out = pod(name, created, **kw)
    out["metadata"]["labels"][render.LABEL_RUN] = str(run)
    out["metadata"]["labels"][render.COMPLETION_INDEX] = str(index)
    out["metadata"]["annotations"] = {render.COMPLETION_INDEX: str(index)}
    return out


def gobserve(job_obj, pods=(), run: int = 1, **kw) -> Observed:
    return observe(job_obj, pods, run=run, **kw)


FAIL_POLICY = ("Failed", "PodFailurePolicy", "Container trainer for pod ns/bot-train-1-x failed with exit code 1 matching FailJob rule at index 2")
EXIT1 = {"exitCode": 1, "reason": "Error", "message": "RuntimeError: NCCL error"}
SIGTERM = {"exitCode": 143, "reason": "Error"}


def test_group_running_shows_every_node():
    pods = [gpod(0, running=5), gpod(1, running=6, node="node-2")]
    r = compute_status(qj(spec=GROUP_SPEC), gobserve(gjob(), pods), at(10), SETTINGS)
    running = conds(r.status)["Running"]
    assert (running["status"], running["reason"]) == ("True", "TrainerRunning")
    assert "2/2 nodes running" in running["message"] and "node 1: bot-train-1-x1 on node-2" in running["message"]
    assert [(a["index"], a["node"], a["phase"]) for a in r.status["attempts"]] == [(0, 0, "Running"), (0, 1, "Running")]
    assert r.status["phase"] == "Running"


def test_group_reports_the_pod_that_holds_it_up():
    pods = [gpod(0, running=5), gpod(1, node=None, unschedulable=("0/2 nodes are available: 2 Insufficient nvidia.com/gpu.", 2))]
    r = compute_status(qj(spec=GROUP_SPEC), gobserve(gjob(), pods), at(30), SETTINGS)
    running = conds(r.status)["Running"]
    assert running["reason"] == "Unschedulable"
    assert "pod bot-train-1-x1 (node 1) cannot be scheduled" in running["message"]
    starting = compute_status(qj(spec=GROUP_SPEC), gobserve(gjob(), [gpod(0, running=5), gpod(1, waiting=("ContainerCreating", ""))]), at(6), SETTINGS)
    assert conds(starting.status)["Running"]["reason"] == "Starting"
    assert "1/2 nodes running" in starting.status["message"]


def test_group_failure_waits_for_every_pod_then_restarts():
    body = qj(spec=GROUP_SPEC)
    failing = [gpod(0, running=5, deleting=True), gpod(1, terminated=EXIT1)]
    r1 = compute_status(body, gobserve(gjob(("FailureTarget", "PodFailurePolicy", "x")), failing), at(60), SETTINGS)
    running = conds(r1.status)["Running"]
    assert (running["status"], running["reason"]) == ("True", "Restarting")
    assert "run 1 failed: attempt 0 (node 1, pod bot-train-1-x1) exited with code 1 (TrainerError)" in running["message"]
    assert "waiting for 1 pod(s) to stop" in running["message"]
    assert r1.restart is None and not r1.terminal
    assert [(e.type, e.reason) for e in r1.events] == [("Warning", "TrainerError"), ("Normal", "Restarting")]
    assert "the group restarts" in r1.events[0].message
    body = apply(body, r1.patch)
    stopped = [gpod(0, terminated=SIGTERM), gpod(1, terminated=EXIT1)]
    r2 = compute_status(body, gobserve(gjob(FAIL_POLICY), stopped), at(70), SETTINGS)
    assert r2.restart == status_mod.GroupRestart(run=2, group=render.GroupAttempt(1, 1, 1, 1), why=r2.restart.why)
    assert "1 of runPolicy.backoffLimit 3 retries used" in r2.restart.why
    assert "restarting all 2 nodes as run 2" in r2.status["message"]
    assert r2.events == []  # node 0's SIGTERM (the group being torn down) is no failure of its own
    assert [(a["node"], a["reason"]) for a in r2.status["attempts"]] == [(0, "Terminated"), (1, "TrainerError")]


def test_group_restart_continues_attempts_and_progress():
    body = qj(spec=GROUP_SPEC)
    body = apply(body, compute_status(body, gobserve(gjob(FAIL_POLICY), [gpod(0, terminated=SIGTERM), gpod(1, terminated=EXIT1)]), at(70), SETTINGS).patch)
    body["status"]["progress"] = {"step": 12, "totalSteps": 40, "updatedAt": ts(50)}
    start = body["status"]["startTime"]
    run2 = gjob(run=2, group=render.GroupAttempt(1, 1, 1, 1))
    r = compute_status(body, gobserve(run2, [], run=2), at(80), SETTINGS)
    assert r.status["run"] == 2 and r.status["jobName"] == "bot-train-r2"
    assert "progress" not in r.patch and r.status["startTime"] == start
    assert len(r.status["attempts"]) == 2
    assert "run 2 (group attempt 1) restarts run 1" in r.status["message"]
    body = apply(body, r.patch)
    pods = [gpod(0, run=2, created=81, running=85), gpod(1, run=2, created=81, running=86)]
    r = compute_status(body, gobserve(run2, pods, run=2), at(90), SETTINGS)
    assert [(a["index"], a["node"], a.get("reason")) for a in r.status["attempts"]] == [
        (0, 0, "Terminated"), (0, 1, "TrainerError"), (1, 0, None), (1, 1, None)]
    assert conds(r.status)["Running"]["reason"] == "TrainerRunning"
    done = [gpod(0, run=2, created=81, terminated=TERM_OK), gpod(1, run=2, created=81, terminated={"exitCode": 0, "reason": "Completed"})]
    body = apply(body, r.patch)
    r = compute_status(body, gobserve(gjob(("Complete", "CompletionsReached", ""), run=2, group=render.GroupAttempt(1, 1, 1, 1)), done, run=2), at(200), SETTINGS)
    assert r.status["phase"] == "Succeeded" and r.status["artifacts"]["adapterUri"] == "s3://out/a/adapter/"
    assert [a["reason"] for a in r.status["attempts"]][-2:] == ["Succeeded", "Succeeded"]


def test_group_attempt_whose_pod_vanished_is_closed_as_stopped():
    previous = [{"index": 0, "node": 0, "podName": "bot-train-0-a", "phase": "Running"},
                {"index": 0, "node": 1, "podName": "bot-train-1-a", "exitCode": 1, "reason": "TrainerError", "finishTime": ts(5)}]
    merged = merge_attempts(previous, [gpod(0, run=2, created=9, running=10)], group_attempt=1)
    assert merged[0]["reason"] == "Stopped" and merged[0]["phase"] == "Failed"
    assert [(a["index"], a["node"]) for a in merged] == [(0, 0), (0, 1), (1, 0)]


@pytest.mark.parametrize(
    ("failed_pod", "reason", "fragment"),
    [
        ({"terminated": {"exitCode": 3, "reason": "Error", "message": {"exitCode": 3, "reason": "InvalidData", "message": "line 7"}}},
         "InvalidData", "not retried"),
        ({"terminated": {"exitCode": 7, "reason": "Error"}}, "InsufficientGPUMemory", "not retried"),
        ({"terminated": {"exitCode": 2, "reason": "Error"}}, "InvalidConfig", "not retried"),
    ],
)
def test_group_permanent_failure_is_not_restarted(failed_pod, reason, fragment):
    pods = [gpod(0, terminated=SIGTERM), gpod(1, **failed_pod)]
    r = compute_status(qj(spec=GROUP_SPEC), gobserve(gjob(FAIL_POLICY), pods), at(100), SETTINGS)
    failed = conds(r.status)["Failed"]
    assert (failed["status"], failed["reason"]) == ("True", reason) and fragment in failed["message"]
    assert r.restart is None and r.terminal and r.stop_reason is None
    assert "node 1" in failed["message"]


def test_group_disruption_restarts_without_counting():
    pods = [gpod(0, terminated=SIGTERM, disruption="PreemptionByScheduler"), gpod(1, terminated=EXIT1)]
    job = gjob(("Failed", "PodFailurePolicy", "Pod ns/x has condition DisruptionTarget matching FailJob rule at index 0"),
               group=render.GroupAttempt(2, 3, None))
    r = compute_status(qj(spec=GROUP_SPEC), gobserve(job, pods, backoff_limit=3), at(100), SETTINGS)
    assert r.restart is not None and r.restart.group == render.GroupAttempt(3, 3, 1, 1)
    assert "disrupted" in r.restart.why and "not counted" in r.restart.why
    assert ("Warning", "Disrupted") in [(e.type, e.reason) for e in r.events]


def test_single_node_attempt_whose_pod_vanished_is_closed_as_stopped():
    """An evicted pod ended and was deleted between two reconciles; the Job made a new one."""
    previous = [{"index": 0, "podName": "bot-train-a", "phase": "Running", "startTime": ts(5)}]
    merged = merge_attempts(previous, [pod("bot-train-b", 9, running=10)])
    assert [(a["index"], a["podName"], a["phase"], a.get("reason")) for a in merged] == [
        (0, "bot-train-a", "Failed", "Stopped"), (1, "bot-train-b", "Running", None)]
    assert merged[0]["message"] == "stopped: the pod was deleted before its end was seen"


def _running_group_then_vanished(job_failure):
    """A two-node run seen running, then (next reconcile) its pods gone and the Job failed with ``job_failure``."""
    body = qj(spec=GROUP_SPEC)
    body = apply(body, compute_status(body, gobserve(gjob(), [gpod(0, running=5), gpod(1, running=5)]), at(10), SETTINGS).patch)
    return compute_status(body, gobserve(gjob(job_failure), [], backoff_limit=0), at(20), SETTINGS)


def test_group_disruption_is_read_from_the_job_when_the_pods_vanished():
    """Evicted pod ended and deleted between two reconciles: the Job's message names the rule."""
    r = _running_group_then_vanished(
        ("Failed", "PodFailurePolicy", "Pod ns/bot-train-1-x1 has condition DisruptionTarget matching FailJob rule at index 0"))
    assert [(a["node"], a["reason"]) for a in r.status["attempts"]] == [(0, "Stopped"), (1, "Disrupted")]
    assert "DisruptionTarget" in r.status["attempts"][1]["message"]
    assert r.restart is not None and r.restart.group == render.GroupAttempt(1, 0, 1, 1)  # not counted, even with backoffLimit 0
    assert "disrupted" in r.restart.why and "not counted" in r.restart.why
    assert [(e.type, e.reason) for e in r.events][0] == ("Warning", "Disrupted")


def test_group_permanent_exit_code_is_read_from_the_job_when_the_pods_vanished():
    r = _running_group_then_vanished(
        ("Failed", "PodFailurePolicy", "Container trainer for pod ns/bot-train-1-x1 failed with exit code 3 matching FailJob rule at index 1"))
    failed = conds(r.status)["Failed"]
    assert (failed["status"], failed["reason"]) == ("True", "InvalidData") and "not retried" in failed["message"]
    assert r.restart is None and r.terminal
    assert r.status["attempts"][1]["exitCode"] == 3 and r.status["attempts"][0]["reason"] == "Stopped"


def test_job_failure_message_does_not_override_what_the_pod_showed():
    attempts = [{"index": 0, "node": 1, "podName": "p", "phase": "Failed", "exitCode": 1, "reason": "TrainerError"}]
    job_obj = gjob(("Failed", "PodFailurePolicy", "Pod ns/p has condition DisruptionTarget matching FailJob rule at index 0"))
    assert attempts_mod.attempts_with_job_failure(attempts, job_obj) == attempts
    other = gjob(("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit"))
    stopped = [{"index": 0, "node": 1, "podName": "p", "phase": "Failed", "reason": "Stopped"}]
    assert attempts_mod.attempts_with_job_failure(stopped, other) == stopped


@pytest.mark.parametrize(
    ("backoff", "failures", "reason", "fragment"),
    [
        (3, 3, "BackoffLimitExceeded", "TrainerError: 4 group attempts failed (runPolicy.backoffLimit 3)"),
        (0, 0, "TrainerError", "runPolicy.backoffLimit is 0 (no retries)"),
    ],
)
def test_group_backoff_limit(backoff, failures, reason, fragment):
    pods = [gpod(0, terminated=SIGTERM), gpod(1, terminated=EXIT1)]
    job = gjob(FAIL_POLICY, group=render.GroupAttempt(failures, failures, None))
    r = compute_status(qj(spec=GROUP_SPEC), gobserve(job, pods, backoff_limit=backoff), at(100), SETTINGS)
    failed = conds(r.status)["Failed"]
    assert (failed["status"], failed["reason"]) == ("True", reason)
    assert fragment in failed["message"] and r.restart is None and r.terminal


def test_group_suspended_restarts_suspended_without_counting():
    pods = [gpod(0, terminated=SIGTERM), gpod(1, terminated=SIGTERM)]
    job = gjob(FAIL_POLICY, suspend=True)
    r = compute_status(qj(spec=GROUP_SPEC), gobserve(job, pods, suspend_requested=True), at(100), SETTINGS)
    assert conds(r.status)["Suspended"]["reason"] == "SuspendedByUser" and r.status["phase"] == "Suspended"
    assert r.restart is not None and r.restart.group == render.GroupAttempt(1, 0, 1, 1)
    assert not r.terminal


def test_group_resumed_in_the_same_run_counts_attempts_per_node():
    """Suspending an Indexed Job deletes its pods without failing it; resuming creates new ones."""
    body = qj(spec=GROUP_SPEC)
    body = apply(body, compute_status(body, gobserve(gjob(), [gpod(0, running=5), gpod(1, running=5)]), at(10), SETTINGS).patch)
    suspended = compute_status(body, gobserve(gjob(suspend=True), [], suspend_requested=True), at(20), SETTINGS)
    assert suspended.status["phase"] == "Suspended" and suspended.restart is None
    assert [a["reason"] for a in suspended.status["attempts"]] == ["Stopped", "Stopped"]
    body = apply(body, suspended.patch)
    resumed = compute_status(body, gobserve(gjob(), []), at(30), SETTINGS)
    assert conds(resumed.status)["Running"]["reason"] == "Pending"  # not a failure: waiting for the new pods
    body = apply(body, resumed.patch)
    again = compute_status(body, gobserve(gjob(), [gpod(0, created=31, running=32), gpod(1, created=31, running=33)]), at(40), SETTINGS)
    assert [(a["index"], a["node"], a.get("reason")) for a in again.status["attempts"]] == [
        (0, 0, "Stopped"), (0, 1, "Stopped"), (1, 0, None), (1, 1, None)]
    assert conds(again.status)["Running"]["reason"] == "TrainerRunning"
    fail = [gpod(0, created=31, terminated=SIGTERM), gpod(1, created=31, terminated=EXIT1)]
    body = apply(body, again.patch)
    r = compute_status(body, gobserve(gjob(FAIL_POLICY), fail), at(50), SETTINGS)
    assert r.restart is not None and "node 1" in r.restart.why  # the resumed pods' failure counts


def test_group_deadline_fails():
    pods = [gpod(0, terminated=SIGTERM), gpod(1, terminated=SIGTERM)]
    job = gjob(("Failed", "DeadlineExceeded", "Job was active longer than specified deadline"))
    r = compute_status(qj(spec=GROUP_SPEC), gobserve(job, pods, active_deadline_seconds=60), at(100), SETTINGS)
    assert conds(r.status)["Failed"]["reason"] == "DeadlineExceeded" and r.restart is None


def test_single_node_attempts_have_no_node_but_a_phase():
    r = compute_status(qj(), observe(job(), [pod(running=5)]), at(10), SETTINGS)
    assert r.status["attempts"] == [{"index": 0, "podName": "bot-train-aaaaa", "phase": "Running", "startTime": ts(5)}]


def test_reconcile_restarts_a_failed_group_as_the_next_run():
    from qlora_operator.reconcile import reconcile

    api = FakeKube(qj(spec=GROUP_SPEC))
    reconcile(api, SETTINGS, "ns", "bot", ensure=True, now=lambda: at(0))
    assert sorted(api.objects) == [("ConfigMap", "bot-config"), ("Job", "bot-train"), ("Role", "bot-trainer"),
                                   ("RoleBinding", "bot-trainer"), ("Service", "bot-train"), ("ServiceAccount", "bot-trainer")]
    api.pods[1] = [gpod(0, terminated=SIGTERM), gpod(1, terminated=EXIT1)]
    api.objects[("Job", "bot-train")]["status"] = {"conditions": [
        {"type": t, "status": "True", "reason": "PodFailurePolicy", "message": "x"} for t in ("FailureTarget", "Failed")]}
    patches = []
    for i in range(3):  # again and again: exactly one next run
        api.calls.clear()
        reconcile(api, SETTINGS, "ns", "bot", now=lambda: at(10 + i))
        patches.append(api.calls.count("patch-status"))
    assert patches[0] == 2  # the failed run's status as it ended, then the next run's
    run2 = api.objects[("Job", "bot-train-r2")]
    assert render.group_attempt_of(run2) == render.GroupAttempt(1, 1, 1, 1)
    assert ("Service", "bot-train-r2") in api.objects and ("Service", "bot-train") not in api.objects
    assert ("ConfigMap", "bot-config-r2") in api.objects
    assert not [k for k in api.objects if k[1] == "bot-train-r3"]
    status = api.body["status"]
    assert status["run"] == 2 and status["jobName"] == "bot-train-r2"
    assert [(a["index"], a["node"]) for a in status["attempts"]] == [(0, 0), (0, 1)]
    assert conds(status)["Running"]["status"] == "True"
    created = [e for e in api.events if e[1] == "JobCreated"]
    assert len(created) == 2


# --- runs: the published artifacts of the last successful run, checkpoint decisions -----------------


def test_artifacts_of_run_1_stay_listed_while_run_2_trains_and_are_replaced_when_it_completes():
    body = qj(status=complete_status(), generation=1)
    r1 = compute_status(body, observe(job(("Complete", "CompletionsReached", "")), [pod("bot-train-a", 1, terminated=TERM_OK)]),
                        at(60), SETTINGS)
    assert r1.status["artifacts"]["run"] == 1
    body = apply(qj(status=None, generation=2), r1.status)
    run2_pod = pod("bot-train-r2-a", 70, running=72)
    run2_pod["metadata"]["labels"][render.LABEL_RUN] = "2"
    r2 = compute_status(body, observe(job(run=2), [run2_pod], run=2), at(80), SETTINGS)
    assert r2.status["run"] == 2 and r2.status["artifacts"] == r1.status["artifacts"] and "artifacts" not in r2.patch
    body = apply(body, r2.patch)
    failed = pod("bot-train-r2-a", 70, terminated={"exitCode": 1, "reason": "Error", "message": "boom"})
    r3 = compute_status(body, observe(job(("Failed", "BackoffLimitExceeded", ""), run=2), [failed], run=2), at(90), SETTINGS)
    assert conds(r3.status)["Failed"]["status"] == "True"
    assert r3.status["artifacts"] == r1.status["artifacts"], "a failed run publishes nothing and hides nothing"
    done = copy.deepcopy(TERM_OK)
    done["message"]["artifacts"] = {"adapterUri": "s3://out/a/run-2/adapter/", "manifestUri": "s3://out/a/run-2/adapter/manifest.json"}
    ok = pod("bot-train-r2-a", 70, terminated=done)
    r4 = compute_status(apply(body, {}), observe(job(("Complete", "CompletionsReached", ""), run=2), [ok], run=2), at(95), SETTINGS)
    assert r4.status["artifacts"]["run"] == 2 and r4.status["artifacts"]["adapterUri"] == "s3://out/a/run-2/adapter/"


def test_checkpoint_decision_is_copied_to_its_attempt_once_with_one_event():
    decision = {"podName": "bot-train-a", "decision": "StartedFresh", "fromStep": None,
                "message": "started fresh: previous checkpoints belong to run 1; run 2 started fresh at step 0"}
    body = qj(status={"run": 1, "progress": {"step": 1, "totalSteps": 4, "checkpoint": decision}})
    pods = [pod("bot-train-a", 1, running=3)]
    r1 = compute_status(body, observe(job(), pods), at(10), SETTINGS)
    assert r1.status["attempts"][0]["checkpoint"] == decision["message"]
    assert ("Normal", "StartedFresh") in [(e.type, e.reason) for e in r1.events]
    r2 = compute_status(apply(body, r1.patch), observe(job(), pods), at(20), SETTINGS)
    assert not [e for e in r2.events if e.reason == "StartedFresh"]
    refused = dict(decision, podName="bot-train-b", decision="Resumed", fromStep=4,
                   message="resumed run 1 from its checkpoint at step 4; refused 1 checkpoint(s) under run 1: step-6: "
                           "config fingerprint differs in lora")
    body = apply(body, r2.patch)
    body["status"]["progress"]["checkpoint"] = refused
    pods = [pod("bot-train-a", 1, terminated={"exitCode": 143, "reason": "Error"}), pod("bot-train-b", 30, running=32)]
    r3 = compute_status(body, observe(job(), pods), at(40), SETTINGS)
    second = r3.status["attempts"][1]
    assert second["resumedFromStep"] == 4 and "differs in lora" in second["checkpoint"]
    assert ("Warning", "CheckpointRefused") in [(e.type, e.reason) for e in r3.events]


def test_an_unnamed_trainer_crash_is_a_trainer_error_with_the_traceback_last_line():
    log_tail = "Traceback (most recent call last):\n  File x\nRuntimeError: size mismatch for lora_A [16, 576] vs [8, 576]\n"
    attempt = attempts_mod.attempt_from_pod(pod(terminated={"exitCode": 1, "reason": "Error", "message": log_tail}), 0)
    assert attempt["reason"] == "TrainerError"
    assert attempt["message"] == "RuntimeError: size mismatch for lora_A [16, 576] vs [8, 576]"


# ----------------------------------------------------------------------------- exports (issue 17)
_EXPORTS_CASES = [
    ("both", [{"format": "gguf", "quantization": "q8_0", "uri": "s3://o/run-1/export/gguf-q8_0/",
               "file": "s3://o/run-1/export/gguf-q8_0/model-q8_0.gguf"},
              {"format": "vllm", "uri": "s3://o/run-1/export/vllm/"}],
     [{"format": "gguf", "quantization": "q8_0", "uri": "s3://o/run-1/export/gguf-q8_0/",
       "file": "s3://o/run-1/export/gguf-q8_0/model-q8_0.gguf"},
      {"format": "vllm", "uri": "s3://o/run-1/export/vllm/"}]),
    ("malformed-dropped", [{"format": "gguf"}, "x", {"format": 3, "uri": "s3://o/"}, {"format": "vllm", "uri": "s3://o/v/",
                                                                                        "extra": "ignored"}],
     [{"format": "vllm", "uri": "s3://o/v/"}]),
    ("bounded", [{"format": "vllm", "uri": f"s3://o/{i}/"} for i in range(10)],
     [{"format": "vllm", "uri": f"s3://o/{i}/"} for i in range(4)]),
    ("not-a-list", {"format": "gguf"}, None),
]


@pytest.mark.parametrize("case,exports,expected", _EXPORTS_CASES, ids=[c[0] for c in _EXPORTS_CASES])
def test_artifacts_copy_exports_and_loss_plot_from_the_termination_message(case, exports, expected):
    message = {"exitCode": 0, "artifacts": {"adapterUri": "s3://o/run-1/adapter/", "exports": exports,
                                             "lossPlotUri": "s3://o/run-1/adapter/loss.png"}}
    arts = attempts_mod.artifacts_from_pods([pod(terminated={"exitCode": 0, "message": message})])
    assert arts["adapterUri"] == "s3://o/run-1/adapter/" and arts["lossPlotUri"] == "s3://o/run-1/adapter/loss.png"
    assert arts.get("exports") == expected
    from qlora_operator.api import Artifacts

    Artifacts.model_validate(arts)  # what the status schema accepts
