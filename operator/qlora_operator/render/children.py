"""The children of a run: ConfigMap, ServiceAccount, Role, RoleBinding, the headless Service
(several nodes) and the batch/v1 Job, in creation order (:func:`render_children`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from qlora_operator.api import GROUP, OPERATOR_ANNOTATION_PREFIX, PLURAL, QLoRAJobSpec
from qlora_operator.render.names import (
    ANN_JOB,
    ANN_MANAGED_ANNOTATIONS,
    ANN_USER_SUSPENDED,
    CONFIG_FILE,
    CONTAINER,
    FAIL_JOB_EXIT_CODES,
    GroupAttempt,
    KUEUE_QUEUE_LABEL,
    LABEL_JOB,
    LABEL_RUN,
    MASTER_PORT,
    PERMANENT_EXIT_CODES,
    child_metadata,
    config_map_name,
    job_name,
    label_value,
    labels,
    run_annotations,
    service_name,
    trainer_name,
)
from qlora_operator.render.pod import render_pod_spec
from qlora_operator.settings import OperatorSettings
from qlora_trainer import contract


def trainer_config_json(spec: QLoRAJobSpec) -> str:
    """``config.json``: the trainer's part of the spec (no credentials, no runtime fields)."""
    data = spec.trainer_config().model_dump(by_alias=True, mode="json", exclude_none=True)
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def render_config_map(body: Mapping[str, Any], spec: QLoRAJobSpec, run: int = 1) -> dict[str, Any]:
    """ConfigMap with ``config.json`` for run ``run``; it also records the run's spec."""
    name = config_map_name(body["metadata"]["name"], run)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": child_metadata(body, name, run, **run_annotations(body, spec)),
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
    meta = child_metadata(body, name)
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
        "metadata": child_metadata(body, trainer_name(meta["name"])),
        "rules": role_rules(meta["name"]),
    }


def render_role_binding(body: Mapping[str, Any]) -> dict[str, Any]:
    """Binds the trainer Role to the trainer ServiceAccount."""
    meta = body["metadata"]
    name = trainer_name(meta["name"])
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": child_metadata(body, name),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": meta["namespace"]}],
    }


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
    2 any other failure (counted against ``runPolicy.backoffLimit``), 3 exit 143 (SIGTERM:
    a suspended Job's pods, ignored; a disruption matched rule 0 first). The operator reads
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
            {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "NotIn",
                                                  "values": [0, contract.EXIT_PREEMPTED]}},
            # SIGTERM, not a failure of the trainer: the Job was suspended (runPolicy.suspend, a
            # Kueue preemption) and the Job controller deleted the pods. Without this rule the
            # real kubelet's exit 143 matched rule 2 and failed the suspended Job.
            {"action": "Ignore", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                                 "values": [contract.EXIT_PREEMPTED]}},
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
        "metadata": child_metadata(body, service_name(job, run), run),
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
    meta = child_metadata(body, job_name(job, run), run, **run_annotations(body, spec))
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


__all__ = [
    "group_pod_failure_policy",
    "pod_failure_policy",
    "render_children",
    "render_config_map",
    "render_job",
    "render_role",
    "render_role_binding",
    "render_service",
    "render_service_account",
    "role_rules",
    "service_account_annotations",
    "service_account_patch",
    "trainer_config_json",
]
