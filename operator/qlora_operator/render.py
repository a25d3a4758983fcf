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
- Only with ``resources.nodes > 1``: a headless Service named like the run's Job
  (``clusterIP: None``, ``publishNotReadyAddresses``, selecting the run's pods). The
  pods set ``subdomain`` to it, so node 0 is reachable as ``<job-name>-0.<service>``.
- batch/v1 Job ``<job>-train`` (run 1) / ``<job>-train-r<N>``.

One node (``resources.nodes: 1``, the default): a Job of one pod; a failed pod is
replaced within the Job (``backoffLimit`` = ``runPolicy.backoffLimit``), and its
``podFailurePolicy`` fails the Job at once on the permanent exit codes
(:data:`PERMANENT_EXIT_CODES`) and ignores disruptions.

Several nodes: an Indexed Job with ``completions = parallelism = nodes``. The pods of a
``torchrun`` group cannot be replaced one by one (the survivors' collectives and
rendezvous are broken), so the Job fails as soon as any pod fails
(``backoffLimit: 0`` and a ``podFailurePolicy`` of ``FailJob`` rules, which also say
why: a disruption, a permanent exit code, anything else). The operator then starts
the next run of the group, a new Job (:mod:`qlora_operator.status` decides, counting
against ``runPolicy.backoffLimit`` except for disruptions); the Job's
``qlora.dev/group-*`` annotations (:class:`GroupAttempt`) carry the count from run to
run.

Trainer contract for more than one GPU in total (``nodes x gpus > 1``): every pod
gets ``QLORA_NNODES``, ``QLORA_NPROC_PER_NODE`` (= ``gpus``), ``QLORA_NODE_RANK`` (the
pod's completion index), ``QLORA_MASTER_ADDR`` and ``QLORA_MASTER_PORT``; the command
stays ``qlora-train --config ...`` (the trainer starts ``torchrun`` itself).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qlora_operator.api import (
    API_VERSION,
    GROUP,
    KIND,
    MSG_MOUNT_UNKNOWN_VOLUME,
    MLFLOW_SECRET_KEYS,
    MSG_SA_ANNOTATION_RESERVED,
    OPERATOR_ANNOTATION_PREFIX,
    PLURAL,
    QLoRAJobSpec,
)
from qlora_operator.settings import OperatorSettings
from qlora_trainer import contract

if TYPE_CHECKING:
    from qlora_operator.api import PodSettings

LABEL_JOB = "qlora.dev/job"
LABEL_RUN = "qlora.dev/run"
ANN_JOB = "qlora.dev/job-name"
ANN_SPEC = "qlora.dev/spec"
ANN_SPEC_HASH = "qlora.dev/spec-hash"
ANN_GENERATION = "qlora.dev/generation"
ANN_USER_SUSPENDED = "qlora.dev/user-suspended"
#: On the trainer ServiceAccount: JSON list of the annotation keys taken from
#: ``spec.pod.serviceAccountAnnotations`` and the chart default, so a key dropped from
#: them is removed again (and annotations others put there are left alone).
ANN_MANAGED_ANNOTATIONS = "qlora.dev/managed-annotations"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"

CONTAINER = "trainer"
CONFIG_DIR = "/etc/qlora"
CONFIG_FILE = "config.json"
CACHE_DIR = "/cache"
TMP_DIR = "/tmp"
TERMINATION_MESSAGE_PATH = contract.TERMINATION_MESSAGE_PATH
SHM_DIR = "/dev/shm"
RUN_AS_USER = 1000
#: Environment names under this prefix are the trainer contract's: ``spec.pod.env`` may
#: not set any (nor the other names the operator sets: :func:`reserved_env_names`).
RESERVED_ENV_PREFIX = contract.ENV_PREFIX

#: Exit codes of qlora-train that mean retrying cannot help (the contract's ``Retry.permanent``:
#: invalid config or data, non-finite loss, does not fit, merge check failed).
PERMANENT_EXIT_CODES = contract.PERMANENT_EXIT_CODES
#: Exit codes that fail a one-node Job at once.
FAIL_JOB_EXIT_CODES = PERMANENT_EXIT_CODES

#: Longest Kubernetes name we build: a Job name must be a valid label value (63).
MAX_NAME = 63
#: Longest Job name: an Indexed Job's pods are named (hostname) ``<job-name>-<index>``,
#: which must stay a DNS label (63) for indexes up to 63.
MAX_JOB_NAME = MAX_NAME - 3
#: ``torchrun``'s rendezvous port on node 0 (``QLORA_MASTER_PORT``).
MASTER_PORT = contract.DEFAULT_MASTER_PORT
#: Annotation (and label) the Job controller puts on an Indexed Job's pods.
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
#: Group attempt of a run's Job (0 for the first run after a spec change).
ANN_GROUP_ATTEMPT = "qlora.dev/group-attempt"
#: Failed group attempts counted against ``runPolicy.backoffLimit`` before this run.
ANN_GROUP_FAILURES = "qlora.dev/group-failures"
#: The run whose failed group this run restarts (its attempts and progress carry on).
ANN_RESTART_OF = "qlora.dev/restart-of"
#: The run a chain of group restarts began with: the training run whose checkpoints and
#: artifacts (``<output>/run-<N>/``) every Job of the chain continues.
ANN_TRAINING_RUN = "qlora.dev/training-run"


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
    """Name of the batch/v1 Job of run ``run`` (1-based); at most :data:`MAX_JOB_NAME` characters."""
    return child_name(job, "train" if run <= 1 else f"train-r{run}", MAX_JOB_NAME)


def service_name(job: str, run: int = 1) -> str:
    """Name of the headless Service of run ``run`` (nodes > 1): the run's Job name.

    A DNS-1035 label when the QLoRAJob's name is one (the CRD requires that for nodes > 1).
    """
    return job_name(job, run)


def master_addr(job: str, run: int = 1) -> str:
    """DNS name of node 0 of run ``run``: ``<job-name>-0.<service>`` (the pod's hostname and subdomain)."""
    return f"{job_name(job, run)}-0.{service_name(job, run)}"


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


@dataclass(frozen=True)
class GroupAttempt:
    """Where a run of several nodes stands in its chain of group restarts (Job annotations).

    ``attempt``: 0-based group attempt (the ``index`` of its pods' attempts).
    ``failures``: failed group attempts counted against ``runPolicy.backoffLimit`` before it.
    ``restart_of``: the run it restarts (None for a run started by a spec change).
    ``training_run``: the first run of the chain (None: this run itself), whose checkpoint
    and artifact prefix the restart continues.
    """

    attempt: int = 0
    failures: int = 0
    restart_of: int | None = None
    training_run: int | None = None

    def annotations(self) -> dict[str, str]:
        """The Job annotations that record it."""
        out = {ANN_GROUP_ATTEMPT: str(self.attempt), ANN_GROUP_FAILURES: str(self.failures)}
        if self.restart_of is not None:
            out[ANN_RESTART_OF] = str(self.restart_of)
        if self.training_run is not None:
            out[ANN_TRAINING_RUN] = str(self.training_run)
        return out


def group_attempt_of(job: Mapping[str, Any] | None) -> GroupAttempt:
    """The :class:`GroupAttempt` a Job records (defaults for a Job without the annotations)."""
    ann = ((job or {}).get("metadata") or {}).get("annotations") or {}

    def number(key: str) -> int | None:
        try:
            return max(0, int(ann[key]))
        except (KeyError, TypeError, ValueError):
            return None

    return GroupAttempt(
        attempt=number(ANN_GROUP_ATTEMPT) or 0,
        failures=number(ANN_GROUP_FAILURES) or 0,
        restart_of=number(ANN_RESTART_OF),
        training_run=number(ANN_TRAINING_RUN),
    )


def job_nodes(job: Mapping[str, Any] | None) -> int:
    """Trainer pods of a rendered Job: ``completions`` of an Indexed Job, else 1."""
    spec = (job or {}).get("spec") or {}
    if spec.get("completionMode") == "Indexed":
        return int(spec.get("completions") or 1)
    return 1


def pod_node_index(pod: Mapping[str, Any]) -> int | None:
    """The completion index of an Indexed Job's pod (annotation, else label), or None."""
    meta = pod.get("metadata") or {}
    for source in (meta.get("annotations") or {}, meta.get("labels") or {}):
        value = source.get(COMPLETION_INDEX)
        if value is not None:
            try:
                return int(value)
            except ValueError:
                return None
    return None


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


def service_account_annotations(spec: QLoRAJobSpec | None, settings: OperatorSettings | None) -> dict[str, str]:
    """User annotations of the trainer ServiceAccount: the chart default
    (``settings.service_account_annotations``) under ``spec.pod.serviceAccountAnnotations``."""
    out = dict(settings.service_account_annotations) if settings is not None else {}
    if spec is not None:
        out.update(spec.pod.service_account_annotations)
    return {k: v for k, v in out.items() if not k.startswith(OPERATOR_ANNOTATION_PREFIX)}


def render_service_account(
    body: Mapping[str, Any], spec: QLoRAJobSpec | None = None, settings: OperatorSettings | None = None
) -> dict[str, Any]:
    """The trainer's ServiceAccount (its token is what may patch the job's status).

    Carries :func:`service_account_annotations` (IRSA's ``eks.amazonaws.com/role-arn``,
    GKE's ``iam.gke.io/gcp-service-account``, ...) and, when there are any,
    :data:`ANN_MANAGED_ANNOTATIONS` listing their keys; the operator's own annotations win.
    """
    name = trainer_name(body["metadata"]["name"])
    meta = _metadata(body, name)
    extra = service_account_annotations(spec, settings)
    if extra:
        meta["annotations"] = {**extra, **meta["annotations"], ANN_MANAGED_ANNOTATIONS: json.dumps(sorted(extra))}
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": meta,
        "automountServiceAccountToken": True,
    }


def service_account_patch(have: Mapping[str, Any], want: Mapping[str, Any]) -> dict[str, Any] | None:
    """Merge patch that brings an existing trainer ServiceAccount's annotations to ``want``'s.

    Sets every annotation of ``want`` that differs, removes the keys ``have`` lists in
    :data:`ANN_MANAGED_ANNOTATIONS` that ``want`` no longer has, and leaves annotations
    others wrote alone. None when nothing differs.
    """
    have_ann = (have.get("metadata") or {}).get("annotations") or {}
    want_ann = (want.get("metadata") or {}).get("annotations") or {}
    try:
        managed = json.loads(have_ann.get(ANN_MANAGED_ANNOTATIONS) or "[]")
    except ValueError:
        managed = []
    changes: dict[str, str | None] = {k: v for k, v in want_ann.items() if have_ann.get(k) != v}
    for key in [*(managed if isinstance(managed, list) else []), ANN_MANAGED_ANNOTATIONS]:
        if isinstance(key, str) and key in have_ann and key not in want_ann:
            changes[key] = None
    return {"metadata": {"annotations": changes}} if changes else None


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


def distributed_env(job: str, spec: QLoRAJobSpec, run: int) -> list[dict[str, Any]]:
    """``torchrun`` rendezvous for ``nodes x gpus > 1`` (empty for one GPU): the trainer contract.

    One node: rank 0 and the pod's own loopback. Several: the rank is the pod's completion
    index (downward API), node 0 is ``<job-name>-0.<service>``.
    """
    nodes, gpus = spec.resources.nodes, spec.resources.gpus
    if nodes * gpus <= 1:
        return []
    if nodes > 1:
        rank: dict[str, Any] = {
            "name": contract.ENV_NODE_RANK,
            "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX}']"}},
        }
        addr = master_addr(job, run)
    else:
        rank, addr = {"name": contract.ENV_NODE_RANK, "value": "0"}, "127.0.0.1"
    return [
        {"name": contract.ENV_NNODES, "value": str(nodes)},
        {"name": contract.ENV_NPROC_PER_NODE, "value": str(gpus)},
        rank,
        {"name": contract.ENV_MASTER_ADDR, "value": addr},
        {"name": contract.ENV_MASTER_PORT, "value": str(MASTER_PORT)},
    ]


