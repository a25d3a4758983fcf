"""The Helm chart (``helm/qlora-operator``) on the real node (``tests/node``): the operator from
its image (``Dockerfile.operator``, built by ``make images``), two replicas with leader
election, under the real kubelet.

- ``helm lint --strict`` is clean (no warning, nothing on stderr); ``values.schema.json``
  refuses unknown keys and bad values.
- ``helm template`` output, cluster-wide and namespaced, passes the API server's own
  validation (``kubectl apply --dry-run=server --validate=strict``) in a namespace that
  enforces the ``restricted`` Pod Security level, without a PodSecurity warning.
- The release lifecycle: ``helm install`` into a ``restricted`` namespace; the kubelet runs
  the Deployment's two operator pods from the operator image (the chart's non-root uid,
  read-only root) and
  their readiness and liveness probes pass; the leader (the Lease's holder) authenticates
  with the chart's ServiceAccount token (the container's process has no kubeconfig;
  TokenReview of the token mounted in its root names the ServiceAccount), serves
  ``/healthz`` and ``/metrics`` at its pod IP, and takes a QLoRAJob to ``Complete`` in
  another ``restricted`` namespace: the RBAC is sufficient, and the operator log (``kubectl
  logs`` through the kubelet) has no 403.
  That ServiceAccount cannot get, list or watch Secrets anywhere. ``helm upgrade`` to a
  list of watched namespaces rolls the Deployment, replaces the ClusterRole with
  namespaced Roles, and a job there completes too. ``helm uninstall`` removes the
  operator and keeps the CRD and the users' QLoRAJobs.
- The trainer pod that ``qlora-operator render`` produces is admitted in a namespace
  enforcing ``restricted`` (and a non-compliant variant is refused: enforcement is on).
- ``slow``: the chart's operator, with namespaced RBAC, runs the real ``qlora-train`` on
  the embedded SmolLM2 model for 2 steps (about a minute on two CPU cores).

The trainer in the lifecycle is a cheap stand-in (run by the trainer image's python) that
follows the trainer's contract with the real pieces around it: it reads the mounted config, patches
``.status.progress`` with the pod's own per-job ServiceAccount token (the Role the
operator created), writes the adapter's ``_SUCCESS`` marker to MinIO with the
credentials the kubelet resolved from the job's Secret, and leaves the JSON
termination message. Waits are bounded (``helpers.wait_for``); nothing sleeps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from helpers import wait_crd_established, wait_for

pytestmark = [pytest.mark.realnode, pytest.mark.cluster]

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "qlora-operator"
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
#: the token and CA the kubelet mounts in a pod's containers (the ServiceAccount admission plugin).
SA_MOUNT = "var/run/secrets/kubernetes.io/serviceaccount"
#: plain HTTP to pod IPs: no proxy settings of the environment.
PLAIN = urllib.request.build_opener(urllib.request.ProxyHandler({}))
RELEASE = "qlora-operator"  # contains the chart name: the full name is the release name
SA = RELEASE
GROUP_PATH = "/apis/qlora.dev/v1alpha1"
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/warn": "restricted"}

STAND_IN_TRAINER = r'''
import json, os, ssl, sys, time, urllib.request
import boto3
cfg = json.load(open(sys.argv[1]))
tokdir = "/var/run/secrets/kubernetes.io/serviceaccount"
ctx = ssl.create_default_context(cafile=os.path.join(tokdir, "ca.crt"))
url = "https://%s:%s/apis/qlora.dev/v1alpha1/namespaces/%s/qlorajobs/%s/status" % (
    os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"],
    os.environ["QLORA_JOB_NAMESPACE"], os.environ["QLORA_JOB_NAME"])
total = 3
for step in range(1, total + 1):
    body = {"status": {"progress": {"step": step, "totalSteps": total, "loss": 1.0 / step, "stage": "Training",
                                    "updatedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}}
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="PATCH", headers={
        "Content-Type": "application/merge-patch+json",
        "Authorization": "Bearer " + open(os.path.join(tokdir, "token")).read().strip()})
    urllib.request.urlopen(req, context=ctx, timeout=10).read()
out = cfg["output"]["uri"].rstrip("/")
bucket, _, prefix = out[len("s3://"):].partition("/")
s3 = boto3.client("s3", endpoint_url=cfg["storage"]["endpoint"], region_name=cfg["storage"]["region"])
s3.put_object(Bucket=bucket, Key=prefix + "/run-1/adapter/_SUCCESS", Body=b"")
with open("/dev/termination-log", "w") as f:
    json.dump({"exitCode": 0, "reason": "Succeeded", "message": "stand-in trainer done",
               "artifacts": {"adapterUri": out + "/run-1/adapter/", "manifestUri": out + "/run-1/adapter/manifest.json"},
               "metrics": {"steps": total}}, f)
'''


# ----------------------------------------------------------------------------- helpers
def image_values(images: dict[str, str]) -> dict:
    """Chart values that run the locally built images (``repository:tag``, never pulled)."""
    def split(ref: str) -> dict:
        repository, tag = ref.rsplit(":", 1)
        return {"repository": repository, "tag": tag, "pullPolicy": "Never"}

    return {"image": split(images["operator"]), "trainer": {"image": split(images["trainer"])}}


@pytest.fixture(scope="module")
def helm(cluster, tmp_path_factory):
    """helm(*args, check=True) -> CompletedProcess, with the admin kubeconfig and private helm dirs."""
    home = tmp_path_factory.mktemp("helm-home")
    env = dict(os.environ, HELM_CACHE_HOME=str(home / "cache"), HELM_CONFIG_HOME=str(home / "config"),
               HELM_DATA_HOME=str(home / "data"), KUBECONFIG=str(cluster.kubeconfig))

    def run(*args: str, check: bool = True, timeout: float = 240) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(cluster.helm_path), *args], capture_output=True, text=True, env=env,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}\n{proc.stdout}")
        return proc

    return run


@pytest.fixture
def make_namespace(cluster):
    """make_namespace(labels) -> name of a fresh namespace (deleted after the test)."""
    api = cluster.api()
    made: list[str] = []

    def make(labels: dict[str, str] | None = None) -> str:
        name = f"h-{uuid.uuid4().hex[:10]}"
        api.create("/api/v1/namespaces", {"metadata": {"name": name, "labels": labels or {}}})
        made.append(name)
        wait_for(lambda: any(sa["metadata"]["name"] == "default"
                             for sa in api.get(f"/api/v1/namespaces/{name}/serviceaccounts")["items"]),
                 30, f"namespace {name} to get its default ServiceAccount")
        return name

    yield make
    for name in made:
        api.delete(f"/api/v1/namespaces/{name}")


def render_chart(helm, cluster, namespace: str, *extra: str) -> list[dict]:
    out = helm("template", RELEASE, str(CHART), "--namespace", namespace, "--kube-version",
               cluster.kubernetes_version, *extra).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def rules_of(docs: list[dict]) -> list[dict]:
    return [rule for d in docs if d["kind"] in ("Role", "ClusterRole") for rule in d.get("rules", [])]


def can_i(cluster, verb: str, resource: str, namespace: str | None, user: str) -> bool:
    where = ["--all-namespaces"] if namespace is None else ["-n", namespace]
    proc = cluster.kubectl("auth", "can-i", verb, resource, *where, "--as", user, check=False)
    answer = proc.stdout.strip()
    assert answer in ("yes", "no"), (proc.stdout, proc.stderr)
    return answer == "yes"


def condition(body: dict, typ: str) -> dict:
    return next((c for c in (body.get("status") or {}).get("conditions") or [] if c["type"] == typ), {})


def operator_pods(api, namespace: str) -> list[dict]:
    """The release's operator pods that are not being deleted."""
    pods = api.get(f"/api/v1/namespaces/{namespace}/pods",
                   labelSelector=f"app.kubernetes.io/instance={RELEASE}")["items"]
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def pod_log(cluster, namespace: str, pod: str) -> str:
    """``kubectl logs`` of a pod (through the API server and the real kubelet)."""
    return cluster.kubectl("-n", namespace, "logs", pod).stdout


