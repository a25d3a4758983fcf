"""Real Kueue (built from its Go module, :mod:`localcluster.kueue`) with the real node.

A ClusterQueue with 1 ``nvidia.com/gpu`` of quota: two 1-GPU Jobs labelled
``kueue.x-k8s.io/queue-name``, as the operator renders them. Kueue's job webhook
suspends both on create; the first is admitted (unsuspended, its pod runs on the real
node from the trainer image), the second's Workload stays pending with Kueue's reason and
is admitted once the first ends. Then the same with QLoRAJobs (the stand-in trainer), and
preemption with the real trainer resuming from its checkpoint.
"""

from __future__ import annotations

import json
import sys

import pytest

from helpers import upload_embedded, wait_for

from operator_harness import (  # helpers of the operator tests
    REAL_TRAINER,
    apply,
    condition,
    events,
    get_qj,
    is_true,
    wait_terminal,
)

from node_jobs import manifest  # the node's stand-in jobs

pytestmark = [pytest.mark.realnode, pytest.mark.cluster]

#: Fake ``nvidia.com/gpu`` of the node (read by the ``node`` fixture): more than the queue's quota
#: of 1, so Kueue (not the scheduler) is what makes a job wait.
NODE_GPUS = 2


@pytest.fixture(scope="module")
def kueue(cluster):
    """Kueue started on the real-node cluster for this module; its webhooks removed after."""
    from localcluster.kueue import Kueue

    with Kueue(cluster) as running:
        print(f"\nkueue {running.version} up in {running.startup_seconds:.1f}s", file=sys.stderr)
        yield running
    assert running.pid == 0


def _apply(cluster, *docs):
    cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(docs)}))


def _queues(cluster, namespace: str, gpus: int = 1, preemption: bool = False):
    flavor = {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": "default-flavor"}}
    cq = {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue", "metadata": {"name": f"cq-{namespace}"},
          "spec": {"namespaceSelector": {},
                   **({"preemption": {"withinClusterQueue": "LowerPriority"}} if preemption else {}),
                   "resourceGroups": [{
              "coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
              "flavors": [{"name": "default-flavor", "resources": [
                  {"name": "cpu", "nominalQuota": "8"}, {"name": "memory", "nominalQuota": "32Gi"},
                  {"name": "nvidia.com/gpu", "nominalQuota": gpus}]}]}]}}
    lq = {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue",
          "metadata": {"name": "team", "namespace": namespace}, "spec": {"clusterQueue": f"cq-{namespace}"}}
    _apply(cluster, flavor, cq, lq)
    return cq["metadata"]["name"]


def _job(name: str, namespace: str, seconds: float, image: str) -> dict:
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "namespace": namespace, "labels": {"kueue.x-k8s.io/queue-name": "team"}},
            "spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never", "containers": [{
                "name": "main", "image": image, "imagePullPolicy": "Never",
                "command": ["python", "-c", f"import time; time.sleep({seconds})"],
                "resources": {"requests": {"cpu": "100m", "memory": "64Mi", "nvidia.com/gpu": "1"},
                              "limits": {"memory": "64Mi", "nvidia.com/gpu": "1"}}}]}}}}


def _workload(api, namespace: str, job: str) -> dict | None:
    for wl in api.get(f"/apis/kueue.x-k8s.io/v1beta2/namespaces/{namespace}/workloads")["items"]:
        if any(o.get("kind") == "Job" and o.get("name") == job for o in wl["metadata"].get("ownerReferences") or []):
            return wl
    return None


def _condition(obj: dict | None, kind: str) -> dict:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == kind:
            return c
    return {}


