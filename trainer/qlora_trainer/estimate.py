"""Per-GPU memory estimate of a QLoRA run, from the model's ``config.json`` and the trainer config.

Pure Python (no torch): the trainer's preflight (:func:`qlora_trainer.train.preflight`),
``qlora-train estimate`` and the operator can all call it. Sizes are GiB (2**30 bytes)
per GPU. Llama-style decoders only (Llama, Mistral, Qwen2 and the like: attention
``q/k/v/o_proj``, gated MLP ``gate/up/down_proj``, RMSNorm); a config without the fields
below raises :class:`EstimateError`, and the trainer then skips the preflight.

What is counted (``T`` = tokens per micro-batch = microBatchSize x maxSeqLength, the
worst case: packing fills every row):

* **4-bit base weights**: every linear layer of the decoder at 0.5 byte/parameter plus
  the quantisation constants (block size 64: fp32 absmax = 1/16 byte/parameter, or with
  double quantisation 8-bit absmax + fp32 second-level constants per 256 blocks
  = 1/64 + 1/4096 byte/parameter). Sharded over the GPUs under FSDP (packed weights in
  ``bnb_4bit_quant_storage`` = compute dtype); the constants live in each module's
  ``quant_state``, outside FSDP's reach, so they are not sharded.
* **Other weights**: embeddings, output head (unless tied) and norms: float32 with
  ``training.upcastFrozenWeights`` (PEFT's ``prepare_model_for_kbit_training`` upcasts
  every non-4-bit parameter), else the compute dtype; FSDP always keeps the compute
  dtype (the FSDP-QLoRA recipe) and shards them.
* **LoRA**: r x (in + out) per adapted linear; float32 weights (4 B) and gradients (4 B),
  AdamW state 8 B (``adamw_torch*``, ``paged_adamw_32bit``) or 2 B (8-bit AdamW; the
  paged variants keep it in CUDA managed memory, still GPU memory when in use). Sharded
  under FSDP. DDP adds its gradient buckets (4 B/parameter).
* **Stored activations**: with gradient checkpointing one layer input per layer,
  ``L x T x hidden x b`` (``b``: the residual stream has the embeddings' dtype, 4 bytes
  when upcast, else the compute dtype's), none on the GPU with
  ``training.activationOffloading``; without checkpointing every layer's saved tensors
  (below), ``L`` times.
* **Peak transient**: the larger of (a) one layer's saved tensors plus its backward
  buffers, ``T x (16 x intermediate + 16 x hidden + 12 x q_dim + LoRA inputs)`` bytes
  (MLP and norm outputs in the residual dtype, scaled from float32; 8 instead of 16 x
  intermediate with Liger's SwiGLU, which recomputes the activation; LoRA inputs:
  compute-dtype copy + 1 B dropout mask per adapted input feature) and (b) the loss over
  the logits, ``T x vocab x 10`` bytes (bf16 logits, their float32 upcast and
  log-softmax), or with Liger's fused linear cross-entropy ``T x hidden x 8`` bytes of
  chunks; plus, for SDPA on packed rows, the block-diagonal attention mask,
  ``rows x row_length^2 x 7.4`` bytes (fitted; none with the variable-length
  FlashAttention the trainer uses for padding-free batches on GPUs), and 0.15 GiB of
  fixed buffers (rotary tables, cuBLAS workspaces, measured).
* **Outside the allocator**: CUDA context 0.75 GiB (0.67 GiB measured on an H200 with
  CUDA 13), NCCL buffers 0.5 GiB when there is more than one GPU (not measured), and a
  10 % fragmentation margin on everything allocated (reserved exceeded allocated by
  5-11 % in the calibration runs).
* **Loading under FSDP**: each rank loads the whole 4-bit model onto its GPU before
  ``fully_shard`` splits it (accelerate 1.15 cannot load bitsandbytes 4-bit weights on
  the meta device; see ``fsdp2_prepare_model``), and the sharded copies are made while
  the whole model is still allocated: the peak is the whole model times
  ``1 + 1/world_size``. Measured on two H200s, Llama-3-70B widths with 10 of its 80
  layers (bench/RESULTS.md): 8.42 GiB allocated after loading (8.12 estimated for the
  whole model with the adapter), 12.22 GiB after wrapping (12.18 estimated), the
  training steps below that. So the unsharded weights and a shard must fit one GPU. This
  is why the estimate refuses a 70B model on 2 x 24 GiB, which Answer.AI's own
  FSDP-QLoRA script does (it quantises layer by layer on the CPU and shards before moving
  to the GPU); with the Hugging Face stack a 70B on 2 GPUs needs about 58 GiB GPUs.

Calibration (one H200, torch 2.11, transformers 5.17, bitsandbytes 0.50.2, PEFT 0.21,
TRL 1.16, the product's own loader and SFTConfig, random-weight Mistral-7B shape: hidden
4096, 32 layers, intermediate 14336, 32/8 heads; NF4 + double quantisation, bf16, LoRA
dropout 0.05 unless said; peak = ``torch.cuda.max_memory_allocated``):

=========================================  =====  ========  =========  =======
run (vocab 32000 unless said)              T      measured  estimated  error
=========================================  =====  ========  =========  =======
q/k/v/o r16 mb4 s512 GC, fused AdamW       2048   6.44      6.46       +0.3 %
q/k/v/o r16 mb4 s512 GC, AdamW, dropout 0  2048   6.39      6.43       +0.6 %
all-linear r16 mb4 s512 GC, AdamW          2048   6.86      7.01       +2.3 %
all-linear r16 mb1 s512 GC, AdamW          512    5.50      5.58       +1.4 %
all-linear r16 mb1 s2048 GC, AdamW         2048   6.82      7.01       +2.8 %
all-linear r16 mb2 s4096 GC, AdamW         8192   12.96     13.08      +1.0 %
all-linear r16 mb4 s512 GC, paged 8-bit    2048   6.58      6.78       +3.0 %
all-linear r64 mb4 s512 GC, AdamW          2048   8.28      8.89       +7.4 %
all-linear r16 mb1 s512, no GC             512    10.50     11.17      +6.3 %
all-linear r16 mb2 s1024, no GC            2048   27.32     29.37      +7.5 %
vocab 49152: q/k/v/o mb4 s512 GC (bench)   2048   6.88      7.17       +4.3 %
vocab 49152: all-linear paged 8-bit        2048   7.42      7.36       -0.8 %
=========================================  =====  ========  =========  =======

So the allocated peak is estimated within -1 % .. +8 % (over-estimates where the runs
used one accumulation step: gradients are counted as live, which they are from the
second micro-batch of an accumulated step on). The vocab-32000 rows were measured with
one accumulation step and 3 steps per run (``bench/calibrate_memory.py``, issue 10, one
device call); the two vocab-49152 rows are the figures of bench/RESULTS.md (4
accumulation steps; the bench's model has the SmolLM2 tokenizer's 49,152-token
vocabulary, although issue 10 quotes the figures for vocab 32000). Memory the process
used in total (``mem_get_info``) was 0.7-1.7 GiB above the allocated peak in those runs;
the estimate's peak (with context and margin) was above it by 1-14 %.

The product path of issue 9 (``upcastFrozenWeights`` off, ``ligerKernels``, variable-length
attention; q/k/v/o r16, micro-batch 16 x 1, s512, fused AdamW, vocab 49152; bench/RESULTS.md):
8.02 measured vs 7.93 estimated (-1.2 %); with ``activationOffloading`` 6.25 vs 6.24 (-0.2 %,
after fitting :data:`OFFLOAD_IN_FLIGHT_LAYERS` to it).

Not calibrated (judgement, to within maybe +-15 %): the overheads outside the allocator,
FSDP, other architectures, and the speed switches at other settings than the two product
runs above; the rows model them from what each one stops storing. The calibration tests
pin the measured configurations.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .config import TrainingConfig

GIB = float(2**30)

#: Bytes per parameter of a packed 4-bit weight.
NF4_BYTES = 0.5
#: bitsandbytes 4-bit block size (parameters per absmax).
BLOCKSIZE = 64
#: Quantisation constants, bytes per parameter: fp32 absmax per block of 64 ...
ABSMAX_BYTES = 4 / BLOCKSIZE
#: ... or, with double quantisation, 8-bit absmax plus fp32 second-level constants per 256 blocks.
ABSMAX_DQ_BYTES = 1 / BLOCKSIZE + 4 / (BLOCKSIZE * 256)
#: Loss over logits: bf16 logits (2) + float32 upcast (4) + float32 log-softmax (4), bytes per element.
LOGITS_BYTES = 10.0
#: Block-diagonal attention mask of a packed row, bytes per (row length)^2 element (fitted at T = 8192).
MASK_BYTES = 7.4
#: Fixed buffers in the allocator during training (rotary tables, cuBLAS workspaces), GiB (measured 0.11-0.15).
FIXED_GIB = 0.15
#: CUDA context and library handles outside the PyTorch allocator, GiB (0.67 measured on an H200, CUDA 13).
CUDA_CONTEXT_GIB = 0.75
#: NCCL communicator buffers per GPU when there is more than one GPU, GiB (not measured).
NCCL_GIB = 0.5
#: Margin for allocator fragmentation, fraction of the allocated peak (5-11 % measured).
FRAGMENTATION = 0.10

#: Optimizer state bytes per trainable parameter.
OPTIMIZER_STATE_BYTES = {
    "adamw_torch": 8.0,
    "adamw_torch_fused": 8.0,
    "paged_adamw_32bit": 8.0,
    "adamw_8bit": 2.0,
    "paged_adamw_8bit": 2.0,
}
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
#: Architectures Liger Kernel 0.8 patches (as ``qlora_trainer.speed`` falls back to; kept here torch-free).
LIGER_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")
#: Checkpointed layer inputs still on the GPU under activation offloading: copies to host memory lag
#: the compute stream and one input is prefetched in the backward pass. Fitted: 6.25 GiB measured on an
#: H200 (7B shape, 16 x 512 tokens, bench/RESULTS.md) against 5.93 estimated with none on the GPU.
OFFLOAD_IN_FLIGHT_LAYERS = 5
#: Fused linear cross-entropy (Liger): float32 chunk logits and their gradient, bytes per token per hidden unit.
FLCE_BYTES = 8.0
#: Linear modules of a Llama-style decoder layer, as PEFT names them.
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class EstimateError(ValueError):
    """The model config cannot be estimated (a missing field, or not a Llama-style decoder)."""


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-style decoder that memory depends on (from ``config.json``)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    model_type: str = ""

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelShape:
        """Read a Hugging Face ``config.json`` dict (a nested ``text_config`` is used when present).

        ``num_key_value_heads`` defaults to ``num_attention_heads``, ``head_dim`` to
        ``hidden_size / num_attention_heads``, ``tie_word_embeddings`` to false.

        Raises:
            EstimateError: a required field is missing or not a positive integer, or the
                model is a mixture of experts (not modelled).
        """
        cfg = config
        if "hidden_size" not in cfg and isinstance(cfg.get("text_config"), Mapping):
            cfg = {**cfg["text_config"], "tie_word_embeddings": cfg.get("tie_word_embeddings", False)}
        if any(k in cfg for k in ("num_local_experts", "num_experts", "n_routed_experts")):
            raise EstimateError("config.json: mixture-of-experts models are not covered by the memory estimate")

        def need(key: str) -> int:
            value = cfg.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise EstimateError(f"config.json: {key} must be a positive integer (got {value!r})")
            return value

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        kv = cfg.get("num_key_value_heads") or heads
        head_dim = cfg.get("head_dim") or hidden // heads
        return cls(
            hidden=hidden,
            intermediate=need("intermediate_size"),
            layers=need("num_hidden_layers"),
            heads=heads,
            kv_heads=int(kv),
            head_dim=int(head_dim),
            vocab=need("vocab_size"),
            tied=bool(cfg.get("tie_word_embeddings", False)),
            model_type=str(cfg.get("model_type") or ""),
        )

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """``{module name: (in_features, out_features)}`` of one decoder layer."""
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def quantised_params(self) -> int:
        """Parameters of every decoder linear layer (the 4-bit part)."""
        return self.layers * sum(a * b for a, b in self.linears().values())

    @property
    def other_params(self) -> int:
        """Embeddings, output head (unless tied) and norms (2 per layer + the final one)."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden

    @property
    def total_params(self) -> int:
        return self.quantised_params + self.other_params