def wait_rolled_out(cluster, api, namespace: str, replicas: int, not_uids: frozenset[str] = frozenset()) -> dict:
    """Wait until the Deployment's ``replicas`` pods are Ready (the kubelet's readiness probe),
    none of them one of ``not_uids`` (an earlier revision) and no other pod is left; then until
    the Lease names one of them as leader and that pod logged that kopf started. Returns the
    leader's pod."""

    def rolled():
        pods = operator_pods(api, namespace)
        everything = api.get(f"/api/v1/namespaces/{namespace}/pods",
                             labelSelector=f"app.kubernetes.io/instance={RELEASE}")["items"]
        ready = [p for p in pods if p["metadata"]["uid"] not in not_uids and any(
            c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions") or [])]
        return ready if len(ready) == replicas == len(everything) else None

    pods = wait_for(rolled, 180, f"{replicas} ready operator pods in {namespace}", interval=0.5)

    def leader():
        try:
            lease = api.get(f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{RELEASE}")
        except Exception:  # noqa: BLE001 - not created yet
            return None
        holder = (lease.get("spec") or {}).get("holderIdentity") or ""
        pod = next((p for p in pods if holder.startswith(p["metadata"]["name"] + "_")), None)
        return pod if pod and "qlora-operator started" in pod_log(cluster, namespace, pod["metadata"]["name"]) else None

    return wait_for(leader, 90, f"an operator pod in {namespace} to lead and start", interval=0.5)


def container_processes(pod_name: str) -> list[dict]:
    """The real node's container processes of ``pod_name`` (by their ``HOSTNAME``): each
    ``{"pid", "env", "cmdline"}``. Read from the host's /proc (root)."""
    from localcluster import realnode

    found = []
    for pid in sorted(realnode.pod_pids()):
        try:
            raw = Path(f"/proc/{pid}/environ").read_bytes()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        env = dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)
        if env.get("HOSTNAME") == pod_name:
            found.append({"pid": pid, "env": env, "cmdline": cmdline})
    return found


def qlorajob(cluster, namespace: str, name: str) -> dict:
    return {
        "apiVersion": "qlora.dev/v1alpha1",
        "kind": "QLoRAJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"uri": "s3://models/stand-in/"},
            "dataset": {"uri": "s3://data/stand-in/train.jsonl"},
            "output": {"uri": f"s3://artifacts/{namespace}/{name}/"},
            "storage": {"endpoint": cluster.s3_endpoint, "credentialsSecretRef": {"name": "s3-creds"}},
            "resources": {"gpus": 1, "cpu": "1", "memory": "1Gi"},
        },
    }


def run_job_to_complete(cluster, api, namespace: str, name: str) -> dict:
    """Create the S3 Secret and a QLoRAJob in ``namespace``; wait for Complete; check what the trainer did."""
    cluster.kubectl("-n", namespace, "create", "secret", "generic", "s3-creds",
                    f"--from-literal=AWS_ACCESS_KEY_ID={cluster.s3_access_key}",
                    f"--from-literal=AWS_SECRET_ACCESS_KEY={cluster.s3_secret_key}")
    cluster.kubectl("apply", "-f", "-", input=json.dumps(qlorajob(cluster, namespace, name)))

    def finished():
        body = api.get(f"{GROUP_PATH}/namespaces/{namespace}/qlorajobs/{name}")
        if condition(body, "Failed").get("status") == "True":
            raise AssertionError(f"{namespace}/{name} failed: {condition(body, 'Failed')}")
        return body if condition(body, "Complete").get("status") == "True" else None

    body = wait_for(finished, 120, f"QLoRAJob {namespace}/{name} to complete", interval=0.5)
    status = body["status"]
    assert status["artifacts"]["adapterUri"] == f"s3://artifacts/{namespace}/{name}/run-1/adapter/", status
    assert status["progress"]["step"] == 3, status  # patched by the trainer with its per-job Role
    cluster.s3_client().head_object(Bucket="artifacts", Key=f"{namespace}/{name}/run-1/adapter/_SUCCESS")
    events = api.get(f"/api/v1/namespaces/{namespace}/events")["items"]
    assert not [e for e in events if e.get("reason") == "FailedCreate"], "a pod was refused (Pod Security?)"
    return body


def assert_no_rbac_denial(log: str, user: str) -> None:
    """No API call of the operator was refused by RBAC. (Other 403s, such as a namespace of
    another test being terminated, are not about the chart.)"""
    denied = [line for line in log.splitlines()
              if (user in line and " cannot " in line) or "Not enough permissions" in line
              or "APIForbiddenError" in line or "permissions not currently held" in line]
    assert not denied, "RBAC refused calls of the operator:\n" + "\n".join(denied[:10])


# ----------------------------------------------------------------------------- lint and template
def test_lint_is_clean(cluster, helm):
    for extra in ([], ["--set", "watchNamespaces={team-a,team-b}"]):
        proc = helm("lint", "--strict", "--kube-version", cluster.kubernetes_version, str(CHART), *extra)
        assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout
        assert "1 chart(s) linted, 0 chart(s) failed" in proc.stdout, proc.stdout
        assert proc.stderr.strip() == "", f"helm lint printed on stderr: {proc.stderr}"


@pytest.mark.parametrize("setting,error", [
    ("trainerImage=x", "additional properties 'trainerImage' not allowed"),
    ("logFormat=xml", "/logFormat"),
    ("watchNamespaces={Team_A}", "/watchNamespaces/0"),
    ("metrics.port=0", "/metrics/port"),
])
def test_values_schema_refuses_mistakes(cluster, helm, setting, error):
    proc = helm("template", RELEASE, str(CHART), "--kube-version", cluster.kubernetes_version, "--set", setting,
                check=False)
    assert proc.returncode != 0 and error in proc.stderr, proc.stderr


@pytest.mark.parametrize("mode", ["cluster-wide", "namespaced"])
def test_template_validates_server_side(cluster, helm, make_namespace, mode):
    release_ns = make_namespace(RESTRICTED)
    watched = [make_namespace(), make_namespace()] if mode == "namespaced" else []
    extra = ["--set", "watchNamespaces={%s}" % ",".join(watched)] if watched else []
    docs = render_chart(helm, cluster, release_ns, "--include-crds", *extra)
    kinds = sorted(d["kind"] for d in docs)
    if mode == "cluster-wide":
        assert kinds == ["ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "Deployment",
                         "PodDisruptionBudget", "Role", "RoleBinding", "Service", "ServiceAccount"], kinds
    else:
        assert kinds == ["CustomResourceDefinition", "Deployment", "PodDisruptionBudget", "Role", "Role", "Role",
                         "RoleBinding", "RoleBinding", "RoleBinding", "Service", "ServiceAccount"], kinds
        assert sorted(d["metadata"]["namespace"] for d in docs if d["kind"] == "Role"
                      and not d["metadata"]["name"].endswith("-leader-election")) == sorted(watched)
        args = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
        assert [a for a in args if a.startswith("--namespace")] == [f"--namespace={ns}" for ns in watched], args
    for rule in rules_of(docs):
        assert "secrets" not in rule["resources"] and "*" not in rule["resources"] + rule["verbs"], rule

    # Server-side apply: the CRD may exist already (applied by another test or an earlier install).
    proc = cluster.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=helm-test",
                           "--dry-run=server", "--validate=strict", "-f", "-",
                           input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))
    assert "Warning" not in proc.stderr, proc.stderr  # PodSecurity warns about workloads it would refuse
    # Deployments only get warnings: create its pod template as a Pod where `restricted` is enforced.
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    spec = dict(deployment["spec"]["template"]["spec"], serviceAccountName="default")  # the dry run made none
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "operator-pod", "namespace": release_ns},
           "spec": spec}
    proc = cluster.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(pod))
    assert "Warning" not in proc.stderr, proc.stderr


