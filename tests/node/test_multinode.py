"""Several trainer nodes (``spec.resources.nodes > 1``, issue 10) on the real node (issue 16).

The operator renders an Indexed Job and a headless Service; the Job controller creates one
pod per node (hostname ``<job-name>-<index>``, subdomain the Service, ``JOB_COMPLETION_INDEX``);
the real kubelet runs them from the trainer image, each in its own network namespace, and the
peers reach node 0 by its cluster DNS name ``<job-name>-0.<service>`` (``QLORA_MASTER_ADDR``),
answered by the node's CoreDNS from the headless Service's endpoints (published before the
pods are Ready).

One real node runs per machine (fixed ports), so a group's pods share that node: what is
tested is the operator's group (rendering, rendezvous by DNS, restarts, suspension), not
placement across machines. The node has :data:`NODE_GPUS` fake GPUs, so a restarted group's
pods fit beside the old ones while they stop.

The pods run a stand-in group trainer (:data:`GROUP_TRAINER`) that follows the trainer's
contract for several nodes: it reads ``QLORA_NNODES``, ``QLORA_NODE_RANK``,
``QLORA_MASTER_ADDR`` and ``QLORA_MASTER_PORT``, meets its peers at node 0 over TCP (a
rendezvous, as ``torchrun`` does), "trains" while node 0 reports progress, and exits
with the trainer's exit codes and JSON termination message. Its behaviour comes from
the dataset file name: ``ok`` (3 steps of a second), ``sleep-N`` (N steps), ``fail-once``
(node 1 exits 1 in run 1, after the rendezvous; node 0 hangs like a broken collective
until the Job controller stops it).
``test_two_nodes_real_trainer`` runs the real ``qlora-train`` instead (``REAL_TRAINER``):
two pods, each a ``torchrun`` agent with one gloo worker on CPU, the embedded model.
"""

from __future__ import annotations

import json
import sys
import time

import pytest
from helpers import wait_for
from kubernetes.client.exceptions import ApiException

from operator_harness import (  # the operator tests' helpers
    GROUP_PATH,
    REAL_TRAINER,
    apply,
    condition,
    events,
    get_qj,
    is_true,
    jobs,
    wait_condition,
)

from node_jobs import NODE_TRAINER, manifest  # the node's stand-in jobs

pytestmark = [pytest.mark.realnode, pytest.mark.cluster]

#: Fake ``nvidia.com/gpu`` of the node (read by the ``node`` fixture): a group of 2 one-GPU pods
#: and the next run's 2 while the failed run's stop.
NODE_GPUS = 4


# ----------------------------------------------------------------------------- the stand-in group trainer

# The stand-in trainer of one node of a group (node_jobs.NODE_TRAINER: cfg, behaviour, finish,
# report, exit 143 on SIGTERM).
GROUP_TRAINER = NODE_TRAINER + r'''
import socket
rank, nodes = int(os.environ["QLORA_NODE_RANK"]), int(os.environ["QLORA_NNODES"])
addr, run = os.environ["QLORA_MASTER_ADDR"], os.environ["QLORA_RUN"]
where = "rank %d/%d run %s master %s:%s index %s host %s" % (rank, nodes, run, addr, os.environ["QLORA_MASTER_PORT"],
                                                            os.environ.get("JOB_COMPLETION_INDEX"), os.environ.get("HOSTNAME"))
print(where, flush=True)

# Rendezvous at node 0, as torchrun does: node 0 listens on every address of its pod, the
# others connect to it by its cluster DNS name (CoreDNS; retried while the name is new).
port = int(os.environ["QLORA_MASTER_PORT"])
if rank == 0:
    server = socket.create_server(("", port))
    peers = [server.accept()[0] for _ in range(nodes - 1)]
    for peer in peers:
        peer.sendall(b"go\n")
else:
    deadline = time.time() + 60
    while True:
        try:
            conn = socket.create_connection((addr, port), timeout=5)
            break
        except OSError:
            if time.time() > deadline:
                finish(1, "Error", "no rendezvous at %s:%d: %s: %s" % (addr, port, where, sys.exc_info()[1]))
            time.sleep(0.2)
    assert conn.makefile().readline().strip() == "go"

if behaviour == "fail-once" and run == "1":
    if rank == 1:
        finish(1, "SimulatedFailure", "simulated failure after the rendezvous: " + where)
    time.sleep(300)  # node 0: a collective that never completes, until the Job controller stops it
steps = int(behaviour.split("-")[1]) if behaviour.startswith("sleep-") else 3
for step in range(steps):
    if rank == 0:
        report(step, steps)
    time.sleep(1)
if rank == 0:
    for peer in peers:
        peer.makefile().readline()  # each peer says it is done
    report(steps, steps)
    finish(0, "Succeeded", where, done)
conn.sendall(b"done\n")
finish(0, "Succeeded", where)
'''
GROUP_COMMAND = json.dumps(["python", "-c", GROUP_TRAINER, "/etc/qlora/config.json"])


