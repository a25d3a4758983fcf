"""The contract between the operator and the trainer pod, written once (DESIGN.md section 4).

Both sides import this module: the operator (:mod:`qlora_operator.render` sets the
environment and the ``podFailurePolicy``, :mod:`qlora_operator.status` reads exit codes,
reasons and the termination message) and the trainer (:mod:`qlora_trainer.errors`,
:mod:`~qlora_trainer.distributed`, :mod:`~qlora_trainer.report`, :mod:`~qlora_trainer.runs`).
It imports only the standard library, like :mod:`qlora_trainer.config`, so the operator
never loads the trainer's stack through it.

Five parts:

* **Environment** (``ENV_*``): the ``QLORA_*`` variables the operator sets on every trainer
  pod (and ``QLORA_SA_TOKEN_DIR`` for a process outside a pod); all are optional for a
  standalone ``qlora-train``.
* **Exit codes** (:data:`EXIT_CODES`): code, termination reason, retry class, meaning.
* **Termination message** (:class:`TerminationMessage`): the JSON the trainer writes to
  ``terminationMessagePath`` (under :data:`TERMINATION_LIMIT` bytes), read back from the
  pod status by the operator (:func:`parse_termination_message`).
* **Progress**: the trainer merge-patches ``.status.progress`` of its own QLoRAJob
  (:data:`API_GROUP`, :data:`API_VERSION`, :data:`PLURAL`); ``progress.stage`` is one of
  :data:`STAGES`.
* **Output layout**: the names under ``spec.output.uri`` (``run-<N>/`` with ``adapter/``,
  ``merged/``, ``checkpoints/step-S/``, ``export/``, ``refused/``, ``tensorboard/``; a
  ``_SUCCESS`` marker last in each published prefix).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypedDict

# --- environment of the trainer pod ------------------------------------------------------

#: Every name under this prefix is the contract's: ``spec.pod.env`` may not set one.
ENV_PREFIX = "QLORA_"
#: The QLoRAJob (name, namespace from the downward API, uid) and the pod's own name.
ENV_JOB_NAME = "QLORA_JOB_NAME"
ENV_JOB_NAMESPACE = "QLORA_JOB_NAMESPACE"
ENV_JOB_UID = "QLORA_JOB_UID"
ENV_POD_NAME = "QLORA_POD_NAME"
#: The Job's run (1-based), the training run whose prefix it writes (a group restart
#: continues the run its chain began with), and the generation the run started from.
ENV_RUN = "QLORA_RUN"
ENV_TRAINING_RUN = "QLORA_TRAINING_RUN"
ENV_GENERATION = "QLORA_GENERATION"
#: Where the trainer writes its termination message; the node-local cache directory.
ENV_TERMINATION_MESSAGE_PATH = "QLORA_TERMINATION_MESSAGE_PATH"
ENV_CACHE_DIR = "QLORA_CACHE_DIR"
#: Multi-GPU layout (``qlora_trainer.distributed``): pods, GPUs per pod, this pod's index,
#: node 0's host and rendezvous port.
ENV_NNODES = "QLORA_NNODES"
ENV_NPROC_PER_NODE = "QLORA_NPROC_PER_NODE"
ENV_NODE_RANK = "QLORA_NODE_RANK"
ENV_MASTER_ADDR = "QLORA_MASTER_ADDR"
ENV_MASTER_PORT = "QLORA_MASTER_PORT"
#: Set by the trainer's launcher for its workers: where global rank 0 writes its result.
ENV_WORKER_RESULT = "QLORA_WORKER_RESULT"
#: Outside a pod only (an operator or trainer run as a host process with a ServiceAccount's
#: token): the directory holding ``token`` and ``ca.crt``; unset in a pod (in-cluster configuration).
ENV_SA_TOKEN_DIR = "QLORA_SA_TOKEN_DIR"
#: Where llama.cpp's converter is installed (``output.export`` gguf); the image's default otherwise.
ENV_LLAMA_CPP_DIR = "QLORA_LLAMA_CPP_DIR"

#: ``torchrun``'s rendezvous port on node 0 (``QLORA_MASTER_PORT``).
DEFAULT_MASTER_PORT = 29500

# --- exit codes ---------------------------------------------------------------------------


class Retry(str, Enum):
    """What an exit code means for the next attempt.

    ``success``: nothing to retry. ``permanent``: retrying the same spec cannot help; the
    Job's ``podFailurePolicy`` fails it at once. ``counted``: retried, each failure counted
    against ``runPolicy.backoffLimit`` (a pod disruption is not counted, whatever its code).
    """

    success = "success"
    permanent = "permanent"
    counted = "counted"


@dataclass(frozen=True)
class ExitCode:
    """One exit code of ``qlora-train``.

    Attributes:
        code: the process exit status (0-255; signal N shows as 128+N).
        reason: the termination reason the trainer writes with it (CamelCase).
        retry: the retry class (:class:`Retry`).
        by_code: True when only that reason exits with this code, so the code alone names
            the reason; False for 1 (any unexpected exception or crash) and the signal codes
            137 and 143 (a kill or a SIGTERM from outside exits with them too).
        meaning: one line for people.
    """

    code: int
    reason: str
    retry: Retry
    by_code: bool
    meaning: str


SUCCEEDED = "Succeeded"
TRAINER_ERROR = "TrainerError"
INVALID_CONFIG = "InvalidConfig"
INVALID_DATA = "InvalidData"
STORAGE_ERROR = "StorageError"
CUDA_OOM = "CudaOutOfMemory"
NON_FINITE_LOSS = "NonFiniteLoss"
INSUFFICIENT_GPU_MEMORY = "InsufficientGPUMemory"
MERGE_CHECK_FAILED = "MergeCheckFailed"
KILLED = "Killed"
PREEMPTED = "Preempted"
#: Reasons the trainer writes beside a code of the table: a failed ``output.export`` (exit 1)
#: and a fit check that fits (``qlora-train fitcheck``, exit 0).
EXPORT_FAILED = "ExportFailed"
FITS = "Fits"

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_INVALID_CONFIG = 2
EXIT_INVALID_DATA = 3
EXIT_STORAGE = 4
EXIT_CUDA_OOM = 5
EXIT_NON_FINITE = 6
EXIT_DOES_NOT_FIT = 7
EXIT_MERGE_CHECK = 8
EXIT_KILLED = 137
EXIT_PREEMPTED = 143

#: The table: every exit code of ``qlora-train``, in order.
EXIT_CODES: tuple[ExitCode, ...] = (
    ExitCode(EXIT_OK, SUCCEEDED, Retry.success, True,
             "adapter (and merged model) written, markers last"),
    ExitCode(EXIT_UNEXPECTED, TRAINER_ERROR, Retry.counted, False,
             "an unexpected exception; the message is its type and last line"),
    ExitCode(EXIT_INVALID_CONFIG, INVALID_CONFIG, Retry.permanent, True,
             "the config cannot be used, or <output>/run-<N>/ holds another QLoRAJob's result"),
    ExitCode(EXIT_INVALID_DATA, INVALID_DATA, Retry.permanent, True,
             "a dataset file is malformed or has no usable rows"),
    ExitCode(EXIT_STORAGE, STORAGE_ERROR, Retry.counted, True,
             "an S3 or file operation failed after the trainer's own retries"),
    ExitCode(EXIT_CUDA_OOM, CUDA_OOM, Retry.counted, True,
             "CUDA out of memory at micro-batch 1, after back-offs"),
    ExitCode(EXIT_NON_FINITE, NON_FINITE_LOSS, Retry.permanent, True,
             "loss or gradient norm non-finite N logged steps in a row"),
    ExitCode(EXIT_DOES_NOT_FIT, INSUFFICIENT_GPU_MEMORY, Retry.permanent, True,
             "the memory estimate says training cannot fit these GPUs"),
    ExitCode(EXIT_MERGE_CHECK, MERGE_CHECK_FAILED, Retry.permanent, True,
             "the merged model answers differently from base + adapter; the adapter is published"),
    ExitCode(EXIT_KILLED, KILLED, Retry.counted, False,
             "SIGKILL: the OOM killer (the runtime says OOMKilled), the grace period, or kill -9"),
    ExitCode(EXIT_PREEMPTED, PREEMPTED, Retry.counted, False,
             "SIGTERM: a checkpoint was written, the next attempt resumes"),
)
_BY_CODE = {entry.code: entry for entry in EXIT_CODES}

#: Exit codes that mean retrying cannot help (``Retry.permanent``): the ``podFailurePolicy``
#: fails the Job on them at once. 4 (storage) and 5 (CUDA out of memory) are retried.
PERMANENT_EXIT_CODES: tuple[int, ...] = tuple(e.code for e in EXIT_CODES if e.retry is Retry.permanent)
#: Exit codes whose termination message carries published artifacts: 0, and 8 (the adapter
#: was published before the merge check failed; the merged model was not).
ARTIFACT_EXIT_CODES: tuple[int, ...] = (EXIT_OK, EXIT_MERGE_CHECK)
#: ``{code: reason}`` of the codes that name their reason alone (``ExitCode.by_code``).
REASONS_BY_CODE: dict[int, str] = {e.code: e.reason for e in EXIT_CODES if e.by_code}


def reason_for(code: int, default: str = "Error") -> str:
    """The trainer's termination reason of exit ``code`` (``default`` for a code not in the table)."""
    entry = _BY_CODE.get(code)
    return entry.reason if entry else default