@dataclass(frozen=True)
class Row:
    """One line of the breakdown: ``gib`` per GPU and what it is."""

    name: str
    gib: float
    detail: str = ""


@dataclass
class Estimate:
    """Per-GPU memory of one layout; ``fits`` when ``peak_gib`` (and the load peak) fit ``gpu_gib``."""

    parallelism: str  # "single", "ddp" or "fsdp"
    world_size: int
    micro_batch_size: int
    max_seq_length: int
    gpu_gib: float
    rows: list[Row]
    allocated_gib: float
    peak_gib: float
    load_peak_gib: float
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return max(self.peak_gib, self.load_peak_gib) <= self.gpu_gib

    @property
    def needed_gib(self) -> float:
        """What one GPU must hold: the larger of the training peak and the load peak."""
        return max(self.peak_gib, self.load_peak_gib)

    def summary(self) -> dict[str, Any]:
        """JSON-ready dict (for log lines and the manifest)."""
        return {
            "parallelism": self.parallelism,
            "worldSize": self.world_size,
            "microBatchSize": self.micro_batch_size,
            "maxSeqLength": self.max_seq_length,
            "gpuGiB": round(self.gpu_gib, 2),
            "peakGiB": round(self.peak_gib, 2),
            "loadPeakGiB": round(self.load_peak_gib, 2),
            "fits": self.fits,
            "rows": {r.name: round(r.gib, 3) for r in self.rows},
        }


