"""Config -> library objects (``qlora_trainer.model``) and the training guards (``callbacks``, ``train``).

Names are checked against the installed transformers/TRL/PEFT/bitsandbytes, so a
library upgrade that renames an argument fails here, not in a pod.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from qlora_trainer.config import ConfigError, LoraSettings, QuantizationConfig, parse_config
from qlora_trainer.errors import NonFiniteLossError
from qlora_trainer.model import (
    Hardware,
    bnb_config,
    compute_dtype,
    lora_config,
    mixed_precision,
    sft_config,
)
from qlora_trainer.train import backoff

CPU = Hardware("cpu", False, "cpu")
AMPERE = Hardware("cuda", True, "NVIDIA H200")
VOLTA = Hardware("cuda", False, "Tesla V100")


def config(**training):
    return parse_config(
        {
            "model": {"uri": "file:///m"},
            "dataset": {"uri": "file:///d.jsonl"},
            "output": {"uri": "file:///o"},
            "training": training,
        }
    )


@pytest.mark.parametrize(
    "setting,hw,expected",
    [
        ("auto", CPU, torch.float32),
        ("auto", AMPERE, torch.bfloat16),
        ("auto", VOLTA, torch.float16),
        ("bfloat16", CPU, torch.bfloat16),
        ("float16", AMPERE, torch.float16),
    ],
)
def test_compute_dtype(setting, hw, expected):
    assert compute_dtype(setting, hw) == expected


@pytest.mark.parametrize(
    "precision,dtype,hw,expected",
    [
        ("auto", torch.float32, CPU, {"bf16": False, "fp16": False}),
        ("auto", torch.bfloat16, AMPERE, {"bf16": True, "fp16": False}),
        ("auto", torch.float16, VOLTA, {"bf16": False, "fp16": True}),
        ("fp32", torch.bfloat16, AMPERE, {"bf16": False, "fp16": False}),
        ("bf16", torch.float32, CPU, {"bf16": True, "fp16": False}),
    ],
)
def test_mixed_precision(precision, dtype, hw, expected):
    assert mixed_precision(precision, dtype, hw) == expected


def test_impossible_precision_is_a_config_error():
    with pytest.raises(ConfigError, match="training.precision fp16 needs a CUDA GPU"):
        mixed_precision("fp16", torch.float16, CPU)
    with pytest.raises(ConfigError, match="no bfloat16 support"):
        mixed_precision("bf16", torch.bfloat16, VOLTA)


def test_sft_config_uses_current_argument_names(tmp_path):
    cfg = config(
        maxSteps=7,
        microBatchSize=3,
        gradientAccumulationSteps=5,
        maxSeqLength=321,
        warmupRatio=0.1,
        checkpointEverySteps=4,
        keepCheckpoints=3,
        optimizer="adamw_torch",
    )
    args = sft_config(cfg, tmp_path, CPU, torch.float32)
    assert args.max_length == 321  # TRL 1.x name (was max_seq_length)
    assert args.warmup_steps == pytest.approx(0.1) and isinstance(args.warmup_steps, float)  # ratio
    assert not hasattr(args, "warmup_ratio") or getattr(args, "warmup_ratio", None) in (None, 0, 0.0)
    assert args.bf16 is False and args.fp16 is False  # TRL's default bf16=True must not leak onto CPU
    assert args.use_cpu is True
    assert args.gradient_checkpointing is True
    assert args.gradient_checkpointing_kwargs == {"use_reentrant": False}  # offloading: qlora_trainer.offload
    assert args.use_liger_kernel is False  # CUDA only
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.max_steps) == (3, 5, 7)
    assert args.save_steps == 4 and args.save_total_limit == 3 and args.optim == "adamw_torch"
    assert args.packing is True and args.padding_free is True
    assert args.include_num_input_tokens_seen == "all"  # packed rows have no padding to exclude
    assert args.logging_nan_inf_filter is False  # the non-finite guard sees real values
    assert args.report_to == [] or args.report_to in ("none", ["none"])
    unpacked = sft_config(config(packing=False), tmp_path, CPU, torch.float32)
    # Padding-free (default): one row per micro-batch, no padding; examples are pre-truncated, so no max_length.
    assert unpacked.padding_free is True and unpacked.include_num_input_tokens_seen == "all"
    assert unpacked.max_length is None
    padded = sft_config(config(packing=False, paddingFree=False), tmp_path, CPU, torch.float32)
    assert padded.padding_free is False and padded.include_num_input_tokens_seen == "non_padding"
    assert padded.max_length == 512
    offloaded = sft_config(config(activationOffloading=True), tmp_path, CPU, torch.float32)
    # not transformers' synchronous offload: qlora_trainer.offload's side-stream copies (a callback)
    assert offloaded.gradient_checkpointing_kwargs == {"use_reentrant": False}
    epochs = sft_config(
        config(epochs=2), tmp_path, CPU, torch.float32, micro_batch_size=1, gradient_accumulation_steps=8
    )
    assert epochs.num_train_epochs == 2 and epochs.max_steps == -1
    assert (epochs.per_device_train_batch_size, epochs.gradient_accumulation_steps) == (1, 8)


def test_bnb_and_lora_configs():
    bnb = bnb_config(QuantizationConfig(quantType="fp4", doubleQuant=False), torch.bfloat16)
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "fp4" and bnb.bnb_4bit_use_double_quant is False
    assert bnb.bnb_4bit_compute_dtype == torch.bfloat16
    lora = lora_config(LoraSettings())
    assert lora.target_modules == "all-linear" and lora.r == 16 and lora.lora_alpha == 32
    assert lora.task_type == "CAUSAL_LM" and lora.bias == "none"
    explicit = lora_config(LoraSettings(targetModules=["q_proj", "v_proj"], r=8, alpha=16, dropout=0.0))
    assert set(explicit.target_modules) == {"q_proj", "v_proj"} and explicit.lora_dropout == 0.0


@pytest.mark.parametrize(
    "start,expected",
    [((4, 4), [(2, 8), (1, 16)]), ((3, 2), [(1, 6)]), ((6, 1), [(3, 2), (1, 6)]), ((5, 2), [(2, 5), (1, 10)])],
)
def test_oom_backoff_halves_and_keeps_the_effective_batch(start, expected):
    steps, current = [], start
    while current[0] > 1:
        current = backoff(*current)
        steps.append(current)
        assert current[0] * current[1] == start[0] * start[1]
    assert steps == expected
    with pytest.raises(ValueError):
        backoff(1, 16)


def test_non_finite_guard_needs_consecutive_steps():
    from qlora_trainer.callbacks import NonFiniteGuard

    guard = NonFiniteGuard(patience=3)
    state = SimpleNamespace(global_step=1)
    for logs in (
        {"loss": float("nan")},
        {"loss": 1.0, "grad_norm": 0.5},
        {"loss": 2.0, "grad_norm": float("inf")},
        {"loss": float("nan")},
    ):
        guard.on_log(None, state, None, logs=logs)
    assert guard.streak == 2
    guard.on_log(None, state, None, logs={"eval_loss": float("nan")})  # eval logs are not training steps
    with pytest.raises(NonFiniteLossError, match="3 consecutive logged steps.*no adapter was written"):
        guard.on_log(None, state, None, logs={"loss": float("inf")})


def test_oom_test_hook_raises_the_cuda_oom_error_above_the_size(monkeypatch):
    from qlora_trainer.callbacks import FaultInjection

    monkeypatch.setenv("QLORA_TEST_OOM_AT_MICRO_BATCH", "2")
    hook = FaultInjection()
    assert hook.active
    hook.on_step_begin(SimpleNamespace(per_device_train_batch_size=2), None, None)
    with pytest.raises(torch.OutOfMemoryError):
        hook.on_step_begin(SimpleNamespace(per_device_train_batch_size=4), None, None)
    monkeypatch.delenv("QLORA_TEST_OOM_AT_MICRO_BATCH")
    assert not FaultInjection().active


def test_lora_gradients_reach_the_first_layer_after_an_eval_pass():
    """bitsandbytes repacks 4-bit weights for CPU inference in eval mode and then drops their gradients.

    Regression test for ``keep_4bit_trainable_on_cpu``: the first layer's LoRA must get
    the same gradient whether or not an eval forward ran before (the eval-loss-before).
    """
    repo = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(repo / "hack"))
    import embedded
    from peft import get_peft_model
    from qlora_trainer.model import load_base_4bit

    torch.manual_seed(0)
    model = load_base_4bit(
        embedded.ensure_model(), QuantizationConfig(), torch.float32, CPU, gradient_checkpointing=False
    )
    model = get_peft_model(model, lora_config(LoraSettings(dropout=0.0)))  # no dropout: deterministic
    x = torch.randint(0, 49152, (1, 24))
    first = next(p for n, p in model.named_parameters() if "layers.0.self_attn.q_proj.lora_B" in n)

    def grad() -> torch.Tensor:
        model.zero_grad()
        model.train()
        model(input_ids=x, labels=x).loss.backward()
        return first.grad.detach().clone()

    before = grad()
    model.eval()
    with torch.no_grad():
        model(input_ids=x)
    after = grad()
    assert before.norm() > 0
    torch.testing.assert_close(after, before)
