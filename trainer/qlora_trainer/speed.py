"""Speed switches that do not change what training computes (issue 9, ``bench/RESULTS.md``).

Each is a field of ``training`` (:class:`~qlora_trainer.config.TrainingSettings`) with the
default on where it pays off on a GPU; all are no-ops on CPU except padding-free batches.

* ``paddingFree``: TRL's padding-free collation concatenates the micro-batch's examples
  into one row and passes their boundaries (``cu_seq_lens_q``/``_k``, ``max_length_q``/``_k``,
  ``position_ids`` restarting at 0). On CUDA, :func:`varlen_attention` computes attention
  with PyTorch's FlashAttention-2 variable-length kernel
  (``torch.nn.attention.varlen.varlen_attn``, PyTorch >= 2.10), so no token attends across
  an example boundary and no FLOP is spent on padding. Elsewhere (CPU) transformers' SDPA
  path builds the same block-diagonal causal mask from the restarting ``position_ids``.
* ``ligerKernels``: Liger Kernel's Triton RMSNorm, RoPE and SwiGLU through transformers'
  ``use_liger_kernel`` (CUDA only). Not its fused linear cross-entropy: TRL 1.x already
  computes the loss with its own fused, chunked LM head (the ``micro-batch x sequence x
  vocab`` logits are never materialised) and refuses Liger's, which would replace it.
* ``upcastFrozenWeights`` off: PEFT's ``prepare_model_for_kbit_training`` casts every
  non-quantised weight (embeddings, norms, ``lm_head``) to float32. Under bf16 autocast
  those matmuls run in bf16 anyway, so the float32 copies only cost memory (about
  ``2 x vocab x hidden x 2`` bytes) and a cast per forward. Off keeps them in the compute
  dtype; norms still compute in float32 internally (``LlamaRMSNorm`` and Liger's).
* ``activationOffloading``: with gradient checkpointing, the checkpointed layer inputs
  live in pinned host memory, copied on a side stream that overlaps compute
  (:mod:`qlora_trainer.offload`). Off by default: it moves ``layers x tokens x hidden x 2``
  bytes from GPU memory to the pod's (pinned) host memory, which its memory request must cover.
* ``fusedLora``: :func:`fuse_lora` replaces PEFT's LoRA forward (``result = base(x).clone();
  result = result + B(A(dropout(x))) * scaling``: a copy, a multiply and an add over the
  ``tokens x out_features`` output, each with its backward) by one ``torch.addmm`` whose cuBLAS
  epilogue adds ``scaling x h B^T`` into the frozen layer's output (``h = A(dropout(x))``, the
  rank-``r`` activations); its backward scales only the ``tokens x r`` and ``r x out`` products.
  Under autocast only (the training loop on a GPU); otherwise PEFT's own forward runs.
* ``checkpointLayers: auto``: with gradient checkpointing on a GPU, the last ``K`` decoder
  layers are not checkpointed (:func:`checkpoint_layers_callback`): they keep their saved
  tensors for the backward pass instead of recomputing their forward from the stored input.
  ``K`` comes from the memory estimate at the chosen micro-batch
  (:func:`qlora_trainer.estimate.checkpoint_layout`). Checkpointing never changes the
  function (non-reentrant checkpointing replays the layer with the same RNG state, so LoRA
  dropout draws the same mask), only memory and time.
* The CUDA caching allocator's ``expandable_segments:True`` (:func:`allocator_env`), set by
  ``qlora-train`` when the pod's environment names no allocator settings: segments grow in
  place instead of new fixed blocks per size, so less memory is reserved beyond what is
  allocated when the micro-batch's tensor sizes vary (padding-free, variable-length rows).
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

import torch

log = logging.getLogger(__name__)

#: Name under which :func:`varlen_attention` is registered with transformers.
VARLEN_ATTENTION = "qlora_varlen"


def liger_available(model_type: str | None) -> bool:
    """Whether Liger Kernel is importable, CUDA is present and it knows ``model_type``.

    Known architectures: Liger's ``MODEL_TYPE_TO_APPLY_LIGER_FN`` (llama, mistral, qwen2, gemma, ...);
    others train without it.
    """
    if not torch.cuda.is_available():
        return False
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return False
    return bool(model_type) and model_type in MODEL_TYPE_TO_APPLY_LIGER_FN


def _packed_boundaries(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``cu_seqlens`` (int32, ``[0, ..., total]``) and the longest length, from restarting ``position_ids`` (1 x T)."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    total = torch.tensor([flat.numel()], device=flat.device)
    cu = torch.cat([starts, total]).to(torch.int32)
    return cu, int(cu.diff().max())


def varlen_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention over a padding-free row of several examples (transformers attention interface).

    Shapes: ``query`` ``(1, heads, T, head_dim)``, ``key``/``value`` ``(1, kv_heads, T, head_dim)``
    (grouped-query attention: ``heads`` a multiple of ``kv_heads``); returns ``(1, T, heads,
    head_dim)``. Boundaries come from ``cu_seq_lens_q``/``max_length_q`` (TRL's padding-free
    collator computes them on the CPU, so no device sync per layer) or else from restarting
    ``position_ids``. A padded batch (a 4-D ``attention_mask``) or a batch of one unpacked
    row falls back to transformers' SDPA implementation, which computes the same function.
    Sliding-window models (``module.sliding_window``) keep their window.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    max_len = kwargs.get("max_length_q")
    position_ids = kwargs.get("position_ids")
    if cu is None and position_ids is not None and query.shape[0] == 1 and attention_mask is None:
        if bool((position_ids.reshape(-1)[1:] == 0).any()):
            cu, max_len = _packed_boundaries(position_ids)
    if cu is None or query.shape[0] != 1 or attention_mask is not None or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    window = getattr(module, "sliding_window", None)
    if not query.is_cuda:
        return _per_example_sdpa(query, key, value, cu, scaling, window), None

    from torch.nn.attention.varlen import varlen_attn

    q = query[0].transpose(0, 1)  # (T, heads, d)
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    if k.shape[1] != q.shape[1]:  # grouped-query attention: one kv head per group of query heads
        groups = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    cu = cu.to(device=q.device, dtype=torch.int32)
    max_len = int(max_len) if max_len is not None else int(cu.diff().max())
    global _VARLEN_ERROR
    if _VARLEN_ERROR is None:
        try:
            out = varlen_attn(
                q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, max_len, max_len,
                scale=scaling,
                window_size=(window - 1 if window else -1, 0),
            )
            return out.unsqueeze(0), None
        except (RuntimeError, NotImplementedError) as err:  # e.g. a GPU the kernel does not support
            _VARLEN_ERROR = f"{type(err).__name__}: {err}"
            log.warning("varlen attention unavailable (%s): computing attention per example with SDPA", _VARLEN_ERROR)
    return _per_example_sdpa(query, key, value, cu, scaling, window), None


#: Why :func:`varlen_attention` fell back to per-example SDPA (``None``: it did not).
_VARLEN_ERROR: str | None = None


def _per_example_sdpa(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu: torch.Tensor, scaling: float | None,
    window: int | None,
) -> torch.Tensor:
    """The same function as :func:`varlen_attention`, one causal SDPA call per example (slower, always available)."""
    from torch.nn.functional import scaled_dot_product_attention

    bounds = cu.tolist()
    groups = query.shape[1] // key.shape[1]
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        q, k, v = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        mask = None
        if window and end - start > window:
            idx = torch.arange(end - start, device=q.device)
            mask = (idx[None, :] <= idx[:, None]) & (idx[:, None] - idx[None, :] < window)
        outs.append(scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scaling))
    return torch.cat(outs, dim=2).transpose(1, 2)


def _varlen_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """Mask builder paired with :func:`varlen_attention`: none unless the batch really has padding.

    Without padding the boundaries travel as ``cu_seq_lens`` (or restarting ``position_ids``),
    as for FlashAttention; a padded batch gets SDPA's 4-D mask for the SDPA fallback.
    """
    from transformers.masking_utils import sdpa_mask

    kv_length = kwargs.get("kv_length", args[2] if len(args) > 2 else None)
    if attention_mask is None or (kv_length is not None and attention_mask[:, -kv_length:].all()):
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register_varlen_attention() -> str:
    """Register :func:`varlen_attention` with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention)
    AttentionMaskInterface.register(VARLEN_ATTENTION, _varlen_mask)
    return VARLEN_ATTENTION


