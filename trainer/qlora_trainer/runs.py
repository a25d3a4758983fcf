"""Which run this trainer is, where that run's files go, and which checkpoints it may resume.

A QLoRAJob has runs 1, 2, ... (the operator starts run N+1 when a training field of a
finished or suspended run changes, e.g. by GitOps). Every run owns one prefix under
``spec.output.uri``, so a new run can never resume, prune or overwrite what an earlier
one wrote (issue 15):

=====================================  ==================================================
``<output>/run-<N>/checkpoints/step-S/``  checkpoints of run N, ``qlora_state.json`` in each
``<output>/run-<N>/adapter/``            the adapter of run N, ``manifest.json``, ``_SUCCESS`` last
``<output>/run-<N>/merged/``             the merged model of run N (``output.merge.enabled``)
``<output>/run-<N>/export/<fmt>/``       exports of run N (``output.export``: gguf-<quant>, vllm), marker last each
``<output>/run-<N>/refused/step-S/``     checkpoints found under run N that it could not use,
                                         moved aside (kept, never loaded or pruned)
=====================================  ==================================================

The run number comes from ``QLORA_TRAINING_RUN`` (the operator sets it on the pod: the
Job's run, or for a group restart of a multi-node job the run the chain began with, so
the restart resumes that run's checkpoints; a standalone ``qlora-train`` is run 1), the
generation it started from from ``QLORA_GENERATION``, the QLoRAJob from
``QLORA_JOB_NAMESPACE``/``QLORA_JOB_NAME``/``QLORA_JOB_UID``.

Each checkpoint records its run, its QLoRAJob and a config **fingerprint**: SHA-256
digests of the base model (URI, revision, per-file checksums), the data (files and
checksums, and the dataset settings), the LoRA shape and targets, the quantization
and the training settings. A retry, a preemption or a suspend/resume of the same run
resumes from the newest checkpoint whose run, job and fingerprint all match; the
decision (:func:`decide_resume`) is made from the small ``qlora_state.json`` files
before any weight is loaded. Anything else in the run's prefix is refused, named in
the log, the manifest and the pod's attempt, and moved to ``refused/``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import contract
from .config import TrainingConfig
from .storage import Checkpoint, join_uri

#: Parts of the fingerprint, in the order a mismatch names them.
FINGERPRINT_PARTS = ("model", "data", "lora", "quantization", "training")


def _sha256(value: Any) -> str:
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def _env_int(name: str) -> int | None:
    try:
        value = int(os.environ.get(name, ""))
    except ValueError:
        return None
    return value if value >= 0 else None


@dataclass(frozen=True)
class RunIdentity:
    """Run ``run`` (>= 1) of the QLoRAJob ``namespace/name`` (``uid``), started from ``generation``.

    ``namespace``, ``name``, ``uid`` and ``generation`` are ``None`` outside the operator.
    """

    run: int = 1
    generation: int | None = None
    namespace: str | None = None
    name: str | None = None
    uid: str | None = None

    @classmethod
    def from_env(cls) -> RunIdentity:
        """From ``QLORA_TRAINING_RUN`` (else ``QLORA_RUN``, else 1), ``QLORA_GENERATION``,
        ``QLORA_JOB_NAMESPACE/NAME/UID``."""
        return cls(
            run=max(1, _env_int(contract.ENV_TRAINING_RUN) or _env_int(contract.ENV_RUN) or 1),
            generation=_env_int(contract.ENV_GENERATION),
            namespace=os.environ.get(contract.ENV_JOB_NAMESPACE) or None,
            name=os.environ.get(contract.ENV_JOB_NAME) or None,
            uid=os.environ.get(contract.ENV_JOB_UID) or None,
        )

    def record(self) -> dict[str, Any]:
        """What checkpoints and manifests store: ``{"run", "generation", "job": {namespace, name, uid}}``."""
        return {
            "run": self.run,
            "generation": self.generation,
            "job": {"namespace": self.namespace, "name": self.name, "uid": self.uid},
        }


@dataclass(frozen=True)
class RunLayout:
    """The URIs of one run under ``spec.output.uri`` (see the module docstring)."""

    output: str
    run: int

    @property
    def root(self) -> str:
        return join_uri(self.output, contract.run_dir(self.run))

    @property
    def checkpoints(self) -> str:
        return join_uri(self.root, contract.CHECKPOINTS_DIR)

    @property
    def adapter(self) -> str:
        return join_uri(self.root, contract.ADAPTER_DIR)

    @property
    def merged(self) -> str:
        return join_uri(self.root, contract.MERGED_DIR)

    @property
    def export(self) -> str:
        """``<output>/run-<N>/export``: one ``<format>[-<quantization>]/`` per ``output.export`` entry."""
        return join_uri(self.root, contract.EXPORT_DIR)

    @property
    def refused(self) -> str:
        return join_uri(self.root, contract.REFUSED_DIR)

    def of_run(self, run: int) -> RunLayout:
        """The layout of another run under the same output."""
        return RunLayout(self.output, run)


def run_of_prefix(name: str) -> int | None:
    """``run-7`` -> 7; anything else -> None."""
    return contract.run_of_dir(name)


def fingerprint(cfg: TrainingConfig, base_lineage: Mapping[str, Any], data_lineage: Mapping[str, Any]) -> dict[str, Any]:
    """``{"digest": ..., "parts": {model, data, lora, quantization, training}}`` of what training depends on.

    ``base_lineage`` / ``data_lineage``: what ``inputs`` returns (URIs with per-file
    ETags or SHA-256). Output, storage and credentials are not part of it: moving the
    output prefix or rotating keys does not change what a checkpoint holds.
    """
    dump = cfg.model_dump(mode="json", by_alias=True)
    parts = {
        "model": _sha256({"source": dump["model"], "files": base_lineage.get("digest") or base_lineage.get("files")}),
        "data": _sha256({"settings": dump["dataset"], "lineage": data_lineage}),
        "lora": _sha256(dump["lora"]),
        "quantization": _sha256(dump["quantization"]),
        "training": _sha256(dump["training"]),
    }
    return {"digest": _sha256(parts), "parts": parts}


@dataclass(frozen=True)
class Refusal:
    """A checkpoint of this run's prefix that may not be resumed, and why (one sentence)."""

    step: int
    uri: str
    why: str