def _env(body: Mapping[str, Any], spec: QLoRAJobSpec, run: int, training_run: int | None = None) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": contract.ENV_JOB_NAME, "value": body["metadata"]["name"]},
        {"name": contract.ENV_JOB_NAMESPACE, "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": contract.ENV_POD_NAME, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": contract.ENV_RUN, "value": str(run)},
        {"name": contract.ENV_TRAINING_RUN, "value": str(training_run or run)},
        {"name": contract.ENV_GENERATION, "value": str(body["metadata"].get("generation", 1))},
        {"name": contract.ENV_JOB_UID, "value": str(body["metadata"].get("uid", ""))},
        {"name": contract.ENV_TERMINATION_MESSAGE_PATH, "value": TERMINATION_MESSAGE_PATH},
        {"name": contract.ENV_CACHE_DIR, "value": CACHE_DIR},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        {"name": "HOME", "value": TMP_DIR},
        {"name": "TMPDIR", "value": TMP_DIR},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        *distributed_env(body["metadata"]["name"], spec, run),
    ]
    return env + credentials_env(spec) + tracking_env(spec)


def credentials_env(spec: QLoRAJobSpec) -> list[dict[str, Any]]:
    """S3 credentials from ``storage.credentialsSecretRef`` (none without it: the pod's identity).

    ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY`` must be in the Secret (the kubelet
    keeps the pod waiting in ``CreateContainerConfigError`` otherwise: ``SecretNotFound``);
    ``AWS_SESSION_TOKEN`` (temporary credentials, e.g. from STS) is ``optional``, so a
    Secret without it still works.
    """
    secret = spec.storage.credentials_secret_ref
    if secret is None:
        return []
    env: list[dict[str, Any]] = [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": secret.name, "key": key}}}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    ]
    token = {"name": secret.name, "key": "AWS_SESSION_TOKEN", "optional": True}
    env.append({"name": "AWS_SESSION_TOKEN", "valueFrom": {"secretKeyRef": token}})
    return env


def tracking_env(spec: QLoRAJobSpec) -> list[dict[str, Any]]:
    """MLflow credentials from ``tracking.mlflow.credentialsSecretRef`` (none without it).

    Each of :data:`api.MLFLOW_SECRET_KEYS` (``MLFLOW_TRACKING_USERNAME``/``PASSWORD`` for basic
    auth, ``MLFLOW_TRACKING_TOKEN`` for a bearer token) is an ``optional`` ``secretKeyRef``: the
    Secret holds the keys its server needs. The operator never reads the Secret; the tracking
    URI, experiment and tags travel in ``config.json`` and the trainer sets ``MLFLOW_*`` itself.
    """
    mlflow = spec.tracking.mlflow
    secret = mlflow.credentials_secret_ref if mlflow else None
    if secret is None:
        return []
    return [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": secret.name, "key": key, "optional": True}}}
        for key in MLFLOW_SECRET_KEYS
    ]


def operator_volumes(job: str, run: int = 1) -> list[dict[str, Any]]:
    """The trainer pod's own volumes: the run's config, and emptyDirs for caches, /tmp and /dev/shm."""
    return [
        {"name": "config", "configMap": {"name": config_map_name(job, run), "items": [{"key": CONFIG_FILE, "path": CONFIG_FILE}]}},
        {"name": "cache", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]


def operator_mounts() -> list[dict[str, Any]]:
    """Where the trainer container mounts :func:`operator_volumes`."""
    return [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "cache", "mountPath": CACHE_DIR},
        {"name": "tmp", "mountPath": TMP_DIR},
        {"name": "dshm", "mountPath": SHM_DIR},
    ]


@functools.cache
def reserved_env_names() -> tuple[str, ...]:
    """Environment names the operator sets on a trainer (sorted), taken from what :func:`_env`
    renders for a job that sets them all (several nodes and GPUs, a credentials Secret).

    ``spec.pod.env`` may set none of them, nor any name under :data:`RESERVED_ENV_PREFIX`
    (the CRD's CEL rule and :func:`pod_settings_problems` both use this list).
    """
    spec = QLoRAJobSpec.model_validate({
        "model": {"uri": "s3://models/m/"}, "dataset": {"uri": "s3://data/d.jsonl"}, "output": {"uri": "s3://out/o/"},
        "storage": {"credentialsSecretRef": {"name": "s"}}, "resources": {"nodes": 2, "gpus": 2},
        "tracking": {"mlflow": {"trackingUri": "http://m:5000", "credentialsSecretRef": {"name": "t"}}},
    })
    body = {"metadata": {"name": "j", "namespace": "n", "uid": "u", "generation": 1}}
    return tuple(sorted({e["name"] for e in _env(body, spec, 2, 1)}))


def reserved_volume_names() -> tuple[str, ...]:
    """Names of :func:`operator_volumes` (sorted): ``spec.pod.volumes`` may use none."""
    return tuple(sorted(v["name"] for v in operator_volumes("j")))


def reserved_mount_paths() -> tuple[str, ...]:
    """Paths of :func:`operator_mounts` and the termination log (sorted): no ``spec.pod.volumeMounts``
    path may be one, lie under one, or contain one."""
    return tuple(sorted({m["mountPath"] for m in operator_mounts()} | {TERMINATION_MESSAGE_PATH}))


def mount_path_collides(path: str, reserved: str) -> bool:
    """True when a mount at ``path`` would be, lie under or hide the operator's ``reserved`` path
    (the CRD's CEL rule tests the same: see ``qlora_operator.crd``)."""
    own = path if path.endswith("/") else path + "/"
    return own.startswith(reserved + "/") or (reserved + "/").startswith(own)


def env_name_reserved(name: str) -> bool:
    """True when ``spec.pod.env`` may not set ``name`` (the operator sets it, or it is under ``QLORA_``)."""
    return name.startswith(RESERVED_ENV_PREFIX) or name in reserved_env_names()


def pod_settings_problems(pod: PodSettings) -> list[str]:
    """What is wrong with ``spec.pod`` (empty: nothing), one message per problem naming the field.

    The same rules as the CRD's CEL (``qlora_operator.crd``): no reserved env, volume names
    or mount paths, no duplicate names or paths, every mount names one of ``pod.volumes``,
    no ServiceAccount annotation key under ``qlora.dev/``.
    """
    problems = []
    for key in pod.service_account_annotations:
        if key.startswith(OPERATOR_ANNOTATION_PREFIX):
            problems.append(f"pod.serviceAccountAnnotations.{key}: {MSG_SA_ANNOTATION_RESERVED}")
    for i, var in enumerate(pod.env):
        if env_name_reserved(var.name):
            problems.append(f"pod.env[{i}].name: {var.name!r}: {msg_env_reserved()}")
    volume_names = [v.name for v in pod.volumes]
    for i, name in enumerate(volume_names):
        if name in reserved_volume_names():
            problems.append(f"pod.volumes[{i}].name: {name!r}: {msg_volume_reserved()}")
    for what, values in (("env", [v.name for v in pod.env]), ("volumes", volume_names),
                         ("volumeMounts", [m.mount_path for m in pod.volume_mounts])):
        dupes = sorted({v for v in values if values.count(v) > 1})
        if dupes:
            key = "mountPath" if what == "volumeMounts" else "name"
            problems.append(f"pod.{what}: duplicate {key} {', '.join(dupes)}: each must be unique")
    for i, mount in enumerate(pod.volume_mounts):
        if any(mount_path_collides(mount.mount_path, p) for p in reserved_mount_paths()):
            problems.append(f"pod.volumeMounts[{i}].mountPath: {mount.mount_path!r}: {msg_mount_reserved()}")
        if mount.name not in volume_names:
            problems.append(f"pod.volumeMounts[{i}].name: {mount.name!r}: {MSG_MOUNT_UNKNOWN_VOLUME}")
    return problems


def msg_env_reserved() -> str:
    """The refusal of an operator-owned env name (pydantic and CEL say the same)."""
    names = [n for n in reserved_env_names() if not n.startswith(RESERVED_ENV_PREFIX)]
    return (
        f"pod.env: the operator sets {RESERVED_ENV_PREFIX}* and {', '.join(names)}: use another name "
        "(S3 credentials come from storage.credentialsSecretRef or the pod's identity)"
    )


def msg_volume_reserved() -> str:
    """The refusal of an operator-owned volume name."""
    return f"pod.volumes: the names {', '.join(reserved_volume_names())} are the operator's own volumes: use another name"


def msg_mount_reserved() -> str:
    """The refusal of a mount path at, under or above the operator's mounts."""
    return (
        f"pod.volumeMounts: mountPath may not be, lie under or contain the operator's mounts "
        f"{', '.join(reserved_mount_paths())}: mount elsewhere, e.g. /data or /models"
    )


def render_pod_spec(
    body: Mapping[str, Any], spec: QLoRAJobSpec, settings: OperatorSettings, run: int = 1, training_run: int | None = None
) -> dict[str, Any]:
    """The trainer pod spec; passes the ``restricted`` Pod Security level.

    ``spec.pod`` adds to it: extra env after the operator's (so ``$(QLORA_JOB_NAME)``
    expands), extra volumes and mounts after the operator's, the chart's then the job's
    ``imagePullSecrets`` (duplicates dropped), ``runtimeClassName``; ``spec.scheduling``
    gives ``nodeSelector``, ``tolerations``, ``affinity`` and ``priorityClassName``. The
    pass-through parts (volume sources, affinity) are checked by the API server when the
    Job is created. Extra volumes are subject to the namespace's Pod Security level.
    """
    job = body["metadata"]["name"]
    extra = spec.pod
    gpu = gpu_resource(spec, settings)
    quantities = {"cpu": spec.resources.cpu, "memory": spec.resources.memory, gpu: str(spec.resources.gpus)}
    container = {
        "name": CONTAINER,
        "image": trainer_image(spec, settings),
        "imagePullPolicy": settings.image_pull_policy,
        "command": list(settings.trainer_command),
        "env": [*_env(body, spec, run, training_run), *(e.model_dump(by_alias=True, exclude_none=True) for e in extra.env)],
        "resources": {"requests": dict(quantities), "limits": dict(quantities)},
        "volumeMounts": [*operator_mounts(), *(m.model_dump(by_alias=True, exclude_none=True) for m in extra.volume_mounts)],
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
        "volumes": [*operator_volumes(job, run), *(v.model_dump(by_alias=True, exclude_none=True) for v in extra.volumes)],
    }
    pull_secrets = list(dict.fromkeys([*settings.image_pull_secrets, *extra.image_pull_secrets]))
    if pull_secrets:
        pod["imagePullSecrets"] = [{"name": n} for n in pull_secrets]
    if extra.runtime_class_name:
        pod["runtimeClassName"] = extra.runtime_class_name
    sched = spec.scheduling
    if sched.node_selector:
        pod["nodeSelector"] = dict(sched.node_selector)
    if sched.tolerations:
        pod["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in sched.tolerations]
    if sched.affinity is not None:
        affinity = sched.affinity.model_dump(by_alias=True, exclude_none=True)
        if affinity:
            pod["affinity"] = affinity
    if sched.priority_class_name:
        pod["priorityClassName"] = sched.priority_class_name
    if spec.resources.nodes > 1:
        pod["subdomain"] = service_name(job, run)
    return pod


_DISRUPTED = [{"type": "DisruptionTarget", "status": "True"}]


def pod_failure_policy() -> dict[str, Any]:
    """One node: fail at once on the permanent exit codes; ignore disruptions; count everything else."""
    return {
        "rules": [
            {
                "action": "FailJob",
                "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": list(FAIL_JOB_EXIT_CODES)},
            },
            {"action": "Ignore", "onPodConditions": list(_DISRUPTED)},
        ]
    }


def group_pod_failure_policy() -> dict[str, Any]:
    """Several nodes: any failed pod fails the Job (the group restarts as a new run).

    The rule that matched (the Job's ``FailureTarget`` message names its index) says why:
    0 a disruption (restarted without counting), 1 a permanent exit code (not restarted),
    2 any other failure (counted against ``runPolicy.backoffLimit``). The operator reads
    the same from the pods, or from that message when the pod ended and was deleted before
    the operator saw it (``status.attempts_with_job_failure``); ``backoffLimit: 0`` covers a
    pod that fails without an exit code.
    """
    return {
        "rules": [
            {"action": "FailJob", "onPodConditions": list(_DISRUPTED)},
            {
                "action": "FailJob",
                "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": list(PERMANENT_EXIT_CODES)},
            },
            {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "NotIn", "values": [0]}},
        ]
    }