def pods_of(api, namespace: str, qj: str) -> list[dict]:
    return api.get(f"/api/v1/namespaces/{namespace}/pods", labelSelector=f"qlora.dev/job={qj}")["items"]


def run_group(cluster, namespace, start_operator, name: str, behaviour: str, *, command: str = GROUP_COMMAND,
              timeout: float = 180, resources: dict | None = None, **spec) -> dict:
    """Start an operator with ``command``, apply a QLoRAJob of 2 nodes x 1 GPU (``resources``
    adds to that), wait until it finishes; returns its body (it must have succeeded)."""
    api = cluster.api()
    start_operator(trainer_command=command, stalled_timeout_seconds=600)
    body = manifest(cluster, namespace, name, behaviour, resources={"nodes": 2, "gpus": 1, **(resources or {})}, **spec)
    apply(cluster, body)
    done = wait_for(
        lambda: (lambda b: b if is_true(b, "Complete") or is_true(b, "Failed") else None)(get_qj(api, namespace, name)),
        timeout, f"{namespace}/{name} to finish", interval=0.5,
    )
    assert is_true(done, "Complete"), (condition(done, "Failed"), done["status"].get("attempts"))
    return done


# ----------------------------------------------------------------------------- on the cluster
def test_several_nodes_need_a_dns_1035_name(cluster, namespace):
    body = manifest(cluster, namespace, "7b-group", resources={"nodes": 2})
    with pytest.raises(ApiException) as err:
        cluster.api().create(f"{GROUP_PATH}/namespaces/{namespace}/qlorajobs", body)
    assert err.value.status == 422 and "DNS-1035 label" in str(err.value.body)
    body["spec"]["resources"]["nodes"] = 1  # one node: any object name
    cluster.api().create(f"{GROUP_PATH}/namespaces/{namespace}/qlorajobs", body)