def test_replicas_leader_election_and_rolling_update(cluster, helm):
    """Default: 2 replicas with leader election (a Lease Role in the release namespace only),
    a rolling update that never drops below the replicas, a PodDisruptionBudget; several
    replicas without leader election are refused."""
    docs = render_chart(helm, cluster, "qlora-system")
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["QLORA_OPERATOR_LEADER_ELECTION"]["value"] == "true"
    assert env["QLORA_OPERATOR_LEADER_ELECTION_NAME"]["value"] == RELEASE
    assert env["QLORA_OPERATOR_LEADER_ELECTION_LEASE_SECONDS"]["value"] == "15"
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    lease_role = next(d for d in docs if d["kind"] == "Role" and d["metadata"]["name"].endswith("-leader-election"))
    assert lease_role["metadata"]["namespace"] == "qlora-system"
    assert lease_role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": [RELEASE], "verbs": ["get", "update"]},
    ]
    binding = next(d for d in docs if d["kind"] == "RoleBinding" and d["metadata"]["name"].endswith("-leader-election"))
    assert binding["roleRef"]["name"] == lease_role["metadata"]["name"] and binding["subjects"][0]["name"] == SA
    pdb = next(d for d in docs if d["kind"] == "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1

    single = render_chart(helm, cluster, "qlora-system", "--set", "replicas=1", "--set", "leaderElection.enabled=false")
    assert not [d for d in single if d["kind"] in ("PodDisruptionBudget", "Role")]
    assert "QLORA_OPERATOR_LEADER_ELECTION" not in json.dumps(single)
    proc = helm("template", RELEASE, str(CHART), "--kube-version", cluster.kubernetes_version,
                "--set", "leaderElection.enabled=false", check=False)
    assert proc.returncode != 0 and "replicas > 1 needs leaderElection.enabled" in proc.stderr, proc.stderr


# ----------------------------------------------------------------------------- the release lifecycle
def test_install_run_upgrade_uninstall(node, cluster, helm, make_namespace, tmp_path):
    """install (cluster-wide) -> job Complete -> upgrade (namespaced) -> job Complete -> uninstall."""
    api = cluster.api()
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    release_ns = make_namespace(RESTRICTED)
    jobs_a = make_namespace(RESTRICTED)
    jobs_b = make_namespace(RESTRICTED)
    user = f"system:serviceaccount:{release_ns}:{SA}"
    replicas = VALUES["replicas"]  # the chart's default: 2, with leader election
    assert replicas == 2
    images = image_values(node["images"])
    values = tmp_path / "values.yaml"
    values.write_text(json.dumps({
        **images,
        "trainer": {**images["trainer"], "command": ["python", "-c", STAND_IN_TRAINER, "/etc/qlora/config.json"]},
        "resyncSeconds": 2,
        "logFormat": "text",
    }))

    installed = True
    try:
        # --- install (cluster-wide) -------------------------------------------------------------
        proc = helm("install", RELEASE, str(CHART), "--namespace", release_ns, "-f", str(values), "--wait",
                    "--timeout", "120s")
        assert "STATUS: deployed" in proc.stdout, proc.stdout
        wait_crd_established(cluster)
        pod = wait_rolled_out(cluster, api, release_ns, replicas)
        timings["install"] = time.monotonic() - t0
        first_pods = operator_pods(api, release_ns)
        assert pod["spec"]["serviceAccountName"] == SA
        container = pod["spec"]["containers"][0]
        assert container["image"] == f"{images['image']['repository']}:{images['image']['tag']}"
        status = pod["status"]["containerStatuses"][0]
        assert status["ready"] and status["restartCount"] == 0, status

        # The container's process runs as the chart's non-root uid on a read-only root and authenticates with
        # the chart's ServiceAccount token, nothing else.
        procs = [p for p in container_processes(pod["metadata"]["name"]) if "qlora-operator" in p["cmdline"]
                 or "qlora_operator" in p["cmdline"]]
        assert procs, container_processes(pod["metadata"]["name"])
        main = procs[0]
        assert "KUBECONFIG" not in main["env"], "the operator pod must not see a kubeconfig"
        run_as = (container.get("securityContext") or {}).get("runAsUser") or \
            (pod["spec"].get("securityContext") or {}).get("runAsUser")
        assert run_as and run_as != 0 and os.stat(f"/proc/{main['pid']}").st_uid == run_as
        root = Path(f"/proc/{main['pid']}/root")
        mounts = Path(f"/proc/{main['pid']}/mounts").read_text().split("\n")
        assert any(line.split()[1:2] == ["/"] and "ro" in line.split()[3].split(",") for line in mounts if line), mounts
        # /var/run is a link to /run in the image: an absolute link, resolved here from the host's root
        mounted = next(d for d in (root / SA_MOUNT, root / SA_MOUNT.removeprefix("var/")) if (d / "token").exists())
        token = (mounted / "token").read_text().strip()
        review = api.create("/apis/authentication.k8s.io/v1/tokenreviews",
                            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}})
        assert review["status"]["authenticated"] and review["status"]["user"]["username"] == user, review["status"]

        # No access to Secrets, anywhere.
        for verb in ("get", "list", "watch"):
            for ns in (None, jobs_a, release_ns):
                assert not can_i(cluster, verb, "secrets", ns, user), f"{user} can {verb} secrets in {ns or 'all'}"
        assert can_i(cluster, "list", "qlorajobs.qlora.dev", None, user)

        # Health and metrics at the leader's pod IP on the chart's ports (the host reaches pod IPs).
        ip = pod["status"]["podIP"]
        with PLAIN.open(f"http://{ip}:{VALUES['health']['port']}/healthz", timeout=5) as resp:
            assert resp.status == 200
        with PLAIN.open(f"http://{ip}:{VALUES['metrics']['port']}/metrics", timeout=5) as resp:
            assert b"qlora_jobs" in resp.read()

        run_job_to_complete(cluster, api, jobs_a, "first")
        timings["job cluster-wide"] = time.monotonic() - t0
        assert_no_rbac_denial(pod_log(cluster, release_ns, pod["metadata"]["name"]), user)

        # --- upgrade: a list of namespaces instead of the whole cluster -----------------------------
        old = api.get(f"/apis/apps/v1/namespaces/{release_ns}/deployments/{RELEASE}")
        proc = helm("upgrade", RELEASE, str(CHART), "--namespace", release_ns, "-f", str(values),
                    "--set", f"watchNamespaces={{{jobs_b}}}", "--wait", "--timeout", "120s")
        assert "STATUS: deployed" in proc.stdout and "REVISION: 2" in proc.stdout, proc.stdout
        new_pod = wait_rolled_out(cluster, api, release_ns, replicas,
                                  not_uids=frozenset(p["metadata"]["uid"] for p in first_pods))
        timings["upgrade"] = time.monotonic() - t0
        deployment = api.get(f"/apis/apps/v1/namespaces/{release_ns}/deployments/{RELEASE}")
        assert deployment["metadata"]["generation"] == old["metadata"]["generation"] + 1
        args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        assert f"--namespace={jobs_b}" in args and "--all-namespaces" not in args, args
        wait_for(lambda: api.get(f"/apis/apps/v1/namespaces/{release_ns}/deployments/{RELEASE}")["status"]
                 .get("updatedReplicas") == replicas, 60, "the Deployment to finish rolling")
        for old_pod in first_pods:
            assert not container_processes(old_pod["metadata"]["name"]), "an old operator process still runs"
        for kind in ("clusterroles", "clusterrolebindings"):
            items = api.get(f"/apis/rbac.authorization.k8s.io/v1/{kind}",
                            labelSelector=f"app.kubernetes.io/instance={RELEASE}")["items"]
            names = [i["metadata"]["name"] for i in items]
            assert not names, f"{kind} left after switching to namespaced RBAC: {names}"
        assert can_i(cluster, "list", "qlorajobs.qlora.dev", jobs_b, user)
        assert not can_i(cluster, "list", "qlorajobs.qlora.dev", jobs_a, user)
        assert not can_i(cluster, "list", "qlorajobs.qlora.dev", None, user)
        for verb in ("get", "list", "watch"):
            assert not can_i(cluster, verb, "secrets", jobs_b, user)

        run_job_to_complete(cluster, api, jobs_b, "second")
        timings["job namespaced"] = time.monotonic() - t0
        assert_no_rbac_denial(pod_log(cluster, release_ns, new_pod["metadata"]["name"]), user)

        # --- uninstall: the operator goes, the CRD and the users' jobs stay ---------------------------
        helm("uninstall", RELEASE, "--namespace", release_ns, "--wait", "--timeout", "120s")
        installed = False
        wait_for(lambda: not api.get(f"/api/v1/namespaces/{release_ns}/pods")["items"], 60,
                 "the operator pod to be deleted")
        timings["uninstall"] = time.monotonic() - t0
        left = cluster.kubectl("get", "deployments,serviceaccounts,services,roles,rolebindings", "-n", release_ns,
                               "-l", f"app.kubernetes.io/instance={RELEASE}", "-o", "name").stdout.split()
        assert not left, left
        assert not cluster.kubectl("get", "roles,rolebindings", "-n", jobs_b, "-l",
                                   f"app.kubernetes.io/instance={RELEASE}", "-o", "name").stdout.split()
        assert api.get("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/qlorajobs.qlora.dev")
        for ns, name in ((jobs_a, "first"), (jobs_b, "second")):
            body = api.get(f"{GROUP_PATH}/namespaces/{ns}/qlorajobs/{name}")
            assert condition(body, "Complete").get("status") == "True", body.get("status")
    finally:
        if installed:  # cluster-scoped objects outlive the namespace: never leave them behind
            helm("uninstall", RELEASE, "--namespace", release_ns, "--wait", "--timeout", "120s", check=False)
    sys.stderr.write(f"\nhelm lifecycle timings (s since start): {({k: round(v, 1) for k, v in timings.items()})}\n")


