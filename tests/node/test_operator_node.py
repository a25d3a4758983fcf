"""The operator on the real node (issue 16, item 4): the real control plane, scheduler and
MinIO, and one real node (containerd + runc + CNI, the kubelet, kube-proxy) whose pods run
the trainer image built by ``make images`` (``tests/node/conftest.py``: the ``node`` fixture,
with :data:`NODE_GPUS` fake ``nvidia.com/gpu``).

Each test runs its own operator process (:class:`operator_harness.Operator`: ``python -m
qlora_operator run --namespace NS``, the cluster's admin kubeconfig) scoped to the test's
namespace, with the trainer image as its default image (``imagePullPolicy: Never``) and for
most tests a cheap stand-in trainer as the trainer command (:data:`NODE_COMMAND`: ``python -c``
the program of ``test_operator``, run by the image's python): the operator renders the
same pods it renders for users (uid 1000, read-only root, the config ConfigMap at
``/etc/qlora``, the ServiceAccount token at its in-cluster path, ``/dev/termination-log``),
only the command differs. The stand-in follows the trainer's contract (config file, exit
codes, JSON termination message, progress patches through the ``kubernetes`` Service with
the pod's own ServiceAccount token, exit 143 on SIGTERM) and its behaviour is picked by the
dataset file name (``ok``, ``exit-3``, ``oom``, ``storage-once``, ``sleep-N``, ``pod-extras``).
``test_real_trainer_end_to_end`` runs the real ``qlora-train``.

What the stand-in node agent used to fake, and the real node does itself: an OOM kill is the
kernel's (``oom`` allocates past the container's memory limit; the node agent called any
unexpected exit 137 ``OOMKilled``), an image that cannot be pulled is the kubelet's own
``ErrImagePull``/``ImagePullBackOff`` (no registry is reachable; that test's operator uses
``imagePullPolicy: IfNotPresent`` so the kubelet tries), a stopped pod gets the kubelet's
SIGTERM (the stand-in exits 143 as ``qlora-train`` does: pid 1 of a container ignores an
unhandled SIGTERM). The pods request little CPU and memory (:data:`POD_RESOURCES`): the GPUs,
not the node's 2 cores, bound how many run at once (limits equal requests, so the CPU limit
is real: 200m each).

Every test of the former ``tests/integration/test_operator.py`` runs here; none needs what
one real node cannot give (``test_unschedulable_then_failed`` asks for one GPU more than the
node has, not for two nodes).

All waits are bounded (``helpers.wait_for``); nothing sleeps to synchronise.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from helpers import wait_for
from kubernetes.client.exceptions import ApiException

from operator_harness import (  # the operator tests' process wrapper and helpers (tests/integration)
    GROUP_PATH,
    REAL_TRAINER,
    apply,
    condition,
    events,
    get_qj,
    is_true,
    jobs,
    pods,
    wait_condition,
    wait_event,
    wait_terminal,
)
from node_jobs import manifest  # the node's stand-in jobs (NODE_COMMAND, POD_RESOURCES)

pytestmark = [pytest.mark.realnode, pytest.mark.cluster]

#: Fake ``nvidia.com/gpu`` of the node (read by the ``node`` fixture): 4 one-GPU pods at once, as on
#: the stand-in's 2 nodes x 2 GPUs; one more than this stays within the operator's default
#: ``max_gpus_per_job`` (8), so ``test_unschedulable_then_failed`` reaches the scheduler.
NODE_GPUS = 4


# ----------------------------------------------------------------------------- happy path (stand-in trainer)
def test_children_status_progress_and_events(cluster, namespace, buckets, start_operator):
    api = cluster.api()
    op = start_operator()
    apply(cluster, manifest(cluster, namespace, "tiny", "sleep-4"))
    body = wait_condition(api, namespace, "tiny", "Running", 60, reason="TrainerRunning")
    assert body["status"]["jobName"] == "tiny-train" and body["status"]["run"] == 1
    # the trainer's own ServiceAccount may patch the progress (Role with resourceNames)
    body = wait_for(lambda: (lambda b: b if (b["status"].get("progress") or {}).get("step", 0) >= 1 else None)(
        get_qj(api, namespace, "tiny")), 30, "a progress report")
    assert body["status"]["phase"] == "Running"
    body = wait_condition(api, namespace, "tiny", "Complete", 60)
    status = body["status"]
    assert status["phase"] == "Succeeded"
    assert status["observedGeneration"] == body["metadata"]["generation"]
    assert status["artifacts"]["adapterUri"] == f"s3://artifacts/{namespace}/tiny/run-1/adapter/"
    assert [a["reason"] for a in status["attempts"]] == ["Succeeded"]
    assert status["startTime"] and status["completionTime"]
    assert status["progress"]["step"] == 4
    kinds = {
        "ConfigMap": f"/api/v1/namespaces/{namespace}/configmaps/tiny-config",
        "ServiceAccount": f"/api/v1/namespaces/{namespace}/serviceaccounts/tiny-trainer",
        "Role": f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles/tiny-trainer",
        "RoleBinding": f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings/tiny-trainer",
        "Job": f"/apis/batch/v1/namespaces/{namespace}/jobs/tiny-train",
    }
    for kind, path in kinds.items():
        child = api.get(path)
        ref = child["metadata"]["ownerReferences"][0]
        assert (ref["kind"], ref["uid"], ref["controller"]) == ("QLoRAJob", body["metadata"]["uid"], True), kind
    assert not body["metadata"].get("finalizers")
    reasons = [(t, r) for t, r, _ in events(api, namespace, "tiny")]
    for expected in [("Normal", "JobCreated"), ("Normal", "Running"), ("Normal", "Completed")]:
        assert expected in reasons, reasons
    # the trainer ServiceAccount can do nothing else
    sa = f"system:serviceaccount:{namespace}:tiny-trainer"
    can = lambda *a: cluster.kubectl("auth", "can-i", *a, "-n", namespace, f"--as={sa}", check=False).stdout.strip()  # noqa: E731
    assert can("patch", "qlorajobs.qlora.dev/tiny", "--subresource=status") == "yes"
    assert can("patch", "qlorajobs.qlora.dev/other", "--subresource=status") == "no"
    assert can("get", "secrets") == "no"
    out = cluster.kubectl("get", "qj", "-n", namespace).stdout
    assert "Succeeded" in out and "4/4" in out
    op.assert_healthy()


# ----------------------------------------------------------------------------- failure reasons
def test_unschedulable_then_failed(cluster, namespace, buckets, start_operator):
    api = cluster.api()
    start_operator(unschedulable_timeout_seconds=12)
    apply(cluster, manifest(cluster, namespace, "big", resources={"gpus": NODE_GPUS + 1}))  # one more than the node has
    body = wait_condition(api, namespace, "big", "Running", 60, reason="Unschedulable")
    assert "Insufficient nvidia.com/gpu" in condition(body, "Running")["message"]
    assert body["status"]["phase"] == "Pending"
    assert "Insufficient nvidia.com/gpu" in wait_event(api, namespace, "big", "Warning", "Unschedulable")
    body = wait_condition(api, namespace, "big", "Failed", 60, reason="Unschedulable")
    assert "could not be scheduled" in condition(body, "Failed")["message"]
    assert body["status"]["phase"] == "Failed"
    wait_for(lambda: not pods(api, namespace, "big"), 30, "the pending pod to be gone")
    assert jobs(api, namespace, "big")[0]["spec"]["suspend"] is True


def test_quota_exceeded(cluster, namespace, buckets, start_operator):
    api = cluster.api()
    api.create(f"/api/v1/namespaces/{namespace}/resourcequotas", {
        "metadata": {"name": "no-gpus"}, "spec": {"hard": {"requests.nvidia.com/gpu": "0"}}})
    start_operator(unschedulable_timeout_seconds=15)
    apply(cluster, manifest(cluster, namespace, "quota"))
    body = wait_condition(api, namespace, "quota", "Running", 60, reason="QuotaExceeded")
    assert "exceeded quota: no-gpus" in condition(body, "Running")["message"]
    assert "exceeded quota" in wait_event(api, namespace, "quota", "Warning", "QuotaExceeded")
    body = wait_condition(api, namespace, "quota", "Failed", 60, reason="QuotaExceeded")
    assert "requests.nvidia.com/gpu" in condition(body, "Failed")["message"]


def test_missing_secret(cluster, namespace, buckets, start_operator):
    api = cluster.api()
    start_operator(container_config_grace_seconds=10)
    spec = manifest(cluster, namespace, "nosecret")
    spec["spec"]["storage"]["credentialsSecretRef"] = {"name": "missing-creds"}
    apply(cluster, spec)
    body = wait_condition(api, namespace, "nosecret", "Running", 60, reason="SecretNotFound")
    message = condition(body, "Running")["message"]
    assert "'missing-creds' not found" in message and "spec.storage.credentialsSecretRef.name" in message
    assert "missing-creds" in wait_event(api, namespace, "nosecret", "Warning", "SecretNotFound")
    body = wait_condition(api, namespace, "nosecret", "Failed", 60, reason="SecretNotFound")
    wait_for(lambda: not pods(api, namespace, "nosecret"), 30, "the waiting pod to be deleted")


def test_image_pull_failed_deletes_the_pod(cluster, namespace, buckets, start_operator):
    api = cluster.api()
    start_operator(image_pull_grace_seconds=8, image_pull_policy="IfNotPresent")  # the kubelet tries: no registry
    image = "registry.example.com/does-not-exist/trainer:1"
    apply(cluster, manifest(cluster, namespace, "noimage", image=image))
    body = wait_condition(api, namespace, "noimage", "Running", 60, reason="ImagePullBackOff")
    assert image in condition(body, "Running")["message"]
    body = wait_condition(api, namespace, "noimage", "Failed", 60, reason="ImagePullFailed")
    assert image in condition(body, "Failed")["message"]
    assert image in wait_event(api, namespace, "noimage", "Warning", "ImagePullFailed")
    wait_for(lambda: not pods(api, namespace, "noimage"), 30, "the pod holding a GPU to be deleted")


def test_invalid_data_fails_at_once(cluster, namespace, buckets, start_operator):
    api = cluster.api()
    start_operator()
    apply(cluster, manifest(cluster, namespace, "baddata", "exit-3", runPolicy={"backoffLimit": 3}))
    body = wait_condition(api, namespace, "baddata", "Failed", 90, reason="InvalidData")
    assert "exited with code 3" in condition(body, "Failed")["message"]
    assert "line 7" in condition(body, "Failed")["message"]
    assert len(body["status"]["attempts"]) == 1  # podFailurePolicy: no retry on 3
    assert body["status"]["attempts"][0]["exitCode"] == 3
    assert "exited with code 3" in wait_event(api, namespace, "baddata", "Warning", "InvalidData")


def test_oom_killed(cluster, namespace, buckets, start_operator):
    api = cluster.api()
    start_operator()
    apply(cluster, manifest(cluster, namespace, "oom", "oom", runPolicy={"backoffLimit": 0}))
    body = wait_condition(api, namespace, "oom", "Failed", 90, reason="OOMKilled")
    attempt = body["status"]["attempts"][0]
    assert (attempt["exitCode"], attempt["reason"]) == (137, "OOMKilled")
    assert "exited with code 137" in condition(body, "Failed")["message"]
    wait_event(api, namespace, "oom", "Warning", "OOMKilled")


def test_backoff_limit_exceeded_carries_the_reason(cluster, namespace, buckets, start_operator):
    api = cluster.api()
    start_operator()
    apply(cluster, manifest(cluster, namespace, "oom2", "oom", runPolicy={"backoffLimit": 1}))
    body = wait_condition(api, namespace, "oom2", "Failed", 120, reason="BackoffLimitExceeded")
    assert condition(body, "Failed")["message"].startswith("OOMKilled: 2 attempts failed")
    assert [a["reason"] for a in body["status"]["attempts"]] == ["OOMKilled", "OOMKilled"]


def test_storage_error_then_retry_succeeds(cluster, namespace, buckets, start_operator):
    api = cluster.api()
    start_operator()
    apply(cluster, manifest(cluster, namespace, "flaky", "storage-once", runPolicy={"backoffLimit": 2}))
    assert "simulated outage" in wait_event(api, namespace, "flaky", "Warning", "StorageError", timeout=90)
    body = wait_condition(api, namespace, "flaky", "Complete", 120)
    attempts = body["status"]["attempts"]
    assert [(a["index"], a["reason"]) for a in attempts] == [(0, "StorageError"), (1, "Succeeded")]
    assert attempts[1]["resumedFromStep"] == 10
    assert body["status"]["artifacts"]["adapterUri"].endswith("/flaky/run-1/adapter/")


def test_invalid_spec_only_the_operator_sees(cluster, namespace, buckets, start_operator):
    api = cluster.api()
    op = start_operator(max_gpus_per_job=1)
    apply(cluster, manifest(cluster, namespace, "toobig", resources={"gpus": 2}))
    body = wait_condition(api, namespace, "toobig", "Failed", 60, reason="InvalidSpec")
    assert "spec.resources.gpus" in condition(body, "Failed")["message"]
    assert "at most 1" in wait_event(api, namespace, "toobig", "Warning", "InvalidSpec")
    assert jobs(api, namespace, "toobig") == []
    op.assert_healthy()


#: The operator's permissions (namespaced mode); the Helm chart grants the same (issue 7).
OPERATOR_RULES = [
    {"apiGroups": ["qlora.dev"], "resources": ["qlorajobs"], "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": ["qlora.dev"], "resources": ["qlorajobs/status"], "verbs": ["get", "patch"]},
    {"apiGroups": ["qlora.dev"], "resources": ["qlorajobs/finalizers"], "verbs": ["update"]},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "delete"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["list", "create"]},
    {"apiGroups": [""], "resources": ["configmaps", "serviceaccounts"], "verbs": ["get", "create", "patch"]},
    {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles", "rolebindings"], "verbs": ["get", "create", "patch"]},
]


def test_operator_works_with_least_privilege(cluster, namespace, buckets, start_operator, tmp_path):
    """The operator as a ServiceAccount with only OPERATOR_RULES, credentials as an in-cluster pod gets them."""
    api = cluster.api()
    api.create(f"/api/v1/namespaces/{namespace}/serviceaccounts", {"metadata": {"name": "qlora-operator"}})
    api.create(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles",
               {"metadata": {"name": "qlora-operator"}, "rules": OPERATOR_RULES})
    api.create(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings", {
        "metadata": {"name": "qlora-operator"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "qlora-operator"},
        "subjects": [{"kind": "ServiceAccount", "name": "qlora-operator", "namespace": namespace}]})
    token_dir = tmp_path / "sa"
    token_dir.mkdir()
    token = cluster.kubectl("-n", namespace, "create", "token", "qlora-operator", "--duration=1h").stdout.strip()
    (token_dir / "token").write_text(token)
    (token_dir / "ca.crt").write_bytes(Path(cluster.ca_cert).read_bytes())
    host, port = cluster.server.split("://", 1)[1].rsplit(":", 1)
    op = start_operator(env={"KUBECONFIG": None, "QLORA_SA_TOKEN_DIR": str(token_dir),
                             "KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port})
    apply(cluster, manifest(cluster, namespace, "lean", "sleep-2"))
    body = wait_condition(api, namespace, "lean", "Complete", 90)
    assert body["status"]["progress"]["step"] == 2
    assert ("Normal", "Completed") in [(t, r) for t, r, _ in events(api, namespace, "lean")]
    who = f"--as=system:serviceaccount:{namespace}:qlora-operator"
    assert cluster.kubectl("auth", "can-i", "get", "secrets", "-n", namespace, who, check=False).stdout.strip() == "no"
    op.assert_healthy()
    assert "Forbidden" not in op.log()


# ----------------------------------------------------------------------------- robustness
def test_operator_killed_after_creating_the_job(cluster, namespace, buckets, start_operator):
    api = cluster.api()
    op = start_operator()
    apply(cluster, manifest(cluster, namespace, "crash", "sleep-6"))
    wait_for(lambda: jobs(api, namespace, "crash"), 60, "the Job to be created", interval=0.05)
    op.kill()
    op.start()
    body = wait_condition(api, namespace, "crash", "Complete", 120)
    assert [j["metadata"]["name"] for j in jobs(api, namespace, "crash")] == ["crash-train"]
    assert len(body["status"]["attempts"]) == 1
    assert body["status"]["phase"] == "Succeeded" and body["status"]["run"] == 1
    # The restarted operator adopted the Job (409 -> fetch and compare) instead of creating another.
    # (The first one may have been killed before it posted its JobCreated event: at most one.)
    assert len([r for _, r, _ in events(api, namespace, "crash") if r == "JobCreated"]) <= 1
    second_run = op.log().split("--- start 2")[-1]
    assert "created Job crash-train" not in second_run


def test_fifty_jobs_at_once(cluster, namespace, buckets, start_operator):
    api = cluster.api()
    port = _free_port()
    start_operator(metrics_port=port)
    names = [f"many-{i:02d}" for i in range(50)]
    started = time.monotonic()
    apply(cluster, *[manifest(cluster, namespace, n) for n in names])

    def all_done():
        items = api.get(f"{GROUP_PATH}/namespaces/{namespace}/qlorajobs")["items"]
        done = [b for b in items if is_true(b, "Complete") or is_true(b, "Failed")]
        return items if len(done) == 50 else None

    items = wait_for(all_done, 600, "50 jobs to finish", interval=2)
    elapsed = time.monotonic() - started
    created = jobs(api, namespace)
    assert len(created) == 50
    assert sorted(j["metadata"]["name"] for j in created) == sorted(f"{n}-train" for n in names)
    owners = [j["metadata"]["ownerReferences"][0]["name"] for j in created]
    assert len(set(owners)) == 50
    assert all(b["status"]["phase"] == "Succeeded" for b in items), [
        (b["metadata"]["name"], b["status"].get("phase")) for b in items if b["status"].get("phase") != "Succeeded"
    ]
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'qlora_jobs{phase="Succeeded"} 50.0' in metrics
    assert "qlora_operator_reconcile_duration_seconds_count" in metrics
    sys.stderr.write(f"\n50 jobs finished in {elapsed:.0f}s\n")


def test_two_replicas_one_leader_and_takeover(cluster, namespace, buckets, start_operator):
    """Two operator processes with leader election (Lease in the test namespace, 6 s lease):
    only the leader reconciles; SIGKILL of the leader during 50 creates lets the standby take
    over within the lease duration (+ one retry); 50 Jobs, one per QLoRAJob, all Succeeded;
    a SIGTERM'd leader releases the Lease and the next takes over at its next retry."""
    api = cluster.api()
    lease = {"leader_election": "true", "leader_election_namespace": namespace,
             "leader_election_lease_seconds": 6, "leader_election_renew_deadline_seconds": 4,
             "leader_election_retry_seconds": 1}
    leader = start_operator(ready_text="qlora-operator started", **lease)
    standby = start_operator(ready_text="waiting for leader lease", **lease)
    holder = api.get(f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/qlora-operator")["spec"]["holderIdentity"]
    assert holder in leader.log() and holder not in standby.log()

    names = [f"ha-{i:02d}" for i in range(50)]
    apply(cluster, *[manifest(cluster, namespace, n) for n in names[:25]])
    wait_for(lambda: len(jobs(api, namespace)) >= 5 or None, 60, "the leader to create some Jobs", interval=0.2)
    assert "created Job" not in standby.log() and "qlora-operator started" not in standby.log()
    leader.kill()  # SIGKILL: no release, the standby must wait for the lease to expire
    killed = time.monotonic()
    apply(cluster, *[manifest(cluster, namespace, n) for n in names[25:]])
    wait_for(lambda: "acquired leader lease" in standby.log() or standby._dead(), 30, "the standby to take over",
             interval=0.1)
    takeover = time.monotonic() - killed
    wait_for(lambda: "qlora-operator started" in standby.log() or standby._dead(), 30, "the new leader's kopf")
    started = time.monotonic() - killed

    def all_done():
        items = api.get(f"{GROUP_PATH}/namespaces/{namespace}/qlorajobs")["items"]
        done = [b for b in items if is_true(b, "Complete") or is_true(b, "Failed")]
        return items if len(done) == 50 else None

    items = wait_for(all_done, 600, "50 jobs to finish", interval=1)
    all_finished = time.monotonic() - killed
    created = jobs(api, namespace)
    assert sorted(j["metadata"]["name"] for j in created) == sorted(f"{n}-train" for n in names)  # one Job each
    assert all(b["status"]["phase"] == "Succeeded" for b in items), [
        (b["metadata"]["name"], b["status"].get("phase")) for b in items if b["status"].get("phase") != "Succeeded"]
    assert all(len(b["status"]["attempts"]) == 1 for b in items)  # no status update lost or doubled
    assert takeover <= 6 + 2 + 1, f"takeover took {takeover:.1f}s"

    # the Job name is deterministic per run: a second create of the same run's Job is refused (409)
    dup = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": created[0]["metadata"]["name"]},
           "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "x"}]}}}}
    with pytest.raises(ApiException) as conflict:
        api.create(f"/apis/batch/v1/namespaces/{namespace}/jobs", dup)
    assert conflict.value.status == 409

    # a clean stop (SIGTERM) releases the Lease: a fresh standby takes over at its next retry
    standby2 = start_operator(ready_text="waiting for leader lease", **lease)
    stopped = time.monotonic()
    standby.stop()
    wait_for(lambda: "acquired leader lease" in standby2.log() or standby2._dead(), 30, "the second standby")
    handover = time.monotonic() - stopped
    assert "released leader lease" in standby.log()
    assert handover < 6, f"handover after a clean stop took {handover:.1f}s"
    sys.stderr.write(f"\nleader SIGKILL -> standby holds the lease {takeover:.1f}s, kopf started {started:.1f}s, "
                     f"50 jobs done {all_finished:.0f}s; SIGTERM handover {handover:.1f}s\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_spec_change_on_a_finished_job_starts_one_new_run(cluster, namespace, buckets, start_operator):
    api = cluster.api()
    start_operator()
    apply(cluster, manifest(cluster, namespace, "gitops"))
    first = wait_condition(api, namespace, "gitops", "Complete", 60)
    assert first["status"]["run"] == 1
    api.patch(f"{GROUP_PATH}/namespaces/{namespace}/qlorajobs/gitops", {"spec": {"dataset": {"uri": "s3://data/fake/ok-v2.jsonl"}}})

    def second_run_done():
        body = get_qj(api, namespace, "gitops")
        return body if body["status"].get("run") == 2 and is_true(body, "Complete") else None

    body = wait_for(second_run_done, 90, "run 2 to complete", interval=0.5)
    assert body["status"]["jobName"] == "gitops-train-r2"
    assert body["status"]["observedGeneration"] == 2
    assert len(body["status"]["attempts"]) == 1
    assert "spec.dataset.uri" in wait_event(api, namespace, "gitops", "Normal", "RunStarted")
    names = sorted(j["metadata"]["name"] for j in jobs(api, namespace, "gitops"))
    assert names == ["gitops-train", "gitops-train-r2"]
    config = api.get(f"/api/v1/namespaces/{namespace}/configmaps/gitops-config-r2")
    assert "ok-v2.jsonl" in config["data"]["config.json"]


def test_pod_extras_reach_the_trainer_and_start_no_run(cluster, namespace, buckets, start_operator):
    """spec.pod: extra env (expanding the operator's variables) and a configMap volume mounted at
    /data reach the trainer process; the Job's pod carries them, the pull Secrets and the
    RuntimeClass, and the trainer ServiceAccount the identity annotations. Changing spec.pod on
    the finished job starts no run."""
    api = cluster.api()
    runtime_class = f"rc-{namespace}"
    api.create("/apis/node.k8s.io/v1/runtimeclasses",
             {"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass", "metadata": {"name": runtime_class}, "handler": "runc"})
    try:
        cluster.kubectl("-n", namespace, "create", "configmap", "extra-data", "--from-literal=train.jsonl=planted-by-test")
        start_operator(service_account_annotations=json.dumps({"iam.gke.io/gcp-service-account": "t@p.iam.gserviceaccount.com"}))
        pod_extras = {
            "serviceAccountAnnotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/qlora"},
            "imagePullSecrets": ["registry-creds"],
            "runtimeClassName": runtime_class,
            "env": [{"name": "EXTRA_GREETING", "value": "hello-$(QLORA_JOB_NAME)"},
                    {"name": "EXTRA_DATA_FILE", "value": "/data/train.jsonl"}],
            "volumes": [{"name": "data", "configMap": {"name": "extra-data"}}],
            "volumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": True}],
        }
        apply(cluster, manifest(cluster, namespace, "extras", "pod-extras", pod=pod_extras))
        body = wait_terminal(api, namespace, "extras", 60)
        assert is_true(body, "Complete"), body["status"]
        assert body["status"]["attempts"][-1]["message"].endswith("extras: planted-by-test"), body["status"]["attempts"]

        (job,) = jobs(api, namespace, "extras")
        pod_spec = job["spec"]["template"]["spec"]
        env = {e["name"]: e.get("value") for e in pod_spec["containers"][0]["env"]}
        assert env["EXTRA_GREETING"] == "hello-$(QLORA_JOB_NAME)" and env["QLORA_JOB_NAME"] == "extras"
        assert {"name": "data", "mountPath": "/data", "readOnly": True} in pod_spec["containers"][0]["volumeMounts"]
        assert {"name": "data", "configMap": {"name": "extra-data", "defaultMode": 420}} in pod_spec["volumes"]
        assert pod_spec["imagePullSecrets"] == [{"name": "registry-creds"}]
        assert pod_spec["runtimeClassName"] == runtime_class
        (pod,) = pods(api, namespace, "extras")
        assert pod["spec"]["runtimeClassName"] == runtime_class and pod["spec"]["serviceAccountName"] == "extras-trainer"
        sa = api.get(f"/api/v1/namespaces/{namespace}/serviceaccounts/extras-trainer")
        annotations = sa["metadata"]["annotations"]
        assert annotations["eks.amazonaws.com/role-arn"] == "arn:aws:iam::111122223333:role/qlora"
        assert annotations["iam.gke.io/gcp-service-account"] == "t@p.iam.gserviceaccount.com"  # the chart default

        api.patch(f"{GROUP_PATH}/namespaces/{namespace}/qlorajobs/extras",
                  {"spec": {"pod": {"env": [{"name": "EXTRA_GREETING", "value": "changed"}]}}})
        body = wait_for(lambda: (lambda b: b if b["status"].get("observedGeneration") == 2 else None)(
            get_qj(api, namespace, "extras")), 30, "generation 2 to be observed", interval=0.5)
        assert body["status"]["run"] == 1 and is_true(body, "Complete")
        assert [j["metadata"]["name"] for j in jobs(api, namespace, "extras")] == ["extras-train"]
    finally:
        api.delete(f"/apis/node.k8s.io/v1/runtimeclasses/{runtime_class}")