def _dtype_bytes(dtype: str) -> int:
    return _DTYPE_BYTES.get(dtype, 2)  # "auto" resolves to bf16/fp16 on a GPU


def _lora_targets(shape: ModelShape, modules: list[str]) -> tuple[dict[str, tuple[int, int]], list[str]]:
    linears = shape.linears()
    if modules == ["all-linear"]:
        return linears, []
    known = {m: linears[m] for m in modules if m in linears}
    return known, [m for m in modules if m not in linears]


def estimate(
    model_config: Mapping[str, Any] | ModelShape,
    cfg: TrainingConfig,
    *,
    world_size: int = 1,
    gpu_gib: float = 80.0,
    parallelism: str | None = None,
    micro_batch_size: int | None = None,
    max_seq_length: int | None = None,
    compute_dtype: str | None = None,
    attention: str | None = None,
    unchecked_layers: int = 0,
) -> Estimate:
    """Per-GPU memory of training ``cfg`` on ``world_size`` GPUs of ``gpu_gib`` GiB each.

    Args:
        model_config: the model's ``config.json`` (dict) or a :class:`ModelShape`.
        cfg: the trainer config (quantisation, LoRA, batch, length, checkpointing, optimizer).
        world_size: GPUs in the job (nodes x GPUs per node).
        gpu_gib: memory of one GPU, GiB (``torch.cuda.mem_get_info`` total).
        parallelism: ``ddp`` or ``fsdp`` (``auto``/``None``: ``cfg.training.parallelism``,
            resolved by :func:`plan`); one GPU is always ``single``.
        micro_batch_size, max_seq_length: override the config's (the preflight uses 1).
        compute_dtype: ``bfloat16``/``float16``/``float32``; default the config's, ``auto``
            counted as 2 bytes (a GPU's bf16/fp16).
        attention: ``varlen`` (FlashAttention on padding-free batches: no mask) or ``sdpa``
            (a block-diagonal mask per packed row); default what the trainer picks for
            the config on a GPU.
        unchecked_layers: with gradient checkpointing, decoder layers that are not
            checkpointed (``training.checkpointLayers: auto``, :func:`checkpoint_layout`):
            each keeps its saved tensors like a run without checkpointing (and is not
            offloaded); clipped to ``0..layers``; ignored without gradient checkpointing.

    Raises:
        EstimateError: the model config lacks a field (see :meth:`ModelShape.from_config`).
    """
    shape = model_config if isinstance(model_config, ModelShape) else ModelShape.from_config(model_config)
    t = cfg.training
    mode = parallelism or t.parallelism
    if world_size <= 1:
        mode = "single"
    elif mode == "auto":
        mode = "ddp"
    mb = micro_batch_size or t.micro_batch_size
    seq = max_seq_length or t.max_seq_length
    tokens = mb * seq
    c = _dtype_bytes(compute_dtype or cfg.quantization.compute_dtype)
    fsdp = mode == "fsdp"
    shard = world_size if fsdp else 1
    notes: list[str] = []
    # Speed switches of issue 9 (``qlora_trainer.speed``), read defensively so the estimate also
    # covers configs from before them (then: upcast, no Liger, SDPA with a mask).
    upcast = bool(getattr(t, "upcast_frozen_weights", True)) and not fsdp
    liger = bool(getattr(t, "liger_kernels", False)) and shape.model_type in LIGER_MODEL_TYPES and c != 4
    if attention is None:
        varlen = bool(t.packing or getattr(t, "padding_free", False)) and c != 4  # FlashAttention varlen on GPUs
    else:
        varlen = attention == "varlen"
    offload = bool(getattr(t, "activation_offloading", False)) and t.gradient_checkpointing

    # Weights.
    q_params = shape.quantised_params
    absmax = ABSMAX_DQ_BYTES if cfg.quantization.double_quant else ABSMAX_BYTES
    packed = q_params * NF4_BYTES
    constants = q_params * absmax
    other_bytes_per = 4 if upcast else c  # prepare_model_for_kbit_training upcasts to fp32
    other = shape.other_params * other_bytes_per

    # LoRA.
    targets, unknown = _lora_targets(shape, list(cfg.lora.target_modules))
    if unknown:
        notes.append(f"lora.targetModules {unknown} are not Llama-style names: not counted")
    lora_params = shape.layers * sum(cfg.lora.r * (a + b) for a, b in targets.values())
    state = OPTIMIZER_STATE_BYTES.get(t.optimizer, 8.0)
    lora_bytes = lora_params * (4 + 4 + state)

    # Activations.
    resid = 4 if (upcast or c == 4) else c  # the residual stream has the embeddings' dtype
    dropout_mask = 1 if cfg.lora.dropout > 0 else 0
    lora_inputs = sum(a for a, _ in targets.values()) * (c + dropout_mask)
    mlp = 8 if liger else 12  # Liger's SwiGLU recomputes the activation instead of saving it
    layer_saved = (mlp * shape.intermediate + 12 * shape.hidden + 12 * shape.q_dim) * resid / 4 + lora_inputs
    layer_backward = (4 * shape.intermediate + 4 * shape.hidden) * resid / 4
    layer_input = tokens * shape.hidden * resid  # what a checkpointed layer keeps for the backward pass
    unchecked = min(max(int(unchecked_layers), 0), shape.layers) if t.gradient_checkpointing else 0
    checkpointed = shape.layers - unchecked
    if t.gradient_checkpointing:
        in_gpu = min(OFFLOAD_IN_FLIGHT_LAYERS, checkpointed) if offload else checkpointed
        stored = in_gpu * layer_input + unchecked * tokens * layer_saved
        stored_detail = f"{checkpointed} checkpointed layer inputs of {mb}x{seq} tokens" + (
            f" (offloaded to host memory; up to {in_gpu} in flight on the GPU)" if offload else ""
        ) + (f" + saved tensors of {unchecked} layers not checkpointed" if unchecked else "")
        # The recompute of a checkpointed layer is the larger transient; with none left, a plain backward.
        layer_phase = tokens * (layer_saved + layer_backward) if checkpointed else tokens * layer_backward
    else:
        stored = shape.layers * tokens * layer_saved
        stored_detail = f"saved tensors of all {shape.layers} layers (no gradient checkpointing)"
        layer_phase = tokens * layer_backward
    if liger:
        logits_phase = tokens * shape.hidden * FLCE_BYTES  # fused linear cross-entropy: no full logits
    else:
        logits_phase = tokens * shape.vocab * LOGITS_BYTES
    rows_n, row_len = (1, tokens) if (t.packing or getattr(t, "padding_free", False)) else (mb, seq)
    mask = 0 if varlen else rows_n * row_len**2 * MASK_BYTES

    rows = [
        Row(
            "4-bit base weights",
            (packed / shard + constants) / GIB,
            f"{q_params / 1e9:.2f} B params x 0.5 B" + (f" / {shard} GPUs" if fsdp else "") + " + quantisation constants",
        ),
        Row(
            "other weights",
            other / shard / GIB,
            f"embeddings, head, norms: {shape.other_params / 1e6:.0f} M x {other_bytes_per} B" + (f" / {shard}" if fsdp else ""),
        ),
        Row(
            "LoRA weights, grads, optimizer",
            lora_bytes / shard / GIB,
            f"{lora_params / 1e6:.1f} M params x {4 + 4 + state:g} B ({t.optimizer})" + (f" / {shard}" if fsdp else ""),
        ),
    ]
    if mode == "ddp":
        rows.append(Row("DDP gradient buckets", lora_params * 4 / GIB, "a copy of the LoRA gradients"))
    if fsdp:
        layer_bytes = shape.quantised_params / shape.layers * NF4_BYTES
        head = shape.vocab * shape.hidden * c
        rows.append(
            Row("FSDP gathered layers", (2 * layer_bytes + head) / GIB, "2 decoder layers + the output head, unsharded")
        )
    rows.append(Row("stored activations", stored / GIB, stored_detail))
    if offload:
        host = checkpointed * layer_input
        notes.append(f"activation offloading keeps {host / GIB:.2f} GiB of pinned host memory per GPU; "
                     "resources.memory must cover it")
    if logits_phase >= layer_phase:
        what = "fused linear cross-entropy chunks (Liger)" if liger else f"{mb}x{seq} tokens x {shape.vocab} vocab x 10 B"
        rows.append(Row("logits and loss", logits_phase / GIB, what))
    else:
        rows.append(Row("one layer's backward", layer_phase / GIB, "recomputed layer (larger than the loss buffers)"))
    rows.append(
        Row(
            "attention mask",
            mask / GIB,
            "none: variable-length FlashAttention" if varlen else f"{rows_n} row(s) of {row_len} tokens, block-diagonal",
        )
    )
    rows.append(Row("fixed buffers", FIXED_GIB, "rotary tables, cuBLAS workspaces"))
    allocated = sum(r.gib for r in rows)
    rows.append(Row("fragmentation margin", allocated * FRAGMENTATION, f"{FRAGMENTATION:.0%} of the allocated peak"))
    outside = CUDA_CONTEXT_GIB + (NCCL_GIB if world_size > 1 else 0.0)
    rows.append(Row("CUDA context" + (" + NCCL" if world_size > 1 else ""), outside, "outside the PyTorch allocator"))
    peak = allocated * (1 + FRAGMENTATION) + outside
    if fsdp:
        full = packed + constants + shape.other_params * c + lora_params * 4
        load_peak = full * (1 + 1 / world_size) / GIB + CUDA_CONTEXT_GIB + NCCL_GIB
        notes.append(
            f"FSDP loads the whole 4-bit model onto each GPU and shards it while the whole copy is still "
            f"there: {load_peak:.1f} GiB while loading"
        )
    else:
        load_peak = 0.0
    return Estimate(
        parallelism=mode,
        world_size=world_size,
        micro_batch_size=mb,
        max_seq_length=seq,
        gpu_gib=gpu_gib,
        rows=rows,
        allocated_gib=allocated,
        peak_gib=peak,
        load_peak_gib=load_peak,
        notes=notes,
    )


