"""Operator settings: environment (``QLORA_OPERATOR_*``) first, command-line flags override.

Every field has a default that works on a real cluster; tests override a few (short
timeouts, a cheap trainer command). Nothing here touches the API.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_PREFIX = "QLORA_OPERATOR_"

DEFAULT_TRAINER_IMAGE = "ghcr.io/qlora-operator/qlora-trainer:0.1.0"
DEFAULT_TRAINER_COMMAND = ("qlora-train", "--config", "/etc/qlora/config.json")
DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"


class SettingsError(ValueError):
    """Settings that cannot be used; the message names the variable or flag."""


class OperatorSettings(BaseModel):
    """What the operator needs to know beyond the QLoRAJob objects themselves."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    trainer_image: Annotated[str, Field(min_length=1)] = Field(
        default=DEFAULT_TRAINER_IMAGE, description="Trainer image used when spec.image is unset."
    )
    image_pull_policy: Annotated[str, Field(pattern=r"^(Always|IfNotPresent|Never)$")] = Field(
        default="IfNotPresent", description="imagePullPolicy of trainer containers."
    )
    image_pull_secrets: tuple[str, ...] = Field(
        default=(),
        description=(
            "imagePullSecrets of every trainer pod (Secret names in the job's namespace), before a job's "
            "spec.pod.imagePullSecrets. Env: comma-separated or a JSON list."
        ),
    )
    service_account_annotations: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Annotations of every trainer ServiceAccount (e.g. IRSA's eks.amazonaws.com/role-arn); a job's "
            "spec.pod.serviceAccountAnnotations win key by key. Env: a JSON object."
        ),
    )
    trainer_command: tuple[str, ...] = Field(
        default=DEFAULT_TRAINER_COMMAND,
        description="Trainer container command; the config file is mounted at /etc/qlora/config.json.",
    )
    namespaces: tuple[str, ...] = Field(
        default=(), description="Namespaces to watch; empty together with all_namespaces=False means all."
    )
    all_namespaces: bool = Field(default=False, description="Watch the whole cluster (needs cluster-wide RBAC).")
    stalled_timeout_seconds: Annotated[float, Field(gt=0)] = Field(
        default=900.0, description="A running trainer that reports no progress for this long is Stalled."
    )
    image_pull_grace_seconds: Annotated[float, Field(ge=0)] = Field(
        default=180.0, description="How long an image may fail to pull before the job fails with ImagePullFailed."
    )
    container_config_grace_seconds: Annotated[float, Field(ge=0)] = Field(
        default=300.0,
        description="How long a pod may wait for a missing Secret before the job fails with SecretNotFound.",
    )
    unschedulable_timeout_seconds: Annotated[float, Field(gt=0)] = Field(
        default=1800.0,
        description="How long a run may stay Unschedulable or QuotaExceeded before the job fails.",
    )
    max_gpus_per_job: Annotated[int, Field(ge=1)] = Field(
        default=8,
        description=(
            "Largest spec.resources.gpus accepted (InvalidSpec above it): GPUs per trainer pod; a job of "
            "several nodes uses nodes x gpus (cap the total with a ResourceQuota)."
        ),
    )
    gpu_resource_name: Annotated[str, Field(min_length=1)] = Field(
        default=DEFAULT_GPU_RESOURCE, description="Extended resource name used when spec.resources.gpuResourceName is unset."
    )
    termination_grace_seconds: Annotated[int, Field(ge=0)] = Field(
        default=30, description="terminationGracePeriodSeconds of trainer pods."
    )
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = Field(
        default=8080, description="Port of the Prometheus /metrics endpoint; 0 disables it."
    )
    metrics_finished_ttl_seconds: Annotated[float, Field(ge=0)] = Field(
        default=600.0,
        description=(
            "Seconds a finished QLoRAJob's training metrics (qlora_job_*) stay exported after its "
            "status.completionTime; deleting the QLoRAJob drops them at once."
        ),
    )
    resync_seconds: Annotated[float, Field(gt=0)] = Field(
        default=15.0, description="How often unfinished jobs are re-checked (timeouts, quota events)."
    )
    max_concurrent_reconciles: Annotated[int, Field(ge=1, le=64)] = Field(
        default=4, description="Reconciles running at the same time (each is a handful of API calls)."
    )
    log_format: Annotated[str, Field(pattern=r"^(json|text)$")] = Field(default="json", description="Log format.")
    leader_election: bool = Field(
        default=False,
        description=(
            "Run as one of several replicas: only the holder of the Lease leader_election_namespace/"
            "leader_election_name reconciles (qlora_operator.leader); the chart turns it on."
        ),
    )
    leader_election_name: Annotated[str, Field(min_length=1, max_length=253)] = Field(
        default="qlora-operator", description="Name of the leader Lease."
    )
    leader_election_namespace: str = Field(
        default="", description="Namespace of the leader Lease; empty: POD_NAMESPACE (the chart sets it from the pod)."
    )
    leader_election_lease_seconds: Annotated[int, Field(ge=2, le=3600)] = Field(
        default=15, description="Lease duration: a standby takes over a crashed leader after this many seconds."
    )
    leader_election_renew_deadline_seconds: Annotated[int, Field(ge=2, le=3600)] = Field(
        default=10, description="A leader that could not renew for this long exits (must be < the lease duration)."
    )
    leader_election_retry_seconds: Annotated[int, Field(ge=1, le=600)] = Field(
        default=2, description="Seconds between tries to take or renew the Lease (renew deadline > 1.2 x this)."
    )

    @field_validator("trainer_command", mode="before")
    @classmethod
    def _command(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                value = json.loads(text)
            else:
                value = shlex.split(text)
        if not value:
            raise ValueError("trainer_command must not be empty")
        return tuple(value)

    @field_validator("service_account_annotations", mode="before")
    @classmethod
    def _annotations(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = json.loads(value) if value.strip() else {}
            if not isinstance(value, dict):
                raise ValueError("service_account_annotations must be a JSON object of strings")
        if isinstance(value, Mapping):
            own = sorted(k for k in value if isinstance(k, str) and k.startswith("qlora.dev/"))
            if own:
                raise ValueError(f"keys under qlora.dev/ are the operator's own: {', '.join(own)}")
        return value

    @field_validator("namespaces", "image_pull_secrets", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                value = json.loads(text)
            else:
                value = [part.strip() for part in text.split(",") if part.strip()]
        return tuple(value)

    @model_validator(mode="after")
    def _lease_timing(self) -> OperatorSettings:
        lease, renew, retry = (self.leader_election_lease_seconds, self.leader_election_renew_deadline_seconds,
                               self.leader_election_retry_seconds)
        if not lease > renew > 1.2 * retry:
            raise ValueError(
                "leader_election_lease_seconds > leader_election_renew_deadline_seconds > 1.2 x "
                f"leader_election_retry_seconds must hold (got {lease}, {renew}, {retry})"
            )
        return self

    @property
    def clusterwide(self) -> bool:
        """True when the operator watches every namespace."""
        return self.all_namespaces or not self.namespaces

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> OperatorSettings:
        """Settings from ``QLORA_OPERATOR_<FIELD>`` variables, then ``overrides`` (flags; None = unset).

        Raises:
            SettingsError: naming the variable or flag and what it must be.
        """
        env = os.environ if env is None else env
        data: dict[str, Any] = {}
        for name in cls.model_fields:
            key = ENV_PREFIX + name.upper()
            if key in env and env[key] != "":
                data[name] = env[key]
        for name, value in overrides.items():
            if name not in cls.model_fields:
                raise SettingsError(f"unknown operator setting {name!r}")
            if value is None or (isinstance(value, (list, tuple)) and not value):
                continue
            data[name] = value
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            lines = []
            for item in err.errors():
                field = str(item["loc"][0]) if item["loc"] else "?"
                lines.append(
                    f"{field} (env {ENV_PREFIX}{field.upper()}, flag --{field.replace('_', '-')}): {item['msg']}"
                )
            raise SettingsError("invalid operator settings: " + "; ".join(lines)) from None
