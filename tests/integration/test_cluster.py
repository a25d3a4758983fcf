"""The local cluster itself (no node: ``cluster`` fixture): control plane, admission, quota, S3.

Everything runs against the real binaries; waits are bounded. Pods under the real kubelet
are tested in ``tests/node`` (``test_real_node.py`` and the operator's tests there).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import textwrap
import time
import uuid

import pytest
from helpers import wait_for
from kubernetes.client.exceptions import ApiException

from localcluster import LocalCluster, procs
from localcluster.binaries import read_versions

PY = "python"


# ---------------------------------------------------------------------------- builders
def container(name: str, code: str, *args: str, **extra) -> dict:
    """A container running ``python -c code args...`` (the image is never pulled)."""
    return {"name": name, "image": "python:3.11-slim", "command": [PY, "-c", textwrap.dedent(code)],
            "args": list(args), **extra}


def job(name: str, code: str, *, backoff_limit: int = 0, gpus: int = 0, volumes=None, mounts=None,
        completions: int = 1, parallelism: int = 1) -> dict:
    """A batch/v1 Job with one ``python -c`` container (restartPolicy Never)."""
    c = container("main", code, volumeMounts=mounts or [])
    if gpus:
        c["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {"backoffLimit": backoff_limit, "completions": completions, "parallelism": parallelism,
                     "template": {"spec": {"restartPolicy": "Never", "containers": [c],
                                           "volumes": volumes or [], "terminationGracePeriodSeconds": 5}}}}


def pod(name: str, containers: list[dict], **spec) -> dict:
    """A bare v1 Pod (restartPolicy Never unless given)."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": "Never", "containers": containers, **spec}}


# ---------------------------------------------------------------------------- reading
def job_pods(api, ns: str, name: str) -> list[dict]:
    """The pods of a Job (by the job-name label)."""
    return api.get(f"/api/v1/namespaces/{ns}/pods", labelSelector=f"job-name={name}")["items"]


# ---------------------------------------------------------------------------- control plane
def test_kubectl_version_prints_the_pinned_server_version(cluster):
    out = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    pinned = read_versions()["KUBERNETES_VERSION"]
    assert out["serverVersion"]["gitVersion"] == pinned
    assert out["clientVersion"]["gitVersion"] == pinned


def test_up_and_down_ten_times_leaks_no_process_or_port(tmp_path):
    times = []
    for i in range(10):
        local = LocalCluster(tmp_path / f"c{i}")
        started = time.monotonic()
        local.start()
        times.append(time.monotonic() - started)
        pids = list(local.pids().values())
        marked = local.leftover_pids()
        ports = list(local.ports.values())
        assert all(procs.alive(p) for p in pids)
        assert set(pids) <= set(marked)
        assert {local.ports[p] for p in ("etcd-client", "apiserver", "s3")} <= procs.listening_ports()
        leftovers = local.stop()
        assert leftovers == [] and local.swept == []
        assert not [p for p in pids + marked if procs.alive(p)], "a process outlived stop()"
        assert local.leftover_pids() == []
        busy = [p for p in ports if not procs.port_is_free(p)]
        assert not busy, f"ports still taken after stop(): {busy}"
    print(f"\nbring-up times (s): {', '.join(f'{t:.1f}' for t in times)}; "
          f"mean {sum(times) / len(times):.1f}", file=sys.stderr)


# ---------------------------------------------------------------------------- admission
def test_restricted_namespace_rejects_a_privileged_pod(cluster, namespace):
    api = cluster.api()
    api.patch(f"/api/v1/namespaces/{namespace}",
              {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}})
    privileged = pod("privileged", [container("c", "pass", securityContext={"privileged": True})])
    with pytest.raises(ApiException) as err:
        api.create(f"/api/v1/namespaces/{namespace}/pods", privileged)
    assert err.value.status == 403
    assert "violates PodSecurity" in err.value.body and "privileged" in err.value.body
    compliant = pod("compliant", [container("c", "pass", securityContext={
        "runAsNonRoot": True, "runAsUser": 1000, "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}})])
    api.request("POST", f"/api/v1/namespaces/{namespace}/pods", body=compliant, query={"dryRun": "All"})


def test_gpu_quota_rejects_the_second_job_pod(cluster, namespace):
    api = cluster.api()
    api.create(f"/api/v1/namespaces/{namespace}/resourcequotas",
               {"metadata": {"name": "gpus"}, "spec": {"hard": {"requests.nvidia.com/gpu": "1"}}})
    wait_for(lambda: api.get(f"/api/v1/namespaces/{namespace}/resourcequotas/gpus").get("status", {}).get("hard"),
             30, "the quota controller to compute the quota's status")
    api.create(f"/apis/batch/v1/namespaces/{namespace}/jobs", job("first", "import time; time.sleep(300)", gpus=1))
    wait_for(lambda: job_pods(api, namespace, "first"), 30, "the first job's pod")
    api.create(f"/apis/batch/v1/namespaces/{namespace}/jobs", job("second", "pass", gpus=1))

    def quota_event():
        events = api.get(f"/api/v1/namespaces/{namespace}/events",
                         fieldSelector="involvedObject.kind=Job,involvedObject.name=second")["items"]
        return [e for e in events if e["reason"] == "FailedCreate" and "exceeded quota" in e["message"]]

    (event, *_) = wait_for(quota_event, 30, "a FailedCreate event with 'exceeded quota' on job second")
    assert "requests.nvidia.com/gpu" in event["message"]
    assert job_pods(api, namespace, "second") == []


# ---------------------------------------------------------------------------- S3
def test_s3_multipart_roundtrip(cluster):
    from boto3.s3.transfer import TransferConfig

    s3 = cluster.s3_client()
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    data = os.urandom(50 * 1024 * 1024)
    config = TransferConfig(multipart_threshold=8 * 1024 * 1024, multipart_chunksize=8 * 1024 * 1024)
    s3.upload_fileobj(io.BytesIO(data), bucket, "blob/50MiB.bin", Config=config)
    head = s3.head_object(Bucket=bucket, Key="blob/50MiB.bin")
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-7")  # 7 parts of 8 MiB: it really was a multipart upload
    listing = s3.list_objects_v2(Bucket=bucket, Prefix="blob/")
    assert [(o["Key"], o["Size"]) for o in listing["Contents"]] == [("blob/50MiB.bin", len(data))]
    out = io.BytesIO()
    s3.download_fileobj(bucket, "blob/50MiB.bin", out, Config=config)
    assert hashlib.sha256(out.getvalue()).hexdigest() == hashlib.sha256(data).hexdigest()
    env = dict(line.split("=", 1) for line in cluster.s3_env.read_text().splitlines())
    assert env["AWS_ENDPOINT_URL"] == cluster.s3_endpoint and env["AWS_DEFAULT_REGION"]