def test_training_fields_locked_while_running_and_suspend_resume(cluster, namespace, buckets, start_operator):
    api = cluster.api()
    start_operator()
    apply(cluster, manifest(cluster, namespace, "live", "sleep-40"))
    wait_condition(api, namespace, "live", "Running", 60, reason="TrainerRunning")
    path = f"{GROUP_PATH}/namespaces/{namespace}/qlorajobs/live"
    with pytest.raises(ApiException) as err:  # the CRD's rule refuses it while Running=True
        api.patch(path, {"spec": {"dataset": {"uri": "s3://data/fake/other.jsonl"}}})
    assert err.value.status == 422 and "while a run is active" in str(err.value.body)
    api.patch(path, {"spec": {"runPolicy": {"suspend": True}}})
    body = wait_condition(api, namespace, "live", "Suspended", 60, reason="SuspendedByUser")
    assert body["status"]["phase"] == "Suspended"
    wait_for(lambda: not [p for p in pods(api, namespace, "live") if p["status"].get("phase") in ("Pending", "Running")],
             60, "the pod to stop")
    assert jobs(api, namespace, "live")[0]["spec"]["suspend"] is True
    api.patch(path, {"spec": {"runPolicy": {"suspend": False}}})
    wait_event(api, namespace, "live", "Normal", "Resumed", timeout=60)
    wait_condition(api, namespace, "live", "Running", 60, reason="TrainerRunning")
    assert [j["metadata"]["name"] for j in jobs(api, namespace, "live")] == ["live-train"]


