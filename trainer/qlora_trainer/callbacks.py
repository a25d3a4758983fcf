"""transformers ``TrainerCallback`` s of the run; each does one thing.

* :class:`EvalBeforeTraining`: the eval loss of the untrained adapter, measured when
  training begins, i.e. after the Trainer has wrapped the model for DDP/FSDP. (Calling
  ``trainer.evaluate()`` before ``trainer.train()`` marks the model as prepared by
  accelerate 1.15 in evaluation mode, and ``train()`` then skips the DDP wrapping:
  every rank would silently train its own replica.)
* :class:`ProgressCallback`: one JSON log line per logged step (step, totalSteps,
  epoch, loss, lr, gradNorm, tokensPerSecond over real non-padding tokens,
  etaSeconds, peak GPU memory) and the same fields to the status reporter (throttled
  there; the peak reserved GPU memory as ``gpuMemoryGiB``, no gradNorm).
* :class:`CheckpointSyncCallback`: after the Trainer wrote ``checkpoint-N`` locally
  (adapter, optimizer, scheduler, RNG, trainer state), adds ``qlora_state.json`` and
  uploads it to ``<output>/checkpoints/step-N/`` with ``_SUCCESS`` last, then keeps
  the newest ``keepCheckpoints`` in storage. Multi-GPU: every rank first waits until
  all have written their files (per-rank RNG state), only global rank 0 uploads, and
  an upload failure stops every rank with rank 0's exit code (``Dist.agree``).
* :class:`NonFiniteGuard`: raises :class:`~qlora_trainer.errors.NonFiniteLossError`
  (exit 6) after ``nonFinitePatience`` consecutive logged steps whose loss or
  gradient norm is NaN/inf.
* :class:`PreemptionCallback`: on SIGTERM, saves (and so syncs) a checkpoint at the
  end of the current step and stops; the run then exits 143 and the next attempt
  resumes. Multi-GPU: the flag is all-reduced at every step end, so every rank saves
  and stops at the same step even when the signal reached them at different steps.
* :class:`NonFiniteGuard` needs no collective: the Trainer logs the loss averaged over
  all ranks and the global gradient norm, so every rank decides alike.
* :class:`FaultInjection`: test hooks driven by environment variables (never set in
  production): ``QLORA_TEST_OOM_AT_MICRO_BATCH=N`` raises ``torch.OutOfMemoryError``
  at the start of a step while the micro-batch is larger than N;
  ``QLORA_TEST_NAN_FROM_STEP=N`` writes NaN into the adapter after step N so the loss
  really becomes non-finite.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from . import contract
from .distributed import Dist
from .errors import NonFiniteLossError
from .report import ProgressReporter, log_event
from .storage import Storage, join_uri

log = logging.getLogger(__name__)

#: Run metadata stored inside each checkpoint (eval loss before training, batch shape in use).
RUN_STATE_FILE = "qlora_state.json"


def gpu_memory_gib() -> dict[str, float]:
    """Peak CUDA memory of this process so far, in GiB (``torch.cuda.max_memory_*``); ``{}`` on CPU."""
    import torch

    if not torch.cuda.is_available():
        return {}
    return {
        "peakAllocatedGiB": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "peakReservedGiB": round(torch.cuda.max_memory_reserved() / 2**30, 2),
    }


def _round(value: float | None, digits: int) -> float | None:
    """``value`` rounded for display (status and log lines), ``None`` kept."""
    return None if value is None else round(value, digits)


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


class EvalBeforeTraining(TrainerCallback):
    """Measures the eval loss before the first step (see the module docstring); skipped when ``loss`` is known.

    Args:
        reporter: gets the ``Evaluating`` stage.
        run_state: the checkpoint's run metadata; ``evalLossBefore`` is stored there.
        examples: eval examples (for the log line).

    Set :attr:`trainer` to the Trainer before training.
    """

    def __init__(self, reporter: ProgressReporter, run_state: dict[str, Any], examples: int) -> None:
        self.reporter = reporter
        self.run_state = run_state
        self.examples = examples
        self.trainer: Any = None
        self.loss: float | None = run_state.get("evalLossBefore")
        self.seconds = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.loss is not None or self.trainer is None:
            return
        t0 = time.monotonic()
        prepared = gpu_memory_gib()  # the model as training holds it (after DDP/FSDP wrapping), before any batch
        self.reporter.stage(contract.STAGE_EVALUATING)
        self.loss = float(self.trainer.evaluate()["eval_loss"])
        self.run_state["evalLossBefore"] = self.loss
        self.seconds = time.monotonic() - t0
        log_event("eval_before", evalLoss=self.loss, examples=self.examples,
                  **{f"{k}BeforeEval": v for k, v in prepared.items()}, **gpu_memory_gib())


class ProgressCallback(TrainerCallback):
    """Structured log lines and status progress for every logged training step."""

    def __init__(self, reporter: ProgressReporter) -> None:
        self.reporter = reporter
        self._t0: float | None = None
        self._step0 = 0
        self._last: tuple[float, int] | None = None  # (time, tokens seen) at the previous log
        self.tokens_at_start = 0
        self.last_eval: tuple[int, float] | None = None  # (step, eval loss) of the latest in-training eval

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._t0 = time.monotonic()
        self._step0 = state.global_step
        self.tokens_at_start = int(state.num_input_tokens_seen or 0)
        self._last = (self._t0, self.tokens_at_start)
        self.reporter.stage(contract.STAGE_TRAINING, step=state.global_step, totalSteps=state.max_steps)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        if "loss" not in logs or self._t0 is None:
            return  # eval or summary logs are reported by the caller
        now = time.monotonic()
        tokens = state.num_input_tokens_seen or 0
        tps = None
        if self._last is not None and now > self._last[0]:
            tps = (tokens - self._last[1]) / (now - self._last[0])
        self._last = (now, tokens)
        done = state.global_step - self._step0
        eta = None
        if done > 0 and state.max_steps:
            eta = (now - self._t0) / done * max(0, state.max_steps - state.global_step)
        fields = {
            "step": state.global_step,
            "totalSteps": state.max_steps,
            "epoch": round(state.epoch or 0.0, 4),
            "loss": _round(_num(logs.get("loss")), 4),
            "learningRate": _round(_num(logs.get("learning_rate")), 8),
            "gradNorm": _num(logs.get("grad_norm")),
            "tokensPerSecond": round(tps, 1) if tps is not None else None,
            "etaSeconds": round(eta) if eta is not None else None,
        }
        memory = gpu_memory_gib()
        log_event("train_step", **fields, **memory)
        fields.pop("gradNorm")
        # GPU memory for status (and the operator's metrics): peak reserved by PyTorch on this
        # process's GPU, in GiB (global rank 0's, the only rank that reports); unset on CPU.
        self.reporter.update(**fields, gpuMemoryGiB=memory.get("peakReservedGiB"))

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        loss = _num((metrics or {}).get("eval_loss"))
        if loss is not None and self._t0 is not None:
            self.last_eval = (state.global_step, loss)
            log_event("eval", step=state.global_step, evalLoss=loss)
            self.reporter.update(evalLoss=_round(loss, 4))


class CheckpointSyncCallback(TrainerCallback):
    """Uploads each local checkpoint to ``<checkpoints_uri>/step-N/`` (marker last) and prunes old ones.

    Args:
        storage: where checkpoints go.
        checkpoints_uri: ``<output>/checkpoints``.
        keep: newest complete checkpoints kept in storage.
        run_state: dict written into each checkpoint as ``qlora_state.json`` (mutable:
            the caller updates it, e.g. with the batch shape after an OOM back-off).
    """

    def __init__(
        self, storage: Storage, checkpoints_uri: str, keep: int, run_state: dict[str, Any], dist: Dist | None = None
    ) -> None:
        self.dist = dist or Dist.single()
        self.storage = storage
        self.checkpoints_uri = checkpoints_uri
        self.keep = keep
        self.run_state = run_state
        self.last_uri: str | None = None
        self.last_local: Path | None = None

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.dist.barrier()  # every rank has written its part (RNG state) of checkpoint-N
        error: BaseException | None = None
        if self.dist.is_main:
            try:
                self._sync(args, state)
            except Exception as err:  # noqa: BLE001 - every rank must hear about it (agree)
                error = err
        self.dist.agree(error)

    def _sync(self, args: Any, state: Any) -> None:
        step = state.global_step
        local = Path(args.output_dir) / f"checkpoint-{step}"
        if not local.is_dir():
            log.warning("checkpoint directory %s missing after save; not synced", local)
            return
        (local / RUN_STATE_FILE).write_text(json.dumps({**self.run_state, "step": step}, indent=1))
        uri = join_uri(self.checkpoints_uri, contract.checkpoint_dir(step))
        t0 = time.monotonic()
        files = self.storage.upload_dir(local, uri, marker={"step": step})
        deleted = self.storage.prune_checkpoints(self.checkpoints_uri, self.keep)
        self.last_uri, self.last_local = uri, local
        log_event(
            "checkpoint", step=step, uri=uri, files=len(files), seconds=round(time.monotonic() - t0, 2), pruned=deleted
        )


class NonFiniteGuard(TrainerCallback):
    """Stops the run (exit 6) after ``patience`` consecutive logged steps with a NaN/inf loss or grad norm."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.streak = 0

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        if "loss" not in logs:
            return
        values = {k: logs.get(k) for k in ("loss", "grad_norm") if isinstance(logs.get(k), int | float)}
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        self.streak = self.streak + 1 if bad else 0
        if bad:
            log_event(
                "non_finite",
                step=state.global_step,
                streak=self.streak,
                patience=self.patience,
                **{k: str(v) for k, v in bad.items()},
            )
        if self.streak >= self.patience:
            what = " and ".join(f"{k.replace('grad_norm', 'gradient norm')} {v}" for k, v in bad.items())
            raise NonFiniteLossError(
                f"non-finite training values for {self.streak} consecutive logged steps (step {state.global_step}: "
                f"{what}); no adapter was written. Lower training.learningRate, keep training.maxGradNorm small, "
                "check the data for broken rows, or use training.precision bf16/fp32 instead of fp16"
            )


