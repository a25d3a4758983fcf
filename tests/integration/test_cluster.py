"""The local cluster itself: control plane, scheduler, node agent, admission, quota, S3.

Everything runs against the real binaries (``cluster`` fixture); waits are bounded.
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
def job_condition(api, ns: str, name: str) -> str | None:
    """``Complete`` or ``Failed`` once the Job has that condition True, else None."""
    j = api.get(f"/apis/batch/v1/namespaces/{ns}/jobs/{name}")
    for cond in j.get("status", {}).get("conditions") or []:
        if cond["type"] in ("Complete", "Failed") and cond["status"] == "True":
            return cond["type"]
    return None


def job_pods(api, ns: str, name: str) -> list[dict]:
    """The pods of a Job (by the job-name label)."""
    return api.get(f"/api/v1/namespaces/{ns}/pods", labelSelector=f"job-name={name}")["items"]


def get_pod(api, ns: str, name: str) -> dict:
    """One pod as JSON."""
    return api.get(f"/api/v1/namespaces/{ns}/pods/{name}")


def state_of(p: dict, container_name: str | None = None) -> dict:
    """The ``state`` of a container status (the first one unless named); {} when none yet."""
    statuses = p.get("status", {}).get("containerStatuses") or []
    for s in statuses:
        if container_name in (None, s["name"]):
            return s["state"]
    return {}


def terminated(p: dict, container_name: str | None = None) -> dict | None:
    """The terminated state of a container, or None."""
    return state_of(p, container_name).get("terminated")


def gone(api, ns: str, name: str) -> bool:
    """True once the pod no longer exists."""
    try:
        get_pod(api, ns, name)
    except ApiException as exc:
        if exc.status == 404:
            return True
        raise
    return False


# ---------------------------------------------------------------------------- control plane
def test_kubectl_version_prints_the_pinned_server_version(cluster):
    out = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    pinned = read_versions()["KUBERNETES_VERSION"]
    assert out["serverVersion"]["gitVersion"] == pinned
    assert out["clientVersion"]["gitVersion"] == pinned


def test_nodes_are_ready_with_gpu_capacity(cluster):
    nodes = {n["metadata"]["name"]: n for n in cluster.api().get("/api/v1/nodes")["items"]}
    assert set(cluster.node_names) <= set(nodes)
    for name in cluster.node_names:
        node = nodes[name]
        assert node["status"]["capacity"]["nvidia.com/gpu"] == str(cluster.gpus_per_node)
        ready = next(c for c in node["status"]["conditions"] if c["type"] == "Ready")
        assert ready["status"] == "True"
        lease = cluster.api().get(f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{name}")
        assert lease["spec"]["holderIdentity"] == name


def test_up_and_down_ten_times_leaks_no_process_or_port(tmp_path):
    times = []
    for i in range(10):
        local = LocalCluster(tmp_path / f"c{i}", nodes=1, gpus_per_node=1)
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


# ---------------------------------------------------------------------------- jobs and scheduling
def test_job_writing_a_file_completes(cluster, namespace):
    api = cluster.api()
    code = """
        import os, sys
        with open("/data/out.txt", "w") as f:
            f.write("hello from " + os.environ["HOSTNAME"])
        with open("/data/out.txt") as f, open(os.environ["QLORA_TERMINATION_MESSAGE_PATH"], "w") as t:
            t.write(f.read())
    """
    body = job("write-file", code, volumes=[{"name": "data", "emptyDir": {}}],
               mounts=[{"name": "data", "mountPath": "/data"}])
    api.create(f"/apis/batch/v1/namespaces/{namespace}/jobs", body)
    assert wait_for(lambda: job_condition(api, namespace, "write-file"), 60, "job write-file to finish") == "Complete"
    (p,) = job_pods(api, namespace, "write-file")
    assert p["spec"]["nodeName"] in cluster.node_names  # bound by the real scheduler
    assert p["status"]["phase"] == "Succeeded"
    term = terminated(p)
    assert term["exitCode"] == 0 and term["reason"] == "Completed"
    assert term["message"] == f"hello from {p['metadata']['name']}"
    host_file = cluster.pod_dir(namespace, p["metadata"]["name"]) / "volumes" / "data" / "out.txt"
    assert host_file.read_text() == term["message"]


def test_job_exiting_3_fails_with_the_exit_code_in_pod_status(cluster, namespace):
    api = cluster.api()
    api.create(f"/apis/batch/v1/namespaces/{namespace}/jobs", job("exit-3", "import sys; sys.exit(3)"))
    assert wait_for(lambda: job_condition(api, namespace, "exit-3"), 60, "job exit-3 to finish") == "Failed"
    (p,) = wait_for(lambda: job_pods(api, namespace, "exit-3"), 10, "the pod of exit-3")
    assert p["status"]["phase"] == "Failed"
    term = terminated(p)
    assert term["exitCode"] == 3 and term["reason"] == "Error"


def test_job_asking_for_too_many_gpus_stays_pending(cluster, namespace):
    api = cluster.api()
    api.create(f"/apis/batch/v1/namespaces/{namespace}/jobs", job("greedy", "pass", gpus=100))

    def unschedulable():
        for p in job_pods(api, namespace, "greedy"):
            for cond in p.get("status", {}).get("conditions") or []:
                if cond["type"] == "PodScheduled" and cond["status"] == "False":
                    return p, cond
        return None

    p, cond = wait_for(unschedulable, 30, "the scheduler to report the greedy pod unschedulable")
    assert cond["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in cond["message"]
    assert p["status"]["phase"] == "Pending" and not p["spec"].get("nodeName")


def test_fifty_pods_at_once(cluster, namespace):
    api = cluster.api()
    body = job("many", "import os; print(os.environ['HOSTNAME'])", completions=50, parallelism=50)
    started = time.monotonic()
    api.create(f"/apis/batch/v1/namespaces/{namespace}/jobs", body)
    assert wait_for(lambda: job_condition(api, namespace, "many"), 180, "50 pods to complete", interval=1) == "Complete"
    pods = job_pods(api, namespace, "many")
    assert sum(p["status"]["phase"] == "Succeeded" for p in pods) == 50
    name = pods[0]["metadata"]["name"]
    assert cluster.pod_log(namespace, name).strip() == name
    print(f"\n50 pods completed in {time.monotonic() - started:.1f}s", file=sys.stderr)


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


# ---------------------------------------------------------------------------- node agent
PROBE = """
import base64, json, os, ssl, sys, urllib.request
sa = os.environ["QLORA_SA_TOKEN_DIR"]
token = open(sa + "/token").read()
ctx = ssl.create_default_context(cafile=sa + "/ca.crt")
host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
req = urllib.request.Request(f"https://{host}:{port}/apis/authentication.k8s.io/v1/selfsubjectreviews",
    data=b'{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}', method="POST",
    headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
review = json.load(urllib.request.urlopen(req, context=ctx))
vault = open("/var/run/secrets/tokens/vault-token").read().split(".")[1]
claims = json.loads(base64.urlsafe_b64decode(vault + "=" * (-len(vault) % 4)))
keys = ["SECRET_VALUE", "CONFIG_VALUE", "POD_NAME", "POD_NAMESPACE", "POD_UID", "NODE_NAME", "POD_IP", "GREETING"]
result = {k: os.environ.get(k) for k in keys}
result.update(config_file=open("/etc/app/settings.json").read(), namespace_file=open(sa + "/namespace").read(),
              user=review["status"]["userInfo"]["username"], vault_aud=claims["aud"], cwd=os.getcwd())
open(sys.argv[1], "w").write(json.dumps(result))
"""


def test_pod_sees_env_volumes_and_service_account_token(cluster, namespace):
    api = cluster.api()
    api.create(f"/api/v1/namespaces/{namespace}/secrets",
               {"metadata": {"name": "creds"}, "stringData": {"password": "s3cr3t"}})
    api.create(f"/api/v1/namespaces/{namespace}/configmaps",
               {"metadata": {"name": "settings"}, "data": {"mode": "fast", "settings.json": '{"a": 1}'}})
    env = [
        {"name": "SECRET_VALUE", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
        {"name": "CONFIG_VALUE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "GREETING", "value": "hi $(POD_NAME)"},
    ]
    mounts = [{"name": "settings", "mountPath": "/etc/app"}, {"name": "vault", "mountPath": "/var/run/secrets/tokens"},
              {"name": "work", "mountPath": "/workspace"}]
    volumes = [{"name": "settings", "configMap": {"name": "settings"}}, {"name": "work", "emptyDir": {}},
               {"name": "vault", "projected": {"sources": [{"serviceAccountToken": {
                   "path": "vault-token", "audience": "vault", "expirationSeconds": 600}}]}}]
    c = container("probe", PROBE, "/dev/termination-log", env=env, volumeMounts=mounts, workingDir="/workspace/sub")
    api.create(f"/api/v1/namespaces/{namespace}/pods", pod("probe", [c], volumes=volumes))
    p = wait_for(lambda: (p := get_pod(api, namespace, "probe"))["status"].get("phase") in ("Succeeded", "Failed")
                 and p, 60, "pod probe to finish")
    term = terminated(p)
    assert p["status"]["phase"] == "Succeeded", (term, cluster.pod_log(namespace, "probe"))
    seen = json.loads(term["message"])
    assert seen["SECRET_VALUE"] == "s3cr3t" and seen["CONFIG_VALUE"] == "fast"
    assert seen["POD_NAME"] == "probe" and seen["POD_NAMESPACE"] == namespace
    assert seen["POD_UID"] == p["metadata"]["uid"] and seen["NODE_NAME"] == p["spec"]["nodeName"]
    assert seen["POD_IP"] == p["status"]["podIP"] == "127.0.0.1"
    assert seen["GREETING"] == "hi probe"
    assert seen["config_file"] == '{"a": 1}' and seen["namespace_file"] == namespace
    assert seen["user"] == f"system:serviceaccount:{namespace}:default"
    assert seen["vault_aud"] == ["vault"]
    assert seen["cwd"] == str(cluster.pod_dir(namespace, "probe") / "volumes" / "work" / "sub")
    assert {c["type"]: c["status"] for c in p["status"]["conditions"]}["Ready"] == "False"  # PodCompleted


def test_init_container_runs_first(cluster, namespace):
    api = cluster.api()
    init = container("init", "open('/shared/x', 'w').write('from init')",
                     volumeMounts=[{"name": "shared", "mountPath": "/shared"}])
    main = container("main", "import sys; open(sys.argv[1], 'w').write(open('/shared/x').read())",
                     "/dev/termination-log", volumeMounts=[{"name": "shared", "mountPath": "/shared"}])
    body = pod("init", [main], initContainers=[init], volumes=[{"name": "shared", "emptyDir": {}}])
    api.create(f"/api/v1/namespaces/{namespace}/pods", body)
    p = wait_for(lambda: (p := get_pod(api, namespace, "init"))["status"].get("phase") in ("Succeeded", "Failed")
                 and p, 60, "pod init to finish")
    assert p["status"]["phase"] == "Succeeded"
    assert p["status"]["initContainerStatuses"][0]["state"]["terminated"]["reason"] == "Completed"
    assert terminated(p)["message"] == "from init"


def test_exit_137_is_oomkilled_and_logs_fill_in_a_missing_message(cluster, namespace):
    api = cluster.api()
    killed = container("killed", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    noisy = container("noisy", "import sys; print('boom: something broke', file=sys.stderr); sys.exit(1)",
                      terminationMessagePolicy="FallbackToLogsOnError")
    api.create(f"/api/v1/namespaces/{namespace}/pods", pod("crash", [killed, noisy]))
    p = wait_for(lambda: (p := get_pod(api, namespace, "crash"))["status"].get("phase") == "Failed" and p,
                 60, "pod crash to fail")
    assert terminated(p, "killed")["exitCode"] == 137 and terminated(p, "killed")["reason"] == "OOMKilled"
    assert terminated(p, "noisy")["reason"] == "Error"
    assert "boom: something broke" in terminated(p, "noisy")["message"]
    assert "boom: something broke" in cluster.pod_log(namespace, "crash", "noisy")


SIGTERM_CODE = """
import os, signal, sys, time
marker, ready, mode = sys.argv[1], sys.argv[2], sys.argv[3]
def on_term(signum, frame):
    with open(marker, "w") as f:
        f.write("TERM")
    if mode == "exit":
        sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
open(ready, "w").close()
while True:
    time.sleep(0.1)
"""


@pytest.mark.parametrize("mode,grace", [("exit", 30), ("ignore", 2)])
def test_deleting_a_running_pod_sends_sigterm_then_sigkill(cluster, namespace, tmp_path, mode, grace):
    api = cluster.api()
    marker, ready = tmp_path / "marker", tmp_path / "ready"
    c = container("sleeper", SIGTERM_CODE, str(marker), str(ready), mode)
    api.create(f"/api/v1/namespaces/{namespace}/pods",
               pod("sleeper", [c], terminationGracePeriodSeconds=grace))
    wait_for(ready.exists, 60, "the pod's process to install its SIGTERM handler")
    assert get_pod(api, namespace, "sleeper")["status"]["phase"] == "Running"
    started = time.monotonic()
    api.delete(f"/api/v1/namespaces/{namespace}/pods/sleeper")
    wait_for(lambda: gone(api, namespace, "sleeper"), grace + 10, "the deleted pod to disappear")
    elapsed = time.monotonic() - started
    assert marker.read_text() == "TERM"
    if mode == "exit":
        assert elapsed < 10, f"a process that exits on SIGTERM took {elapsed:.1f}s to go"
    else:
        assert elapsed >= grace - 0.5, f"SIGKILL came after {elapsed:.1f}s, before the {grace}s grace period"
    assert not [p for p in procs.marked_pids(cluster.id) if str(marker) in _cmdline(p)]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_missing_secret_is_create_container_config_error_until_it_appears(cluster, namespace):
    api = cluster.api()
    env = [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "later", "key": "token"}}}]
    c = container("c", "import os, sys; open(sys.argv[1], 'w').write(os.environ['TOKEN'])", "/dev/termination-log",
                  env=env)
    api.create(f"/api/v1/namespaces/{namespace}/pods", pod("needs-secret", [c]))
    waiting = wait_for(lambda: state_of(get_pod(api, namespace, "needs-secret")).get("waiting", {}).get("reason")
                       == "CreateContainerConfigError" and state_of(get_pod(api, namespace, "needs-secret"))["waiting"],
                       30, "waiting reason CreateContainerConfigError")
    assert waiting["message"] == 'secret "later" not found'
    assert get_pod(api, namespace, "needs-secret")["status"]["phase"] == "Pending"
    api.create(f"/api/v1/namespaces/{namespace}/secrets", {"metadata": {"name": "later"}, "stringData": {"token": "t0k"}})
    p = wait_for(lambda: (p := get_pod(api, namespace, "needs-secret"))["status"].get("phase") == "Succeeded" and p,
                 30, "the pod to run once the secret exists")
    assert terminated(p)["message"] == "t0k"


def test_unpullable_image_reports_image_pull_errors(cluster, namespace):
    api = cluster.api()
    image = "registry.invalid/team/does-not-exist:v1"
    c = dict(container("c", "pass"), image=image)
    api.create(f"/api/v1/namespaces/{namespace}/pods", pod("no-image", [c]))
    reasons = set()

    def both_seen():
        waiting = state_of(get_pod(api, namespace, "no-image")).get("waiting") or {}
        if waiting.get("reason") in ("ErrImagePull", "ImagePullBackOff"):
            assert image in waiting["message"]
            reasons.add(waiting["reason"])
        return reasons == {"ErrImagePull", "ImagePullBackOff"}

    wait_for(both_seen, 30, "ErrImagePull and then ImagePullBackOff", interval=0.1)
    assert get_pod(api, namespace, "no-image")["status"]["phase"] == "Pending"


def test_kubectl_logs_reads_the_container_log(cluster, namespace):
    api = cluster.api()
    code = "import sys, time\nfor i in range(5):\n    print('line', i, flush=True)\n    time.sleep(0.2)\n"
    api.create(f"/api/v1/namespaces/{namespace}/pods", pod("chatty", [container("talk", code)]))
    wait_for(lambda: get_pod(api, namespace, "chatty")["status"].get("phase") in ("Running", "Succeeded"), 60,
             "pod chatty to start")
    followed = cluster.kubectl("logs", "-f", "chatty", "-n", namespace, timeout_s=60).stdout  # ends with the container
    assert followed.splitlines() == [f"line {i}" for i in range(5)]
    assert cluster.kubectl("logs", "chatty", "-n", namespace, "--tail", "2").stdout.splitlines() == ["line 3", "line 4"]
    assert cluster.pod_log(namespace, "chatty", "talk") == followed
