"""Pure builders: a QLoRAJob (its body and parsed spec) + settings -> child manifests.

Nothing here talks to the API or reads the clock. Every child gets deterministic
name, the ``qlora.dev/job`` label, and a controller owner reference to the QLoRAJob
(what ``kopf.adopt`` would set), so deleting the QLoRAJob garbage-collects them and
creating twice is a 409, never a duplicate.

Children, in creation order (the Job last: its existence marks the run as started):

- ConfigMap ``<job>-config`` (run 1) / ``<job>-config-r<N>``: ``config.json``, the
  trainer config (``spec.trainer_config()``).
- ServiceAccount, Role, RoleBinding ``<job>-trainer``: the trainer may ``get`` its
  own QLoRAJob and ``get``/``patch`` its ``status`` (``resourceNames: [<job>]``).
- batch/v1 Job ``<job>-train`` (run 1) / ``<job>-train-r<N>``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from qlora_operator.api import API_VERSION, GROUP, KIND, PLURAL, QLoRAJobSpec
from qlora_operator.settings import OperatorSettings

LABEL_JOB = "qlora.dev/job"
LABEL_RUN = "qlora.dev/run"
ANN_JOB = "qlora.dev/job-name"
ANN_SPEC = "qlora.dev/spec"
ANN_SPEC_HASH = "qlora.dev/spec-hash"
ANN_GENERATION = "qlora.dev/generation"
ANN_USER_SUSPENDED = "qlora.dev/user-suspended"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"

CONTAINER = "trainer"
CONFIG_DIR = "/etc/qlora"
CONFIG_FILE = "config.json"
CACHE_DIR = "/cache"
TMP_DIR = "/tmp"
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
RUN_AS_USER = 1000

#: Exit codes of qlora-train that fail the Job at once (retrying cannot help).
FAIL_JOB_EXIT_CODES = (2, 3, 6)

#: Longest Kubernetes name we build: a Job name must be a valid label value (63).
MAX_NAME = 63


def _digest(text: str, size: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:size]


def child_name(job: str, suffix: str, limit: int = MAX_NAME) -> str:
    """``<job>-<suffix>``, shortened deterministically (hash of the full name) when too long."""
    name = f"{job}-{suffix}"
    if len(name) <= limit:
        return name
    digest = _digest(job)
    keep = limit - len(suffix) - len(digest) - 2
    return f"{job[:keep].rstrip('-.')}-{digest}-{suffix}"


def label_value(job: str) -> str:
    """The ``qlora.dev/job`` label value: the name, or a hashed prefix when over 63 characters."""
    if len(job) <= 63:
        return job
    return f"{job[:54].rstrip('-.')}-{_digest(job)}"


def job_name(job: str, run: int = 1) -> str:
    """Name of the batch/v1 Job of run ``run`` (1-based)."""
    return child_name(job, "train" if run <= 1 else f"train-r{run}")


def config_map_name(job: str, run: int = 1) -> str:
    """Name of the ConfigMap holding the trainer config of run ``run``."""
    return child_name(job, "config" if run <= 1 else f"config-r{run}")


def trainer_name(job: str) -> str:
    """Name shared by the trainer's ServiceAccount, Role and RoleBinding."""
    return child_name(job, "trainer")


def labels(job: str, run: int | None = None) -> dict[str, str]:
    """Labels of every child (``run`` adds ``qlora.dev/run``)."""
    out = {
        "app.kubernetes.io/name": "qlora-trainer",
        "app.kubernetes.io/instance": label_value(job),
        "app.kubernetes.io/component": "trainer",
        "app.kubernetes.io/part-of": "qlora-operator",
        "app.kubernetes.io/managed-by": "qlora-operator",
        LABEL_JOB: label_value(job),
    }
    if run is not None:
        out[LABEL_RUN] = str(run)
    return out


