"""Names, labels and annotations of a QLoRAJob's children, and what they record.

Every child gets a deterministic name (:func:`child_name`: ``<job>-<suffix>``, shortened
with a hash when too long), the ``qlora.dev/job`` label (:func:`labels`) and a controller
owner reference to the QLoRAJob (:func:`child_metadata`). A run's ConfigMap and Job record
the spec they were rendered from (:func:`run_annotations`, read back by
:func:`recorded_spec`); a group run's Job records its place in a chain of group restarts
(:class:`GroupAttempt`). Also the paths and numbers the pod and the Jobs share.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qlora_operator.api import API_VERSION, KIND, QLoRAJobSpec
from qlora_trainer import contract

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


def child_metadata(body: Mapping[str, Any], name: str, run: int | None = None, **annotations: str) -> dict[str, Any]:
    """``metadata`` of the child ``name`` of the QLoRAJob ``body``: its namespace, :func:`labels`
    (with ``qlora.dev/run`` when ``run`` is given), the ``qlora.dev/job-name`` annotation plus
    ``annotations``, and the controller :func:`owner_reference`."""
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


def run_annotations(body: Mapping[str, Any], spec: QLoRAJobSpec) -> dict[str, str]:
    """What a run's ConfigMap and Job record: the spec (:func:`spec_json`), its hash (16 hex digits
    of SHA-256) and the QLoRAJob's ``metadata.generation``."""
    text = spec_json(spec)
    return {
        ANN_SPEC: text,
        ANN_SPEC_HASH: _digest(text, 16),
        ANN_GENERATION: str(body["metadata"].get("generation", 1)),
    }


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


__all__ = [
    "ANN_GENERATION",
    "ANN_GROUP_ATTEMPT",
    "ANN_GROUP_FAILURES",
    "ANN_JOB",
    "ANN_MANAGED_ANNOTATIONS",
    "ANN_RESTART_OF",
    "ANN_SPEC",
    "ANN_SPEC_HASH",
    "ANN_TRAINING_RUN",
    "ANN_USER_SUSPENDED",
    "CACHE_DIR",
    "COMPLETION_INDEX",
    "CONFIG_DIR",
    "CONFIG_FILE",
    "CONTAINER",
    "FAIL_JOB_EXIT_CODES",
    "GroupAttempt",
    "KUEUE_QUEUE_LABEL",
    "LABEL_JOB",
    "LABEL_RUN",
    "MASTER_PORT",
    "MAX_JOB_NAME",
    "MAX_NAME",
    "PERMANENT_EXIT_CODES",
    "RESERVED_ENV_PREFIX",
    "RUN_AS_USER",
    "SHM_DIR",
    "TERMINATION_MESSAGE_PATH",
    "TMP_DIR",
    "canonical_spec",
    "child_metadata",
    "child_name",
    "config_map_name",
    "group_attempt_of",
    "job_name",
    "job_nodes",
    "label_value",
    "labels",
    "master_addr",
    "owner_reference",
    "pod_node_index",
    "recorded_spec",
    "run_annotations",
    "run_of",
    "service_name",
    "spec_json",
    "trainer_name",
]