def test_second_job_waits_for_quota_with_kueues_reason(node, cluster, kueue, namespace):
    api = cluster.api()
    cq = _queues(cluster, namespace)
    try:
        _apply(cluster, _job("first", namespace, 8, node["image"]))
        first = wait_for(lambda: (lambda wl: wl if _condition(wl, "Admitted").get("status") == "True" else None)(
            _workload(api, namespace, "first")), 60, "the first Job's Workload to be admitted")
        _apply(cluster, _job("second", namespace, 1, node["image"]))
        second = wait_for(lambda: (lambda wl: wl if _condition(wl, "QuotaReserved").get("status") == "False"
                                   else None)(_workload(api, namespace, "second")), 60,
                          "the second Workload to be evaluated")
        pending = _condition(second, "QuotaReserved")
        assert pending["reason"] == "Pending", pending
        assert "insufficient" in pending["message"] and "nvidia.com/gpu" in pending["message"], pending
        # Kueue's webhook created it suspended; it stays so while the first holds the GPU
        assert api.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/second")["spec"]["suspend"] is True
        assert api.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/first")["spec"].get("suspend") is False
        assert _condition(first, "Admitted")["status"] == "True"

        def finished(job):
            status = api.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/{job}").get("status") or {}
            return status.get("succeeded") == 1

        wait_for(lambda: finished("first"), 90, "the first Job to succeed")
        wait_for(lambda: _condition(_workload(api, namespace, "second"), "Admitted").get("status") == "True", 60,
                 "the second Workload to be admitted once the first ended")
        wait_for(lambda: finished("second"), 90, "the second Job to succeed")
    finally:
        cluster.kubectl("delete", "jobs", "--all", "-n", namespace, "--wait=false", check=False)
        cluster.kubectl("delete", "localqueue", "team", "-n", namespace, "--wait=false", check=False)
        cluster.kubectl("delete", "clusterqueue", cq, "--wait=false", check=False)


# ----------------------------------------------------------------------------- QLoRAJobs through Kueue
def test_qlorajobs_queue_in_kueue_and_status_mirrors_the_workload(cluster, kueue, namespace, buckets, start_operator):
    """Two 1-GPU QLoRAJobs on a 1-GPU ClusterQueue: the second shows Queued with Kueue's reason
    and message in status (phase, Suspended condition, status.queue) and runs once the first ends."""
    api = cluster.api()
    cq = _queues(cluster, namespace)
    try:
        start_operator()
        scheduling = {"queueName": "team"}
        apply(cluster, manifest(cluster, namespace, "first", "sleep-8", scheduling=scheduling))

        def running(name):
            body = get_qj(api, namespace, name)
            queue = (body.get("status") or {}).get("queue") or {}
            return body if (body.get("status") or {}).get("phase") == "Running" and queue.get("admitted") else None

        first = wait_for(lambda: running("first"), 90, "the first QLoRAJob to be admitted and run")
        assert first["status"]["queue"]["clusterQueue"] == cq and first["status"]["queue"]["localQueue"] == "team"

        apply(cluster, manifest(cluster, namespace, "second", "sleep-4", scheduling=scheduling))

        def queued_with_reason():
            body = get_qj(api, namespace, "second")
            queue = (body.get("status") or {}).get("queue") or {}
            return body if queue.get("reason") == "Pending" and "nvidia.com/gpu" in (queue.get("message") or "") else None

        second = wait_for(queued_with_reason, 60, "the second QLoRAJob to show Kueue's pending reason")
        status = second["status"]
        assert status["phase"] == "Queued" and status["queue"]["admitted"] is False, status
        assert status["queue"]["workload"] and "insufficient" in status["queue"]["message"], status["queue"]
        suspended = condition(second, "Suspended")
        assert suspended["status"] == "True" and suspended["reason"] == "Queued", suspended
        assert "insufficient" in suspended["message"] and "LocalQueue team" in suspended["message"], suspended
        assert "insufficient" in status["message"]

        first = wait_terminal(api, namespace, "first", 120)
        assert is_true(first, "Complete"), first["status"]
        second = wait_for(lambda: running("second"), 90, "the second QLoRAJob to be admitted once the first ended")
        assert second["status"]["queue"]["clusterQueue"] == cq and "Queued" not in second["status"]["message"]
        second = wait_terminal(api, namespace, "second", 120)
        assert is_true(second, "Complete"), second["status"]
    finally:
        cluster.kubectl("delete", "qlorajobs", "--all", "-n", namespace, "--wait=false", check=False)
        cluster.kubectl("delete", "localqueue", "team", "-n", namespace, "--wait=false", check=False)
        cluster.kubectl("delete", "clusterqueue", cq, "--wait=false", check=False)