def attention_implementation(padding_free: bool, device: str) -> str:
    """Attention implementation to load the model with: varlen on CUDA for padding-free batches, else SDPA."""
    if padding_free and device == "cuda":
        from torch.nn.attention import varlen  # noqa: F401  (PyTorch >= 2.10; ImportError otherwise)

        return register_varlen_attention()
    return "sdpa"


#: Attribute holding PEFT's own forward on a LoRA layer that :func:`fuse_lora` patched.
_UNFUSED = "_qlora_unfused_forward"


def fused_lora_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """PEFT LoRA ``Linear``/``Linear4bit`` forward with the scale and add inside the LoRA B matmul.

    ``x``: ``(..., in_features)``; returns ``(..., out_features)`` =
    ``base(x) + scaling * dropout(x) @ A^T @ B^T`` as PEFT computes it, as
    ``torch.addmm(base(x), dropout(x) @ A^T, B^T, alpha=scaling)`` (2-D views of the token
    dimensions): no defensive clone of ``base(x)`` (addmm writes a new tensor), no separate
    multiply and add kernels, fp32 accumulation of the sum inside the GEMM. Falls back to
    PEFT's forward (``_qlora_unfused_forward``) outside autocast (PEFT then casts ``x`` to the
    adapter's float32), for several or mixed adapters, merged or disabled adapters, DoRA or
    other LoRA variants, a LoRA bias, and extra call arguments.
    """
    unfused = getattr(self, _UNFUSED)
    if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
        return unfused(x, *args, **kwargs)
    name = self.active_adapters[0]
    if (name not in self.lora_A or name in getattr(self, "lora_variant", {}) or self.use_dora.get(name)
            or self.lora_B[name].bias is not None or not torch.is_autocast_enabled(x.device.type)):
        return unfused(x, *args, **kwargs)
    result = self.base_layer(x)
    h = self.lora_A[name](self.lora_dropout[name](x))
    out = torch.addmm(
        result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), self.lora_B[name].weight.t(),
        alpha=self.scaling[name],
    )
    return out.view(result.shape)