def test_deleting_a_job_removes_its_children_but_not_artifacts(cluster, namespace, buckets, start_operator):
    api = cluster.api()
    start_operator()
    apply(cluster, manifest(cluster, namespace, "gone", "sleep-300"))
    body = wait_condition(api, namespace, "gone", "Running", 60, reason="TrainerRunning")
    assert not body["metadata"].get("finalizers")
    key = f"{namespace}/gone/run-1/adapter/_SUCCESS"
    buckets.put_object(Bucket="artifacts", Key=key, Body=b"")
    cluster.kubectl("-n", namespace, "delete", "qj", "gone", "--wait=true", "--timeout=30s")

    def children_gone():
        left = []
        for path in ("configmaps", "serviceaccounts", "pods"):
            left += [i["metadata"]["name"] for i in api.get(f"/api/v1/namespaces/{namespace}/{path}",
                                                               labelSelector="qlora.dev/job=gone")["items"]]
        for path in ("roles", "rolebindings"):
            left += [i["metadata"]["name"] for i in api.get(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/{path}",
                                                               labelSelector="qlora.dev/job=gone")["items"]]
        left += [j["metadata"]["name"] for j in jobs(api, namespace, "gone")]
        return not left or None

    wait_for(children_gone, 90, "the children to be garbage-collected", interval=1)
    buckets.head_object(Bucket="artifacts", Key=key)  # artifacts are never deleted