def owner_reference(body: Mapping[str, Any]) -> dict[str, Any]:
    """Controller owner reference to the QLoRAJob ``body``."""
    meta = body["metadata"]
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(body: Mapping[str, Any], name: str, run: int | None = None, **annotations: str) -> dict[str, Any]:
    meta = body["metadata"]
    out: dict[str, Any] = {
        "name": name,
        "namespace": meta["namespace"],
        "labels": labels(meta["name"], run),
        "annotations": {ANN_JOB: meta["name"], **annotations},
        "ownerReferences": [owner_reference(body)],
    }
    return out


def canonical_spec(spec: QLoRAJobSpec) -> dict[str, Any]:
    """The spec with defaults filled in, as stored on a run's children (``qlora.dev/spec``)."""
    return spec.model_dump(by_alias=True, mode="json", exclude_none=True)


def spec_json(spec: QLoRAJobSpec) -> str:
    """Compact, key-sorted JSON of :func:`canonical_spec` (stable for hashing)."""
    return json.dumps(canonical_spec(spec), sort_keys=True, separators=(",", ":"))


def trainer_config_json(spec: QLoRAJobSpec) -> str:
    """``config.json``: the trainer's part of the spec (no credentials, no runtime fields)."""
    data = spec.trainer_config().model_dump(by_alias=True, mode="json", exclude_none=True)
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _run_annotations(body: Mapping[str, Any], spec: QLoRAJobSpec) -> dict[str, str]:
    text = spec_json(spec)
    return {
        ANN_SPEC: text,
        ANN_SPEC_HASH: _digest(text, 16),
        ANN_GENERATION: str(body["metadata"].get("generation", 1)),
    }


def render_config_map(body: Mapping[str, Any], spec: QLoRAJobSpec, run: int = 1) -> dict[str, Any]:
    """ConfigMap with ``config.json`` for run ``run``; it also records the run's spec."""
    name = config_map_name(body["metadata"]["name"], run)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(body, name, run, **_run_annotations(body, spec)),
        "data": {CONFIG_FILE: trainer_config_json(spec)},
    }


def render_service_account(body: Mapping[str, Any]) -> dict[str, Any]:
    """The trainer's ServiceAccount (its token is what may patch the job's status)."""
    name = trainer_name(body["metadata"]["name"])
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(body, name),
        "automountServiceAccountToken": True,
    }


def role_rules(job: str) -> list[dict[str, Any]]:
    """What a trainer may do: read its own QLoRAJob, read and patch its own status. Nothing else."""
    return [
        {"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "resourceNames": [job], "verbs": ["get", "patch"]},
        {"apiGroups": [GROUP], "resources": [PLURAL], "resourceNames": [job], "verbs": ["get"]},
    ]


def render_role(body: Mapping[str, Any]) -> dict[str, Any]:
    """Role limited to this job's object (``resourceNames``)."""
    meta = body["metadata"]
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _metadata(body, trainer_name(meta["name"])),
        "rules": role_rules(meta["name"]),
    }


def render_role_binding(body: Mapping[str, Any]) -> dict[str, Any]:
    """Binds the trainer Role to the trainer ServiceAccount."""
    meta = body["metadata"]
    name = trainer_name(meta["name"])
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(body, name),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": meta["namespace"]}],
    }


def gpu_resource(spec: QLoRAJobSpec, settings: OperatorSettings) -> str:
    """The extended resource a GPU is requested as."""
    return spec.resources.gpu_resource_name or settings.gpu_resource_name


def trainer_image(spec: QLoRAJobSpec, settings: OperatorSettings) -> str:
    """The image trainer pods run."""
    return spec.image or settings.trainer_image


def _env(body: Mapping[str, Any], spec: QLoRAJobSpec, run: int) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "QLORA_JOB_NAME", "value": body["metadata"]["name"]},
        {"name": "QLORA_JOB_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "QLORA_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "QLORA_RUN", "value": str(run)},
        {"name": "QLORA_TERMINATION_MESSAGE_PATH", "value": TERMINATION_MESSAGE_PATH},
        {"name": "QLORA_CACHE_DIR", "value": CACHE_DIR},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        {"name": "HOME", "value": TMP_DIR},
        {"name": "TMPDIR", "value": TMP_DIR},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    secret = spec.storage.credentials_secret_ref
    if secret is not None:
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": secret.name, "key": key}}})
    return env


