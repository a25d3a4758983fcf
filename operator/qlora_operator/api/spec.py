"""The QLoRAJob spec (``qlora.dev/v1alpha1``): the API's identity and the spec models.

The spec is the trainer's input contract (:class:`qlora_trainer.config.TrainingConfig`)
plus the runtime fields only the operator uses (resources, image, scheduling, run
policy, the credentials Secret). The CRD in ``crds/`` is generated from these models
(``python -m qlora_operator.crd``); a test fails when the committed file differs.

No field names a namespace: a job reaches only Secrets of its own namespace. Unknown
fields (``credentialsSecretRef.namespace`` included) are refused by ``kubectl apply``
(server-side strict field validation, kubectl's default) and pruned for clients that
ask for less, so they can never take effect.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field

from qlora_operator.api.patterns import (
    DNS_1035_LABEL,
    DNS_LABEL,
    DNS_SUBDOMAIN,
    EXTENDED_RESOURCE,
    LABEL_KEY,
    LABEL_VALUE,
    MSG_DNS_LABEL,
    MSG_DNS_SUBDOMAIN,
    MSG_EXTENDED_RESOURCE,
    MSG_LABEL_VALUE,
    MSG_SECRET_NAME,
    PassThrough,
    Quantity,
    SecretName,
)
from qlora_operator.api.pod import PodSettings
from qlora_trainer import contract
from qlora_trainer.config import (
    ApiModel,
    MlflowSettings,
    StorageSettings,
    TrackingSettings,
    TrainingConfig,
    cel_pattern,
    cel_rule,
    cel_rules,
    pattern_check,
)

GROUP = contract.API_GROUP
VERSION = contract.API_VERSION
KIND = "QLoRAJob"
PLURAL = contract.PLURAL
SINGULAR = "qlorajob"
SHORT_NAMES = ["qj"]
CATEGORIES = ["qlora"]
API_VERSION = f"{GROUP}/{VERSION}"
#: ``metadata.name`` of a QLoRAJob is at most this long (like CronJob's 52): child
#: names add suffixes (``<name>-train``, ``<name>-config``, ...) and the Job's name
#: must still fit the 63-character ``job-name`` label of its pods.
MAX_NAME_LENGTH = 52
MSG_MULTINODE_NAME = (
    "metadata.name must be a DNS-1035 label (lowercase letters, digits and '-', a letter first, no '.') when "
    "spec.resources.nodes > 1: it names the run's headless Service and its pods' hostnames (<name>-train-<index>)"
)


class SecretReference(ApiModel):
    """A Secret in the job's own namespace (there is deliberately no namespace field)."""

    name: SecretName = Field(
        description=(
            "Secret name in the QLoRAJob's own namespace, with keys AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (optionally AWS_SESSION_TOKEN). There is no namespace field: "
            "a job can only use Secrets of its own namespace."
        ),
        json_schema_extra=cel_rules(cel_pattern(DNS_SUBDOMAIN, MSG_SECRET_NAME)),
    )


class JobStorageSettings(StorageSettings):
    """S3 connection plus the Secret the trainer pod reads credentials from."""

    credentials_secret_ref: SecretReference | None = Field(
        default=None,
        description=(
            "Secret (same namespace) whose AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY keys (and AWS_SESSION_TOKEN "
            "for temporary credentials, when present) become the trainer's environment. Unset: the pod's own "
            "identity (e.g. IRSA) is used."
        ),
    )


#: Keys of ``tracking.mlflow.credentialsSecretRef`` that become the trainer's environment (each optional).
MLFLOW_SECRET_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


class TrackingSecretReference(ApiModel):
    """A Secret in the job's own namespace with MLflow credentials (no namespace field)."""

    name: SecretName = Field(
        description=(
            "Secret name in the QLoRAJob's own namespace; its keys MLFLOW_TRACKING_USERNAME / "
            "MLFLOW_TRACKING_PASSWORD (basic auth) or MLFLOW_TRACKING_TOKEN (bearer), each optional, become "
            "the trainer's environment. The operator never reads it."
        )
    )