def test_spec_change_while_suspended_replaces_the_run(cluster, namespace, buckets, start_operator):
    api = cluster.api()
    start_operator()
    apply(cluster, manifest(cluster, namespace, "paused", "sleep-60"))
    wait_condition(api, namespace, "paused", "Running", 60, reason="TrainerRunning")
    path = f"{GROUP_PATH}/namespaces/{namespace}/qlorajobs/paused"
    api.patch(path, {"spec": {"runPolicy": {"suspend": True}}})
    wait_condition(api, namespace, "paused", "Suspended", 60)
    # Running=False now: the CRD lets training fields change; the suspended run is replaced by run 2.
    api.patch(path, {"spec": {"dataset": {"uri": "s3://data/fake/sleep-2.jsonl"}}})
    body = wait_for(lambda: (lambda b: b if b["status"].get("run") == 2 and is_true(b, "Suspended") else None)(
        get_qj(api, namespace, "paused")), 60, "run 2, suspended")
    assert body["status"]["jobName"] == "paused-train-r2"
    wait_for(lambda: [j["metadata"]["name"] for j in jobs(api, namespace, "paused")] == ["paused-train-r2"], 60,
             "the suspended Job of run 1 to be deleted")
    api.patch(path, {"spec": {"runPolicy": {"suspend": False}}})
    body = wait_condition(api, namespace, "paused", "Complete", 90)
    assert body["status"]["run"] == 2 and body["status"]["progress"]["step"] == 2


