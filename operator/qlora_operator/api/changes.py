"""Spec changes during a run: which fields are fixed while ``Running=True`` and what a change means.

Training fields are fixed while a run is active (condition ``Running=True``): the CRD
refuses such an update with a CEL transition rule at the object root, and
:func:`training_fields_changed` lets the operator apply the same rule (and decide what
a changed spec on a finished or suspended job means).
"""

from __future__ import annotations

from typing import Any

from qlora_operator.api.spec import QLoRAJobSpec
from qlora_operator.api.status import ConditionType, QLoRAJobStatus

# --- changes during a run -----------------------------------------------------

#: Spec fields (camelCase paths) that may change while a run is active; every other
#: field is fixed for the run. The CRD's transition rule and
#: :func:`training_fields_changed` are both derived from this tuple.
MUTABLE_WHILE_ACTIVE = (
    "runPolicy.suspend",
    "runPolicy.activeDeadlineSeconds",
    "runPolicy.ttlSecondsAfterFinished",
    "scheduling",
)


def _spec_dicts(*specs: QLoRAJobSpec | dict[str, Any] | None) -> list[dict[str, Any]]:
    """Specs as plain camelCase dicts: with defaults filled in when all are valid (so an
    absent field equals its default), else as written (an invalid spec has no defaults)."""
    try:
        parsed = [s if isinstance(s, QLoRAJobSpec) else QLoRAJobSpec.model_validate(s or {}) for s in specs]
    except Exception:
        return [
            s.model_dump(by_alias=True, mode="json", exclude_none=True) if isinstance(s, QLoRAJobSpec) else dict(s or {})
            for s in specs
        ]
    return [p.model_dump(by_alias=True, mode="json", exclude_none=True) for p in parsed]


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            if value is not None:  # null == absent
                out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: data}


def _is_mutable(path: str) -> bool:
    return any(path == p or path.startswith(p + ".") for p in MUTABLE_WHILE_ACTIVE)


def training_fields_changed(
    old_spec: QLoRAJobSpec | dict[str, Any] | None, new_spec: QLoRAJobSpec | dict[str, Any] | None
) -> list[str]:
    """Paths (``spec.lora.r``, ...) of fields that differ and are fixed during a run.

    Both specs are compared after defaulting, so ``{}`` and the defaults are equal;
    lists compare as a whole. Fields in :data:`MUTABLE_WHILE_ACTIVE` (suspension,
    deadlines, TTL, scheduling) are ignored. Sorted; empty when nothing that matters
    changed. The operator uses it on a spec change while :func:`run_is_active`.
    """
    old, new = (_flatten(d) for d in _spec_dicts(old_spec, new_spec))
    missing = object()
    changed = {
        path
        for path in old.keys() | new.keys()
        if old.get(path, missing) != new.get(path, missing) and not _is_mutable(path)
    }
    return sorted(f"spec.{path}" for path in changed)


#: Fields fixed during a run whose change on a finished or suspended job still starts no
#: new run: they decide how the operator retries a run, which Secret holds the keys and
#: the pod's identity and plumbing (``pod``), not what is trained (a new ``backoffLimit``
#: or pull Secret applies from the next run).
NOT_STARTING_A_RUN = ("runPolicy", "storage.credentialsSecretRef", "tracking.mlflow.credentialsSecretRef", "pod")


def run_fields_changed(
    old_spec: QLoRAJobSpec | dict[str, Any] | None, new_spec: QLoRAJobSpec | dict[str, Any] | None
) -> list[str]:
    """Paths of changed fields that start a new run: :func:`training_fields_changed` without
    :data:`NOT_STARTING_A_RUN`.

    What starts a run: model, dataset, quantization, lora, training, output, the storage
    endpoint, resources (the world size shapes the optimisation; more memory is how an
    OOMKilled run is retried) and image (the program that trains). What does not: the
    identical manifest again, a reordering of keys (specs compare as parsed values, with
    defaults filled in), labels and annotations (not in the spec), the credentials Secret,
    and every ``runPolicy``, ``scheduling`` and ``pod`` field.
    """
    return [
        path
        for path in training_fields_changed(old_spec, new_spec)
        if not any(path == f"spec.{p}" or path.startswith(f"spec.{p}.") for p in NOT_STARTING_A_RUN)
    ]


def run_is_active(status: QLoRAJobStatus | dict[str, Any] | None) -> bool:
    """True when the ``Running`` condition is ``True`` (the CRD's transition rule tests the same)."""
    if status is None:
        return False
    if isinstance(status, QLoRAJobStatus):
        conditions = [c.model_dump(by_alias=True) for c in status.conditions]
    else:
        conditions = status.get("conditions") or []
    return any(c.get("type") == ConditionType.running.value and c.get("status") == "True" for c in conditions)


__all__ = [
    "MUTABLE_WHILE_ACTIVE",
    "NOT_STARTING_A_RUN",
    "run_fields_changed",
    "run_is_active",
    "training_fields_changed",
]