@dataclass
class Plan:
    """The preflight's decision: ``parallelism`` to use and the estimate at micro-batch 1 behind it."""

    parallelism: str
    estimate: Estimate
    fits: bool
    message: str = ""


def plan(
    model_config: Mapping[str, Any] | ModelShape,
    cfg: TrainingConfig,
    *,
    world_size: int,
    gpu_gib: float,
    compute_dtype: str | None = None,
) -> Plan:
    """Choose the parallelism (``auto``: DDP when a replica fits one GPU, else FSDP) and check the fit.

    The check is at micro-batch 1 (the smallest the trainer can run; a larger configured
    micro-batch may still run out of memory, which the single-GPU back-off handles).
    ``message`` says, when nothing fits, the numbers and what would fit.
    """
    shape = model_config if isinstance(model_config, ModelShape) else ModelShape.from_config(model_config)
    setting = cfg.training.parallelism

    def at(mode: str, ws: int = world_size, seq: int | None = None) -> Estimate:
        return estimate(
            shape, cfg, world_size=ws, gpu_gib=gpu_gib, parallelism=mode, micro_batch_size=1,
            max_seq_length=seq, compute_dtype=compute_dtype,
        )

    if world_size <= 1:
        chosen = at("single")
    elif setting == "auto":
        chosen = at("ddp")
        if not chosen.fits:
            fsdp = at("fsdp")
            if fsdp.fits:
                chosen = fsdp
    else:
        chosen = at(setting)
    if chosen.fits:
        return Plan(chosen.parallelism, chosen, True)
    return Plan(chosen.parallelism, chosen, False, does_not_fit_message(shape, cfg, chosen, at))