def test_two_nodes_indexed_job_and_service(cluster, namespace, buckets, start_operator):
    api = cluster.api()
    started = time.monotonic()
    body = run_group(cluster, namespace, start_operator, "duo", "ok")
    status = body["status"]
    assert status["phase"] == "Succeeded" and status["run"] == 1 and status["jobName"] == "duo-train"
    assert status["artifacts"]["adapterUri"] == f"s3://artifacts/{namespace}/duo/run-1/adapter/"
    assert status["progress"]["step"] == 3  # from node 0 only
    attempts = status["attempts"]
    assert [(a["index"], a["node"], a["phase"], a["reason"]) for a in attempts] == [
        (0, 0, "Succeeded", "Succeeded"), (0, 1, "Succeeded", "Succeeded")]
    for attempt in attempts:  # each pod saw its rank, its index, its hostname, and node 0 by its DNS name
        node = attempt["node"]
        assert f"rank {node}/2 run 1 master duo-train-0.duo-train:29500 index {node} host duo-train-{node}" \
            in attempt["message"]

    (job,) = jobs(api, namespace, "duo")
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"], spec["backoffLimit"]) == ("Indexed", 2, 2, 0)
    svc = api.get(f"/api/v1/namespaces/{namespace}/services/duo-train")
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {"qlora.dev/job": "duo", "qlora.dev/run": "1"}
    assert svc["metadata"]["ownerReferences"][0]["uid"] == body["metadata"]["uid"]
    pods = sorted(pods_of(api, namespace, "duo"), key=lambda p: p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"])
    assert [(p["spec"]["hostname"], p["spec"]["subdomain"]) for p in pods] == [("duo-train-0", "duo-train"), ("duo-train-1", "duo-train")]
    env = {e["name"]: e for e in pods[1]["spec"]["containers"][0]["env"]}
    assert env["QLORA_MASTER_ADDR"]["value"] == "duo-train-0.duo-train"
    assert env["QLORA_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    reasons = [(t, r) for t, r, _ in events(api, namespace, "duo")]
    assert ("Normal", "Completed") in reasons and not [r for t, r in reasons if t == "Warning"], reasons
    sys.stderr.write(f"\n2-node job finished in {time.monotonic() - started:.0f}s\n")


def test_group_restarts_as_the_next_run_after_a_retryable_failure(cluster, namespace, buckets, start_operator):
    api = cluster.api()
    started = time.monotonic()
    body = run_group(cluster, namespace, start_operator, "retry", "fail-once", runPolicy={"backoffLimit": 2}, timeout=240)
    status = body["status"]
    assert status["run"] == 2 and status["jobName"] == "retry-train-r2" and status["phase"] == "Succeeded"
    attempts = [(a["index"], a["node"], a["reason"]) for a in status["attempts"]]
    # run 1: node 1 failed; the Job controller stopped node 0 (SIGTERM: Terminated, or Stopped when its
    # pod was deleted before the operator saw its end); run 2: both succeeded
    assert attempts[0][:2] == (0, 0) and attempts[0][2] in ("Terminated", "Stopped"), attempts
    assert attempts[1:] == [(0, 1, "SimulatedFailure"), (1, 0, "Succeeded"), (1, 1, "Succeeded")], attempts
    assert status["attempts"][1]["exitCode"] == 1 and "simulated failure" in status["attempts"][1]["message"]
    assert all("run 2" in a["message"] for a in status["attempts"][2:])
    assert [a["podName"].startswith("retry-train-r2-") for a in status["attempts"]] == [False, False, True, True]

    by_name = {j["metadata"]["name"]: j for j in jobs(api, namespace, "retry")}
    assert sorted(by_name) == ["retry-train", "retry-train-r2"]
    ann = by_name["retry-train-r2"]["metadata"]["annotations"]
    assert (ann["qlora.dev/group-attempt"], ann["qlora.dev/group-failures"], ann["qlora.dev/restart-of"]) == ("1", "1", "1")
    failed = {c["type"]: c for c in by_name["retry-train"]["status"]["conditions"]}
    assert failed["Failed"]["reason"] == "PodFailurePolicy" and "rule at index 2" in failed["Failed"]["message"]
    with pytest.raises(ApiException) as err:  # the failed run's Service went when run 2 started
        api.get(f"/api/v1/namespaces/{namespace}/services/retry-train")
    assert err.value.status == 404
    api.get(f"/api/v1/namespaces/{namespace}/services/retry-train-r2")

    evs = events(api, namespace, "retry")
    reasons = [(t, r) for t, r, _ in evs]
    assert ("Warning", "SimulatedFailure") in reasons and ("Normal", "Restarting") in reasons, reasons
    assert not {("Warning", "Terminated"), ("Warning", "Stopped")} & set(reasons)  # node 0: only a casualty
    created = [m for t, r, m in evs if r == "JobCreated"]
    assert len(created) == 2 and "1 of runPolicy.backoffLimit 2 retries used" in created[1], created
    sys.stderr.write(f"\n2-node job with one group restart finished in {time.monotonic() - started:.0f}s\n")


def running_pods(api, namespace: str, qj: str, run: int) -> list[dict]:
    return [p for p in pods_of(api, namespace, qj)
            if p["metadata"]["labels"].get("qlora.dev/run") == str(run) and p["status"].get("phase") == "Running"
            and not p["metadata"].get("deletionTimestamp")]


def test_disruption_restarts_the_group_without_counting(cluster, namespace, buckets, start_operator):
    """An evicted pod (DisruptionTarget) restarts the group even with runPolicy.backoffLimit 0."""
    api = cluster.api()
    start_operator(trainer_command=GROUP_COMMAND)
    apply(cluster, manifest(cluster, namespace, "evict", "sleep-8", resources={"nodes": 2, "gpus": 1},
                            runPolicy={"backoffLimit": 0}))
    wait_condition(api, namespace, "evict", "Running", 60, reason="TrainerRunning")
    victim = wait_for(lambda: [p for p in running_pods(api, namespace, "evict", 1)
                               if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "1"],
                      30, "node 1 to run")[0]["metadata"]["name"]
    api.create(f"/api/v1/namespaces/{namespace}/pods/{victim}/eviction",
               {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": victim, "namespace": namespace}})
    body = wait_for(lambda: (lambda b: b if is_true(b, "Complete") or is_true(b, "Failed") else None)(
        get_qj(api, namespace, "evict")), 180, "the job to finish", interval=0.5)
    assert is_true(body, "Complete"), (condition(body, "Failed"), body["status"].get("attempts"))
    status = body["status"]
    assert status["run"] == 2, status
    evicted = next(a for a in status["attempts"] if a["podName"] == victim)
    assert (evicted["index"], evicted["node"], evicted["reason"]) == (0, 1, "Disrupted")
    # The pod's condition when the operator saw the pod end; the Job's failure message when the
    # pod ended and was deleted between two reconciles.
    assert "EvictionByEvictionAPI" in evicted["message"] or "has condition DisruptionTarget" in evicted["message"]
    job2 = api.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/evict-train-r2")
    assert job2["metadata"]["annotations"]["qlora.dev/group-failures"] == "0"  # not counted
    assert [(a["index"], a["reason"]) for a in status["attempts"][-2:]] == [(1, "Succeeded"), (1, "Succeeded")]


def test_suspend_and_resume_a_group(cluster, namespace, buckets, start_operator):
    """Suspending stops every pod of the group (the Job controller does not count that as a
    failure); resuming starts them all again in the same run."""
    api = cluster.api()
    start_operator(trainer_command=GROUP_COMMAND)
    apply(cluster, manifest(cluster, namespace, "pause", "sleep-6", resources={"nodes": 2, "gpus": 1},
                            runPolicy={"backoffLimit": 0}))
    wait_condition(api, namespace, "pause", "Running", 60, reason="TrainerRunning")
    path = f"{GROUP_PATH}/namespaces/{namespace}/qlorajobs/pause"
    api.patch(path, {"spec": {"runPolicy": {"suspend": True}}})
    body = wait_condition(api, namespace, "pause", "Suspended", 60, reason="SuspendedByUser")
    assert body["status"]["phase"] == "Suspended" and body["status"]["run"] == 1
    wait_for(lambda: not [p for p in pods_of(api, namespace, "pause") if p["status"].get("phase") in ("Pending", "Running")],
             60, "the pods to stop")
    api.patch(path, {"spec": {"runPolicy": {"suspend": False}}})
    body = wait_condition(api, namespace, "pause", "Complete", 120)
    status = body["status"]
    assert status["run"] == 1 and [j["metadata"]["name"] for j in jobs(api, namespace, "pause")] == ["pause-train"]
    attempts = [(a["index"], a["node"], a["reason"]) for a in status["attempts"]]
    assert [a[:2] for a in attempts] == [(0, 0), (0, 1), (1, 0), (1, 1)], attempts
    assert {a[2] for a in attempts[:2]} <= {"Terminated", "Stopped"} and [a[2] for a in attempts[2:]] == ["Succeeded"] * 2


@pytest.mark.slow
def test_two_nodes_real_trainer(cluster, namespace, buckets, start_operator, tmp_path):
    """qlora-train with nodes: 2 on CPU (gloo), the embedded model, a slice of the corpus."""
    from helpers import upload_embedded

    upload_embedded(buckets, tmp_path / "corpus", None, {f"{namespace}/train.jsonl": ("train", 0, 32)})
    body = run_group(
        cluster, namespace, start_operator, "smol-duo", "ok", command=REAL_TRAINER, timeout=900,
        resources={"cpu": "1", "memory": "4Gi"},  # both pods share the node's 2 cores
        model={"uri": "s3://models/smollm2/"},
        dataset={"uri": f"s3://data/{namespace}/train.jsonl", "format": "chat"},
        lora={"r": 8, "alpha": 16, "targetModules": ["q_proj", "v_proj"]},
        training={"maxSteps": 4, "microBatchSize": 2, "gradientAccumulationSteps": 1, "maxSeqLength": 128,
                  "checkpointEverySteps": 2, "optimizer": "adamw_torch", "learningRate": 1e-3},
    )
    assert body["status"]["progress"]["step"] == 4
    assert [a["reason"] for a in body["status"]["attempts"]] == ["Succeeded", "Succeeded"]
    adapter = body["status"]["artifacts"]["adapterUri"]
    bucket, _, prefix = adapter.removeprefix("s3://").partition("/")
    keys = {o["Key"] for o in buckets.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])}
    assert f"{prefix.rstrip('/')}/_SUCCESS" in keys and f"{prefix.rstrip('/')}/adapter_model.safetensors" in keys, keys
