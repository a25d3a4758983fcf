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
* Multi-GPU (``distributed``): under torchrun the Trainer/accelerate wrap the model
  themselves; each local rank loads the 4-bit model onto ``cuda:LOCAL_RANK``.
  DDP: ``ddp_find_unused_parameters=False`` (every LoRA weight gets a gradient every
  step; the search costs a graph traversal per step), ``ddp_backend`` nccl on CUDA,
  gloo on CPU.
* FSDP-QLoRA (``training.parallelism: fsdp``; bitsandbytes' "FSDP-QLoRA" guide and
  PEFT's "Use PEFT QLoRA and FSDP", checked against transformers 5.17 / accelerate
  1.15 source): ``bnb_4bit_quant_storage`` = the compute dtype, so the packed 4-bit
  weights are a float tensor FSDP can shard and its mixed-precision cast is a no-op
  (accelerate excludes uint8-stored ``Params4bit`` from sharding); the base loads in
  the compute dtype and its non-4-bit weights stay there (no float32 upcast: one dtype
  per FSDP unit); ``fsdp=True`` with ``fsdp_config`` version 2 (FSDP2 ``fully_shard``:
  transformers 5.17's default; FSDP1 and its ``use_orig_params``/``sync_module_states``
  are deprecated there and go in 5.20 — FSDP2 keeps the original parameters as DTensors
  and needs no state sync because every rank loads the same weights and seeds the same
  LoRA init), ``TRANSFORMER_BASED_WRAP`` on the decoder layer class,
  ``cpu_ram_efficient_loading`` off (accelerate skips it for 4-bit models: every rank
  loads the whole 4-bit model onto its GPU, then shards it), ``FULL_STATE_DICT``
  checkpoints (written by rank 0 alone, so its node's checkpoint directory is complete
  for the storage sync). Gradient checkpointing stays the Trainer's non-reentrant one
  (FSDP's ``activation_checkpointing`` does not preserve the RNG state, so LoRA dropout
  would draw a different mask in the recomputation). bitsandbytes' optimizers (the
  default ``paged_adamw_8bit``) cannot step FSDP2's DTensor parameters (seen on two
  H200s: "optimizer_update_8bit_blockwise got mixed torch.Tensor and DTensor"), so under
  FSDP they become ``adamw_torch`` (:func:`optimizer_for`; the adapter is small, so its
  32-bit states cost little, and sharded).
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


def bnb_config(q: QuantizationConfig, dtype: torch.dtype, *, fsdp: bool = False) -> Any:
    """bitsandbytes 4-bit config: ``quantType`` nf4/fp4, ``doubleQuant``, compute ``dtype``.

    The packed weights are stored as uint8, or under FSDP as ``dtype`` (see the module docstring).
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype if fsdp else torch.uint8,
    )


def device_map(hw: Hardware) -> dict[str, Any]:
    """Everything on one device: the local GPU (``LOCAL_RANK``) or the CPU."""
    if hw.device == "cuda":
        import os

        return {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return {"": "cpu"}


def load_base_4bit(
    path: Path,
    q: QuantizationConfig,
    dtype: torch.dtype,
    hw: Hardware,
    *,
    gradient_checkpointing: bool,
    upcast_frozen: bool = True,
    attn_implementation: str = "sdpa",
    fsdp: bool = False,
) -> Any:
    """Load the base model 4-bit quantised, every weight frozen, ready for LoRA.

    Non-quantised modules (embeddings, norms, head) load in ``dtype``. With
    ``upcast_frozen`` PEFT's ``prepare_model_for_kbit_training`` freezes everything,
    upcasts them to fp32 and, with ``gradient_checkpointing``, enables non-reentrant
    checkpointing (the reference recipe); without it they stay in ``dtype``
    (``training.upcastFrozenWeights``, see :mod:`qlora_trainer.speed`) and the Trainer
    enables checkpointing. ``attn_implementation``: a transformers attention name
    (:func:`qlora_trainer.speed.attention_implementation`). ``fsdp``: FSDP-QLoRA (packed
    weights stored in ``dtype``, no upcast whatever ``upcast_frozen`` says; module docstring).
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path),
        quantization_config=bnb_config(q, dtype, fsdp=fsdp),
        dtype=dtype,
        device_map=device_map(hw),
        low_cpu_mem_usage=True,
        attn_implementation=attn_implementation,
    )
    model.config.use_cache = False
    keep_4bit_trainable_on_cpu(model)
    if fsdp or not upcast_frozen:
        for param in model.parameters():
            param.requires_grad = False
        return model
    from peft import prepare_model_for_kbit_training

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


def decoder_layer_classes(model: Any) -> list[str]:
    """Class names FSDP wraps one unit each: the model's ``_no_split_modules`` (e.g. ``LlamaDecoderLayer``)."""
    names = getattr(model, "_no_split_modules", None) or []
    return sorted({str(n) for n in names})


def fsdp_settings(wrap_classes: list[str]) -> dict[str, Any]:
    """``fsdp``/``fsdp_config`` of ``TrainingArguments`` for FSDP-QLoRA (see the module docstring)."""
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": list(wrap_classes),
            "reshard_after_forward": True,
            "cpu_ram_efficient_loading": False,
            "state_dict_type": "FULL_STATE_DICT",
            "activation_checkpointing": False,
        },
    }


#: Optimizers implemented by bitsandbytes (they take plain tensors, not FSDP2's DTensors).
BNB_OPTIMIZERS = ("paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit")