def does_not_fit_message(shape: ModelShape, cfg: TrainingConfig, est: Estimate, at: Any) -> str:
    """The refusal: estimated vs available GiB per GPU, and the nearest layouts that would fit.

    ``at(mode, world_size=est.world_size, max_seq_length=None)`` re-estimates at micro-batch 1.
    """
    where = f"parallelism {est.parallelism} on {est.world_size} GPUs" if est.world_size > 1 else "on 1 GPU"
    head = (
        f"training does not fit: estimated {est.needed_gib:.1f} GiB per GPU at micro-batch 1 and "
        f"training.maxSeqLength {est.max_seq_length} ({where}; {shape.total_params / 1e9:.1f} B parameters), "
        f"but a GPU has {est.gpu_gib:.1f} GiB"
    )
    if est.load_peak_gib > est.gpu_gib:
        head += f" (loading the whole 4-bit model takes {est.load_peak_gib:.1f} GiB on each GPU before FSDP shards it)"
    options = []
    if est.world_size > 1 and est.parallelism != "fsdp" and at("fsdp").fits:
        options.append("training.parallelism fsdp (or auto) on the same GPUs")
    else:
        for ws in (2, 4, 8, 16, 32, 64):
            if ws > est.world_size and at("fsdp", ws).fits:
                options.append(f"{ws} GPUs (resources.gpus x nodes) with training.parallelism fsdp or auto")
                break
    seq = est.max_seq_length // 2
    while seq >= 16:
        if at(est.parallelism, est.world_size, seq).fits:
            options.append(f"training.maxSeqLength {seq}")
            break
        seq //= 2
    if not options:
        options.append(f"GPUs with at least {math.ceil(est.needed_gib)} GiB")
        sharded = at("fsdp", max(8, est.world_size))
        if sharded.needed_gib < est.needed_gib:
            options.append(
                f"{sharded.world_size} GPUs of at least {math.ceil(sharded.needed_gib)} GiB with training.parallelism fsdp"
            )
    return head + ". Would fit: " + "; or ".join(options) + "."