def fuse_lora(model: torch.nn.Module) -> int:
    """Give every PEFT LoRA linear layer of ``model`` :func:`fused_lora_forward`; returns how many.

    Covers ``peft.tuners.lora.Linear`` (16-bit base) and bitsandbytes' ``Linear4bit``/``Linear8bitLt``
    LoRA layers; idempotent. PEFT's own forward stays on each layer as ``_qlora_unfused_forward``.
    """
    import types

    from peft.tuners.lora import layer as lora_layer

    classes: list[type] = [lora_layer.Linear]
    try:
        from peft.tuners.lora import bnb as lora_bnb

        classes += [c for c in (getattr(lora_bnb, "Linear4bit", None), getattr(lora_bnb, "Linear8bitLt", None)) if c]
    except ImportError:  # bitsandbytes missing: 16-bit LoRA only
        pass
    patched = 0
    for module in model.modules():
        if not isinstance(module, tuple(classes)) or hasattr(module, _UNFUSED):
            continue
        setattr(module, _UNFUSED, module.forward)
        module.forward = types.MethodType(fused_lora_forward, module)
        patched += 1
    return patched


#: ``PYTORCH_CUDA_ALLOC_CONF`` that :func:`allocator_env` sets when the environment has none.
CUDA_ALLOC_CONF = "expandable_segments:True"

#: Environment variables through which PyTorch reads its allocator settings (the second is the newer name).
ALLOC_CONF_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def allocator_env(environ: MutableMapping[str, str]) -> str | None:
    """Set ``PYTORCH_CUDA_ALLOC_CONF`` to :data:`CUDA_ALLOC_CONF` in ``environ`` unless it names allocator settings.

    Must run before the process (or the children it starts, which inherit ``environ``) first
    allocates CUDA memory: PyTorch reads the variable when its allocator starts. Returns the
    value set, or ``None`` when ``PYTORCH_CUDA_ALLOC_CONF`` or ``PYTORCH_ALLOC_CONF`` is
    present (also empty): the operator's or the user's choice is kept.
    """
    if any(name in environ for name in ALLOC_CONF_VARS):
        return None
    environ["PYTORCH_CUDA_ALLOC_CONF"] = CUDA_ALLOC_CONF
    return CUDA_ALLOC_CONF


def uncheckpoint_last_layers(model: torch.nn.Module, count: int) -> int:
    """Turn gradient checkpointing off on the last ``count`` decoder layers of ``model``; returns how many.

    Decoder layers are transformers' ``GradientCheckpointingLayer`` modules in module order
    (the model's layer order); each checks its ``gradient_checkpointing`` flag on every call,
    so setting it ``False`` makes that layer keep its activations for the backward pass. Call
    after gradient checkpointing is enabled (the Trainer enables it on every layer inside
    ``train()``); ``count <= 0`` changes nothing.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    chosen = layers[len(layers) - count:] if count > 0 else []
    for layer in chosen:
        layer.gradient_checkpointing = False
    return len(chosen)


def checkpoint_layers_callback(count: int) -> Any:
    """A ``TrainerCallback`` that leaves the last ``count`` decoder layers unchecked when training begins.

    ``on_train_begin`` runs after the Trainer enabled gradient checkpointing and, listed before
    the activation offloader's callback (:func:`qlora_trainer.offload.offload_callback`), before
    it wraps the checkpointed layers, so unchecked layers are neither recomputed nor offloaded.
    ``callback.unchecked``: how many layers it turned off (log line ``checkpoint_layers``).
    """
    from transformers import TrainerCallback

    class CheckpointLayersCallback(TrainerCallback):
        def __init__(self) -> None:
            self.count = count
            self.unchecked = 0

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            if model is None or not getattr(args, "gradient_checkpointing", False):
                return
            self.unchecked = uncheckpoint_last_layers(model, self.count)
            log.info("checkpointLayers: the last %d decoder layers are not checkpointed", self.unchecked)

    return CheckpointLayersCallback()