def _upload_data(buckets, namespace: str, tmp_path) -> None:
    upload_embedded(buckets, tmp_path / "corpus", None, {f"{namespace}/train.jsonl": ("train", 0, 96)})


def _real_job(cluster, namespace: str, name: str, steps: int, priority: str) -> dict:
    body = manifest(cluster, namespace, name, scheduling={"queueName": "team", "priorityClassName": priority})
    body["spec"].update({
        "model": {"uri": "s3://models/smollm2/"},  # uploaded by the node fixture
        "dataset": {"uri": f"s3://data/{namespace}/train.jsonl", "format": "chat"},
        "lora": {"r": 8, "alpha": 16, "targetModules": ["q_proj", "v_proj"]},
        "training": {"maxSteps": steps, "microBatchSize": 2, "gradientAccumulationSteps": 1, "maxSeqLength": 128,
                     "checkpointEverySteps": 2, "optimizer": "adamw_torch", "learningRate": 1e-3},
        "resources": {"gpus": 1, "cpu": "1", "memory": "4Gi"},
    })
    return body


@pytest.mark.slow
def test_a_higher_priority_job_preempts_a_running_one_which_resumes_from_its_checkpoint(
        cluster, kueue, namespace, buckets, start_operator, tmp_path):
    """Kueue preemption with the real trainer: the low-priority run is evicted mid-training (Job
    suspended, SIGTERM), checkpoints, shows Queued/Preempted, and once the high-priority run ends it
    is readmitted, resumes from that checkpoint and succeeds; the stopped pod is a disruption."""
    api = cluster.api()
    _upload_data(buckets, namespace, tmp_path)
    low_pc, high_pc = f"low-{namespace}", f"high-{namespace}"
    _apply(cluster, *({"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": n},
                       "value": v} for n, v in ((low_pc, 100), (high_pc, 1000))))
    cq = _queues(cluster, namespace, preemption=True)
    try:
        start_operator(trainer_command=REAL_TRAINER,
                       stalled_timeout_seconds=600)
        apply(cluster, _real_job(cluster, namespace, "low", 24, low_pc))

        def training(min_step):
            body = get_qj(api, namespace, "low")
            if is_true(body, "Failed") or is_true(body, "Complete"):
                raise AssertionError(f"low ended early: {body['status']}")
            return body if ((body.get("status") or {}).get("progress") or {}).get("step", 0) >= min_step else None

        wait_for(lambda: training(3), 420, "the low-priority run to pass step 3")
        apply(cluster, _real_job(cluster, namespace, "high", 2, high_pc))

        def preempted():
            body = get_qj(api, namespace, "low")
            cond = condition(body, "Suspended")
            return body if cond.get("status") == "True" and cond.get("reason") == "Preempted" else None

        low = wait_for(preempted, 120, "the low-priority run to show Preempted")
        assert low["status"]["phase"] == "Queued" and low["status"]["queue"]["evictions"] >= 1, low["status"]
        high = wait_terminal(api, namespace, "high", 420)
        assert is_true(high, "Complete"), high["status"]
        low = wait_terminal(api, namespace, "low", 600)
        assert is_true(low, "Complete"), (condition(low, "Failed"), low["status"].get("attempts"))
        attempts = low["status"]["attempts"]
        assert len(attempts) >= 2, attempts
        stopped, last = attempts[0], attempts[-1]
        assert stopped["reason"] == "Disrupted" and "Preempted" in stopped["message"], stopped
        assert last.get("resumedFromStep", 0) >= 2 and last["exitCode"] == 0, last
        assert low["status"]["progress"]["step"] == 24 and low["status"]["queue"]["evictions"] >= 1
        reasons = [r for _, r, _ in events(api, namespace, "low")]
        assert "ResumedFromCheckpoint" in reasons and "Failed" not in reasons, reasons
    finally:
        cluster.kubectl("delete", "qlorajobs", "--all", "-n", namespace, "--wait=false", check=False)
        cluster.kubectl("delete", "localqueue", "team", "-n", namespace, "--wait=false", check=False)
        cluster.kubectl("delete", "clusterqueue", cq, "--wait=false", check=False)
        cluster.kubectl("delete", "priorityclass", low_pc, high_pc, "--wait=false", check=False)
