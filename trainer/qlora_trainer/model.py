"""The one adapter from our config to library objects (transformers, bitsandbytes, PEFT, TRL).

Every name that changed across library versions is mapped here and nowhere else
(checked against the installed transformers 5.x, TRL 1.x, PEFT 0.2x, bitsandbytes 0.5x):

* TRL ``SFTConfig``: ``max_length`` (not ``max_seq_length``); the trainer takes
  ``processing_class`` (not ``tokenizer``); ``bf16`` defaults to *True* in TRL's
  base config, so it is always set explicitly here.
* transformers ``TrainingArguments``: ``warmup_ratio`` is gone; ``warmup_steps`` takes a
  float in ``[0, 1)`` as a ratio of the total steps.
* Gradient checkpointing is non-reentrant (``use_reentrant=False``).
* Compute dtype ``auto``: bfloat16 on GPUs that support it, float16 on older GPUs,
  float32 on CPU (bf16 matmuls on CPU are about ten times slower).
* Precision ``auto`` follows the compute dtype (bf16 -> bf16 autocast, fp16 -> fp16
  with the gradient scaler, fp32 -> none). fp16 with bf16 compute is refused in the
  config; fp16 on a machine without CUDA is refused here.
* bitsandbytes 0.50 on CPUs with AVX512-BF16 repacks a ``Linear4bit`` weight in place
  for fast inference the first time it runs in eval mode without gradients (our eval
  before training); afterwards its matmul has no autograd kernel, so gradients stop
  flowing through every frozen layer and the LoRA weights of all but the last layers
  get zero gradient (torch only warns). :func:`keep_4bit_trainable_on_cpu` turns that
  repacking off.
* LoRA weights stay float32 (master weights; autocast does the low-precision
  matmuls). TRL casts the adapter of a quantised model to bf16; that makes the
  fp16 gradient scaler fail (it cannot unscale bf16 gradients) and, on CPU, runs the
  LoRA matmuls in slow bf16. :func:`adapter_to_float32` undoes it before training.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, Dtype, LoraSettings, Precision, QuantizationConfig, TrainingConfig

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Hardware:
    """What the run executes on: ``device`` is ``"cuda"`` or ``"cpu"``; ``bf16`` whether the GPU does bf16."""

    device: str
    bf16: bool
    name: str

    @classmethod
    def detect(cls) -> Hardware:
        if torch.cuda.is_available():
            return cls("cuda", bool(torch.cuda.is_bf16_supported()), torch.cuda.get_device_name(0))
        return cls("cpu", False, "cpu")


def compute_dtype(setting: Dtype | str, hw: Hardware) -> torch.dtype:
    """The 4-bit matmul compute dtype for ``quantization.computeDtype`` (``auto`` resolved for ``hw``)."""
    value = Dtype(setting).value
    if value != "auto":
        return _DTYPES[value]
    if hw.device == "cuda":
        return torch.bfloat16 if hw.bf16 else torch.float16
    return torch.float32


def mixed_precision(setting: Precision | str, dtype: torch.dtype, hw: Hardware) -> dict[str, bool]:
    """``{"bf16": ..., "fp16": ...}`` for ``SFTConfig`` from ``training.precision``.

    Raises:
        ConfigError: fp16 requested without CUDA, or bf16 on a GPU without bf16.
    """
    value = Precision(setting).value
    if value == "auto":
        value = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    if value == "fp16" and hw.device != "cuda":
        raise ConfigError("training.precision fp16 needs a CUDA GPU: use bf16 or fp32 (or auto) on CPU")
    if value == "bf16" and hw.device == "cuda" and not hw.bf16:
        raise ConfigError(f"training.precision bf16: the GPU {hw.name} has no bfloat16 support: use fp16 or auto")
    return {"bf16": value == "bf16", "fp16": value == "fp16"}


def load_tokenizer(path: Path) -> Any:
    """The tokenizer of the model directory; its pad token is set to EOS when it has none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def bnb_config(q: QuantizationConfig, dtype: torch.dtype) -> Any:
    """bitsandbytes 4-bit config: ``quantType`` nf4/fp4, ``doubleQuant``, compute ``dtype``."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=torch.uint8,
    )


def device_map(hw: Hardware) -> dict[str, Any]:
    """Everything on one device: the local GPU (``LOCAL_RANK``) or the CPU."""
    if hw.device == "cuda":
        import os

        return {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return {"": "cpu"}


def load_base_4bit(
    path: Path, q: QuantizationConfig, dtype: torch.dtype, hw: Hardware, *, gradient_checkpointing: bool
) -> Any:
    """Load the base model 4-bit quantised and prepared for k-bit training.

    Non-quantised modules (embeddings, norms, head) load in ``dtype``; PEFT's
    ``prepare_model_for_kbit_training`` freezes everything, upcasts them to fp32 and,
    with ``gradient_checkpointing``, enables non-reentrant checkpointing.
    """
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path),
        quantization_config=bnb_config(q, dtype),
        dtype=dtype,
        device_map=device_map(hw),
        low_cpu_mem_usage=True,
    )
    model.config.use_cache = False
    keep_4bit_trainable_on_cpu(model)
    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )


def keep_4bit_trainable_on_cpu(model: Any) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference (see the module docstring).

    Returns the number of ``Linear4bit`` modules changed (0 where the CPU lacks AVX512-BF16).
    """
    n = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def lora_config(lora: LoraSettings) -> Any:
    """PEFT ``LoraConfig``: ``all-linear`` is passed as the string PEFT expands (every linear but the head)."""
    from peft import LoraConfig

    targets: Any = lora.target_modules
    if len(targets) == 1 and targets[0] == "all-linear":
        targets = "all-linear"
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias=lora.bias,
        task_type="CAUSAL_LM",
    )