# --- termination message ------------------------------------------------------------------

#: The container's ``terminationMessagePath`` (the trainer's default when the env is unset).
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
#: Upper bound of the termination message, bytes (the kubelet truncates at 4096).
TERMINATION_LIMIT = 4000


class TerminationMessage(TypedDict, total=False):
    """The trainer's result, compact JSON in the termination message (camelCase keys).

    ``exitCode`` and ``reason`` are always present (:data:`EXIT_CODES`); ``message`` says
    what happened (a failure names the field, file or URI); ``artifacts`` has the published
    URIs (``adapterUri``, ``mergedUri``, ``manifestUri``, ``lastCheckpointUri``,
    ``lossPlotUri``, ``exports``, ``mergeCheck``, ``tracking``, ``run``); ``metrics`` the
    train and eval numbers; ``resumedFromStep`` the checkpoint step the attempt resumed
    from; ``checkpoint`` the resume decision; ``fitCheck`` the fit check's estimate
    (``qlora-train fitcheck``); ``durationSeconds`` the process's run time.
    """

    exitCode: int
    reason: str
    message: str
    artifacts: dict[str, Any]
    metrics: dict[str, Any]
    resumedFromStep: int
    checkpoint: dict[str, Any]
    fitCheck: dict[str, Any]
    durationSeconds: float


