"""What a run's fit-check Job says (pure): running, fits, or why the run must not start.

A QLoRAJob with ``spec.resources.gpuMemoryGiB`` gets, before its GPU Job, a CPU-only Job
(:func:`render.render_fitcheck_job`) running ``qlora-train fitcheck``: it reads only the
model's ``config.json`` and runs the trainer's memory estimate for the requested GPUs
(:mod:`qlora_trainer.fitcheck`). Its result is the pod's JSON termination message::

    {"exitCode": 7, "reason": "InsufficientGPUMemory", "message": "...", "fitCheck": {...}}

:func:`read` turns the Job and its pods into a :class:`FitCheck`; the reconcile creates the
GPU Job only for ``state == "fits"`` and fails the run (no GPU requested, no weight read)
for ``state == "failed"``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qlora_operator.api import INSUFFICIENT_GPU_MEMORY
from qlora_operator.attempts import EXIT_REASONS
from qlora_operator.objects import job_result, pod_terminated
from qlora_trainer import contract
from qlora_trainer.contract import parse_termination_message

#: Reason of a fit check that ended without a result the operator can read (its pod never
#: ran, was deleted, or the Job hit its deadline).
FIT_CHECK_FAILED = "FitCheckFailed"
#: Condition reason while the fit check runs (phase Pending).
FIT_CHECKING = "FitChecking"


@dataclass(frozen=True)
class FitCheck:
    """One run's fit check as the cluster shows it.

    ``state``: ``running`` (no result yet), ``fits`` (create the GPU Job; also when the
    estimate does not cover the model, the trainer's in-pod preflight checks again) or
    ``failed`` (``reason``: ``InsufficientGPUMemory``, the trainer's reason for exit 2/4,
    or :data:`FIT_CHECK_FAILED`). ``message``: the trainer's (what would fit, or what could
    not be read). ``seconds``: the check's own run time as the trainer measured it.
    ``read``: the URIs it read (only ``<model>/config.json``).
    """

    job_name: str
    state: str
    reason: str
    message: str
    seconds: float | None = None
    read: tuple[str, ...] = ()


def _result_message(pods: Sequence[Mapping[str, Any]]) -> tuple[int | None, dict[str, Any] | None]:
    """(exit code, parsed termination message) of the newest finished fit-check pod."""
    best: tuple[str, int | None, dict[str, Any] | None] | None = None
    for pod in pods:
        term = pod_terminated(pod)
        if not term:
            continue
        finished = str(term.get("finishedAt") or "")
        if best is None or finished >= best[0]:
            best = (finished, term.get("exitCode"), parse_termination_message(term.get("message")))
    return (best[1], best[2]) if best else (None, None)


def read(job: Mapping[str, Any], pods: Sequence[Mapping[str, Any]]) -> FitCheck:
    """The :class:`FitCheck` of the fit-check ``job`` and its ``pods`` (pure)."""
    name = (job.get("metadata") or {}).get("name") or ""
    outcome, job_reason, job_message = job_result(job)
    code, message = _result_message(pods)
    check = (message or {}).get("fitCheck") or {}
    seconds = check.get("seconds") if isinstance(check.get("seconds"), (int, float)) else None
    read_uris = tuple(str(u) for u in check.get("read") or ())
    text = str((message or {}).get("message") or "")
    if outcome is None:
        return FitCheck(name, "running", FIT_CHECKING, f"fit check Job {name} is running", seconds, read_uris)
    if outcome == "succeeded":
        return FitCheck(name, "fits", contract.FITS, text or "the model fits the requested GPUs", seconds, read_uris)
    if message is not None and code not in (None, contract.EXIT_OK):
        reason = str(message.get("reason") or EXIT_REASONS.get(int(code), FIT_CHECK_FAILED))
        if int(code) == contract.EXIT_DOES_NOT_FIT:
            reason = INSUFFICIENT_GPU_MEMORY
        return FitCheck(name, "failed", reason, text or f"fit check exited {code}", seconds, read_uris)
    why = job_message or job_reason or "no result"
    detail = f" (last exit code {code})" if code is not None else ""
    return FitCheck(name, "failed", FIT_CHECK_FAILED,
                    f"fit check Job {name} failed without a result{detail}: {why}", seconds, read_uris)