def adapter_to_float32(model: Any) -> int:
    """Cast every trainable parameter to float32 (see the module docstring); returns how many."""
    n = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.to(torch.float32)
            n += 1
    return n


def sft_config(
    cfg: TrainingConfig,
    output_dir: Path,
    hw: Hardware,
    dtype: torch.dtype,
    *,
    micro_batch_size: int | None = None,
    gradient_accumulation_steps: int | None = None,
    with_eval: bool = True,
) -> Any:
    """TRL ``SFTConfig`` for the run; local checkpoints go to ``output_dir/checkpoint-N``.

    ``micro_batch_size``/``gradient_accumulation_steps`` override the config (OOM back-off).
    Checkpoints are saved every ``checkpointEverySteps`` with optimizer, scheduler, RNG
    and trainer state; the storage sync is a callback (``train``).
    """
    from trl import SFTConfig

    t = cfg.training
    precision = mixed_precision(t.precision, dtype, hw)
    padding_free = t.packing  # TRL's "bfd" packing is padding-free: no padding tokens at all
    kwargs: dict[str, Any] = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": micro_batch_size or t.micro_batch_size,
        # eval keeps no activations for a backward pass: twice the micro-batch fits where training does
        "per_device_eval_batch_size": 2 * (micro_batch_size or t.micro_batch_size),
        "gradient_accumulation_steps": gradient_accumulation_steps or t.gradient_accumulation_steps,
        "learning_rate": t.learning_rate,
        "lr_scheduler_type": t.lr_scheduler,
        "warmup_steps": float(t.warmup_ratio),  # a float in [0, 1) is a ratio of the total steps
        "optim": t.optimizer,
        "max_grad_norm": t.max_grad_norm,
        "weight_decay": t.weight_decay,
        "seed": t.seed,
        "data_seed": t.seed,
        "bf16": precision["bf16"],
        "fp16": precision["fp16"],
        "use_cpu": hw.device == "cpu",
        "max_length": t.max_seq_length,
        "packing": t.packing,
        "packing_strategy": "bfd",
        "eval_packing": False,
        "completion_only_loss": None,  # labels are built by ``encode``; TRL keeps a given labels column
        "gradient_checkpointing": t.gradient_checkpointing,
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "logging_steps": t.log_every_steps,
        "logging_first_step": True,
        "logging_nan_inf_filter": False,  # the non-finite guard must see NaN/inf as they are
        "include_num_input_tokens_seen": "all" if padding_free else "non_padding",
        "save_strategy": "steps",
        "save_steps": t.checkpoint_every_steps,
        "save_total_limit": t.keep_checkpoints,
        "eval_strategy": "steps" if with_eval else "no",
        "eval_steps": t.eval_every_steps,
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "dataset_num_proc": None,
        "remove_unused_columns": True,
    }
    if t.max_steps is not None:
        kwargs["max_steps"] = t.max_steps
    else:
        kwargs["num_train_epochs"] = t.resolved_epochs()
    return SFTConfig(**kwargs)