def optimizer_for(optimizer: str, parallelism: str) -> str:
    """The ``optim`` of ``TrainingArguments``: ``optimizer``, or ``adamw_torch`` for a bitsandbytes one under FSDP."""
    name = getattr(optimizer, "value", optimizer)
    if parallelism == "fsdp" and name in BNB_OPTIMIZERS:
        return "adamw_torch"
    return str(name)


def parallel_settings(parallelism: str, device: str, fsdp_wrap: list[str] | None = None) -> dict[str, Any]:
    """``TrainingArguments`` fields of ``parallelism`` (``single``: none; see the module docstring).

    ``ddp_backend`` makes transformers initialise a process group, so these only work
    inside a torchrun worker.
    """
    if parallelism not in ("ddp", "fsdp"):
        return {}
    out: dict[str, Any] = {"ddp_backend": "nccl" if device == "cuda" else "gloo", "ddp_find_unused_parameters": False}
    if parallelism == "fsdp":
        out.update(fsdp_settings(fsdp_wrap or []))
    return out


def sft_config(
    cfg: TrainingConfig,
    output_dir: Path,
    hw: Hardware,
    dtype: torch.dtype,
    *,
    micro_batch_size: int | None = None,
    gradient_accumulation_steps: int | None = None,
    with_eval: bool = True,
    model_type: str | None = None,
    parallelism: str = "single",
    fsdp_wrap: list[str] | None = None,
) -> Any:
    """TRL ``SFTConfig`` for the run; local checkpoints go to ``output_dir/checkpoint-N``.

    ``micro_batch_size``/``gradient_accumulation_steps`` override the config (OOM back-off).
    Checkpoints are saved every ``checkpointEverySteps`` with optimizer, scheduler, RNG
    and trainer state; the storage sync is a callback (``train``). ``model_type``
    (``config.model_type``) decides whether Liger Kernel applies (:mod:`qlora_trainer.speed`).
    ``parallelism`` (``single``, ``ddp``, ``fsdp``: decided by the preflight) adds the
    DDP/FSDP settings; ``fsdp_wrap`` names the decoder layer classes
    (:func:`decoder_layer_classes`). Under torchrun the per-device batch is per rank: the
    effective batch is micro-batch x accumulation x world size.
    """
    from trl import SFTConfig

    from .speed import liger_available

    t = cfg.training
    precision = mixed_precision(t.precision, dtype, hw)
    padding_free = t.packing or t.padding_free  # TRL's "bfd" packing is padding-free too
    liger = t.liger_kernels and hw.device == "cuda" and liger_available(model_type)
    kwargs: dict[str, Any] = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": micro_batch_size or t.micro_batch_size,
        # eval keeps no activations for a backward pass: twice the micro-batch fits where training does
        "per_device_eval_batch_size": 2 * (micro_batch_size or t.micro_batch_size),
        "gradient_accumulation_steps": gradient_accumulation_steps or t.gradient_accumulation_steps,
        "learning_rate": t.learning_rate,
        "lr_scheduler_type": t.lr_scheduler,
        "warmup_steps": float(t.warmup_ratio),  # a float in [0, 1) is a ratio of the total steps
        "optim": optimizer_for(t.optimizer, parallelism),
        "max_grad_norm": t.max_grad_norm,
        "weight_decay": t.weight_decay,
        "seed": t.seed,
        "data_seed": t.seed,
        "bf16": precision["bf16"],
        "fp16": precision["fp16"],
        "use_cpu": hw.device == "cpu",
        # Examples arrive tokenized and truncated to maxSeqLength (``encode``); TRL refuses a max_length it
        # would not enforce (padding-free without packing), so it only gets one for packing.
        "max_length": t.max_seq_length if (t.packing or not padding_free) else None,
        "packing": t.packing,
        "packing_strategy": "bfd",
        "eval_packing": False,
        "completion_only_loss": None,  # labels are built by ``encode``; TRL keeps a given labels column
        "gradient_checkpointing": t.gradient_checkpointing,
        # activationOffloading is not transformers' ``offload`` (synchronous copies): see qlora_trainer.offload
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "padding_free": padding_free,
        "use_liger_kernel": liger,
        # Layer kernels only: TRL 1.x computes the loss with its own fused, chunked LM head (the logits are
        # never materialised) and refuses Liger's fused linear cross-entropy, which would replace it.
        "liger_kernel_config": {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                                "fused_linear_cross_entropy": False} if liger else None,
        "logging_steps": t.log_every_steps,
        "logging_first_step": True,
        "logging_nan_inf_filter": False,  # the non-finite guard must see NaN/inf as they are
        "include_num_input_tokens_seen": "all" if padding_free else "non_padding",
        "save_strategy": "steps",
        "save_steps": t.checkpoint_every_steps,
        "save_total_limit": t.keep_checkpoints,
        "eval_strategy": "steps" if with_eval else "no",
        "eval_steps": t.eval_every_steps,
        "report_to": cfg.tracking.report_to() or "none",  # transformers' MLflow/TensorBoard callbacks (tracking)
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "dataset_num_proc": None,
        "remove_unused_columns": True,
    }
    kwargs.update(parallel_settings(parallelism, hw.device, fsdp_wrap))
    if t.max_steps is not None:
        kwargs["max_steps"] = t.max_steps
    else:
        kwargs["num_train_epochs"] = t.resolved_epochs()
    return SFTConfig(**kwargs)