class JobMlflowSettings(MlflowSettings):
    """``tracking.mlflow`` plus the Secret the trainer pod reads MLflow credentials from."""

    credentials_secret_ref: TrackingSecretReference | None = Field(
        default=None,
        description="Secret (same namespace) with MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN. Unset: none.",
    )


class JobTrackingSettings(TrackingSettings):
    """``spec.tracking``: the trainer's tracking settings and the MLflow credentials Secret."""

    mlflow: JobMlflowSettings | None = Field(default=None, description="Log the run to an MLflow tracking server.")


class Resources(ApiModel):
    """Compute for each trainer pod, and how many pods (nodes) a run has."""

    gpus: Annotated[int, Field(ge=1, le=64)] = Field(
        default=1, description="GPUs per trainer pod, 1..64. Default 1."
    )
    nodes: Annotated[int, Field(ge=1, le=64)] = Field(
        default=1,
        description=(
            "Trainer pods (torchrun nodes), 1..64, each with `gpus` GPUs: the run uses nodes x gpus GPUs. "
            "Default 1. Above 1 the run is an Indexed Job with a headless Service, and metadata.name must be "
            "a DNS-1035 label (a letter first; letters, digits and '-')."
        ),
    )
    gpu_resource_name: Annotated[
        str,
        Field(min_length=3, max_length=253, json_schema_extra={"pattern": EXTENDED_RESOURCE}),
        pattern_check(EXTENDED_RESOURCE, MSG_EXTENDED_RESOURCE),
    ] | None = Field(
        default=None,
        description="Extended resource name of a GPU. Default: the operator's setting (nvidia.com/gpu).",
    )
    gpu_memory_gib: Annotated[float, Field(gt=0, le=1024)] | None = Field(
        default=None,
        alias="gpuMemoryGiB",
        description=(
            "Memory of one GPU in GiB (e.g. 24, 80). When set, each run starts with a fit check before any GPU "
            "is requested: a CPU-only Job (<name>-train-fit, <name>-train-r<N>-fit for run N) reads only the model's config.json and runs the "
            "memory estimate for nodes x gpus GPUs of this size; a run that cannot fit fails with "
            "InsufficientGPUMemory naming what would fit, without a GPU pod or a weight download. Unset: "
            "no fit check (the trainer's in-pod preflight still checks on the GPU)."
        ),
    )
    cpu: Quantity = Field(default="4", description="CPU request and limit (Kubernetes quantity, e.g. 8 or 500m). Default 4.")
    memory: Quantity = Field(
        default="32Gi", description="Memory request and limit (Kubernetes quantity, e.g. 64Gi). Default 32Gi."
    )


class Toleration(ApiModel):
    """A pod toleration (core/v1 ``Toleration``)."""

    key: Annotated[str, Field(max_length=317)] | None = Field(
        default=None, description="Taint key to tolerate; empty with operator Exists tolerates every taint."
    )
    operator: Literal["Exists", "Equal"] | None = Field(
        default=None, description="Exists or Equal (default Equal)."
    )
    value: Annotated[str, Field(max_length=63)] | None = Field(
        default=None, description="Taint value for operator Equal."
    )
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate; empty: all effects."
    )
    toleration_seconds: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = Field(
        default=None, description="For NoExecute: seconds the pod stays bound after the taint appears."
    )


class Affinity(ApiModel):
    """A pod's ``affinity`` (core/v1 ``Affinity``): each part is passed to the pod as written.

    The API server checks the parts when the operator creates the run's Job; a refusal
    fails the job with ``InvalidSpec`` and the server's message.
    """

    node_affinity: PassThrough | None = Field(
        default=None, description="core/v1 NodeAffinity (requiredDuringSchedulingIgnoredDuringExecution, ...)."
    )
    pod_affinity: PassThrough | None = Field(default=None, description="core/v1 PodAffinity.")
    pod_anti_affinity: PassThrough | None = Field(default=None, description="core/v1 PodAntiAffinity.")


