"""``spec.pod``: identity and plumbing of trainer pods (ServiceAccount annotations, pull
Secrets, RuntimeClass, extra env, volumes and mounts).

The checks that depend on what the operator renders (its own env names, volumes and mount
paths) live in :mod:`qlora_operator.render`; :class:`PodSettings` calls them lazily, at
validation time, and the CEL rules of those fields read render's names when the schema
is generated (render imports the API).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Annotated, Any

from pydantic import ConfigDict, Field, model_validator

from qlora_operator.api.patterns import (
    DNS_LABEL,
    DNS_SUBDOMAIN,
    LABEL_KEY,
    MSG_DNS_LABEL,
    MSG_DNS_SUBDOMAIN,
    PASS_THROUGH,
    Quantity,
)
from qlora_trainer import contract
from qlora_trainer.config import (
    CEL_RULES,
    ApiModel,
    cel_disjoint,
    cel_list,
    cel_prefix,
    cel_rule,
    cel_rules,
    pattern_check,
)

#: An environment variable name (the rule every supported Kubernetes version accepts).
ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
#: An absolute container path.
MOUNT_PATH = r"^/[^:]*$"
#: Annotation keys under this prefix are the operator's own.
OPERATOR_ANNOTATION_PREFIX = f"{contract.API_GROUP}/"

MSG_ENV_NAME = "must be an environment variable name (letters, digits, '_', '-', '.'; not a digit first)"
MSG_MOUNT_PATH = "must be an absolute path without ':' such as /data"
MSG_ANNOTATION_KEY = "must be an annotation key such as eks.amazonaws.com/role-arn"
MSG_ENV_VALUE_AND_VALUE_FROM = "pod.env: set value or valueFrom, not both"
MSG_ENV_ONE_SOURCE = (
    "pod.env[].valueFrom: set exactly one of secretKeyRef, configMapKeyRef, fieldRef, resourceFieldRef"
)
MSG_SA_ANNOTATION_RESERVED = (
    f"pod.serviceAccountAnnotations: keys under {OPERATOR_ANNOTATION_PREFIX} are the operator's own: use another key"
)
MSG_MOUNT_UNKNOWN_VOLUME = "pod.volumeMounts[].name must name a volume of pod.volumes"

def _list_map(key: str) -> dict[str, Any]:
    """``x-kubernetes-list-type: map`` keyed by ``key`` (one entry per value of ``key``)."""
    return {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": [key]}


def _rule_from_render(rule: Callable[[ModuleType], dict[str, str]], **extra: Any) -> Callable[[dict[str, Any]], None]:
    """``json_schema_extra`` of a field whose CEL rule names what render renders (the operator's
    env names, volumes, mounts): ``rule(render)`` is built when the schema is generated, as
    :meth:`PodSettings._no_collisions` calls render at validation (render imports this module).
    ``extra``: further schema keys of the field (its list type)."""

    def add(schema: dict[str, Any]) -> None:
        from qlora_operator import render  # render imports this module: resolve at schema time

        schema.update(extra)
        schema[CEL_RULES] = [rule(render)]

    return add


def _env_reserved(render: ModuleType) -> dict[str, str]:
    names = cel_list(render.reserved_env_names())
    return cel_rule(
        f"self.all(e, !e.name.startsWith('{render.RESERVED_ENV_PREFIX}') && !(e.name in {names}))",
        render.msg_env_reserved(),
    )


def _volume_reserved(render: ModuleType) -> dict[str, str]:
    names = cel_list(render.reserved_volume_names())
    return cel_rule(f"self.all(v, !(v.name in {names}))", render.msg_volume_reserved())


def _mount_reserved(render: ModuleType) -> dict[str, str]:
    # as render.mount_path_collides: the mount's path as a prefix against each reserved path + '/'
    reserved = cel_list(tuple(p + "/" for p in render.reserved_mount_paths()))
    return cel_rule(
        f"self.all(m, {reserved}.all(p, " + cel_disjoint(cel_prefix("m.mountPath"), "p") + "))",
        render.msg_mount_reserved(),
    )


_ShortName = Annotated[
    str,
    Field(min_length=1, max_length=253, json_schema_extra={"pattern": DNS_SUBDOMAIN}),
    pattern_check(DNS_SUBDOMAIN, MSG_DNS_SUBDOMAIN),
]
_VolumeName = Annotated[
    str,
    Field(min_length=1, max_length=63, json_schema_extra={"pattern": DNS_LABEL}),
    pattern_check(DNS_LABEL, MSG_DNS_LABEL),
]
_MountPath = Annotated[
    str,
    Field(min_length=1, max_length=1024, json_schema_extra={"pattern": MOUNT_PATH}),
    pattern_check(MOUNT_PATH, MSG_MOUNT_PATH),
]



class KeySelector(ApiModel):
    """A key of a Secret or ConfigMap in the job's own namespace (no namespace field)."""

    name: _ShortName = Field(description="Secret or ConfigMap name, in the QLoRAJob's namespace.")
    key: Annotated[str, Field(min_length=1, max_length=253)] = Field(description="The key to read.")
    optional: bool | None = Field(
        default=None, description="true: the variable is unset when the object or key is missing. Default false."
    )


