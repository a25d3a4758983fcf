"""The QLoRAJob status: phase, condition types, attempts, progress and artifacts."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Literal

from pydantic import Field

from qlora_trainer import contract
from qlora_trainer.config import ApiModel

# --- status -----------------------------------------------------------------
#
# Every field the operator or the trainer writes is listed here: the API server drops
# status fields its schema does not name. Strings carry a maxLength and lists a
# maxItems so a runaway writer cannot bloat the object.


class Phase(str, Enum):
    """Display summary of the conditions (never used as state)."""

    pending = "Pending"
    queued = "Queued"
    starting = "Starting"
    running = "Running"
    merging = "Merging"
    uploading = "Uploading"
    suspended = "Suspended"
    succeeded = "Succeeded"
    failed = "Failed"


class ConditionType(str, Enum):
    """Condition types of a QLoRAJob.

    ``Running=True`` means a run is active (from the creation of its batch/v1 Job until
    it completes, fails or is suspended): while it holds, the CRD refuses changes to
    training fields (see :func:`training_fields_changed`).
    """

    running = "Running"
    complete = "Complete"
    failed = "Failed"
    suspended = "Suspended"
    stalled = "Stalled"
    #: A spec change the operator could not apply to the active run (a fallback behind
    #: the CRD's immutability rules); the change becomes the next run.
    spec_rejected = "SpecRejected"


# --- condition reasons (CamelCase; the trainer's come from qlora_trainer.contract) ------------
INVALID_SPEC = "InvalidSpec"
UNSCHEDULABLE = "Unschedulable"
QUOTA_EXCEEDED = "QuotaExceeded"
IMAGE_PULL_BACKOFF = "ImagePullBackOff"
IMAGE_PULL_FAILED = "ImagePullFailed"
SECRET_NOT_FOUND = "SecretNotFound"
CONTAINER_CONFIG_ERROR = "CreateContainerConfigError"
OOM_KILLED = "OOMKilled"
#: Exit 137 (SIGKILL) without the container runtime's ``OOMKilled``: killed after the
#: termination grace period, by a user (``kill -9``, a forced delete) or another process.
KILLED = contract.KILLED
CUDA_OOM = contract.CUDA_OOM
INVALID_DATA = contract.INVALID_DATA
INVALID_CONFIG = contract.INVALID_CONFIG
NON_FINITE_LOSS = contract.NON_FINITE_LOSS
INSUFFICIENT_GPU_MEMORY = contract.INSUFFICIENT_GPU_MEMORY
#: Exit 8: the merged model failed its equivalence check; the adapter is published.
MERGE_CHECK_FAILED = contract.MERGE_CHECK_FAILED
STORAGE_ERROR = contract.STORAGE_ERROR
DEADLINE_EXCEEDED = "DeadlineExceeded"
BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
DISRUPTED = "Disrupted"
#: An exception the trainer has no name for (exit 1); the message is its last line.
TRAINER_ERROR = contract.TRAINER_ERROR
SUCCEEDED = contract.SUCCEEDED
TRAINER_RUNNING = "TrainerRunning"
PENDING = "Pending"
STARTING = "Starting"
RETRYING = "Retrying"
FINISHING = "Finishing"
RESTARTING = "Restarting"
#: An attempt whose pod was gone before its end was seen (its group's run had failed).
STOPPED = "Stopped"
TERMINATED = "Terminated"
SPEC_REJECTED = "SpecRejected"
NO_PROGRESS = "NoProgress"


_Str253 = Annotated[str, Field(max_length=253)]
_Time = Annotated[str, Field(max_length=64)]
_Uri = Annotated[str, Field(max_length=4096)]
_Message = Annotated[str, Field(max_length=32768)]


class Condition(ApiModel):
    """A ``metav1.Condition``."""

    type: Annotated[str, Field(min_length=1, max_length=316)] = Field(
        description="Running, Complete, Failed, Suspended or Stalled."
    )
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: Annotated[str, Field(max_length=1024)] = Field(
        description="CamelCase reason of the last transition, e.g. BackoffLimitExceeded."
    )
    message: _Message = Field(default="", description="Human-readable details; names the field and the fix.")
    last_transition_time: _Time = Field(description="When status last changed (RFC 3339).")
    observed_generation: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="metadata.generation the condition was computed from."
    )


class CheckpointDecision(ApiModel):
    """What one trainer pod resumed from (decided before any weight loads; the trainer's ``runs`` module)."""

    pod_name: _Str253 | None = Field(default=None, description="The trainer pod that decided.")
    decision: Literal[contract.CHECKPOINT_RESUMED, contract.CHECKPOINT_STARTED_FRESH] = Field(
        description="Resumed: from a checkpoint of this run; StartedFresh: from step 0."
    )
    from_step: int | None = Field(default=None, description="The checkpoint step resumed from.")
    message: Annotated[str, Field(max_length=1024)] | None = Field(
        default=None,
        description=(
            "One line, e.g. 'started fresh: previous checkpoints belong to run 1; run 2 started fresh at step 0', "
            "naming any checkpoint of this run refused (other run, other QLoRAJob, config fingerprint differs)."
        ),
    )


class Progress(ApiModel):
    """Live training progress, written by the trainer (throttled)."""

    step: int | None = Field(default=None, description="Optimizer steps done.")
    total_steps: int | None = Field(default=None, description="Optimizer steps planned.")
    epoch: float | None = Field(default=None, description="Epochs done (fractional).")
    loss: float | None = Field(default=None, description="Training loss at the last logged step.")
    eval_loss: float | None = Field(default=None, description="Eval loss at the last evaluation.")
    learning_rate: float | None = Field(default=None, description="Learning rate at the last logged step.")
    tokens_per_second: float | None = Field(default=None, description="Real (non-padding) tokens per second.")
    gpu_memory_gib: float | None = Field(
        default=None,
        alias="gpuMemoryGiB",
        description=(
            "Peak GPU memory PyTorch reserved on the reporting trainer's GPU (global rank 0), in GiB "
            "(torch.cuda.max_memory_reserved); unset on CPU."
        ),
    )
    eta_seconds: int | None = Field(default=None, description="Estimated seconds to the end of training.")
    eta: Annotated[str, Field(max_length=16)] | None = Field(
        default=None, description="etaSeconds for display (45s, 12m30s, 3h05m, 2d04h; printer column ETA)."
    )
    progress: Annotated[str, Field(max_length=64)] | None = Field(
        default=None, description="step/totalSteps, for display (printer column Progress)."
    )
    stage: Annotated[str, Field(max_length=64)] | None = Field(
        default=None, description="Trainer stage: Loading, Training, Merging, Uploading, Done."
    )
    updated_at: _Time | None = Field(default=None, description="When the trainer last reported (RFC 3339).")
    checkpoint: CheckpointDecision | None = Field(
        default=None, description="What the reporting pod resumed from, or why it started fresh."
    )


class Attempt(ApiModel):
    """One trainer pod: one attempt of one node."""

    index: int = Field(
        description=(
            "0-based attempt number: of the run's single pod (nodes 1), or of the group (nodes > 1: the "
            "same for every node of one run; each group restart adds one)."
        )
    )
    node: Annotated[int, Field(ge=0, le=63)] | None = Field(
        default=None, description="Node index (the pod's completion index, torchrun node rank); only when nodes > 1."
    )
    pod_name: _Str253 = Field(description="Trainer pod of this attempt.")
    phase: Annotated[str, Field(max_length=16)] | None = Field(
        default=None, description="Pod phase: Pending, Running, Succeeded or Failed."
    )
    start_time: _Time | None = Field(default=None, description="When the pod started (RFC 3339).")
    finish_time: _Time | None = Field(default=None, description="When the pod finished (RFC 3339).")
    exit_code: int | None = Field(default=None, description="Trainer exit code (DESIGN section 4 lists them).")
    reason: Annotated[str, Field(max_length=1024)] | None = Field(
        default=None,
        description=(
            "CamelCase reason: Succeeded, OOMKilled (the container runtime reports an OOM kill), Killed "
            "(exit 137, SIGKILL without an OOM kill: after the termination grace period, or kill -9), "
            "CudaOutOfMemory, InsufficientGPUMemory, InvalidData, "
            "InvalidConfig, NonFiniteLoss, StorageError, Terminated (exit 143), Disrupted, Stopped (the pod was "
            "gone before its end was seen), or a waiting reason such as ImagePullBackOff."
        ),
    )
    message: _Message | None = Field(default=None, description="The trainer's termination message or pod reason.")
    resumed_from_step: int | None = Field(default=None, description="Checkpoint step this attempt resumed from.")
    checkpoint: Annotated[str, Field(max_length=1024)] | None = Field(
        default=None,
        description="What this attempt resumed from, or why it started fresh (the trainer's progress.checkpoint.message).",
    )


class ExportArtifact(ApiModel):
    """One published export (``spec.output.export``), listed after its _SUCCESS marker exists."""

    format: Annotated[str, Field(max_length=16)] = Field(description="gguf or vllm.")
    quantization: Annotated[str, Field(max_length=16)] | None = Field(
        default=None, description="GGUF tensor type (f16, bf16, q8_0); unset for vllm."
    )
    uri: _Uri = Field(description="<output>/run-<N>/export/<format>[-<quantization>]/.")
    file: _Uri | None = Field(default=None, description="The .gguf file (gguf) or serve.sh (vllm) in it.")


#: Most exports kept in ``status.artifacts.exports`` (one per format).
MAX_EXPORTS = 4


class MergeCheck(ApiModel):
    """The merged model's equivalence check against base + adapter (trainer ``merge.passes``)."""

    passed: bool | None = Field(default=None, description="Whether the merge met its rule; false: no merged model.")
    dtype: _Str253 | None = Field(default=None, description="Merge dtype (output.merge.dtype).")
    onto: _Str253 | None = Field(default=None, description="Weights merged onto: nf4-dequantised or original.")
    max_abs_logit_diff: float | None = Field(
        default=None, description="Largest |logit| difference, merged vs unmerged, teacher-forced over the check prompts."
    )
    tolerance: float | None = Field(default=None, description="Largest maxAbsLogitDiff the rule allows for this dtype.")
    top1_agreement: float | None = Field(
        default=None, description="Share (0-1) of continuation positions whose top-1 token agrees, teacher-forced."
    )
    min_top1_agreement: float | None = Field(default=None, description="Least top1Agreement the rule requires.")
    greedy_tokens_agree: int | None = Field(default=None, description="Free-running greedy tokens that agree.")
    greedy_tokens: int | None = Field(default=None, description="Greedy tokens compared (prompts x new tokens).")


class TrackingArtifacts(ApiModel):
    """Where the run was tracked (``spec.tracking``), from the trainer's termination message."""

    mlflow_run_id: Annotated[str, Field(max_length=64)] | None = Field(
        default=None, description="MLflow run id; a resumed attempt of the same run continues this run."
    )
    mlflow_experiment_id: Annotated[str, Field(max_length=64)] | None = Field(
        default=None, description="MLflow experiment id of the run."
    )
    mlflow_run_uri: _Uri | None = Field(
        default=None, description="Link to the run in the MLflow UI: <trackingUri>/#/experiments/<id>/runs/<runId>."
    )
    tensorboard_uri: _Uri | None = Field(
        default=None, description="<output>/run-<N>/tensorboard/: TensorBoard event files (tensorboard --logdir)."
    )


class Artifacts(ApiModel):
    """Artifact URIs; each is listed only after its _SUCCESS marker exists."""

    run: int | None = Field(
        default=None,
        description=(
            "The run that wrote them. They stay listed (and valid in storage) while a later run trains, "
            "until that run completes: every run writes under its own <output>/run-<N>/."
        ),
    )
    generation: int | None = Field(default=None, description="metadata.generation the run started from.")
    adapter_uri: _Uri | None = Field(default=None, description="<output>/run-<N>/adapter/: the LoRA adapter.")
    merged_uri: _Uri | None = Field(
        default=None, description="<output>/run-<N>/merged/: the merged model, when asked for."
    )
    manifest_uri: _Uri | None = Field(default=None, description="The lineage manifest.json.")
    last_checkpoint_uri: _Uri | None = Field(default=None, description="Newest complete checkpoint.")
    loss_plot_uri: _Uri | None = Field(
        default=None, description="<output>/run-<N>/adapter/loss.png: train and eval loss and learning rate by step."
    )
    exports: Annotated[list[ExportArtifact], Field(max_length=MAX_EXPORTS)] | None = Field(
        default=None, description="Published exports of spec.output.export (gguf, vllm), each with its own _SUCCESS."
    )
    merge_check: MergeCheck | None = Field(
        default=None, description="The merge's equivalence check; passed false: MergeCheckFailed, no mergedUri."
    )
    tracking: TrackingArtifacts | None = Field(
        default=None, description="The MLflow run (id, link) and TensorBoard event files of spec.tracking."
    )


class QueueStatus(ApiModel):
    """The current run's Kueue Workload as the operator last read it (``scheduling.queueName`` set).

    Mirrors the Workload's conditions (Kueue v1beta2): ``QuotaReserved`` false with reason
    ``Pending`` while it waits (``message``: Kueue's, e.g. "insufficient unused quota for
    nvidia.com/gpu"), ``Admitted``, and ``Evicted`` (reason ``Preempted`` when a
    higher-priority Workload took the quota): the Job is suspended, its pods stop, the
    trainer checkpoints on SIGTERM and the run resumes from that checkpoint once readmitted.
    """

    workload: _Str253 | None = Field(default=None, description="Name of the Workload Kueue made for the run's Job.")
    local_queue: _Str253 | None = Field(default=None, description="The LocalQueue (spec.scheduling.queueName).")
    cluster_queue: _Str253 | None = Field(
        default=None, description="The ClusterQueue that admitted the Workload (its status.admission)."
    )
    admitted: bool = Field(default=False, description="The Workload's Admitted condition is True.")
    reason: _Str253 | None = Field(
        default=None, description="Kueue's reason: of Evicted when evicted, else of Admitted or QuotaReserved."
    )
    message: _Message | None = Field(default=None, description="Kueue's message for that reason.")
    evictions: int = Field(
        default=0, ge=0, description="Times Kueue evicted (e.g. preempted) this run's Workload (schedulingStats)."
    )


class QLoRAJobStatus(ApiModel):
    """``status`` of a QLoRAJob; every field the operator or trainer writes."""

    observed_generation: int | None = Field(default=None, description="metadata.generation last acted on.")
    phase: Phase | None = Field(default=None, description="Display summary of the conditions.")
    conditions: Annotated[list[Condition], Field(max_length=32)] = Field(
        default_factory=list, description="Running, Complete, Failed, Suspended, Stalled (one per type)."
    )
    progress: Progress | None = Field(default=None, description="Live progress, written by the trainer.")
    attempts: Annotated[list[Attempt], Field(max_length=1024)] = Field(
        default_factory=list,
        description=(
            "Pods of the current run, oldest first. With nodes > 1 also those of the earlier runs the group "
            "restarted from, ordered by attempt and node (the newest 100 are kept)."
        ),
    )
    artifacts: Artifacts | None = Field(
        default=None,
        description="Complete artifacts of the last successful run (artifacts.run names it; kept while a later run trains).",
    )
    job_name: _Str253 | None = Field(default=None, description="The batch/v1 Job of the current run.")
    run: int | None = Field(
        default=None,
        description=(
            "Run number (one batch/v1 Job each): a changed spec on a finished job starts the next, and so "
            "does a group restart (nodes > 1)."
        ),
    )
    start_time: _Time | None = Field(default=None, description="When the current run started (RFC 3339).")
    completion_time: _Time | None = Field(default=None, description="When the current run finished (RFC 3339).")
    message: _Message | None = Field(default=None, description="Summary of the current state, for people.")
    queue: QueueStatus | None = Field(
        default=None, description="The current run's Kueue Workload (scheduling.queueName set and Kueue installed)."
    )


__all__ = [
    "Artifacts",
    "Attempt",
    "BACKOFF_LIMIT_EXCEEDED",
    "CONTAINER_CONFIG_ERROR",
    "CUDA_OOM",
    "CheckpointDecision",
    "Condition",
    "ConditionType",
    "DEADLINE_EXCEEDED",
    "DISRUPTED",
    "ExportArtifact",
    "FINISHING",
    "IMAGE_PULL_BACKOFF",
    "IMAGE_PULL_FAILED",
    "INSUFFICIENT_GPU_MEMORY",
    "INVALID_CONFIG",
    "INVALID_DATA",
    "INVALID_SPEC",
    "KILLED",
    "MAX_EXPORTS",
    "MERGE_CHECK_FAILED",
    "MergeCheck",
    "NON_FINITE_LOSS",
    "NO_PROGRESS",
    "OOM_KILLED",
    "PENDING",
    "Phase",
    "Progress",
    "QLoRAJobStatus",
    "QUOTA_EXCEEDED",
    "QueueStatus",
    "RESTARTING",
    "RETRYING",
    "SECRET_NOT_FOUND",
    "SPEC_REJECTED",
    "STARTING",
    "STOPPED",
    "STORAGE_ERROR",
    "SUCCEEDED",
    "TERMINATED",
    "TRAINER_ERROR",
    "TRAINER_RUNNING",
    "TrackingArtifacts",
    "UNSCHEDULABLE",
]