def render_pod_spec(body: Mapping[str, Any], spec: QLoRAJobSpec, settings: OperatorSettings, run: int = 1) -> dict[str, Any]:
    """The trainer pod spec; passes the ``restricted`` Pod Security level."""
    job = body["metadata"]["name"]
    gpu = gpu_resource(spec, settings)
    quantities = {"cpu": spec.resources.cpu, "memory": spec.resources.memory, gpu: str(spec.resources.gpus)}
    container = {
        "name": CONTAINER,
        "image": trainer_image(spec, settings),
        "imagePullPolicy": settings.image_pull_policy,
        "command": list(settings.trainer_command),
        "env": _env(body, spec, run),
        "resources": {"requests": dict(quantities), "limits": dict(quantities)},
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "cache", "mountPath": CACHE_DIR},
            {"name": "tmp", "mountPath": TMP_DIR},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": trainer_name(job),
        "automountServiceAccountToken": True,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": settings.termination_grace_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": config_map_name(job, run), "items": [{"key": CONFIG_FILE, "path": CONFIG_FILE}]}},
            {"name": "cache", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        ],
    }
    sched = spec.scheduling
    if sched.node_selector:
        pod["nodeSelector"] = dict(sched.node_selector)
    if sched.tolerations:
        pod["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in sched.tolerations]
    if sched.priority_class_name:
        pod["priorityClassName"] = sched.priority_class_name
    return pod


def pod_failure_policy() -> dict[str, Any]:
    """Fail at once on exit codes 2, 3, 6; ignore disruptions; count everything else."""
    return {
        "rules": [
            {
                "action": "FailJob",
                "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": list(FAIL_JOB_EXIT_CODES)},
            },
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]
    }


def render_job(body: Mapping[str, Any], spec: QLoRAJobSpec, settings: OperatorSettings, run: int = 1) -> dict[str, Any]:
    """The batch/v1 Job of run ``run``."""
    job = body["metadata"]["name"]
    policy = spec.run_policy
    queued = bool(spec.scheduling.queue_name)
    meta = _metadata(body, job_name(job, run), run, **_run_annotations(body, spec))
    if queued:
        meta["labels"][KUEUE_QUEUE_LABEL] = spec.scheduling.queue_name
    if policy.suspend:
        meta["annotations"][ANN_USER_SUSPENDED] = "true"
    job_spec: dict[str, Any] = {
        "completions": 1,
        "parallelism": 1,
        "backoffLimit": policy.backoff_limit,
        # Kueue admits a queued Job by un-suspending it: it must be created suspended.
        "suspend": bool(policy.suspend or queued),
        "podFailurePolicy": pod_failure_policy(),
        # A replacement pod starts only when the failed one is gone: one GPU holder at a time.
        "podReplacementPolicy": "Failed",
        "template": {
            "metadata": {
                "labels": labels(job, run),
                "annotations": {ANN_JOB: job, "kubectl.kubernetes.io/default-container": CONTAINER},
            },
            "spec": render_pod_spec(body, spec, settings, run),
        },
    }
    if policy.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = policy.active_deadline_seconds
    if policy.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = policy.ttl_seconds_after_finished
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}


def render_children(
    body: Mapping[str, Any], spec: QLoRAJobSpec, settings: OperatorSettings, run: int = 1
) -> list[dict[str, Any]]:
    """Every child of run ``run`` in creation order (the Job last)."""
    return [
        render_config_map(body, spec, run),
        render_service_account(body),
        render_role(body),
        render_role_binding(body),
        render_job(body, spec, settings, run),
    ]


def run_of(obj: Mapping[str, Any]) -> int | None:
    """The run number of a child (its ``qlora.dev/run`` label), or None."""
    value = (obj.get("metadata", {}).get("labels") or {}).get(LABEL_RUN)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def recorded_spec(obj: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The spec a run was started with (``qlora.dev/spec`` annotation), or None."""
    if not obj:
        return None
    text = (obj.get("metadata", {}).get("annotations") or {}).get(ANN_SPEC)
    if not text:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None