class PreemptionCallback(TrainerCallback):
    """SIGTERM -> checkpoint at the end of the current step, then stop (the caller exits 143)."""

    def __init__(self, dist: Dist | None = None) -> None:
        self.dist = dist or Dist.single()
        self.requested = False
        self._previous: Any = None

    def install(self) -> None:
        """Install the SIGTERM handler (main thread only)."""

        def handler(signum: int, frame: Any) -> None:
            self.requested = True
            log_event("sigterm", message="checkpointing at the end of this step, then stopping")

        try:
            self._previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread
            log.debug("SIGTERM handler not installed (not the main thread)")

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.dist.any_flag(self.requested):
            self.requested = True
            control.should_save = True
            control.should_training_stop = True


class FaultInjection(TrainerCallback):
    """Test hooks (see the module docstring); inert unless their environment variables are set."""

    def __init__(self) -> None:
        oom = os.environ.get("QLORA_TEST_OOM_AT_MICRO_BATCH")
        nan = os.environ.get("QLORA_TEST_NAN_FROM_STEP")
        self.oom_above = int(oom) if oom else None
        self.nan_from = int(nan) if nan else None

    @property
    def active(self) -> bool:
        return self.oom_above is not None or self.nan_from is not None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.oom_above is not None and args.per_device_train_batch_size > self.oom_above:
            raise torch.OutOfMemoryError(
                f"CUDA out of memory (test hook QLORA_TEST_OOM_AT_MICRO_BATCH={self.oom_above}, "
                f"micro-batch {args.per_device_train_batch_size})"
            )

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.nan_from is not None and state.global_step >= self.nan_from and model is not None:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if param.requires_grad and "lora_B" in name:
                        param.fill_(float("nan"))