class Scheduling(ApiModel):
    """Where trainer pods may run and how they queue (may change while a run is active)."""

    node_selector: Annotated[
        dict[
            Annotated[str, Field(max_length=317), pattern_check(LABEL_KEY, "must be a label key such as example.com/gpu-type")],
            Annotated[str, Field(max_length=63, json_schema_extra={"pattern": LABEL_VALUE}), pattern_check(LABEL_VALUE, MSG_LABEL_VALUE)],
        ],
        Field(max_length=64),
    ] = Field(
        default_factory=dict,
        description="Node labels a trainer pod's node must have (at most 64).",
        json_schema_extra=cel_rules(
            cel_rule(
                f"self.all(k, k.size() <= 317 && k.matches(r'{LABEL_KEY}'))",
                "scheduling.nodeSelector: keys must be label keys such as example.com/gpu-type",
            ),
        ),
    )
    tolerations: Annotated[list[Toleration], Field(max_length=32)] = Field(
        default_factory=list, description="Taints trainer pods tolerate (at most 32)."
    )
    priority_class_name: Annotated[
        str,
        Field(max_length=253, json_schema_extra={"pattern": f"^$|{DNS_SUBDOMAIN}"}),
        pattern_check(f"^$|{DNS_SUBDOMAIN}", MSG_DNS_SUBDOMAIN),
    ] = Field(default="", description="PriorityClass of trainer pods (empty: the cluster default).")
    affinity: Affinity | None = Field(
        default=None,
        description=(
            "Node affinity, pod affinity and anti-affinity of trainer pods (core/v1 Affinity, passed as written; "
            "the API server checks it when the operator creates the run's Job)."
        ),
    )
    queue_name: Annotated[
        str,
        Field(max_length=63, json_schema_extra={"pattern": f"^$|{DNS_LABEL}"}),
        pattern_check(f"^$|{DNS_LABEL}", MSG_DNS_LABEL),
    ] = Field(
        default="",
        description="Kueue LocalQueue (same namespace): sets the kueue.x-k8s.io/queue-name label on the Job. Empty: none.",
    )


class RunPolicy(ApiModel):
    """Retries, deadlines and suspension of the underlying batch/v1 Job."""

    backoff_limit: Annotated[int, Field(ge=0, le=100)] = Field(
        default=3,
        description=(
            "Failed attempts retried before the job fails, 0..100; each retry resumes from the newest checkpoint. "
            "One node: failed pods. Several nodes: failed groups (any pod failing restarts all of them as the next "
            "run; disruptions are not counted). Default 3."
        ),
    )
    active_deadline_seconds: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = Field(
        default=None,
        description=(
            "Wall-clock limit for the whole run, in seconds (all attempts; with resources.nodes > 1, for each "
            "run of the group: a group restart starts a new Job). Unset: none."
        ),
    )
    ttl_seconds_after_finished: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = Field(
        default=None,
        description="Delete the finished batch/v1 Job (not this QLoRAJob) after this many seconds. Unset: kept.",
    )
    suspend: bool = Field(
        default=False,
        description="Suspend the run: pods are stopped, checkpoints kept; false resumes. May change while a run is active.",
    )


