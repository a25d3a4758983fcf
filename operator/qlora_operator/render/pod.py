"""The trainer pod: its spec (container, env, volumes, security context, placement) and what it reserves.

The operator's own env names, volumes and mount paths are what ``spec.pod`` may not use:
:func:`pod_settings_problems` (called by ``PodSettings``' validator) and the CEL rules of
:mod:`qlora_operator.api.pod` both take them from here.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from qlora_operator.api import (
    MLFLOW_SECRET_KEYS,
    MSG_MOUNT_UNKNOWN_VOLUME,
    MSG_SA_ANNOTATION_RESERVED,
    OPERATOR_ANNOTATION_PREFIX,
    QLoRAJobSpec,
)
from qlora_operator.render.names import (
    CACHE_DIR,
    COMPLETION_INDEX,
    CONFIG_DIR,
    CONFIG_FILE,
    CONTAINER,
    MASTER_PORT,
    RESERVED_ENV_PREFIX,
    RUN_AS_USER,
    SHM_DIR,
    TERMINATION_MESSAGE_PATH,
    TMP_DIR,
    config_map_name,
    master_addr,
    service_name,
    trainer_name,
)
from qlora_operator.settings import OperatorSettings
from qlora_trainer import contract
from qlora_trainer.config import uris_overlap

if TYPE_CHECKING:
    from qlora_operator.api import PodSettings


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
    """True when a mount at ``path`` would be, lie under or hide the operator's ``reserved`` path:
    the two overlap as :func:`qlora_trainer.config.uris_overlap` decides for URIs (each as a
    prefix ending in ``/``); the CEL rule on ``spec.pod.volumeMounts`` tests the same."""
    return uris_overlap(path, reserved)


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


__all__ = [
    "credentials_env",
    "distributed_env",
    "env_name_reserved",
    "gpu_resource",
    "mount_path_collides",
    "msg_env_reserved",
    "msg_mount_reserved",
    "msg_volume_reserved",
    "operator_mounts",
    "operator_volumes",
    "pod_settings_problems",
    "render_pod_spec",
    "reserved_env_names",
    "reserved_mount_paths",
    "reserved_volume_names",
    "tracking_env",
    "trainer_image",
]