def test_namespace_deletion_with_running_jobs(cluster, buckets, tmp_path, start_operator):
    api = cluster.api()
    ns = f"t-del-{uuid.uuid4().hex[:8]}"
    api.create("/api/v1/namespaces", {"metadata": {"name": ns}})
    wait_for(lambda: any(sa["metadata"]["name"] == "default" for sa in
                         api.get(f"/api/v1/namespaces/{ns}/serviceaccounts")["items"]), 30, "the default ServiceAccount")
    cluster.kubectl("-n", ns, "create", "secret", "generic", "s3-creds",
                    f"--from-literal=AWS_ACCESS_KEY_ID={cluster.s3_access_key}",
                    f"--from-literal=AWS_SECRET_ACCESS_KEY={cluster.s3_secret_key}")
    op = start_operator(ns=ns)
    apply(cluster, manifest(cluster, ns, "run-a", "sleep-300"), manifest(cluster, ns, "run-b", "sleep-300"))
    for name in ("run-a", "run-b"):
        wait_condition(api, ns, name, "Running", 90, reason="TrainerRunning")
    started = time.monotonic()
    api.delete(f"/api/v1/namespaces/{ns}")

    def gone():
        try:
            api.get(f"/api/v1/namespaces/{ns}")
        except ApiException as err:
            return err.status == 404
        return False

    wait_for(gone, 120, f"namespace {ns} to be deleted", interval=1)
    sys.stderr.write(f"\nnamespace with 2 running jobs deleted in {time.monotonic() - started:.0f}s\n")
    op.assert_healthy()