# ----------------------------------------------------------------------------- trainer pods and Pod Security
def test_rendered_trainer_pod_is_admitted_under_restricted(cluster, make_namespace):
    ns = make_namespace(RESTRICTED)
    proc = subprocess.run([sys.executable, "-m", "qlora_operator", "render", str(REPO / "examples" / "minimal.yaml"),
                           "--namespace", ns, "--output", "json"], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    children = json.loads(proc.stdout)["items"]
    # The children the Job's pod refers to exist for real (no owner: there is no QLoRAJob here) ...
    objs = [{**c, "metadata": {k: v for k, v in c["metadata"].items() if k != "ownerReferences"}} for c in children]
    job = next(c for c in objs if c["kind"] == "Job")
    others = [c for c in objs if c["kind"] != "Job"]
    assert sorted(c["kind"] for c in others) == ["ConfigMap", "Role", "RoleBinding", "ServiceAccount"]
    proc = cluster.kubectl("apply", "--validate=strict", "-f", "-",
                           input=json.dumps({"apiVersion": "v1", "kind": "List", "items": others}))
    assert "Warning" not in proc.stderr, proc.stderr
    # ... and the Job, then its pod template as a Pod, pass server-side creation with every admission plugin.
    proc = cluster.kubectl("create", "--dry-run=server", "--validate=strict", "-f", "-", input=json.dumps(job))
    assert "Warning" not in proc.stderr, proc.stderr
    template = job["spec"]["template"]
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "trainer", "namespace": ns, "labels": template["metadata"].get("labels", {})},
           "spec": template["spec"]}
    created = cluster.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(pod))
    assert "Warning" not in created.stderr, created.stderr
    assert json.loads(created.stdout)["spec"]["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"

    # Control: the same pod without its security context is refused, so enforcement is on.
    loose = json.loads(json.dumps(pod))
    loose["spec"].pop("securityContext", None)
    for container in loose["spec"]["containers"] + loose["spec"].get("initContainers", []):
        container.pop("securityContext", None)
    refused = cluster.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(loose), check=False)
    assert refused.returncode != 0 and "violates PodSecurity" in refused.stderr, refused.stderr