class FieldRef(ApiModel):
    """core/v1 ``ObjectFieldSelector``: a field of the trainer pod (downward API)."""

    field_path: Annotated[str, Field(min_length=1, max_length=256)] = Field(
        description="Pod field, e.g. metadata.name, spec.nodeName, status.podIP."
    )
    api_version: Annotated[str, Field(max_length=64)] | None = Field(
        default=None, description="Version of the field path's schema. Default v1."
    )


class ResourceFieldRef(ApiModel):
    """core/v1 ``ResourceFieldSelector``: a request or limit of the trainer container."""

    resource: Annotated[str, Field(min_length=1, max_length=256)] = Field(
        description="limits.cpu, limits.memory, requests.cpu, requests.memory, ..."
    )
    divisor: Quantity | None = Field(default=None, description="Unit of the value, e.g. 1Mi. Default 1.")


class EnvVarSource(ApiModel):
    """Where an extra variable's value comes from; exactly one source."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            cel_rule(
                "[has(self.secretKeyRef), has(self.configMapKeyRef), has(self.fieldRef), has(self.resourceFieldRef)]"
                ".filter(x, x).size() == 1",
                MSG_ENV_ONE_SOURCE,
            ),
        )
    )

    secret_key_ref: KeySelector | None = Field(default=None, description="A key of a Secret in the job's namespace.")
    config_map_key_ref: KeySelector | None = Field(
        default=None, description="A key of a ConfigMap in the job's namespace."
    )
    field_ref: FieldRef | None = Field(default=None, description="A field of the pod (downward API).")
    resource_field_ref: ResourceFieldRef | None = Field(
        default=None, description="A resource request or limit of the trainer container."
    )

    @model_validator(mode="after")
    def _one_source(self) -> EnvVarSource:
        sources = (self.secret_key_ref, self.config_map_key_ref, self.field_ref, self.resource_field_ref)
        if sum(s is not None for s in sources) != 1:
            raise ValueError(MSG_ENV_ONE_SOURCE)
        return self


class EnvVar(ApiModel):
    """An extra environment variable of the trainer container (core/v1 ``EnvVar``)."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(cel_rule("!(has(self.value) && has(self.valueFrom))", MSG_ENV_VALUE_AND_VALUE_FROM))
    )

    name: Annotated[
        str, Field(min_length=1, max_length=256, json_schema_extra={"pattern": ENV_NAME}), pattern_check(ENV_NAME, MSG_ENV_NAME)
    ] = Field(description="Variable name; the operator's own names (QLORA_*, the S3 credentials, ...) are refused.")
    value: Annotated[str, Field(max_length=32768)] | None = Field(
        default=None,
        description="Literal value; $(VAR) expands the operator's variables and earlier extra ones.",
    )
    value_from: EnvVarSource | None = Field(default=None, description="Value from a Secret, ConfigMap or the pod.")

    @model_validator(mode="after")
    def _value_or_source(self) -> EnvVar:
        if self.value is not None and self.value_from is not None:
            raise ValueError(MSG_ENV_VALUE_AND_VALUE_FROM)
        return self


class Volume(ApiModel):
    """An extra pod volume (core/v1 ``Volume``): ``name`` plus one volume source, passed as written.

    E.g. ``{name: models, persistentVolumeClaim: {claimName: models, readOnly: true}}``;
    the API server checks the source when the operator creates the Job, and the
    namespace's Pod Security level applies (``restricted`` refuses ``hostPath``).
    """

    model_config = ConfigDict(extra="allow", json_schema_extra=PASS_THROUGH)

    name: _VolumeName = Field(description="Volume name (a DNS label); the operator's own volume names are refused.")


class VolumeMount(ApiModel):
    """Where the trainer container mounts an extra volume (core/v1 ``VolumeMount``)."""

    name: _VolumeName = Field(description="A volume of pod.volumes.")
    mount_path: _MountPath = Field(
        description="Absolute path in the container; may not be, contain or lie under the operator's mounts."
    )
    read_only: bool | None = Field(default=None, description="Mount read-only. Default false.")
    sub_path: Annotated[str, Field(max_length=1024)] | None = Field(
        default=None, description="Path within the volume to mount instead of its root."
    )