# ----------------------------------------------------------------------------- the real trainer
@pytest.mark.slow
def test_real_trainer_end_to_end(cluster, namespace, buckets, start_operator, tmp_path):
    """qlora-train on the embedded SmolLM2 model and a slice of the chatterbot corpus."""
    from helpers import upload_embedded

    api = cluster.api()
    upload_embedded(buckets, tmp_path / "corpus", None, {  # the model is in s3://models/smollm2/ (node fixture)
        f"{namespace}/train.jsonl": ("train", 0, 48), f"{namespace}/eval.jsonl": ("eval", 0, 8)})

    start_operator(trainer_command=REAL_TRAINER,
                   stalled_timeout_seconds=600)
    body = manifest(cluster, namespace, "smol")
    body["spec"].update({
        "model": {"uri": "s3://models/smollm2/"},
        "dataset": {"uri": f"s3://data/{namespace}/train.jsonl", "evalUri": f"s3://data/{namespace}/eval.jsonl", "format": "chat"},
        "lora": {"r": 8, "alpha": 16, "targetModules": ["q_proj", "v_proj"]},
        "training": {"maxSteps": 6, "microBatchSize": 2, "gradientAccumulationSteps": 1, "maxSeqLength": 128,
                     "checkpointEverySteps": 3, "evalEverySteps": 3, "optimizer": "adamw_torch", "learningRate": 1e-3},
        "resources": {"gpus": 1, "cpu": "2", "memory": "4Gi"},
    })
    # What `kubectl get qj -w` shows, every update (a watch, not polling): Pending -> Running -> Succeeded.
    watch = subprocess.Popen(
        [str(cluster.kubectl_path), "--kubeconfig", str(cluster.kubeconfig), "-n", namespace, "get", "qj", "-w",
         "--no-headers", "-o", "custom-columns=NAME:.metadata.name,PHASE:.status.phase,PROGRESS:.status.progress.progress,LOSS:.status.progress.loss"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        apply(cluster, body)

        def running_with_progress():
            b = get_qj(api, namespace, "smol")
            progress = (b.get("status") or {}).get("progress") or {}
            if is_true(b, "Failed"):
                raise AssertionError(f"failed: {condition(b, 'Failed')}")
            return b if progress.get("step", 0) >= 1 and progress.get("loss") is not None else None

        b = wait_for(running_with_progress, 600, "training progress with a loss", interval=0.5)
        # 6 short steps can be over before the first progress report lands: then the trainer is uploading.
        assert b["status"]["phase"] in ("Running", "Uploading"), b["status"]["phase"]
        out = cluster.kubectl("get", "qj", "-n", namespace, "smol").stdout
        # The trainer may be past its last step by now (6 short steps): the live Running rows are
        # asserted on the watch below; here the printer columns must show the progress.
        assert "/6" in out and any(p in out for p in ("Running", "Uploading", "Merging", "Succeeded")), out
        b = wait_terminal(api, namespace, "smol", 900)
    finally:
        watch.terminate()
        lines = watch.communicate(timeout=10)[0].splitlines()
    assert is_true(b, "Complete"), (condition(b, "Failed"), b["status"].get("attempts"))
    phases = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[1] != "<none>" and (not phases or phases[-1] != parts[1]):
            phases.append(parts[1])
    assert phases[0] == "Pending" and phases[-1] == "Succeeded", phases
    assert "Running" in phases and phases.index("Running") < phases.index("Succeeded"), phases
    with_loss = [line for line in lines if "/6" in line and line.split()[-1] != "<none>"]
    assert with_loss, lines
    sys.stderr.write("\nkubectl get qj -w:\n" + "\n".join(lines) + "\n")
    adapter = b["status"]["artifacts"]["adapterUri"]
    assert adapter == f"s3://artifacts/{namespace}/smol/run-1/adapter/"
    keys = {o["Key"] for o in buckets.list_objects_v2(Bucket="artifacts", Prefix=f"{namespace}/smol/run-1/adapter/").get("Contents", [])}
    assert f"{namespace}/smol/run-1/adapter/_SUCCESS" in keys
    assert any(k.endswith("adapter_model.safetensors") for k in keys), keys
    assert b["status"]["progress"]["step"] == 6