# ----------------------------------------------------------------------------- the real trainer under the chart
@pytest.mark.slow
def test_real_trainer_under_the_chart(node, cluster, helm, make_namespace, tmp_path):
    """The chart's operator (namespaced RBAC, one replica) runs the real ``qlora-train`` from the
    trainer image on the embedded model (uploaded by the ``node`` fixture): 2 steps."""
    import embedded  # hack/embedded.py

    api = cluster.api()
    s3 = node["s3"]
    release_ns = make_namespace(RESTRICTED)
    jobs_ns = make_namespace(RESTRICTED)
    corpus = tmp_path / "corpus"
    embedded.build_corpus(corpus)
    rows = (corpus / "train.jsonl").read_text().splitlines()[:16]
    s3.put_object(Bucket="data", Key=f"{jobs_ns}/train.jsonl", Body="\n".join(rows).encode() + b"\n")

    values = tmp_path / "values.yaml"
    values.write_text(json.dumps({
        **image_values(node["images"]),
        "watchNamespaces": [jobs_ns],
        "resyncSeconds": 2, "logFormat": "text", "timeouts": {"stalledSeconds": 600},
        "replicas": 1, "leaderElection": {"enabled": False},  # the node's 2 cores go to the trainer
    }))
    helm("install", RELEASE, str(CHART), "--namespace", release_ns, "-f", str(values), "--wait", "--timeout", "120s")
    try:
        pods = wait_for(lambda: [p for p in operator_pods(api, release_ns)
                                 if p["status"].get("phase") == "Running"] or None, 120, "the operator pod")
        pod = pods[0]
        wait_for(lambda: "qlora-operator started" in pod_log(cluster, release_ns, pod["metadata"]["name"]), 90,
                 "the operator to start")
        cluster.kubectl("-n", jobs_ns, "create", "secret", "generic", "s3-creds",
                        f"--from-literal=AWS_ACCESS_KEY_ID={cluster.s3_access_key}",
                        f"--from-literal=AWS_SECRET_ACCESS_KEY={cluster.s3_secret_key}")
        body = qlorajob(cluster, jobs_ns, "smol")
        body["spec"].update({
            "model": {"uri": "s3://models/smollm2/"},
            "dataset": {"uri": f"s3://data/{jobs_ns}/train.jsonl", "format": "chat"},
            "lora": {"r": 4, "alpha": 8, "targetModules": ["q_proj", "v_proj"]},
            "training": {"maxSteps": 2, "microBatchSize": 2, "gradientAccumulationSteps": 1, "maxSeqLength": 64,
                         "checkpointEverySteps": 2, "evalEverySteps": 2, "optimizer": "adamw_torch"},
            "resources": {"gpus": 1, "cpu": "1500m", "memory": "4Gi"},  # beside the operator's 100m
        })
        cluster.kubectl("apply", "-f", "-", input=json.dumps(body))

        def finished():
            got = api.get(f"{GROUP_PATH}/namespaces/{jobs_ns}/qlorajobs/smol")
            if condition(got, "Failed").get("status") == "True":
                raise AssertionError(f"failed: {condition(got, 'Failed')}")
            return got if condition(got, "Complete").get("status") == "True" else None

        got = wait_for(finished, 600, "the real training run to complete", interval=1)
        assert got["status"]["progress"]["step"] == 2, got["status"]  # reported by qlora-train itself
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket="artifacts", Prefix=f"{jobs_ns}/smol/run-1/adapter/")
                .get("Contents", [])}
        assert f"{jobs_ns}/smol/run-1/adapter/_SUCCESS" in keys and any(k.endswith(".safetensors") for k in keys), keys
        assert_no_rbac_denial(pod_log(cluster, release_ns, pod["metadata"]["name"]),
                              f"system:serviceaccount:{release_ns}:{SA}")
    finally:
        helm("uninstall", RELEASE, "--namespace", release_ns, "--wait", "--timeout", "120s", check=False)