def render_service(body: Mapping[str, Any], spec: QLoRAJobSpec, run: int = 1) -> dict[str, Any]:
    """The headless Service of run ``run`` (nodes > 1): DNS names for the run's pods.

    ``publishNotReadyAddresses``: node 0 must be resolvable before any pod is Ready.
    Owned by the QLoRAJob (it exists before the Job, so pods never start without it).
    """
    job = body["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(body, service_name(job, run), run),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {LABEL_JOB: label_value(job), LABEL_RUN: str(run)},
            "ports": [{"name": "torch-dist", "port": MASTER_PORT, "targetPort": MASTER_PORT, "protocol": "TCP"}],
        },
    }


def render_job(
    body: Mapping[str, Any], spec: QLoRAJobSpec, settings: OperatorSettings, run: int = 1,
    group: GroupAttempt | None = None,
) -> dict[str, Any]:
    """The batch/v1 Job of run ``run``; ``group``: its place in a chain of group restarts (nodes > 1)."""
    job = body["metadata"]["name"]
    policy = spec.run_policy
    nodes = spec.resources.nodes
    queued = bool(spec.scheduling.queue_name)
    meta = _metadata(body, job_name(job, run), run, **_run_annotations(body, spec))
    if queued:
        meta["labels"][KUEUE_QUEUE_LABEL] = spec.scheduling.queue_name
    if policy.suspend:
        meta["annotations"][ANN_USER_SUSPENDED] = "true"
    if nodes > 1:
        meta["annotations"].update((group or GroupAttempt()).annotations())
    job_spec: dict[str, Any] = {
        "completions": nodes,
        "parallelism": nodes,
        # One node: retries within the Job. Several: the first failure fails the Job (group restart).
        "backoffLimit": policy.backoff_limit if nodes == 1 else 0,
        # Kueue admits a queued Job by un-suspending it: it must be created suspended.
        "suspend": bool(policy.suspend or queued),
        "podFailurePolicy": pod_failure_policy() if nodes == 1 else group_pod_failure_policy(),
        # A replacement pod starts only when the failed one is gone: one GPU holder at a time.
        "podReplacementPolicy": "Failed",
        "template": {
            "metadata": {
                "labels": labels(job, run),
                "annotations": {ANN_JOB: job, "kubectl.kubernetes.io/default-container": CONTAINER},
            },
            "spec": render_pod_spec(body, spec, settings, run, (group or GroupAttempt()).training_run),
        },
    }
    if nodes > 1:
        job_spec["completionMode"] = "Indexed"
    if policy.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = policy.active_deadline_seconds
    if policy.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = policy.ttl_seconds_after_finished
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}


