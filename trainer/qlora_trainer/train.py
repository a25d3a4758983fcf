"""The training run: 4-bit base + LoRA, TRL ``SFTTrainer``, resume, back-off, guards.

:func:`train` does, in order:

1. Looks for the newest *complete* checkpoint under ``<output>/checkpoints/`` (one with
   ``_SUCCESS``; incomplete ones are ignored) and, if there is one, downloads it; the
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
"""

from __future__ import annotations

import gc
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .callbacks import (
    RUN_STATE_FILE,
    CheckpointSyncCallback,
    FaultInjection,
    gpu_memory_gib,
    NonFiniteGuard,
    PreemptionCallback,
    ProgressCallback,
)
from .config import TrainingConfig
from .errors import OutOfMemoryError, Preempted
from .inputs import DataInput, ModelInput
from .model import Hardware, adapter_to_float32, compute_dtype, load_base_4bit, lora_config, mixed_precision, sft_config
from .report import ProgressReporter, log_event
from .storage import Storage, join_uri

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


def _restore_checkpoint(
    storage: Storage, checkpoints_uri: str, local_root: Path
) -> tuple[int, Path, dict[str, Any]] | None:
    """Download the newest complete checkpoint to ``local_root/checkpoint-N``; ``None`` when there is none."""
    complete = storage.complete_checkpoints(checkpoints_uri)
    if not complete:
        return None
    latest = complete[-1]
    local = local_root / f"checkpoint-{latest.step}"
    storage.download_prefix(latest.uri, local)
    try:
        run_state = json.loads((local / RUN_STATE_FILE).read_text())
    except (OSError, ValueError):
        run_state = {}
    log_event("resume", step=latest.step, uri=latest.uri)
    return latest.step, local, run_state


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def train(
    cfg: TrainingConfig,
    base: ModelInput,
    tokenizer: Any,
    data: DataInput,
    storage: Storage,
    reporter: ProgressReporter,
    work_dir: Path,
    hw: Hardware | None = None,
) -> TrainOutcome:
    """Run QLoRA fine-tuning (see the module docstring); returns the trained model and metrics.

    Raises:
        ConfigError: precision not possible on this hardware (exit 2).
        StorageError: checkpoint download/upload failed (exit 4).
        OutOfMemoryError: CUDA OOM at micro-batch 1 (exit 5).
        NonFiniteLossError: NaN/inf loss (exit 6).
        Preempted: SIGTERM; a checkpoint was synced (exit 143).
    """
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import PrinterCallback
    from trl import SFTTrainer

    hw = hw or Hardware.detect()
    t = cfg.training
    dtype = compute_dtype(cfg.quantization.compute_dtype, hw)
    precision = mixed_precision(t.precision, dtype, hw)  # refuse impossible precision before loading anything
    out_dir = Path(work_dir) / "run"
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoints_uri = join_uri(cfg.output.uri, "checkpoints")

    restored = _restore_checkpoint(storage, checkpoints_uri, out_dir)
    resumed_from, local_ckpt, run_state = restored if restored else (None, None, {})
    micro_batch = int(run_state.get("microBatchSize") or t.micro_batch_size)
    accumulation = int(run_state.get("gradientAccumulationSteps") or t.gradient_accumulation_steps)
    eval_before = run_state.get("evalLossBefore")
    run_state = {
        "evalLossBefore": eval_before,
        "microBatchSize": micro_batch,
        "gradientAccumulationSteps": accumulation,
        "resumedFrom": run_state.get("resumedFrom", []) + ([resumed_from] if resumed_from else []),
    }

    log_event("load_model", uri=base.uri, computeDtype=str(dtype).removeprefix("torch."), device=hw.device, **precision)
    t0 = time.monotonic()
    model = load_base_4bit(base.path, cfg.quantization, dtype, hw, gradient_checkpointing=t.gradient_checkpointing)
    model = get_peft_model(model, lora_config(cfg.lora))
    adapter_to_float32(model)
    initial_adapter = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log_event("model_ready", seconds=round(time.monotonic() - t0, 1), trainableParams=trainable)

    train_ds, eval_ds = data.train.to_dataset(), data.eval.to_dataset()
    progress = ProgressCallback(reporter)
    sync = CheckpointSyncCallback(storage, checkpoints_uri, t.keep_checkpoints, run_state)
    guard = NonFiniteGuard(t.non_finite_patience)
    preempt = PreemptionCallback()
    faults = FaultInjection()
    backoffs: list[dict[str, int]] = []
    tried: list[int] = []
    preempt.install()
    try:
        while True:
            args = sft_config(
                cfg, out_dir, hw, dtype, micro_batch_size=micro_batch, gradient_accumulation_steps=accumulation
            )
            callbacks = [progress, sync, guard, preempt] + ([faults] if faults.active else [])
            trainer = SFTTrainer(
                model=model,
                args=args,
                train_dataset=train_ds,
                eval_dataset=eval_ds,
                processing_class=tokenizer,
                callbacks=callbacks,
            )
            adapter_to_float32(trainer.model)  # TRL casts a quantised model's adapter to bf16
            trainer.remove_callback(PrinterCallback)  # our JSON lines replace its dict prints
            try:
                if eval_before is None:
                    reporter.stage("Evaluating")
                    eval_before = float(trainer.evaluate()["eval_loss"])
                    run_state["evalLossBefore"] = eval_before
                    log_event("eval_before", evalLoss=eval_before, examples=len(eval_ds))
                train_start = time.monotonic()
                result = trainer.train(resume_from_checkpoint=str(local_ckpt) if local_ckpt else None)
                break
            except torch.OutOfMemoryError as err:
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
                model.zero_grad(set_to_none=True)
                del trainer
                _free_memory()
                # Continue from the last synced checkpoint of this run (or the one resumed from), else restart.
                local_ckpt = sync.last_local or local_ckpt
                if local_ckpt is None:
                    set_peft_model_state_dict(model, initial_adapter)
                reporter.update(force=True)
    finally:
        preempt.uninstall()
    train_seconds = time.monotonic() - train_start
    if preempt.requested:
        raise Preempted(
            f"SIGTERM at step {trainer.state.global_step}: checkpoint {sync.last_uri or '(none yet)'} written; "
            "the next attempt resumes from it"
        )

    reporter.stage("Evaluating", step=trainer.state.global_step)
    if progress.last_eval is not None and progress.last_eval[0] == trainer.state.global_step:
        eval_after = progress.last_eval[1]  # the Trainer already evaluated the final step
    else:
        eval_after = float(trainer.evaluate()["eval_loss"])
    log_event("eval_after", evalLoss=eval_after, evalLossBefore=eval_before)
    reporter.update(evalLoss=eval_after)

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
        "effectiveBatchSize": micro_batch * accumulation,
        "microBatchSize": micro_batch,
        "gradientAccumulationSteps": accumulation,
        "trainableParams": trainable,
        **gpu_memory_gib(),
    }
    return TrainOutcome(
        model=trainer.model,
        metrics=metrics,
        resumed_from_step=resumed_from,
        micro_batch_size=micro_batch,
        gradient_accumulation_steps=accumulation,
        backoffs=backoffs,
        last_checkpoint_uri=sync.last_uri
        or (join_uri(checkpoints_uri, f"step-{resumed_from}") if resumed_from else None),
    )