#: Keys dropped, in this order, while the message is over :data:`TERMINATION_LIMIT`.
_DROP_ORDER = ("metrics", "artifacts", "resumedFromStep")


def _compact(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"), default=str, ensure_ascii=False)


def encode_termination_message(result: dict[str, Any]) -> str:
    """``result`` (a :class:`TerminationMessage`) as compact JSON of at most :data:`TERMINATION_LIMIT` bytes.

    ``None`` values are left out. When too long, ``message`` is shortened first, then
    ``metrics``, ``artifacts`` and ``resumedFromStep`` are dropped; the text is always
    valid JSON with ``exitCode`` and ``reason``.
    """
    result = {k: v for k, v in result.items() if v is not None}
    text = _compact(result)
    # Shrink in order of least value: the message's tail, then metrics, then everything but the outcome.
    if len(text.encode()) > TERMINATION_LIMIT and "message" in result:
        msg = str(result["message"])
        keep = max(0, len(msg.encode()) - (len(text.encode()) - TERMINATION_LIMIT) - 32)
        result["message"] = msg.encode()[:keep].decode(errors="ignore") + "...(truncated)"
        text = _compact(result)
    for key in _DROP_ORDER:
        if len(text.encode()) <= TERMINATION_LIMIT:
            break
        result.pop(key, None)
        text = _compact(result)
    if len(text.encode()) > TERMINATION_LIMIT:
        result = {
            "exitCode": result.get("exitCode"),
            "reason": result.get("reason"),
            "message": str(result.get("message", ""))[:500] + "...(truncated)",
        }
        text = _compact(result)
    return text


def parse_json_object(text: Any) -> dict[str, Any] | None:
    """``text`` parsed as a JSON object, or None when it is absent, not a string, not JSON or not an object."""
    if not text or not isinstance(text, str):
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def parse_termination_message(text: Any) -> dict[str, Any] | None:
    """The trainer's JSON termination message as a dict, or None when absent, not JSON or not an object."""
    return parse_json_object(text)


# --- progress ----------------------------------------------------------------------------

#: The QLoRAJob's API group, version and plural (the ``status`` subresource the trainer patches).
API_GROUP = "qlora.dev"
API_VERSION = "v1alpha1"
PLURAL = "qlorajobs"
#: ``.status.progress.stage``, in order ("Done": the trainer finishes its last writes and exits).
STAGE_LOADING = "Loading"
STAGE_TRAINING = "Training"
STAGE_EVALUATING = "Evaluating"
STAGE_MERGING = "Merging"
STAGE_UPLOADING = "Uploading"
STAGE_DONE = "Done"
STAGES = (STAGE_LOADING, STAGE_TRAINING, STAGE_EVALUATING, STAGE_MERGING, STAGE_UPLOADING, STAGE_DONE)
#: ``.status.progress.checkpoint.decision``: the attempt resumed a checkpoint of its run, or started at step 0.
CHECKPOINT_RESUMED = "Resumed"
CHECKPOINT_STARTED_FRESH = "StartedFresh"

# --- output layout ------------------------------------------------------------------------

#: ``<output>/run-<N>/``: everything run N writes.
RUN_DIR_PREFIX = "run-"
#: Names under ``<output>/run-<N>/``.
CHECKPOINTS_DIR = "checkpoints"
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
EXPORT_DIR = "export"
REFUSED_DIR = "refused"
TENSORBOARD_DIR = "tensorboard"
#: ``checkpoints/step-<S>/``: one checkpoint.
CHECKPOINT_DIR_PREFIX = "step-"
#: Written last into each published prefix: nothing without it is ever reported.
SUCCESS_MARKER = "_SUCCESS"
#: The lineage manifest in ``adapter/`` (and ``merged/``, each export).
MANIFEST = "manifest.json"
#: The loss plot in ``adapter/``.
LOSS_PLOT = "loss.png"

_RUN_DIR = re.compile(rf"^{RUN_DIR_PREFIX}(\d+)$")
_CHECKPOINT_DIR = re.compile(rf"^{CHECKPOINT_DIR_PREFIX}(\d+)$")


def run_dir(run: int) -> str:
    """``run-<N>``: the directory name of run ``run`` (>= 1) under ``spec.output.uri``."""
    return f"{RUN_DIR_PREFIX}{run}"


def run_of_dir(name: str) -> int | None:
    """``run-7`` (slashes ignored) -> 7; anything else -> None."""
    match = _RUN_DIR.match(name.strip("/"))
    return int(match.group(1)) if match else None


def checkpoint_dir(step: int) -> str:
    """``step-<S>``: the directory name of the checkpoint of optimizer step ``step``."""
    return f"{CHECKPOINT_DIR_PREFIX}{step}"


def step_of_dir(name: str) -> int | None:
    """``step-120`` -> 120; anything else (``step-120-1700000000`` included) -> None."""
    match = _CHECKPOINT_DIR.match(name)
    return int(match.group(1)) if match else None
