"""Spec changes during a run: which fields are fixed while ``Running=True`` and what a change means.

Training fields are fixed while a run is active (condition ``Running=True``): the CRD
refuses such an update with CEL transition rules at the object root
(:func:`transition_rules`, one per :func:`fixed_during_run` field), and
:func:`training_fields_changed` lets the operator apply the same rule (and decide what
a changed spec on a finished or suspended job means).

A transition rule at the root sees ``oldSelf.status`` (on a main-resource update the API
server carries the stored status over, so ``self.status == oldSelf.status``), which is
how the rule can depend on the run state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qlora_operator.api.spec import QLoRAJobSpec
from qlora_operator.api.status import ConditionType, QLoRAJobStatus
from qlora_trainer.config import cel_rule

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


def fixed_during_run() -> list[str]:
    """Spec paths (camelCase, ``lora``, ``runPolicy.backoffLimit``) fixed while a run is active:
    every top-level spec field, except that a section with a :data:`MUTABLE_WHILE_ACTIVE`
    field is listed field by field without those. In the order of :class:`QLoRAJobSpec`'s fields."""
    paths = []
    for name, field in QLoRAJobSpec.model_fields.items():
        alias = field.alias or name
        if any(m == alias or m.startswith(alias + ".") for m in MUTABLE_WHILE_ACTIVE):
            if alias in MUTABLE_WHILE_ACTIVE:
                continue  # the whole section may change
            sub = field.annotation
            for sub_name, sub_field in sub.model_fields.items():  # type: ignore[union-attr]
                path = f"{alias}.{sub_field.alias or sub_name}"
                if path not in MUTABLE_WHILE_ACTIVE:
                    paths.append(path)
        else:
            paths.append(alias)
    return paths


def _has_chain(root: str, path: str) -> str:
    parts = path.split(".")
    return " && ".join(f"has({root}.{'.'.join(parts[: i + 1])})" for i in range(len(parts)))


def _same(path: str, always_present: bool) -> str:
    """CEL: spec field ``path`` is unchanged between ``oldSelf`` and ``self`` (absent == absent)."""
    if always_present:
        return f"self.spec.{path} == oldSelf.spec.{path}"
    new, old = _has_chain("self.spec", path), _has_chain("oldSelf.spec", path)
    return f"(({new}) ? (({old}) && self.spec.{path} == oldSelf.spec.{path}) : !({old}))"


#: CEL: the stored object's run is active (as :func:`run_is_active`).
_ACTIVE = (
    "has(oldSelf.status) && has(oldSelf.status.conditions)"
    " && oldSelf.status.conditions.exists(c, c.type == 'Running' && c.status == 'True')"
)


def transition_rules(always_present: Callable[[str], bool]) -> list[dict[str, str]]:
    """The CRD's transition rules at the object root: one per :func:`fixed_during_run` path,
    refusing a change while the stored object's run is active.

    ``always_present(path)``: whether the schema makes ``spec.<path>`` present after
    defaulting (required or defaulted all the way down), so the rule may compare without
    ``has()``. One rule per field (rather than one rule with a ``messageExpression``
    listing the changed fields, which the API server's cost estimator refuses at the
    root) so each refusal names its field.
    """
    return [
        cel_rule(
            f"!({_ACTIVE}) || {_same(path, always_present(path))}",
            f"spec.{path} cannot change while a run is active (condition Running=True): "
            "suspend the job (spec.runPolicy.suspend: true) or wait until it finishes",
            fieldPath=f".spec.{path}",
            reason="FieldValueForbidden",
        )
        for path in fixed_during_run()
    ]


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
    "fixed_during_run",
    "run_fields_changed",
    "run_is_active",
    "training_fields_changed",
    "transition_rules",
]