#: ``training.checkpointLayers`` value that lets :func:`checkpoint_layout` choose.
CHECKPOINT_AUTO = "auto"

#: Share of a GPU's memory that :func:`micro_batch_layout` lets the estimated peak take.
AUTO_MICRO_BATCH_SHARE = 0.8


@dataclass
class Layout:
    """Micro-batch and accumulation of a run (``training.autoMicroBatch``) and why."""

    micro_batch_size: int
    gradient_accumulation_steps: int
    given: tuple[int, int]
    reason: str
    estimate_gib: float | None = None
    #: Decoder layers that are not checkpointed (``training.checkpointLayers``; 0: all are).
    unchecked_layers: int = 0
    checkpoint_reason: str = "all layers checkpointed"

    def summary(self) -> dict[str, Any]:
        """JSON-ready dict (log line ``micro_batch_layout``, the bench's run record)."""
        return {
            "microBatchSize": self.micro_batch_size,
            "gradientAccumulationSteps": self.gradient_accumulation_steps,
            "given": f"{self.given[0]}x{self.given[1]}",
            "reason": self.reason,
            "estimatedPeakGiB": None if self.estimate_gib is None else round(self.estimate_gib, 2),
            "uncheckpointedLayers": self.unchecked_layers,
            "checkpointLayers": self.checkpoint_reason,
        }