def fitcheck_job_name(job: str, run: int = 1) -> str:
    """Name of run ``run``'s CPU-only fit-check Job."""
    return child_name(job_name(job, run), "fit")


#: Label of a fit-check Job and pod: the run it checks.
LABEL_FITCHECK_RUN = "qlora.dev/fitcheck-run"

#: What the fit-check container requests (and is limited to): no GPU.
FITCHECK_RESOURCES = {"cpu": "250m", "memory": "512Mi"}


def fitcheck_command(settings: OperatorSettings, spec: QLoRAJobSpec) -> list[str]:
    """The trainer command with ``fitcheck`` before ``--config`` and the GPUs to check appended.

    Raises:
        ValueError: ``spec.resources.gpuMemoryGiB`` is unset (no fit check to run).
    """
    res = spec.resources
    if res.gpu_memory_gib is None:
        raise ValueError("spec.resources.gpuMemoryGiB: unset, so there is no fit check to render")
    command = list(settings.trainer_command)
    at = command.index("--config") if "--config" in command else len(command)
    command.insert(at, "fitcheck")
    return [*command, "--gpus", str(res.gpus), "--nodes", str(res.nodes), "--gpu-memory", f"{res.gpu_memory_gib:g}"]


def render_fitcheck_job(
    body: Mapping[str, Any], spec: QLoRAJobSpec, settings: OperatorSettings, run: int = 1
) -> dict[str, Any]:
    """Run ``run``'s fit check: a CPU-only batch/v1 Job created before the GPU Job.

    Why a separate pod, not an initContainer: an initContainer runs in the GPU pod, which
    holds its GPUs from scheduling on. The pod is the trainer's (image, ServiceAccount,
    credentials env from the job's own Secret, config mount, restricted security context),
    with ``qlora-train fitcheck`` as its command, :data:`FITCHECK_RESOURCES` and no GPU,
    and none of ``spec.scheduling``'s GPU-node placement (node selector, tolerations,
    affinity, priority). It reads only ``<model.uri>/config.json``; its result is its
    termination message (``fitCheck``; exit 0 fits, 7 InsufficientGPUMemory).
    """
    job = body["metadata"]["name"]
    pod = render_pod_spec(body, spec, settings, run)
    container = pod["containers"][0]
    container["command"] = fitcheck_command(settings, spec)
    container["resources"] = {"requests": dict(FITCHECK_RESOURCES), "limits": dict(FITCHECK_RESOURCES)}
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName", "subdomain"):
        pod.pop(key, None)
    pod["terminationGracePeriodSeconds"] = 5
    # No qlora.dev/run label: the run's GPU Job is found by that label (plan.current_run).
    fit_labels = {**labels(job), "app.kubernetes.io/component": "fitcheck", LABEL_FITCHECK_RUN: str(run)}
    meta = _metadata(body, fitcheck_job_name(job, run))
    meta["labels"] = dict(fit_labels)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            "backoffLimit": 1,
            "activeDeadlineSeconds": 300,
            "podReplacementPolicy": "Failed",
            "template": {"metadata": {"labels": fit_labels, "annotations": {ANN_JOB: job}}, "spec": pod},
        },
    }


def render_children(
    body: Mapping[str, Any], spec: QLoRAJobSpec, settings: OperatorSettings, run: int = 1,
    group: GroupAttempt | None = None,
) -> list[dict[str, Any]]:
    """Every child of run ``run`` in creation order (the Service before the Job, the Job last)."""
    children = [
        render_config_map(body, spec, run),
        render_service_account(body, spec, settings),
        render_role(body),
        render_role_binding(body),
    ]
    if spec.resources.nodes > 1:
        children.append(render_service(body, spec, run))
    children.append(render_job(body, spec, settings, run, group))
    return children


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
    return contract.parse_json_object((obj.get("metadata", {}).get("annotations") or {}).get(ANN_SPEC))