@dataclass
class ResumeDecision:
    """What :func:`decide_resume` chose.

    ``checkpoint``: the one to resume (``None``: start from step 0); ``state``: its
    ``qlora_state.json``; ``refused``: the others that may not be used; ``previous``:
    the newest earlier run that left checkpoints (for the "started fresh" note).
    """

    checkpoint: Checkpoint | None
    state: dict[str, Any] = field(default_factory=dict)
    refused: list[Refusal] = field(default_factory=list)
    previous: int | None = None

    @property
    def decision(self) -> str:
        """``Resumed`` or ``StartedFresh``."""
        return contract.CHECKPOINT_RESUMED if self.checkpoint is not None else contract.CHECKPOINT_STARTED_FRESH

    def message(self, identity: RunIdentity) -> str:
        """One line for the log, the manifest, the pod's attempt and an Event."""
        if self.checkpoint is not None:
            text = f"resumed run {identity.run} from its checkpoint at step {self.checkpoint.step}"
        else:
            text = f"run {identity.run} started fresh at step 0"
            if self.previous is not None:
                text = f"started fresh: previous checkpoints belong to run {self.previous}; " + text
        if self.refused:
            listed = "; ".join(f"{contract.checkpoint_dir(r.step)}: {r.why}" for r in self.refused[:4])
            more = f" (and {len(self.refused) - 4} more)" if len(self.refused) > 4 else ""
            text += f"; refused {len(self.refused)} checkpoint(s) under run {identity.run}: {listed}{more}"
        return text

    def record(self, identity: RunIdentity) -> dict[str, Any]:
        """The manifest's ``run.checkpoints``."""
        return {
            "decision": self.decision,
            "fromStep": self.checkpoint.step if self.checkpoint else None,
            "message": self.message(identity),
            "refused": [{"step": r.step, "why": r.why} for r in self.refused],
            "previousRunWithCheckpoints": self.previous,
        }


def incompatibility(state: Mapping[str, Any] | None, identity: RunIdentity, expected: Mapping[str, Any]) -> str | None:
    """Why a checkpoint with run metadata ``state`` may not be resumed by this run; ``None`` when it may.

    ``expected``: this run's :func:`fingerprint`. Checked in order: metadata present,
    written by this run number, by this QLoRAJob (uid, when both know it), same fingerprint.
    """
    if not state:
        return "no qlora_state.json: not written by this trainer version"
    owner = state.get("owner") or {}
    if owner.get("run") != identity.run:
        return f"written by run {owner.get('run', 'unknown')}, not run {identity.run}"
    theirs_uid, ours_uid = (owner.get("job") or {}).get("uid"), identity.uid
    if theirs_uid and ours_uid and theirs_uid != ours_uid:
        job = owner.get("job") or {}
        return f"written by another QLoRAJob ({job.get('namespace')}/{job.get('name')}, uid {theirs_uid})"
    theirs = state.get("fingerprint") or {}
    if theirs.get("digest") == expected.get("digest"):
        return None
    differ = [p for p in FINGERPRINT_PARTS if (theirs.get("parts") or {}).get(p) != expected["parts"][p]]
    return "config fingerprint differs in " + (", ".join(differ) if differ else "its digest")


def decide_resume(
    candidates: Sequence[tuple[Checkpoint, Mapping[str, Any] | None]],
    identity: RunIdentity,
    expected: Mapping[str, Any],
    previous: int | None = None,
) -> ResumeDecision:
    """The newest compatible checkpoint of ``candidates`` (complete ones, any order, each with its
    ``qlora_state.json`` or ``None``); every incompatible one is refused. Pure."""
    decision = ResumeDecision(None, previous=previous)
    for ckpt, state in sorted(candidates, key=lambda c: c[0].step, reverse=True):
        why = incompatibility(state, identity, expected)
        if why is not None:
            decision.refused.append(Refusal(ckpt.step, ckpt.uri, why))
        elif decision.checkpoint is None:
            decision.checkpoint, decision.state = ckpt, dict(state or {})
    decision.refused.sort(key=lambda r: r.step)
    return decision
