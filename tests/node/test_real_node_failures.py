"""Failures of a running trainer on the real node (issue 16, item 4): the real ``qlora-train``
from the trainer image, under a real kubelet and containerd, killed, evicted and deleted.

One real-node cluster for the module with the trainer image, the model and a slice of the
corpus in MinIO, and one operator process per test (fixtures ``node``, ``namespace``,
``operator`` of ``tests/node/conftest.py``); the pods run from the image as uid 1000 with a
read-only root. Training is tiny (8 steps, a checkpoint every 2, 64-token
rows): each run is dominated by the trainer's start (imports, 4-bit load) on 2 cores.

* ``test_sigkill_of_the_trainer_process_then_resume``: once checkpoint 2 is complete in
  MinIO, the trainer container's process is SIGKILLed on the host (found with ``ctr tasks
  ls``, as the kernel's OOM killer or ``kill -9`` would kill it): the attempt is recorded
  ``Killed`` (exit 137, no OOM reported by containerd), the Job's next pod resumes from the
  newest complete checkpoint (``resumedFromStep`` in the attempt, the ``resume`` event in
  its ``kubectl logs``, the adapter's manifest) and the job ends Succeeded with its adapter.
  A watch of the QLoRAJob shows ``Retrying`` between the attempts and never a pod
  ``Starting`` again once it ran: a real kubelet reports the trainer container's end before
  the pod's terminal phase, and the operator used to call such a pod "starting" (the stand-in
  node agent sets both at once, so no integration test saw it).
* ``test_eviction_checkpoints_then_resumes_uncounted``: a policy/v1 Eviction of the running
  pod with ``runPolicy.backoffLimit: 0`` once checkpoint 2 is complete: the kubelet's
  SIGTERM (to the container's pid 1, ``qlora-train``) makes the trainer write a checkpoint
  at the end of the step in progress, after the newest scheduled one (step 3 when evicted
  during step 3: only the SIGTERM path writes an odd step), and exit 143; the attempt is
  ``Disrupted`` (DisruptionTarget, EvictionByEvictionAPI), not counted (the Job would fail
  at once with a backoffLimit of 0), and the next pod resumes from that checkpoint.
* ``test_deleting_the_qlorajob_while_its_pod_runs``: ``kubectl delete qj`` while the trainer
  runs (no finalizer: garbage collection): the Job, its pods and the other children are
  gone, the trainer's process and its containers (and sandbox) are gone from containerd,
  and every object already under the job's output prefix (the checkpoint) and the inputs
  are untouched in MinIO (same keys, same ETags; the deleted pod's SIGTERM checkpoint may
  add one).

All waits are bounded (``helpers.wait_for``); nothing sleeps to synchronise.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import wait_for

from operator_harness import (  # the operator tests' process wrapper and helpers, reused
    GROUP_PATH,
    apply,
    condition,
    get_qj,
    is_true,
    jobs,
    manifest,
    pods,
)

pytestmark = [pytest.mark.realnode, pytest.mark.cluster, pytest.mark.slow]

STEPS = 8
CHECKPOINT_EVERY = 2
#: Bounded waits on a busy 2-core machine: one trainer start + 8 steps is under a minute idle.
RUN_TIMEOUT = 600


# ----------------------------------------------------------------------------- helpers
def job_manifest(node, namespace: str, name: str, **spec) -> dict:
    """A QLoRAJob of the embedded model: :data:`STEPS` steps, a checkpoint every 2 steps, no image (the
    operator's default: the built trainer image)."""
    body = manifest(node["cluster"], namespace, name, **spec)
    del body["spec"]["image"]
    body["spec"].update({
        "model": {"uri": "s3://models/smollm2/"},
        "dataset": {"uri": "s3://data/train.jsonl", "evalUri": "s3://data/eval.jsonl", "format": "chat"},
        "lora": {"r": 8, "alpha": 16, "targetModules": ["q_proj", "v_proj"]},
        "training": {"maxSteps": STEPS, "microBatchSize": 2, "gradientAccumulationSteps": 1, "maxSeqLength": 64,
                     "checkpointEverySteps": CHECKPOINT_EVERY, "keepCheckpoints": 5, "evalEverySteps": 100,
                     "optimizer": "adamw_torch", "learningRate": 1e-3, "gradientCheckpointing": False},
        "resources": {"gpus": 1, "cpu": "2", "memory": "4Gi"},
    })
    return body


def keys(s3, bucket: str, prefix: str) -> dict[str, str]:
    """``{key under prefix: ETag}``."""
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"][len(prefix):]] = obj["ETag"]
    return out


def complete_steps(s3, namespace: str, name: str) -> list[int]:
    """Steps of run 1's checkpoints whose ``_SUCCESS`` marker is in MinIO."""
    return sorted(int(k.split("/")[0].removeprefix("step-"))
                  for k in keys(s3, "artifacts", f"{namespace}/{name}/run-1/checkpoints/") if k.endswith("/_SUCCESS"))


def running_pod(api, namespace: str, name: str) -> dict:
    """The Job's pod whose trainer container runs (waits for it)."""
    def check():
        for pod in pods(api, namespace, name):
            statuses = pod["status"].get("containerStatuses") or []
            if not pod["metadata"].get("deletionTimestamp") and statuses and "running" in statuses[0]["state"]:
                return pod
        return None

    return wait_for(check, RUN_TIMEOUT, f"a running trainer container of {namespace}/{name}", interval=0.5)


def wait_checkpoint(node, namespace: str, name: str, step: int) -> None:
    """Wait until run 1's checkpoint ``step`` is complete in MinIO (its marker written last)."""
    wait_for(lambda: step in complete_steps(node["s3"], namespace, name), RUN_TIMEOUT,
             f"checkpoint step-{step} of {namespace}/{name} in MinIO", interval=0.25)


def wait_done(api, namespace: str, name: str) -> dict:
    """Wait until the QLoRAJob is Complete or Failed; return it."""
    return wait_for(lambda: (lambda b: b if is_true(b, "Complete") or is_true(b, "Failed") else None)(
        get_qj(api, namespace, name)), RUN_TIMEOUT, f"{namespace}/{name} to finish", interval=1)


def ctr(node, *args: str) -> str:
    """``ctr -n k8s.io ARGS`` against the node's containerd; its stdout."""
    from localcluster import nodeimages

    proc = subprocess.run(nodeimages.ctr_argv(node["cluster"].containerd_socket, *args), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def task_pid(node, container_id: str) -> int:
    """The host pid of a container's task (``ctr tasks ls``)."""
    for line in ctr(node, "tasks", "ls").splitlines()[1:]:
        task, pid, status = line.split()[:3]
        if task == container_id:
            assert status == "RUNNING", line
            return int(pid)
    raise AssertionError(f"no task {container_id} in containerd")


def pod_containers(node, pod_uid: str) -> list[str]:
    """IDs of the containers (the sandbox included) containerd holds for the pod ``pod_uid``."""
    return ctr(node, "containers", "ls", "-q", f'labels."io.kubernetes.pod.uid"=={pod_uid}').split()


def pod_logs(node, namespace: str, pod: str) -> list[dict]:
    """The trainer's JSON events from ``kubectl logs`` (read through the real kubelet)."""
    out = node["cluster"].kubectl("-n", namespace, "logs", pod).stdout
    events = []
    for line in out.splitlines():
        if line.startswith('{"event"'):
            try:
                events.append(json.loads(line))
            except ValueError:
                pass
    return events


def container_id(pod: dict) -> str:
    return pod["status"]["containerStatuses"][0]["containerID"].removeprefix("containerd://")


class StatusWatch:
    """A watch of one QLoRAJob (what ``kubectl get qj -w`` shows), started before it exists:
    every update's phase and its ``Running`` condition's reason and message."""

    def __init__(self, cluster, namespace: str, name: str) -> None:
        self.updates: list[tuple[str, str, str]] = []
        self.error: BaseException | None = None
        api, path = cluster.api(), f"{GROUP_PATH}/namespaces/{namespace}/qlorajobs"
        selector = f"metadata.name={name}"
        version = api.get(path, fieldSelector=selector)["metadata"]["resourceVersion"]
        self._thread = threading.Thread(target=self._run, args=(api, path, version, selector), daemon=True)
        self._thread.start()

    def _run(self, api, path: str, version: str, selector: str) -> None:
        try:
            for event in api.watch(path, version, timeout_s=RUN_TIMEOUT, fieldSelector=selector):
                body = event["object"]
                if event["type"] in ("ADDED", "MODIFIED"):
                    running = condition(body, "Running")
                    self.updates.append(((body.get("status") or {}).get("phase", ""), running.get("reason", ""),
                                         running.get("message", "")))
        except Exception as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc

    def stop(self) -> list[tuple[str, str, str]]:
        """The updates seen so far (the watch thread is a daemon: it ends with its timeout)."""
        assert self.error is None, f"the watch failed: {self.error!r}"
        return list(self.updates)


def assert_never_starting_again(updates: list[tuple[str, ...]]) -> None:
    """No pod is shown ``Starting`` once it was shown running: a real kubelet reports the trainer
    container's end before the pod's terminal phase (the phase stays Running until the sandbox is
    torn down), and that pod is over, not starting."""
    ran: set[str] = set()
    for phase, reason, message in updates:
        named = re.search(r"\bpod ([a-z0-9-]+)", message)
        pod = named.group(1) if named else None
        if reason == "TrainerRunning" and pod:
            ran.add(pod)
        assert not (reason == "Starting" and pod in ran), f"{pod} shown Starting after it ran: {updates}"


def assert_succeeded_from(node, namespace: str, name: str, body: dict, resumed: int) -> None:
    """The job Succeeded after resuming at ``resumed``: status, the adapter and its manifest in MinIO."""
    status = body["status"]
    assert is_true(body, "Complete"), (condition(body, "Failed"), status.get("attempts"))
    assert status["phase"] == "Succeeded" and status["progress"]["step"] == STEPS, status
    assert status["artifacts"]["adapterUri"] == f"s3://artifacts/{namespace}/{name}/run-1/adapter/"
    adapter = keys(node["s3"], "artifacts", f"{namespace}/{name}/run-1/adapter/")
    assert "_SUCCESS" in adapter and "adapter_model.safetensors" in adapter, sorted(adapter)
    manifest_doc = json.loads(node["s3"].get_object(
        Bucket="artifacts", Key=f"{namespace}/{name}/run-1/adapter/manifest.json")["Body"].read())
    assert manifest_doc["run"]["resumedFromStep"] == resumed and manifest_doc["metrics"]["steps"] == STEPS


# ----------------------------------------------------------------------------- tests
@pytest.mark.timeout(1200)
def test_sigkill_of_the_trainer_process_then_resume(node, namespace, operator):
    cluster = node["cluster"]
    api = cluster.api()
    name = "killed"
    started = time.monotonic()
    watch = StatusWatch(cluster, namespace, name)
    apply(cluster, job_manifest(node, namespace, name, runPolicy={"backoffLimit": 2}))
    wait_checkpoint(node, namespace, name, CHECKPOINT_EVERY)
    victim = running_pod(api, namespace, name)
    cid = container_id(victim)
    pid = task_pid(node, cid)
    assert "kubepods" in Path(f"/proc/{pid}/cgroup").read_text()  # the container's process, on the host
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic() - started

    def ended():
        pod = api.get(f"/api/v1/namespaces/{namespace}/pods/{victim['metadata']['name']}")
        state = pod["status"]["containerStatuses"][0]["state"]
        return state.get("terminated")

    term = wait_for(ended, 120, "the killed container's end in the pod status", interval=0.5)
    assert term["exitCode"] == 137 and term["reason"] != "OOMKilled", term
    at_kill = complete_steps(node["s3"], namespace, name)  # the process is gone: nothing more is written
    newest = max(at_kill)
    assert CHECKPOINT_EVERY <= newest < STEPS, newest

    try:
        body = wait_done(api, namespace, name)
    finally:
        updates = watch.stop()
    attempts = body["status"]["attempts"]
    print(f"\nSIGKILL of pid {pid} at {killed_at:.0f}s (complete checkpoints {at_kill}, container reason "
          f"{term['reason']}); resumed from step {attempts[-1].get('resumedFromStep')}; done in "
          f"{time.monotonic() - started:.0f}s; attempts {[(a['index'], a['reason'], a.get('exitCode')) for a in attempts]}; "
          f"attempt 0: {attempts[0].get('message', '')[:160]!r}", file=sys.stderr)
    assert [(a["index"], a["reason"], a["exitCode"]) for a in attempts] == [(0, "Killed", 137), (1, "Succeeded", 0)]
    assert attempts[0]["podName"] == victim["metadata"]["name"]
    assert "got SIGKILL" in attempts[0]["message"] and "not a memory limit" in attempts[0]["message"]
    assert attempts[1]["resumedFromStep"] == newest, attempts
    events = pod_logs(node, namespace, attempts[1]["podName"])
    assert [e["step"] for e in events if e["event"] == "resume"] == [newest]
    assert [e["step"] for e in events if e["event"] == "train_step"] == list(range(newest + 1, STEPS + 1))
    assert_succeeded_from(node, namespace, name, body, newest)
    assert ("Pending", "Retrying") in [u[:2] for u in updates], updates  # between the attempts
    assert_never_starting_again(updates)
    operator.assert_healthy()


@pytest.mark.timeout(1200)
def test_eviction_checkpoints_then_resumes_uncounted(node, namespace, operator):
    cluster = node["cluster"]
    api = cluster.api()
    name = "evicted"
    started = time.monotonic()
    watch = StatusWatch(cluster, namespace, name)
    apply(cluster, job_manifest(node, namespace, name, runPolicy={"backoffLimit": 0}))
    wait_checkpoint(node, namespace, name, CHECKPOINT_EVERY)
    victim = running_pod(api, namespace, name)["metadata"]["name"]
    before = complete_steps(node["s3"], namespace, name)
    api.create(f"/api/v1/namespaces/{namespace}/pods/{victim}/eviction",
               {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": victim, "namespace": namespace}})
    evicted_at = time.monotonic() - started

    try:
        body = wait_done(api, namespace, name)
    finally:
        updates = watch.stop()
    attempts = body["status"]["attempts"]
    after = complete_steps(node["s3"], namespace, name)
    print(f"\neviction at {evicted_at:.0f}s (checkpoints then {before}, finally {after}); resumed from step "
          f"{attempts[-1].get('resumedFromStep')}; done in {time.monotonic() - started:.0f}s; "
          f"attempts {[(a['index'], a['reason'], a.get('exitCode')) for a in attempts]}", file=sys.stderr)
    assert [(a["index"], a["reason"]) for a in attempts] == [(0, "Disrupted"), (1, "Succeeded")], attempts
    assert attempts[0]["podName"] == victim
    assert "EvictionByEvictionAPI" in attempts[0]["message"] or "DisruptionTarget" in attempts[0]["message"]
    # The trainer's SIGTERM exit (143), when the operator saw the pod end before the Job controller let it go.
    assert attempts[0].get("exitCode") in (143, None), attempts[0]
    resumed = attempts[1]["resumedFromStep"]
    # The SIGTERM checkpoint: written at the end of the step in progress, after the newest scheduled one.
    assert max(before) < resumed < STEPS, (before, resumed)
    events = pod_logs(node, namespace, attempts[1]["podName"])
    assert [e["step"] for e in events if e["event"] == "resume"] == [resumed]
    assert [e["step"] for e in events if e["event"] == "train_step"] == list(range(resumed + 1, STEPS + 1))
    assert_succeeded_from(node, namespace, name, body, resumed)
    assert_never_starting_again(updates)
    operator.assert_healthy()


@pytest.mark.timeout(900)
def test_deleting_the_qlorajob_while_its_pod_runs(node, namespace, operator):
    cluster = node["cluster"]
    api = cluster.api()
    s3 = node["s3"]
    name = "gone"
    apply(cluster, job_manifest(node, namespace, name))
    wait_checkpoint(node, namespace, name, CHECKPOINT_EVERY)
    pod = running_pod(api, namespace, name)
    cid, uid = container_id(pod), pod["metadata"]["uid"]
    pid = task_pid(node, cid)
    assert cid in pod_containers(node, uid) and len(pod_containers(node, uid)) == 2  # trainer + sandbox
    published = keys(s3, "artifacts", f"{namespace}/{name}/")
    inputs = {**keys(s3, "models", "smollm2/"), **keys(s3, "data", "")}
    assert f"run-1/checkpoints/step-{CHECKPOINT_EVERY}/_SUCCESS" in published
    t = time.monotonic()
    cluster.kubectl("-n", namespace, "delete", "qj", name, "--wait=true", "--timeout=60s")

    def children_gone():
        left = [j["metadata"]["name"] for j in jobs(api, namespace, name)]
        left += [p["metadata"]["name"] for p in pods(api, namespace, name)]
        for path in ("configmaps", "serviceaccounts"):
            left += [i["metadata"]["name"] for i in api.get(f"/api/v1/namespaces/{namespace}/{path}",
                                                             labelSelector=f"qlora.dev/job={name}")["items"]]
        for path in ("roles", "rolebindings"):
            left += [i["metadata"]["name"] for i in api.get(
                f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/{path}",
                labelSelector=f"qlora.dev/job={name}")["items"]]
        return not left or None

    wait_for(children_gone, 120, "the Job, its pods and the other children to be garbage-collected", interval=1)
    api_gone = time.monotonic() - t
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), 60, f"the trainer process {pid} to end")
    # the kubelet removes a deleted pod's containers and sandbox (its cleanup and container GC)
    wait_for(lambda: not pod_containers(node, uid), 180, f"containerd to drop the containers of pod {uid}", interval=1)
    node_gone = time.monotonic() - t
    assert cid not in ctr(node, "tasks", "ls")
    after = keys(s3, "artifacts", f"{namespace}/{name}/")
    print(f"\nQLoRAJob deleted: children gone from the API in {api_gone:.0f}s, containers gone from "
          f"containerd in {node_gone:.0f}s; {len(published)} published objects kept, complete checkpoints "
          f"before {sorted(int(k.split('/')[2][5:]) for k in published if k.endswith('/_SUCCESS') and '/checkpoints/' in k)}"
          f", after {complete_steps(s3, namespace, name)}", file=sys.stderr)
    assert {k: after.get(k) for k in published} == published, "published objects changed or went"
    assert {**keys(s3, "models", "smollm2/"), **keys(s3, "data", "")} == inputs
    with pytest.raises(Exception) as err:
        get_qj(api, namespace, name)
    assert getattr(err.value, "status", None) == 404
    assert not api.get(f"{GROUP_PATH}/namespaces/{namespace}/qlorajobs")["items"]
    operator.assert_healthy()
