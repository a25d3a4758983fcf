"""The training run: 4-bit base + LoRA, TRL ``SFTTrainer``, resume, back-off, guards.

:func:`train` does, in order:

1. Looks for the newest *complete* checkpoint of this run under
   ``<output>/run-<N>/checkpoints/`` (one with ``_SUCCESS``; incomplete ones are
   ignored) whose run, QLoRAJob and config fingerprint match (``runs``; decided from
   ``qlora_state.json`` before any weight loads; refused ones are moved aside and named
   in the log, the progress report and the manifest) and, if there is one, downloads it; the
   Trainer then restores adapter, optimizer, scheduler, RNG and trainer state and skips
   the batches already seen (same seed, same order), so the learning-rate schedule
   and the data position continue. ``resumedFromStep`` is reported.
2. Loads the base 4-bit (``model``), wraps it with LoRA, builds the ``SFTTrainer`` on
   the pre-tokenized data (``encode``), and measures the eval loss before training
   (on a fresh start; a resumed run reads it from the checkpoint).
3. Trains. Checkpoints are synced to storage by a callback; progress is logged and
   reported; NaN/inf losses stop the run (exit 6); SIGTERM checkpoints and stops.
4. CUDA out of memory: the micro-batch is halved and gradient accumulation raised so
   that their product (the effective batch) stays the same, the adapter is reset to
   the last checkpoint (or its initial weights) and training restarts, down to
   micro-batch 1; then exit 5 naming the sizes tried.
5. Measures the eval loss after training.

Multi-GPU (``distributed``; ``dist`` and ``parallelism`` from ``cli``): the same steps
on every rank. Global rank 0 chooses the checkpoint to resume from and broadcasts it;
each node's local rank 0 downloads it, the others wait. The OOM back-off of step 4 is
single-GPU only: under DDP/FSDP an out-of-memory error exits 5 at once (the other
ranks are blocked in a collective of the same step and cannot re-plan with it). Under
FSDP the trained adapter is gathered from its shards on every rank
(``TrainOutcome.adapter_state``) for rank 0 to save. :func:`preflight` runs before the
weights load: it estimates GPU memory (``estimate``), picks DDP or FSDP for
``parallelism: auto`` and refuses layouts that cannot fit (exit 7).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import contract
from .callbacks import (
    RUN_STATE_FILE,
    EvalBeforeTraining,
    CheckpointSyncCallback,
    FaultInjection,
    gpu_memory_gib,
    NonFiniteGuard,
    PreemptionCallback,
    ProgressCallback,
)
from .config import TrainingConfig
from .distributed import Dist
from .errors import DoesNotFitError, OutOfMemoryError, Preempted, StorageError
from .estimate import GIB, EstimateError, plan
from .inputs import DataInput, ModelInput
from .assemble import build_model, build_sft_trainer
from .model import Hardware, compute_dtype, mixed_precision, optimizer_for
from .report import ProgressReporter, log_event, now_rfc3339
from .runs import ResumeDecision, RunIdentity, RunLayout, decide_resume, fingerprint
from .storage import Checkpoint, Storage, join_uri

log = logging.getLogger(__name__)


@dataclass
class TrainOutcome:
    """What the run produced: the trained PEFT ``model`` and numbers for the manifest."""

    model: Any
    metrics: dict[str, Any]
    resumed_from_step: int | None
    micro_batch_size: int
    gradient_accumulation_steps: int
    backoffs: list[dict[str, int]] = field(default_factory=list)
    last_checkpoint_uri: str | None = None
    #: FSDP: the full adapter state dict gathered from the shards (what ``save_pretrained`` writes); else ``None``.
    adapter_state: dict[str, Any] | None = None
    #: What the run resumed from or why it started fresh (``runs.ResumeDecision.record``).
    resume: dict[str, Any] = field(default_factory=dict)
    #: The Trainer's ``log_history`` (kept across resumes) plus the eval before and after: ``plots.loss_plot``'s input.
    history: list[dict[str, Any]] = field(default_factory=list)
    #: ``tracking``: mlflowRunId/ExperimentId/RunUri and tensorboardUri (``qlora_trainer.tracking``).
    tracking: dict[str, Any] = field(default_factory=dict)


def backoff(micro_batch: int, accumulation: int) -> tuple[int, int]:
    """Next smaller micro-batch and the accumulation that keeps ``micro_batch * accumulation``.

    The new micro-batch is the largest divisor of the effective batch that is at most
    half the current one (1 always qualifies), so the effective batch is kept exactly.

    Raises:
        ValueError: ``micro_batch`` is already 1.
    """
    if micro_batch <= 1:
        raise ValueError("micro-batch is already 1")
    effective = micro_batch * accumulation
    new = next(d for d in range(micro_batch // 2, 0, -1) if effective % d == 0)
    return new, effective // new


def _checkpoint_states(storage: Storage, checkpoints: list[Checkpoint]) -> list[tuple[Checkpoint, dict[str, Any] | None]]:
    """Each complete checkpoint with its ``qlora_state.json`` (``None`` when missing or not JSON)."""
    out = []
    for ckpt in checkpoints:
        try:
            state = json.loads(storage.read_bytes(join_uri(ckpt.uri, RUN_STATE_FILE)))
        except (StorageError, ValueError):
            state = None
        out.append((ckpt, state if isinstance(state, dict) else None))
    return out


def choose_checkpoint(
    storage: Storage, layout: RunLayout, identity: RunIdentity, expected: dict[str, Any]
) -> ResumeDecision:
    """Decide what this run resumes from, reading only the checkpoints' ``qlora_state.json``.

    Refused checkpoints under this run's prefix are moved to ``<run>/refused/`` (kept,
    never loaded, pruned or overwritten). For a fresh start of run N > 1 the decision
    also names run N-1 when it left checkpoints ("started fresh: previous checkpoints
    belong to run N-1").

    Raises:
        StorageError: listing, reading or moving failed.
    """
    candidates = _checkpoint_states(storage, storage.complete_checkpoints(layout.checkpoints))
    previous = None
    if identity.run > 1 and storage.complete_checkpoints(layout.of_run(identity.run - 1).checkpoints):
        previous = identity.run - 1
    decision = decide_resume(candidates, identity, expected, previous)
    for refused in decision.refused:
        stamp = now_rfc3339().replace(":", "").replace("-", "")
        dest = join_uri(layout.refused, f"{contract.checkpoint_dir(refused.step)}-{stamp}")
        storage.move_prefix(refused.uri, dest)
        log_event("checkpoint_refused", step=refused.step, uri=refused.uri, movedTo=dest + "/", why=refused.why)
    return decision


def _restore_checkpoint(
    storage: Storage,
    layout: RunLayout,
    identity: RunIdentity,
    expected: dict[str, Any],
    local_root: Path,
    dist: Dist | None = None,
) -> tuple[ResumeDecision, Path | None]:
    """:func:`choose_checkpoint`, then download the chosen one to ``local_root/checkpoint-N``.

    Multi-GPU: rank 0 lists and decides, every rank gets its choice; each node's local
    rank 0 downloads into the node's cache while the others wait.
    """
    dist = dist or Dist.single()
    decision, error = None, None
    if dist.is_main:
        try:
            decision = choose_checkpoint(storage, layout, identity, expected)
        except Exception as err:  # noqa: BLE001 - shared with every rank by agree()
            error = err
    dist.agree(error)
    decision = dist.broadcast(decision)
    assert decision is not None
    log_event(
        "checkpoint_decision", decision=decision.decision, run=identity.run,
        step=decision.checkpoint.step if decision.checkpoint else 0, message=decision.message(identity),
    )
    if decision.checkpoint is None:
        return decision, None
    local = local_root / f"checkpoint-{decision.checkpoint.step}"
    if dist.is_local_main:
        try:
            storage.download_prefix(decision.checkpoint.uri, local)
        except Exception as err:  # noqa: BLE001
            error = err
    dist.agree(error)
    log_event("resume", step=decision.checkpoint.step, uri=decision.checkpoint.uri)
    return decision, local


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _rewind_after_oom(model: Any, checkpoint: Path | None, initial_adapter: dict, reporter: Any) -> Path | None:
    """Get ready to train again after a CUDA OOM (the caller dropped its trainer): clear the
    gradients, free the cached GPU memory, and return ``checkpoint`` (the last checkpoint synced
    in this run, or the one resumed from) to continue from; without one the adapter is reset to
    its initial weights (the run restarts at step 0). Reports progress at once."""
    from peft import set_peft_model_state_dict

    model.zero_grad(set_to_none=True)
    _free_memory()
    if checkpoint is None:
        set_peft_model_state_dict(model, initial_adapter)
    reporter.update(force=True)
    return checkpoint


def train(
    cfg: TrainingConfig,
    base: ModelInput,
    tokenizer: Any,
    data: DataInput,
    storage: Storage,
    reporter: ProgressReporter,
    work_dir: Path,
    hw: Hardware | None = None,
    *,
    dist: Dist | None = None,
    parallelism: str = "single",
    identity: RunIdentity | None = None,
) -> TrainOutcome:
    """Run QLoRA fine-tuning (see the module docstring); returns the trained model and metrics.

    ``dist``: this rank's place in a multi-GPU job (default: a single process);
    ``parallelism``: ``single``, ``ddp`` or ``fsdp`` (from :func:`preflight`);
    ``identity``: the run (default :meth:`RunIdentity.from_env`), whose own prefix
    ``<output>/run-<N>/checkpoints/`` is the only place checkpoints are resumed from.

    Raises:
        ConfigError: precision not possible on this hardware (exit 2).
        StorageError: checkpoint download/upload failed (exit 4).
        OutOfMemoryError: CUDA OOM at micro-batch 1 (exit 5).
        NonFiniteLossError: NaN/inf loss (exit 6).
        Preempted: SIGTERM; a checkpoint was synced (exit 143).
    """
    from peft import get_peft_model_state_dict

    hw = hw or Hardware.detect()
    dist = dist or Dist.single()
    t = cfg.training
    dtype = compute_dtype(cfg.quantization.compute_dtype, hw)
    precision = mixed_precision(t.precision, dtype, hw)  # refuse impossible precision before loading anything
    out_dir = Path(work_dir) / "run"
    out_dir.mkdir(parents=True, exist_ok=True)
    identity = identity or RunIdentity.from_env()
    layout = RunLayout(cfg.output.uri, identity.run)
    checkpoints_uri = layout.checkpoints
    expected = fingerprint(cfg, base.lineage, data.lineage)

    from . import tracking

    tracked = tracking.prepare(cfg, storage, layout.root, Path(work_dir), identity)
    decision, local_ckpt = _restore_checkpoint(storage, layout, identity, expected, out_dir, dist)
    resumed_from = decision.checkpoint.step if decision.checkpoint else None
    run_state = decision.state
    reporter.update(force=True, checkpoint={
        "podName": os.environ.get(contract.ENV_POD_NAME), "decision": decision.decision,
        "fromStep": resumed_from, "message": decision.message(identity)[:1000],
    })
    kept = None
    if run_state.get("microBatchSize") and run_state.get("gradientAccumulationSteps"):
        kept = (int(run_state["microBatchSize"]), int(run_state["gradientAccumulationSteps"]))  # a resumed run keeps its own
    batch_layout = run_layout(cfg, base.path, hw, dist, parallelism, kept=kept)
    micro_batch, accumulation = batch_layout.micro_batch_size, batch_layout.gradient_accumulation_steps
    # Layers not checkpointed (training.checkpointLayers): chosen again on every attempt for this GPU and
    # micro-batch; they change memory and speed only, never the result, so a resumed run need not keep them.
    unchecked = batch_layout.unchecked_layers
    eval_before = run_state.get("evalLossBefore")
    run_state = {
        "evalLossBefore": eval_before,
        "microBatchSize": micro_batch,
        "gradientAccumulationSteps": accumulation,
        "resumedFrom": run_state.get("resumedFrom", []) + ([resumed_from] if resumed_from else []),
        "owner": identity.record(),
        "fingerprint": expected,
    }

    optim, requested = optimizer_for(t.optimizer, parallelism), str(getattr(t.optimizer, "value", t.optimizer))
    if optim != requested:
        log_event("optimizer", requested=requested, using=optim,
                  reason=f"bitsandbytes optimizers cannot step {parallelism.upper()} (DTensor) parameters")
    log_event("load_model", uri=base.uri, computeDtype=str(dtype).removeprefix("torch."), device=hw.device, **precision)
    t0 = time.monotonic()
    model = build_model(cfg, base.path, dtype, hw, fsdp=parallelism == "fsdp")
    initial_adapter = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log_event("model_ready", seconds=round(time.monotonic() - t0, 1), trainableParams=trainable, **gpu_memory_gib())

    train_ds, eval_ds = data.train.to_dataset(), data.eval.to_dataset()
    before = EvalBeforeTraining(reporter, run_state, len(eval_ds))
    progress = ProgressCallback(reporter)
    sync = CheckpointSyncCallback(storage, checkpoints_uri, t.keep_checkpoints, run_state, dist)
    guard = NonFiniteGuard(t.non_finite_patience)
    preempt = PreemptionCallback(dist)
    faults = FaultInjection()
    record_run = tracking.RecordMlflowRun(cfg, storage, layout.root, tracked, dist.is_main)
    tensorboard = tracking.SyncTensorboard(cfg, storage, layout.root, dist.is_main)
    backoffs: list[dict[str, int]] = []
    tried: list[int] = []
    preempt.install()
    try:
        while True:
            callbacks = [before, progress, sync, guard, preempt, record_run, tensorboard] + (
                [faults] if faults.active else [])
            trainer = build_sft_trainer(
                cfg,
                model,
                train_ds,
                tokenizer,
                hw=hw,
                dtype=dtype,
                output_dir=out_dir,
                callbacks=callbacks,
                eval_dataset=eval_ds,
                micro_batch_size=micro_batch,
                gradient_accumulation_steps=accumulation,
                parallelism=parallelism,
                unchecked_layers=unchecked,
            )
            before.trainer = tensorboard.trainer = trainer
            try:
                train_start = time.monotonic()
                result = trainer.train(resume_from_checkpoint=str(local_ckpt) if local_ckpt else None)
                break
            except torch.OutOfMemoryError as err:
                if dist.active:
                    raise OutOfMemoryError(
                        f"CUDA out of memory on rank {dist.rank} at micro-batch {micro_batch}, max sequence length "
                        f"{t.max_seq_length} ({parallelism} over {dist.world_size} GPUs): the in-process back-off is "
                        "single-GPU only; "
                        + (f"set training.checkpointLayers all ({unchecked} layers were not checkpointed), or "
                           if unchecked else "")
                        + "lower training.microBatchSize (raise gradientAccumulationSteps to keep the "
                        "effective batch), lower training.maxSeqLength, or use training.parallelism fsdp"
                    ) from err
                if unchecked > 0:
                    # First give back the memory of the layers not checkpointed, at the same micro-batch.
                    step = trainer.state.global_step
                    backoffs.append({"atStep": step, "fromMicroBatch": micro_batch, "toMicroBatch": micro_batch,
                                     "gradientAccumulationSteps": accumulation,
                                     "fromUncheckpointedLayers": unchecked, "toUncheckpointedLayers": 0})
                    log_event("oom_backoff", step=step, microBatch=micro_batch, gradientAccumulationSteps=accumulation,
                              uncheckpointedLayers=0, previousUncheckpointedLayers=unchecked, error=str(err)[:300])
                    unchecked = 0
                    del trainer
                    local_ckpt = _rewind_after_oom(model, sync.last_local or local_ckpt, initial_adapter, reporter)
                    continue
                tried.append(micro_batch)
                if micro_batch <= 1:
                    raise OutOfMemoryError(
                        f"CUDA out of memory at every micro-batch tried ({', '.join(map(str, tried))}; effective batch "
                        f"{t.micro_batch_size * t.gradient_accumulation_steps} kept by raising gradient accumulation), "
                        f"max sequence length {t.max_seq_length}: lower training.maxSeqLength, keep "
                        "training.gradientCheckpointing on, or use a GPU with more memory"
                    ) from err
                new_mb, new_acc = backoff(micro_batch, accumulation)
                step = trainer.state.global_step
                backoffs.append(
                    {
                        "atStep": step,
                        "fromMicroBatch": micro_batch,
                        "toMicroBatch": new_mb,
                        "gradientAccumulationSteps": new_acc,
                    }
                )
                log_event(
                    "oom_backoff",
                    step=step,
                    microBatch=new_mb,
                    gradientAccumulationSteps=new_acc,
                    previousMicroBatch=micro_batch,
                    error=str(err)[:300],
                )
                micro_batch, accumulation = new_mb, new_acc
                run_state.update(microBatchSize=micro_batch, gradientAccumulationSteps=accumulation)
                del trainer
                local_ckpt = _rewind_after_oom(model, sync.last_local or local_ckpt, initial_adapter, reporter)
    finally:
        preempt.uninstall()
    train_seconds = time.monotonic() - train_start - before.seconds
    eval_before = before.loss
    if preempt.requested:
        raise Preempted(
            f"SIGTERM at step {trainer.state.global_step}: checkpoint {sync.last_uri or '(none yet)'} written; "
            "the next attempt resumes from it"
        )

    reporter.stage(contract.STAGE_EVALUATING, step=trainer.state.global_step)
    if progress.last_eval is not None and progress.last_eval[0] == trainer.state.global_step:
        eval_after = progress.last_eval[1]  # the Trainer already evaluated the final step
    else:
        eval_after = float(trainer.evaluate()["eval_loss"])
    log_event("eval_after", evalLoss=eval_after, evalLossBefore=eval_before)
    reporter.update(evalLoss=eval_after)
    adapter_state = gather_adapter_state(trainer.model) if parallelism == "fsdp" else None

    state = trainer.state
    steps_this_run = state.global_step - (resumed_from or 0)
    tokens = int(state.num_input_tokens_seen or 0)
    metrics = {
        "evalLossBefore": eval_before,
        "evalLossAfter": eval_after,
        "trainLoss": float(result.training_loss),
        "steps": state.global_step,
        "totalSteps": state.max_steps,
        "epochs": round(float(state.epoch or 0.0), 4),
        "tokensSeen": tokens,
        "trainSeconds": round(train_seconds, 1),
        "secondsPerStep": round(train_seconds / steps_this_run, 3) if steps_this_run else None,
        "tokensPerSecond": round((tokens - progress.tokens_at_start) / train_seconds, 1) if train_seconds > 0 else None,
        "effectiveBatchSize": micro_batch * accumulation * dist.world_size,
        "microBatchSize": micro_batch,
        "gradientAccumulationSteps": accumulation,
        "worldSize": dist.world_size,
        "parallelism": parallelism,
        "trainableParams": trainable,
        **gpu_memory_gib(),
    }
    if dist.is_main:
        tracking.upload_tensorboard(cfg, storage, layout.root, tracked)
    return TrainOutcome(
        model=trainer.model,
        metrics=metrics,
        resumed_from_step=resumed_from,
        micro_batch_size=micro_batch,
        gradient_accumulation_steps=accumulation,
        backoffs=backoffs,
        last_checkpoint_uri=sync.last_uri
        or (join_uri(checkpoints_uri, contract.checkpoint_dir(resumed_from)) if resumed_from else None),
        adapter_state=adapter_state,
        resume=decision.record(identity),
        tracking=dict(tracked),
        history=[
            *([{"step": resumed_from or 0, "eval_loss": eval_before}] if eval_before is not None else []),
            *[dict(e) for e in state.log_history],
            {"step": state.global_step, "eval_loss": eval_after},
        ],
    )


def gather_adapter_state(model: Any) -> dict[str, Any]:
    """Every trainable (LoRA) parameter in full, gathered from its FSDP shards; call on every rank.

    Keys are the parameter names (FSDP2 keeps them), which PEFT's ``save_pretrained(state_dict=...)``
    filters and renames into the adapter file. Tensors are detached copies on the CPU.
    """
    out = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        full = param.full_tensor() if hasattr(param, "full_tensor") else param
        out[name] = full.detach().to("cpu", copy=True)
    return out


def run_layout(
    cfg: TrainingConfig, model_dir: Path, hw: Hardware, dist: Dist, parallelism: str,
    kept: tuple[int, int] | None = None,
) -> Any:
    """Micro-batch, accumulation and layers not checkpointed of this run, decided on rank 0.

    :func:`qlora_trainer.assemble.micro_batch_layout_for` from the model's ``config.json`` and
    this GPU's memory (``training.autoMicroBatch``, ``training.checkpointLayers``; ``kept``: a
    resumed run's micro-batch and accumulation, kept); every rank gets rank 0's layout (log line
    ``micro_batch_layout``). An unreadable ``config.json`` keeps the layout as given (or ``kept``),
    every layer checkpointed.
    """
    from .assemble import micro_batch_layout_for
    from .estimate import Layout

    t = cfg.training
    given = (t.micro_batch_size, t.gradient_accumulation_steps)
    use = kept or given
    layout = Layout(*use, given, "as given")
    if dist.is_main:
        try:
            model_config = json.loads((Path(model_dir) / "config.json").read_text())
            layout = micro_batch_layout_for(cfg, model_config, hw, world_size=dist.world_size,
                                            parallelism=None if parallelism == "single" else parallelism, kept=kept)
        except (OSError, ValueError) as err:
            layout = Layout(*use, given, f"as given: config.json unreadable: {err}")
    layout = dist.broadcast(layout)
    log_event("micro_batch_layout", **layout.summary())
    return layout


def preflight(cfg: TrainingConfig, model_dir: Path, hw: Hardware, dist: Dist, gpu_gib: float | None = None) -> str:
    """The parallelism of this run (``single``, ``ddp``, ``fsdp``), checked against GPU memory.

    On CUDA, global rank 0 estimates the per-GPU memory at micro-batch 1 from the model's
    ``config.json`` (``estimate.plan``) with this GPU's total memory
    (``torch.cuda.mem_get_info``) and logs it (``memory_estimate``); ``auto`` becomes DDP
    when one replica fits a GPU, else FSDP. Every rank gets rank 0's decision. Without
    CUDA, or for a model the estimate does not cover, nothing is checked and ``auto`` is DDP;
    without CUDA ``fsdp`` is DDP too (accelerate enables FSDP on accelerator devices only).
    ``gpu_gib`` overrides the GPU's memory (tests).

    Raises:
        DoesNotFitError: the estimate exceeds the GPU's memory (exit 7), with the numbers
            and what would fit.
    """
    setting = cfg.training.parallelism
    if dist.launched and dist.world_size == 1 and setting != "auto":
        default = setting  # torchrun with one process: honour an explicit ddp/fsdp (FSDP over one GPU tests the wiring)
    else:
        default = "single" if not dist.active else ("ddp" if setting == "auto" else setting)
    decision, error = default, None
    if dist.is_main:
        try:
            decision = _plan_on_rank0(cfg, model_dir, hw, dist, default, gpu_gib)
        except Exception as err:  # noqa: BLE001 - shared with every rank by agree()
            error = err
    dist.agree(error)
    return str(dist.broadcast(decision))


def _plan_on_rank0(
    cfg: TrainingConfig, model_dir: Path, hw: Hardware, dist: Dist, default: str, gpu_gib: float | None
) -> str:
    if hw.device != "cuda":
        if default == "fsdp":
            # accelerate 1.15 enables FSDP for accelerator devices only: on CPU it would quietly run DDP.
            default = "ddp"
            log_event("parallelism", requested="fsdp", using="ddp", reason="FSDP needs CUDA GPUs (accelerate)")
        log_event("memory_estimate", skipped="no CUDA GPU", parallelism=default)
        return default
    try:
        model_config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError) as err:
        log_event("memory_estimate", skipped=f"config.json unreadable: {err}", parallelism=default)
        return default
    total = gpu_gib if gpu_gib is not None else torch.cuda.mem_get_info()[1] / GIB
    dtype = str(compute_dtype(cfg.quantization.compute_dtype, hw)).removeprefix("torch.")
    try:
        decision = plan(model_config, cfg, world_size=dist.world_size, gpu_gib=total, compute_dtype=dtype)
    except EstimateError as err:
        log_event("memory_estimate", skipped=str(err), parallelism=default)
        return default
    log_event("memory_estimate", **decision.estimate.summary())
    if not decision.fits:
        raise DoesNotFitError(decision.message)
    return default if dist.world_size == 1 else decision.parallelism
