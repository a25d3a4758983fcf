"""Assembly of the model and the TRL trainer from a ``TrainingConfig``: the one code path.

:func:`train <qlora_trainer.train.train>` and the benchmark (``bench/bench_qlora.py``) both
build through here, so the benchmark measures exactly what the product runs: the 4-bit base
with the speed switches of :mod:`qlora_trainer.speed`, the seeded LoRA adapter in float32,
``SFTConfig`` and ``SFTTrainer`` with the post-construction fixes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .config import TrainingConfig
from .model import Hardware, adapter_to_float32, decoder_layer_classes, load_base_4bit, lora_config, sft_config
from .speed import attention_implementation, fuse_lora


def build_model(cfg: TrainingConfig, path: Path, dtype: torch.dtype, hw: Hardware, *, fsdp: bool = False) -> Any:
    """The 4-bit base at ``path`` wrapped with the (seeded) LoRA adapter, adapter weights in float32.

    ``training.seed`` seeds the adapter's initialisation (PEFT draws LoRA A from the global
    RNG: unseeded, two runs with the same seed would differ from the first step; under
    DDP/FSDP every rank draws the same initial adapter). ``fsdp``: load for FSDP-QLoRA
    (:func:`qlora_trainer.model.load_base_4bit`). ``training.fusedLora`` on a GPU patches the
    LoRA layers' forward (:func:`qlora_trainer.speed.fuse_lora`).
    """
    from peft import get_peft_model
    from transformers import set_seed

    t = cfg.training
    model = load_base_4bit(
        path,
        cfg.quantization,
        dtype,
        hw,
        gradient_checkpointing=t.gradient_checkpointing,
        upcast_frozen=t.upcast_frozen_weights,
        attn_implementation=attention_implementation(t.padding_free or t.packing, hw.device),
        fsdp=fsdp,
    )
    set_seed(t.seed)
    model = get_peft_model(model, lora_config(cfg.lora))
    adapter_to_float32(model)
    if t.fused_lora and hw.device == "cuda":
        fuse_lora(model)
    return model


def build_sft_trainer(
    cfg: TrainingConfig,
    model: Any,
    train_dataset: Any,
    tokenizer: Any,
    *,
    hw: Hardware,
    dtype: torch.dtype,
    output_dir: Path,
    callbacks: list[Any],
    eval_dataset: Any = None,
    micro_batch_size: int | None = None,
    gradient_accumulation_steps: int | None = None,
    parallelism: str = "single",
    unchecked_layers: int = 0,
) -> Any:
    """``SFTTrainer`` over ``model`` (from :func:`build_model`) with the run's ``SFTConfig``.

    ``parallelism`` (``single``/``ddp``/``fsdp``) selects the distributed settings of
    :func:`qlora_trainer.model.sft_config`; FSDP wraps the model's decoder layer class.

    TRL casts a quantised model's adapter to bf16 and installs its console printer; both
    are undone here (float32 master weights; the JSON progress lines replace the prints).
    ``training.activationOffloading`` with gradient checkpointing on a GPU adds the callback of
    :func:`qlora_trainer.offload.offload_callback`; on CPU activations are in host memory already.
    ``unchecked_layers`` (from :func:`micro_batch_layout_for`, ``training.checkpointLayers``): the
    last that many decoder layers are not checkpointed (GPU, with gradient checkpointing).
    """
    from transformers import PrinterCallback
    from trl import SFTTrainer

    callbacks = list(callbacks) + speed_callbacks(cfg, hw, unchecked_layers)

    args = sft_config(
        cfg,
        output_dir,
        hw,
        dtype,
        micro_batch_size=micro_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        with_eval=eval_dataset is not None,
        model_type=getattr(getattr(model, "config", None), "model_type", None),
        parallelism=parallelism,
        fsdp_wrap=decoder_layer_classes(model) if parallelism == "fsdp" else None,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    adapter_to_float32(trainer.model)
    trainer.remove_callback(PrinterCallback)
    return trainer


def speed_callbacks(cfg: TrainingConfig, hw: Hardware, unchecked_layers: int = 0) -> list[Any]:
    """Trainer callbacks of the speed switches (GPU, with gradient checkpointing), in this order.

    1. ``unchecked_layers > 0``: :func:`qlora_trainer.speed.checkpoint_layers_callback` (the last
       ``unchecked_layers`` decoder layers not checkpointed); first, so the offloader below
       wraps only the layers still checkpointed.
    2. ``training.activationOffloading``: the activation offloader.
    """
    t = cfg.training
    if not (t.gradient_checkpointing and hw.device == "cuda"):
        return []
    out: list[Any] = []
    if unchecked_layers > 0:
        from .speed import checkpoint_layers_callback

        out.append(checkpoint_layers_callback(unchecked_layers))
    if t.activation_offloading:
        from .offload import offload_callback

        out.append(offload_callback("cuda"))
    return out


def micro_batch_layout_for(
    cfg: TrainingConfig, model_config: dict[str, Any], hw: Hardware, *, world_size: int = 1,
    parallelism: str | None = None, gpu_gib: float | None = None, kept: tuple[int, int] | None = None,
) -> Any:
    """The run's micro-batch layout (:func:`qlora_trainer.estimate.micro_batch_layout`) on this machine.

    ``model_config``: the model's ``config.json``; ``gpu_gib`` defaults to this GPU's total
    memory (``torch.cuda.mem_get_info``); ``kept``: the (micro-batch, accumulation) of a resumed
    run, whose layers not checkpointed are chosen for it. Without CUDA, or for a model the
    estimate does not cover, the layout stays as given (or ``kept``) with every layer checkpointed.
    """
    from .estimate import EstimateError, Layout, micro_batch_layout
    from .model import compute_dtype

    t = cfg.training
    given = (t.micro_batch_size, t.gradient_accumulation_steps)
    use = kept or given
    if hw.device != "cuda":
        return Layout(*use, given, "as given: no CUDA GPU" if kept is None else "kept from the checkpoint resumed")
    total = gpu_gib if gpu_gib is not None else torch.cuda.mem_get_info()[1] / 2**30
    dtype = str(compute_dtype(cfg.quantization.compute_dtype, hw)).removeprefix("torch.")
    try:
        return micro_batch_layout(model_config, cfg, gpu_gib=total, world_size=world_size,
                                  parallelism=parallelism, compute_dtype=dtype, kept=kept)
    except EstimateError as err:
        return Layout(*use, given, f"as given: {err}")


def build_trainer(
    cfg: TrainingConfig,
    model_dir: Path,
    train_dataset: Any,
    *,
    hw: Hardware,
    output_dir: Path,
    callbacks: list[Any],
    eval_dataset: Any = None,
) -> tuple[Any, dict[str, Any]]:
    """Model + trainer for ``cfg`` on the model at ``model_dir`` (the benchmark's entry point).

    Returns ``(trainer, info)``; ``info`` names the switches in effect (attention
    implementation, Liger, padding-free, upcast, offloading, fused LoRA, the micro-batch layout
    of ``training.autoMicroBatch``, the layers ``training.checkpointLayers`` leaves unchecked) for
    the benchmark's table.
    """
    from .model import compute_dtype, load_tokenizer

    dtype = compute_dtype(cfg.quantization.compute_dtype, hw)
    tokenizer = load_tokenizer(Path(model_dir))
    model = build_model(cfg, Path(model_dir), dtype, hw)
    layout = micro_batch_layout_for(cfg, model.config.to_dict(), hw)
    trainer = build_sft_trainer(
        cfg, model, train_dataset, tokenizer, hw=hw, dtype=dtype, output_dir=output_dir, callbacks=callbacks,
        eval_dataset=eval_dataset, micro_batch_size=layout.micro_batch_size,
        gradient_accumulation_steps=layout.gradient_accumulation_steps, unchecked_layers=layout.unchecked_layers,
    )
    t = cfg.training
    base = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    info = {
        "attention": base.config._attn_implementation,
        "liger": bool(trainer.args.use_liger_kernel),
        "paddingFree": bool(trainer.args.padding_free),
        "packing": bool(trainer.args.packing),
        "upcastFrozenWeights": t.upcast_frozen_weights,
        "activationOffloading": t.activation_offloading,
        "fusedLora": bool(t.fused_lora and hw.device == "cuda"),
        "microBatchLayout": layout.summary(),
        "uncheckpointedLayers": layout.unchecked_layers if (t.gradient_checkpointing and hw.device == "cuda") else 0,
        "embedDtype": str(base.get_input_embeddings().weight.dtype).removeprefix("torch."),
    }
    return trainer, info