def micro_batch_layout(
    model_config: Mapping[str, Any] | ModelShape,
    cfg: TrainingConfig,
    *,
    gpu_gib: float,
    world_size: int = 1,
    parallelism: str | None = None,
    compute_dtype: str | None = None,
    share: float = AUTO_MICRO_BATCH_SHARE,
    kept: tuple[int, int] | None = None,
) -> Layout:
    """The largest micro-batch for the same effective batch whose estimated peak fits ``share`` of the GPU.

    Candidates are ``microBatchSize x k`` for each divisor ``k`` of ``gradientAccumulationSteps``
    (accumulation ``/ k``), so sequences per optimizer step (``microBatchSize x
    gradientAccumulationSteps x GPUs``) never change and the loss stays the same function (the
    trainer normalises by tokens across micro-batches). Why larger: the 4-bit base's per-weight
    work (dequantisation, kernel launches, LoRA elementwise) runs once per micro-batch, so
    16 x 1 trained 1.6x the tokens/s of 8 x 2 on the Mistral-7B shape (``bench/RESULTS.md``,
    issues 9 and 19). ``gpu_gib``: one GPU's memory in GiB. Keeps the layout as
    given when ``training.autoMicroBatch`` is off or no candidate larger than it fits, and
    ``kept`` (micro-batch, accumulation) when given (a resumed run keeps its checkpoint's).
    Then, at the chosen micro-batch, :func:`checkpoint_layout` picks the layers that are
    not checkpointed (``unchecked_layers``).
    """
    t = cfg.training
    given = (t.micro_batch_size, t.gradient_accumulation_steps)
    shape = model_config if isinstance(model_config, ModelShape) else ModelShape.from_config(model_config)
    kw: dict[str, Any] = dict(gpu_gib=gpu_gib, world_size=world_size, parallelism=parallelism,
                              compute_dtype=compute_dtype, share=share)
    if kept is not None:
        layout = Layout(kept[0], kept[1], given, "kept from the checkpoint resumed")
        return with_checkpoint_layout(layout, shape, cfg, **kw)
    if not t.auto_micro_batch:
        return with_checkpoint_layout(Layout(*given, given, "autoMicroBatch off"), shape, cfg, **kw)
    budget = gpu_gib * share
    for k in sorted((d for d in range(1, given[1] + 1) if given[1] % d == 0), reverse=True):
        mb = given[0] * k
        est = estimate(shape, cfg, world_size=world_size, gpu_gib=gpu_gib, parallelism=parallelism,
                       micro_batch_size=mb, compute_dtype=compute_dtype)
        if est.needed_gib <= budget or k == 1:
            why = ("as given" if k == 1 else f"{mb}x{given[1] // k}: estimated peak {est.needed_gib:.1f} GiB "
                   f"<= {share:.0%} of {gpu_gib:.1f} GiB, same effective batch")
            return with_checkpoint_layout(Layout(mb, given[1] // k, given, why, est.needed_gib), shape, cfg, **kw)
    raise AssertionError("unreachable: k = 1 always returns")


def checkpoint_layout(
    model_config: Mapping[str, Any] | ModelShape,
    cfg: TrainingConfig,
    *,
    micro_batch_size: int,
    gpu_gib: float,
    world_size: int = 1,
    parallelism: str | None = None,
    compute_dtype: str | None = None,
    share: float = AUTO_MICRO_BATCH_SHARE,
) -> tuple[int, float | None, str]:
    """How many decoder layers may skip gradient checkpointing at ``micro_batch_size``: ``(K, GiB, reason)``.

    ``training.checkpointLayers: auto`` with ``gradientCheckpointing`` on: ``K`` is the largest
    number of layers (0..layers) whose estimate (:func:`estimate` with ``unchecked_layers=K``:
    each such layer keeps its saved tensors instead of its input) fits ``share`` of the GPU
    (``gpu_gib``, GiB); the trainer leaves the *last* ``K`` layers unchecked
    (:func:`qlora_trainer.speed.checkpoint_layers_callback`). Each unchecked layer saves one
    recompute forward (about a quarter of its training FLOPs). ``GiB`` is the estimated peak at
    ``K`` (``None`` when nothing was estimated). ``K = 0`` with ``checkpointLayers: all``, without
    gradient checkpointing, or when even ``K = 1`` does not fit.
    """
    t = cfg.training
    if not t.gradient_checkpointing:
        return 0, None, "no gradient checkpointing"
    if getattr(t, "checkpoint_layers", "all") != CHECKPOINT_AUTO:  # str enum: equal to its value
        return 0, None, "all layers checkpointed (checkpointLayers all)"
    shape = model_config if isinstance(model_config, ModelShape) else ModelShape.from_config(model_config)
    budget = gpu_gib * share

    def peak(k: int) -> float:
        return estimate(shape, cfg, world_size=world_size, gpu_gib=gpu_gib, parallelism=parallelism,
                        micro_batch_size=micro_batch_size, compute_dtype=compute_dtype,
                        unchecked_layers=k).needed_gib

    lo, hi = 0, shape.layers  # the peak grows with k: the largest k with peak(k) <= budget, by bisection
    if peak(hi) <= budget:
        lo = hi
    else:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if peak(mid) <= budget:
                lo = mid
            else:
                hi = mid
    gib = peak(lo)
    if lo == 0:
        return 0, gib, (f"all layers checkpointed: one layer not checkpointed would exceed {share:.0%} of "
                        f"{gpu_gib:.1f} GiB")
    return lo, gib, (f"last {lo} of {shape.layers} layers not checkpointed: estimated peak {gib:.1f} GiB <= "
                     f"{share:.0%} of {gpu_gib:.1f} GiB at micro-batch {micro_batch_size}")


def with_checkpoint_layout(layout: Layout, shape: ModelShape, cfg: TrainingConfig, **kw: Any) -> Layout:
    """``layout`` with :func:`checkpoint_layout`'s choice at its micro-batch (same keyword arguments)."""
    k, gib, why = checkpoint_layout(shape, cfg, micro_batch_size=layout.micro_batch_size, **kw)
    layout.unchecked_layers, layout.checkpoint_reason = k, why
    if k and gib is not None:
        layout.estimate_gib = gib
    return layout