class PodSettings(ApiModel):
    """Identity and pod plumbing of trainer pods: no effect on what is trained.

    Fixed while a run is active (a Job's pod template is immutable); a change on a
    finished or suspended job starts no run and applies from the next one.
    """

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            cel_rule(
                "!has(self.volumeMounts)"
                " || self.volumeMounts.all(m, has(self.volumes) && self.volumes.exists(v, v.name == m.name))",
                MSG_MOUNT_UNKNOWN_VOLUME,
                fieldPath=".volumeMounts",
            ),
        )
    )

    service_account_annotations: Annotated[
        dict[
            Annotated[str, Field(max_length=317), pattern_check(LABEL_KEY, MSG_ANNOTATION_KEY)],
            Annotated[str, Field(max_length=4096)],
        ],
        Field(max_length=32),
    ] = Field(
        default_factory=dict,
        description=(
            "Annotations of the trainer's ServiceAccount <job>-trainer, over the chart's "
            "trainer.serviceAccountAnnotations: IRSA (eks.amazonaws.com/role-arn) or GKE Workload Identity "
            "(iam.gke.io/gcp-service-account). At most 32; keys under qlora.dev/ are refused."
        ),
        json_schema_extra=cel_rules(
            cel_rule(f"self.all(k, !k.startsWith('{OPERATOR_ANNOTATION_PREFIX}'))", MSG_SA_ANNOTATION_RESERVED),
            cel_rule(
                f"self.all(k, k.size() <= 317 && k.matches(r'{LABEL_KEY}'))",
                f"pod.serviceAccountAnnotations: keys {MSG_ANNOTATION_KEY}",
            ),
        ),
    )
    image_pull_secrets: Annotated[list[_ShortName], Field(max_length=16)] = Field(
        default_factory=list,
        description=(
            "Secrets (same namespace, type kubernetes.io/dockerconfigjson) to pull the trainer image with, "
            "after the chart's trainer.imagePullSecrets. At most 16."
        ),
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    runtime_class_name: _ShortName | None = Field(
        default=None, description="RuntimeClass of trainer pods (e.g. nvidia). Unset: the cluster default."
    )
    env: Annotated[list[EnvVar], Field(max_length=64)] = Field(
        default_factory=list,
        description=(
            "Extra environment variables of the trainer container, after the operator's (at most 64). "
            "The operator's own names are refused (QLORA_*, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
            "AWS_SESSION_TOKEN, HOME, TMPDIR, HF_HOME, PYTHONUNBUFFERED)."
        ),
        json_schema_extra=_rule_from_render(_env_reserved, **_list_map("name")),
    )
    volumes: Annotated[list[Volume], Field(max_length=32)] = Field(
        default_factory=list,
        description=(
            "Extra pod volumes (core/v1 Volume: name plus one source, e.g. persistentVolumeClaim), at most 32. "
            "A PVC mounted with volumeMounts serves file:// model, data or output URIs. The operator's own "
            "volume names (config, cache, tmp, dshm) are refused."
        ),
        json_schema_extra=_rule_from_render(_volume_reserved, **_list_map("name")),
    )
    volume_mounts: Annotated[list[VolumeMount], Field(max_length=32)] = Field(
        default_factory=list,
        description=(
            "Mounts of pod.volumes in the trainer container, at most 32. The operator's mount paths "
            "(/etc/qlora, /cache, /tmp, /dev/shm, /dev/termination-log) and paths under or above them are refused."
        ),
        json_schema_extra=_rule_from_render(_mount_reserved, **_list_map("mountPath")),
    )

    @model_validator(mode="after")
    def _no_collisions(self) -> PodSettings:
        from qlora_operator import render  # render imports this module: resolve at validation time

        problems = render.pod_settings_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self


__all__ = [
    "ENV_NAME",
    "EnvVar",
    "EnvVarSource",
    "FieldRef",
    "KeySelector",
    "MOUNT_PATH",
    "MSG_ANNOTATION_KEY",
    "MSG_ENV_NAME",
    "MSG_ENV_ONE_SOURCE",
    "MSG_ENV_VALUE_AND_VALUE_FROM",
    "MSG_MOUNT_PATH",
    "MSG_MOUNT_UNKNOWN_VOLUME",
    "MSG_SA_ANNOTATION_RESERVED",
    "OPERATOR_ANNOTATION_PREFIX",
    "PodSettings",
    "ResourceFieldRef",
    "Volume",
    "VolumeMount",
]
