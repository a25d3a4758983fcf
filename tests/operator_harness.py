"""The operator tests' process wrapper and helpers (``tests/operator_harness.py``; no tests).

The operator tests themselves run on the real node (``tests/node``: ``test_operator_node``,
``test_multinode``, ``test_kueue``, ``test_fitcheck``, ``test_sts_credentials`` and the others
import from this module; their fixtures are in ``tests/node/conftest.py``). What they share:

- :class:`Operator`: one ``python -m qlora_operator run --namespace NS`` process (the
  cluster's admin kubeconfig) scoped to a namespace, with settings from ``QLORA_OPERATOR_*``:
  short timeouts, and by default a cheap stand-in trainer (``python -c FAKE_TRAINER``)
  that follows the trainer's contract (config file, exit codes, JSON termination message,
  progress patches with the pod's own ServiceAccount token) and whose behaviour is picked
  by the dataset file name (``ok``, ``exit-3``, ``kill9``, ``oom``, ``storage-once``,
  ``sleep-N``, ``pod-extras``). ``REAL_TRAINER`` is the real ``qlora-train`` command.
- helpers: ``manifest``, ``apply``, ``get_qj``, ``condition``, ``is_true``,
  ``wait_condition``, ``wait_terminal``, ``events``, ``wait_event``, ``jobs``, ``gpu_jobs``, ``pods``.

All waits are bounded (``helpers.wait_for``); nothing sleeps to synchronise.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from helpers import wait_for

REPO = Path(__file__).resolve().parents[2]
GROUP_PATH = "/apis/qlora.dev/v1alpha1"

# What every stand-in trainer program shares: its config (argv[1]: the pod's /etc/qlora/config.json,
# a path of the pod), the behaviour named by the dataset file, finish()
# (termination message + exit code) and report() (a status PATCH with the trainer's ServiceAccount
# token: in the pod's in-cluster directory, or where QLORA_SA_TOKEN_DIR says).
STAND_IN_LIB = r'''
import json, os, signal, ssl, sys, time, urllib.request
cfg = json.load(open(sys.argv[1]))
behaviour = cfg["dataset"]["uri"].rstrip("/").rsplit("/", 1)[-1].split(".")[0]
out = cfg["output"]["uri"].rstrip("/")
run_prefix = out + "/run-" + os.environ.get("QLORA_TRAINING_RUN", "1")
done = {"adapterUri": run_prefix + "/adapter/", "manifestUri": run_prefix + "/adapter/manifest.json"}

def finish(code, reason, message, artifacts=None, resumed=None):
    path = os.environ.get("QLORA_TERMINATION_MESSAGE_PATH")
    if path:
        with open(path, "w") as f:
            json.dump({"exitCode": code, "reason": reason, "message": message, "artifacts": artifacts or {},
                       "resumedFromStep": resumed, "metrics": {}}, f)
    sys.exit(code)

def report(step, total, loss=None):
    tokdir = os.environ.get("QLORA_SA_TOKEN_DIR") or "/var/run/secrets/kubernetes.io/serviceaccount"
    ctx = ssl.create_default_context(cafile=os.path.join(tokdir, "ca.crt"))
    url = "https://%s:%s/apis/qlora.dev/v1alpha1/namespaces/%s/qlorajobs/%s/status" % (
        os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"],
        os.environ["QLORA_JOB_NAMESPACE"], os.environ["QLORA_JOB_NAME"])
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    progress = {"step": step, "totalSteps": total, "progress": "%d/%d" % (step, total), "stage": "Training",
                "updatedAt": now}
    if loss is not None:
        progress["loss"] = loss
    req = urllib.request.Request(url, data=json.dumps({"status": {"progress": progress}}).encode(), method="PATCH",
                                 headers={"Content-Type": "application/merge-patch+json",
                                          "Authorization": "Bearer " + open(os.path.join(tokdir, "token")).read().strip()})
    urllib.request.urlopen(req, context=ctx, timeout=10).read()
'''

# The behaviours of the stand-in trainer of one node (after STAND_IN_LIB). ``kill9`` kills
# itself (exit 137 that is not an OOM kill); ``oom`` allocates past
# the container's memory limit (a real kubelet's OOMKilled, from the kernel's OOM killer:
# a process cannot SIGKILL itself as a container's pid 1).
FAKE_BEHAVIOURS = r'''
REASONS = {2: "InvalidConfig", 3: "InvalidData", 4: "StorageError", 5: "CudaOutOfMemory", 6: "NonFiniteLoss"}

if behaviour.startswith("sleep-"):
    total = int(behaviour.split("-")[1])
    for step in range(total):
        report(step, total, 2.0 / (step + 1))
        time.sleep(1)
    report(total, total, 2.0 / (total + 1))
    finish(0, "Succeeded", "slept", done)
if behaviour.startswith("exit-"):
    code = int(behaviour.split("-")[1])
    finish(code, REASONS.get(code, "Error"), "fake trainer failure %d: %s line 7: not a JSON object" % (code, cfg["dataset"]["uri"]))
if behaviour == "kill9":
    os.kill(os.getpid(), signal.SIGKILL)
if behaviour == "oom":
    hog = []
    while True:
        hog.append(b"\1" * (16 << 20))  # written, so resident: 16 MiB a step until the limit
if behaviour == "storage-once":
    import boto3
    s3 = boto3.client("s3", endpoint_url=cfg["storage"]["endpoint"], region_name=cfg["storage"]["region"])
    bucket, _, prefix = out[len("s3://"):].partition("/")
    key = prefix + "/first-attempt-marker"
    try:
        s3.head_object(Bucket=bucket, Key=key)
    except Exception:
        s3.put_object(Bucket=bucket, Key=key, Body=b"1")
        finish(4, "StorageError", "S3 PUT %s/%s failed: simulated outage" % (bucket, prefix))
    finish(0, "Succeeded", "retried", done, resumed=10)
if behaviour == "pod-extras":  # spec.pod.env and a spec.pod.volumes mount reached the process
    want = "hello-" + os.environ["QLORA_JOB_NAME"]
    if os.environ.get("EXTRA_GREETING") != want:
        finish(3, "InvalidData", "EXTRA_GREETING is %r, not %r" % (os.environ.get("EXTRA_GREETING"), want))
    with open(os.environ["EXTRA_DATA_FILE"]) as f:
        finish(0, "Succeeded", "extras: " + f.read().strip(), done)
finish(0, "Succeeded", "done", done)
'''
# The stand-in trainer of one node.
FAKE_TRAINER = STAND_IN_LIB + FAKE_BEHAVIOURS
FAKE_COMMAND = json.dumps(["python", "-c", FAKE_TRAINER, "/etc/qlora/config.json"])
# The real trainer, as the chart's default command runs it.
REAL_TRAINER = json.dumps(["qlora-train", "--config", "/etc/qlora/config.json"])


# ----------------------------------------------------------------------------- the operator process
class Operator:
    """One ``qlora-operator run`` process for a namespace; logs to a file."""

    def __init__(self, cluster, namespace: str, log_path: Path, env: dict | None = None, **settings):
        self.cluster = cluster
        self.namespace = namespace
        self.log_path = log_path
        self.extra_env = env or {}
        self.settings = {"trainer_command": FAKE_COMMAND, "resync_seconds": 2, "metrics_port": 0, **settings}
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, ready_text: str = "qlora-operator started") -> Operator:
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.cluster.kubeconfig)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer"), env.get("PYTHONPATH", "")])
        for key, value in self.settings.items():
            env[f"QLORA_OPERATOR_{key.upper()}"] = str(value)
        for key, value in self.extra_env.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        self.starts += 1
        log = open(self.log_path, "a")
        log.write(f"--- start {self.starts}\n")
        log.flush()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qlora_operator", "run", "--namespace", self.namespace, "--standalone"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO,
        )
        log.close()
        marker = f"--- start {self.starts}"
        wait_for(lambda: self.log().split(marker)[-1].count(ready_text) or self._dead(), 60,
                 f"the operator to log {ready_text!r}")
        assert self.proc.poll() is None, f"operator exited: {self.log()[-3000:]}"
        return self

    def _dead(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"operator exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
        return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL, no clean-up (a crash)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def assert_healthy(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, f"operator died:\n{self.log()[-4000:]}"
        assert "Traceback" not in self.log(), self.log()[-6000:]


# ----------------------------------------------------------------------------- helpers
def manifest(cluster, namespace: str, name: str, behaviour: str = "ok", **spec) -> dict:
    body = {
        "apiVersion": "qlora.dev/v1alpha1",
        "kind": "QLoRAJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"uri": "s3://models/fake/"},
            "dataset": {"uri": f"s3://data/fake/{behaviour}.jsonl"},
            "output": {"uri": f"s3://artifacts/{namespace}/{name}/"},
            "storage": {"endpoint": cluster.s3_endpoint, "credentialsSecretRef": {"name": "s3-creds"}},
            "resources": {"gpus": 1, "cpu": "1", "memory": "1Gi"},
            "image": "ghcr.io/qlora-operator/qlora-trainer:test",
        },
    }
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(body["spec"].get(key), dict):
            body["spec"][key] = {**body["spec"][key], **value}
        else:
            body["spec"][key] = value
    return body


def apply(cluster, *objs: dict) -> None:
    doc = {"apiVersion": "v1", "kind": "List", "items": list(objs)}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(doc))


def get_qj(api, namespace: str, name: str) -> dict:
    return api.get(f"{GROUP_PATH}/namespaces/{namespace}/qlorajobs/{name}")


def condition(body: dict, typ: str) -> dict:
    for cond in (body.get("status") or {}).get("conditions") or []:
        if cond["type"] == typ:
            return cond
    return {}


def is_true(body: dict, typ: str) -> bool:
    return condition(body, typ).get("status") == "True"


def wait_condition(api, namespace: str, name: str, typ: str, timeout: float, reason: str | None = None) -> dict:
    def check():
        body = get_qj(api, namespace, name)
        cond = condition(body, typ)
        if cond.get("status") == "True" and (reason is None or cond.get("reason") == reason):
            return body
        return None

    return wait_for(check, timeout, f"{namespace}/{name} condition {typ}={reason or 'True'}", interval=0.5)


def wait_terminal(api, namespace: str, name: str, timeout: float) -> dict:
    return wait_for(
        lambda: (lambda b: b if is_true(b, "Complete") or is_true(b, "Failed") else None)(get_qj(api, namespace, name)),
        timeout, f"{namespace}/{name} to finish", interval=0.5,
    )


def events(api, namespace: str, name: str) -> list[tuple[str, str, str]]:
    items = api.get(f"/api/v1/namespaces/{namespace}/events",
                    fieldSelector=f"involvedObject.name={name},involvedObject.kind=QLoRAJob")["items"]
    items.sort(key=lambda e: (e.get("lastTimestamp") or "", e["metadata"]["name"]))
    return [(e["type"], e["reason"], e.get("message") or "") for e in items]


def wait_event(api, namespace: str, name: str, type_: str, reason: str, timeout: float = 20) -> str:
    def check():
        for t, r, m in events(api, namespace, name):
            if t == type_ and r == reason:
                return m or " "
        return None

    return wait_for(check, timeout, f"{type_} event {reason} on {namespace}/{name}", interval=0.5)


def jobs(api, namespace: str, qj: str | None = None) -> list[dict]:
    selector = f"qlora.dev/job={qj}" if qj else "qlora.dev/job"
    return api.get(f"/apis/batch/v1/namespaces/{namespace}/jobs", labelSelector=selector)["items"]


def gpu_jobs(api, namespace: str, qj: str) -> list[dict]:
    """The run Jobs of ``qj`` (label ``qlora.dev/run``): not its fit-check Job."""
    return [j for j in jobs(api, namespace, qj) if "qlora.dev/run" in j["metadata"].get("labels", {})]


def pods(api, namespace: str, qj: str) -> list[dict]:
    return api.get(f"/api/v1/namespaces/{namespace}/pods", labelSelector=f"qlora.dev/job={qj}")["items"]