class QLoRAJobSpec(TrainingConfig):
    """``spec`` of a QLoRAJob: the trainer config plus runtime fields."""

    storage: JobStorageSettings = Field(
        default_factory=JobStorageSettings,
        description="How the trainer reaches S3: endpoint, region, addressing, and the credentials Secret (same namespace).",
    )
    tracking: JobTrackingSettings = Field(
        default_factory=JobTrackingSettings,
        description=(
            "Experiment tracking through transformers' integrations: an MLflow run (tracking URI, experiment, "
            "tags, credentials Secret) and/or TensorBoard event files under <output>/run-<N>/tensorboard/."
        ),
    )
    resources: Resources = Field(
        default_factory=Resources, description="Compute per trainer pod: GPUs, CPU and memory (requests = limits)."
    )
    image: Annotated[str, Field(min_length=1, max_length=512)] | None = Field(
        default=None, description="Trainer image. Default: the operator's configured trainer image."
    )
    scheduling: Scheduling = Field(
        default_factory=Scheduling,
        description="Placement and queueing of trainer pods (may change while a run is active).",
    )
    pod: PodSettings = Field(
        default_factory=PodSettings,
        description=(
            "Identity and plumbing of trainer pods: ServiceAccount annotations (IRSA, Workload Identity), image pull "
            "Secrets, RuntimeClass, extra env and volumes. Fixed during a run; a change starts no run."
        ),
    )
    run_policy: RunPolicy = Field(
        default_factory=RunPolicy,
        description="Retries, deadline, TTL and suspension of the run (all but backoffLimit may change during a run).",
    )

    def trainer_config(self) -> TrainingConfig:
        """The part of the spec the trainer reads, as a plain :class:`TrainingConfig`."""
        data = self.model_dump(by_alias=True, mode="json", include=set(TrainingConfig.model_fields))
        data["storage"].pop("credentialsSecretRef", None)
        if data["tracking"].get("mlflow"):
            data["tracking"]["mlflow"].pop("credentialsSecretRef", None)
        return TrainingConfig.model_validate(data)


#: CEL rules at the object root (they see ``metadata`` and ``spec``): the name's length,
#: and a DNS-1035 name for several nodes (:func:`multinode_name_problem`). The root's
#: transition rules (fields fixed during a run) are :func:`qlora_operator.api.changes.transition_rules`.
OBJECT_RULES = [
    cel_rule(
        f"self.metadata.name.size() <= {MAX_NAME_LENGTH}",
        f"metadata.name must be at most {MAX_NAME_LENGTH} characters "
        "(child objects such as the <name>-train Job add suffixes)",
    ),
    cel_rule(
        "!has(self.spec.resources) || !has(self.spec.resources.nodes) || self.spec.resources.nodes <= 1"
        f" || self.metadata.name.matches(r'{DNS_1035_LABEL}')",
        MSG_MULTINODE_NAME,
    ),
]


def multinode_name_problem(name: str, nodes: int) -> str | None:
    """Why ``name`` cannot run ``nodes`` trainer pods, or None (the CRD checks the same).

    A run of several nodes gets a headless Service named after its Job (``<name>-train``),
    and Service names are DNS-1035 labels; its pods' hostnames ``<job>-<index>`` must be
    DNS labels too (no ``.``).
    """
    if nodes > 1 and not re.match(DNS_1035_LABEL, name):
        return f"{MSG_MULTINODE_NAME}; got {name!r}"
    return None


def parse_spec(spec: dict[str, Any]) -> QLoRAJobSpec:
    """Validate a QLoRAJob ``spec`` mapping (typed as the API server does: ``"2"`` is no integer).

    Raises:
        qlora_trainer.config.ConfigError: naming every offending ``spec.`` field.
    """
    from pydantic import ValidationError

    from qlora_trainer.config import ConfigError, format_validation_error, validate_like_api_server

    try:
        return validate_like_api_server(QLoRAJobSpec, spec)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, prefix="spec.")) from None


__all__ = [
    "API_VERSION",
    "Affinity",
    "CATEGORIES",
    "GROUP",
    "JobMlflowSettings",
    "JobStorageSettings",
    "JobTrackingSettings",
    "KIND",
    "MAX_NAME_LENGTH",
    "MLFLOW_SECRET_KEYS",
    "MSG_MULTINODE_NAME",
    "OBJECT_RULES",
    "PLURAL",
    "QLoRAJobSpec",
    "Resources",
    "RunPolicy",
    "SHORT_NAMES",
    "SINGULAR",
    "Scheduling",
    "SecretReference",
    "Toleration",
    "TrackingSecretReference",
    "VERSION",
    "multinode_name_problem",
    "parse_spec",
]
