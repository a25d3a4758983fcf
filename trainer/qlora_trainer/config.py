"""The trainer's input contract: ``TrainingConfig`` and its sections.

This module is pydantic only: it must never import torch, transformers or kopf,
because the operator (no torch) and the CRD generator build on it. The same models
validate ``qlora-train --config FILE`` locally and, extended in
``qlora_operator.api``, the ``spec`` of a ``QLoRAJob``.

Field names are camelCase on the wire (Kubernetes API conventions) and snake_case
in Python. Names follow Hugging Face / PEFT terms where one exists: ``r``,
``alpha`` (PEFT ``lora_alpha``), ``targetModules`` (``target_modules``),
``quantType`` (``bnb_4bit_quant_type``), ``computeDtype``
(``bnb_4bit_compute_dtype``), ``doubleQuant`` (``bnb_4bit_use_double_quant``).

Rules that are cross-field but checkable by the API server are also declared as CEL
rules beside the field or model they check (``json_schema_extra`` with
:data:`CEL_RULES`, built by :func:`cel_rule`: plain data, no operator import); the CRD
generator (``qlora_operator.crd``) copies them into the schema. The pydantic validators
here carry the same messages so that a local run fails exactly as ``kubectl apply`` would.
"""

from __future__ import annotations

import json
import re
from enum import Enum
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

#: URI schemes the trainer can read from or write to.
SUPPORTED_SCHEMES = ("s3://", "file://")
#: Model URIs may also name a Hugging Face hub repository (``hf://org/name``); the
#: trainer resolves it with the hub client, so it needs network access to the hub.
MODEL_SCHEMES = ("s3://", "file://", "hf://")

_S3_URI = r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$"
_FILE_URI = r"^file:///.*$"
_HF_URI = r"^hf://[A-Za-z0-9][A-Za-z0-9._\-]*/[A-Za-z0-9][A-Za-z0-9._\-]*$"
#: Regular expression a data or output URI must match (also the CRD ``pattern``).
DATA_URI_PATTERN = f"({_S3_URI})|({_FILE_URI})"
#: Regular expression a model URI must match (also the CRD ``pattern``).
MODEL_URI_PATTERN = f"({_S3_URI})|({_FILE_URI})|({_HF_URI})"
#: Longest URI accepted, in characters (S3 keys are at most 1,024 bytes).
MAX_URI_LENGTH = 2048
#: Regular expression of an S3 endpoint URL (also the CRD ``pattern``).
ENDPOINT_PATTERN = r"^https?://[^\s/]+(/.*)?$"

# Messages shared by the pydantic validators and the CEL rules of the generated CRD
# (``qlora_operator.crd``), so a local ``qlora-train --config`` run and ``kubectl
# apply`` refuse the same spec with the same words.
#: A model URI that does not match :data:`MODEL_URI_PATTERN`.
MSG_MODEL_URI = "must be an s3://bucket/key, file:///path or hf://org/name URI"
#: A data or output URI that does not match :data:`DATA_URI_PATTERN`.
MSG_DATA_URI = "must be an s3://bucket/key or file:///path URI"
#: A storage endpoint that does not match :data:`ENDPOINT_PATTERN`.
MSG_ENDPOINT = "must be an http:// or https:// URL such as http://minio.storage:9000"
MSG_EPOCHS_AND_MAX_STEPS = (
    "training.epochs and training.maxSteps are both set: set at most one of them "
    "(neither set means 3 epochs)"
)
MSG_FP16_WITH_BF16 = (
    "training.precision fp16 with quantization.computeDtype bfloat16 is refused "
    "(the fp16 gradient scaler crashes on bf16 gradients): use precision bf16, or computeDtype float16"
)
MSG_OUTPUT_OVERLAPS_DATASET = (
    "output.uri and dataset.uri overlap (the same location, or one inside the other): "
    "write artifacts to a prefix of their own"
)
MSG_OUTPUT_OVERLAPS_EVAL = (
    "output.uri and dataset.evalUri overlap (the same location, or one inside the other): "
    "write artifacts to a prefix of their own"
)
MSG_OUTPUT_OVERLAPS_MODEL = (
    "output.uri and model.uri overlap (the same location, or one inside the other): "
    "write artifacts to a prefix of their own"
)
MSG_ALL_LINEAR_ALONE = (
    "lora.targetModules: all-linear already selects every linear layer: list it alone, or list module names"
)
MSG_TARGET_MODULES_UNIQUE = "lora.targetModules: module names must be unique"
MSG_EXPORT_NEEDS_MERGE = (
    "output.export needs output.merge.enabled: true (GGUF and the vLLM merged copy are made from the merged model): "
    "enable the merge, or remove output.export"
)
MSG_EXPORT_FORMATS_UNIQUE = "output.export: each format may be listed once"
MSG_EXPORT_QUANTIZATION_GGUF_ONLY = (
    "output.export[].quantization applies to format gguf only: remove it from the vllm entry"
)


def pattern_check(pattern: str, hint: str) -> AfterValidator:
    """An ``AfterValidator`` that checks ``pattern`` and says ``hint`` (not the regex) on failure."""
    rx = re.compile(pattern)

    def check(value: str) -> str:
        if not rx.fullmatch(value):
            raise PydanticCustomError("pattern_hint", "{hint} (got {got})", {"hint": hint, "got": _short(value)})
        return value

    return AfterValidator(check)


#: The JSON-schema key under which a field or model declares its CEL rules; the CRD
#: generator copies it to the field's schema node as is (Kubernetes' own key).
CEL_RULES = "x-kubernetes-validations"


def cel_rule(rule: str, message: str, **extra: str) -> dict[str, str]:
    """One CEL rule of the CRD: ``{"rule": ..., "message": ..., **extra}`` (e.g. ``fieldPath``).

    ``rule`` is evaluated by the API server with ``self`` the field's value; ``message``
    is what ``kubectl apply`` says, the same words as the pydantic validator's.
    """
    return {"rule": rule, "message": message, **extra}


def cel_rules(*rules: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    """``json_schema_extra`` declaring ``rules`` (from :func:`cel_rule`) on a field or model."""
    return {CEL_RULES: list(rules)}


def cel_pattern(pattern: str, hint: str) -> dict[str, str]:
    """The CEL twin of :func:`pattern_check`: ``self`` matches ``pattern``, else ``hint``.

    The field keeps ``pattern`` too; the rule is what gives ``kubectl apply`` the hint.

    Raises:
        ValueError: ``pattern`` contains a quote (it cannot be a CEL raw string).
    """
    if "'" in pattern:
        raise ValueError(f"pattern {pattern!r} contains a quote")
    return cel_rule(f"self.matches(r'{pattern}')", hint)


def cel_list(values: Sequence[str]) -> str:
    """A CEL list literal of strings, ``['a', 'b']``.

    Raises:
        ValueError: a value contains a quote or backslash.
    """
    for value in values:
        if "'" in value or "\\" in value:
            raise ValueError(f"{value!r} cannot be quoted in CEL")
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


def cel_prefix(expr: str) -> str:
    """CEL: the string ``expr`` as a prefix, ending in ``/`` (:func:`_as_prefix`)."""
    return f"({expr}.endsWith('/') ? {expr} : {expr} + '/')"


def cel_disjoint(prefix_a: str, prefix_b: str) -> str:
    """CEL: neither prefix starts with the other, i.e. not :func:`uris_overlap` (both end in ``/``:
    see :func:`cel_prefix`)."""
    return f"!({prefix_a}.startsWith({prefix_b}) || {prefix_b}.startsWith({prefix_a}))"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + "...'"


#: A model location: s3://, file:// or hf://. The CRD keeps the regex as ``pattern``.
ModelUri = Annotated[
    str,
    Field(
        max_length=MAX_URI_LENGTH,
        json_schema_extra={"pattern": MODEL_URI_PATTERN, **cel_rules(cel_pattern(MODEL_URI_PATTERN, MSG_MODEL_URI))},
    ),
    pattern_check(MODEL_URI_PATTERN, MSG_MODEL_URI),
]
#: A data or output location: s3:// or file://. The CRD keeps the regex as ``pattern``.
DataUri = Annotated[
    str,
    Field(
        max_length=MAX_URI_LENGTH,
        json_schema_extra={"pattern": DATA_URI_PATTERN, **cel_rules(cel_pattern(DATA_URI_PATTERN, MSG_DATA_URI))},
    ),
    pattern_check(DATA_URI_PATTERN, MSG_DATA_URI),
]
#: An S3 endpoint URL.
EndpointUrl = Annotated[
    str,
    Field(
        max_length=1024,
        json_schema_extra={"pattern": ENDPOINT_PATTERN, **cel_rules(cel_pattern(ENDPOINT_PATTERN, MSG_ENDPOINT))},
    ),
    pattern_check(ENDPOINT_PATTERN, MSG_ENDPOINT),
]


def _as_prefix(uri: str) -> str:
    return uri if uri.endswith("/") else uri + "/"


def uris_overlap(a: str, b: str) -> bool:
    """True when ``a`` and ``b`` are the same location or one lies inside the other.

    ``s3://b/data`` and ``s3://b/data/out/`` overlap; ``s3://b/data.jsonl`` and
    ``s3://b/data.jsonl.out/`` do not. The CRD's CEL rule computes the same thing.
    """
    pa, pb = _as_prefix(a), _as_prefix(b)
    return pa.startswith(pb) or pb.startswith(pa)


class ConfigError(ValueError):
    """A configuration that cannot be used; ``str()`` names each offending field.

    Raised by :func:`load_config`; ``qlora-train`` turns it into exit code 2.
    """


class ApiModel(BaseModel):
    """Base for every API section: camelCase aliases, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
        validate_default=True,
    )


class DatasetFormat(str, Enum):
    """How rows are turned into prompts and completions."""

    auto = "auto"
    text = "text"
    instruction = "instruction"
    prompt_completion = "promptCompletion"
    chat = "chat"


class ChatTemplate(str, Enum):
    """Which chat template renders ``chat`` rows (``tokenizer``: the model's own)."""

    tokenizer = "tokenizer"
    chatml = "chatml"
    llama2 = "llama2"
    alpaca = "alpaca"


class QuantType(str, Enum):
    """4-bit data type of the frozen base weights (bitsandbytes ``bnb_4bit_quant_type``)."""

    nf4 = "nf4"
    fp4 = "fp4"


class Dtype(str, Enum):
    """A floating-point dtype, or ``auto`` (chosen from the hardware at run time)."""

    auto = "auto"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


class MergeDtype(str, Enum):
    """Dtype of a merged (dequantised base + LoRA) model."""

    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


class Precision(str, Enum):
    """Mixed-precision mode of the training loop (``auto`` follows the compute dtype)."""

    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class LoraBias(str, Enum):
    """Which biases are trained (PEFT ``LoraConfig.bias``)."""

    none = "none"
    all = "all"
    lora_only = "lora_only"


class LrScheduler(str, Enum):
    """Learning-rate schedule (transformers ``SchedulerType`` names)."""

    linear = "linear"
    cosine = "cosine"
    constant = "constant"
    constant_with_warmup = "constant_with_warmup"


class Optimizer(str, Enum):
    """Optimizer (transformers ``OptimizerNames``; the paged 8-bit AdamW is QLoRA's)."""

    paged_adamw_8bit = "paged_adamw_8bit"
    paged_adamw_32bit = "paged_adamw_32bit"
    adamw_8bit = "adamw_8bit"
    adamw_torch = "adamw_torch"
    adamw_torch_fused = "adamw_torch_fused"


class Parallelism(str, Enum):
    """How a run spreads over several GPUs (one GPU: always a single process).

    ``ddp``: one full 4-bit replica per GPU, gradients all-reduced (PyTorch DDP).
    ``fsdp``: FSDP-QLoRA, the 4-bit weights sharded over all GPUs (Answer.AI / HF recipe).
    ``auto``: ``ddp`` unless the memory estimate says a replica does not fit one GPU,
    then ``fsdp``.
    """

    auto = "auto"
    ddp = "ddp"
    fsdp = "fsdp"


class CheckpointLayers(str, Enum):
    """Which decoder layers gradient checkpointing recomputes (``training.checkpointLayers``).

    ``all``: every decoder layer (the plain Trainer behaviour). ``auto``: on a CUDA GPU, the
    last ``K`` decoder layers keep their activations instead (no recompute forward), ``K`` the
    most whose memory estimate still fits the share of the GPU that ``autoMicroBatch`` uses
    (:func:`qlora_trainer.estimate.checkpoint_layout`); on CPU, ``all``.
    """

    auto = "auto"
    all = "all"


class AddressingStyle(str, Enum):
    """S3 addressing: ``path`` (MinIO, most S3-compatible stores) or ``virtual`` (AWS)."""

    path = "path"
    virtual = "virtual"


class ModelSource(ApiModel):
    """Where the base model is read from."""

    uri: ModelUri = Field(
        description=(
            "Base model in Hugging Face layout (config.json, safetensors, tokenizer files): "
            "an s3:// prefix, a file:// directory, or hf://org/name (needs hub access)."
        ),
    )
    revision: Annotated[str, Field(max_length=256)] | None = Field(
        default=None,
        description="Hub revision (branch, tag or commit) for hf:// URIs; ignored otherwise.",
    )


class DatasetSource(ApiModel):
    """Where the training (and optionally eval) data is read from, and how rows look."""

    uri: DataUri = Field(
        description=(
            "Training data: one file or a prefix of shards (s3:// or file://). "
            "Formats by extension: .jsonl, .json, .parquet, .csv."
        ),
    )
    format: DatasetFormat = Field(
        default=DatasetFormat.auto,
        description=(
            "Row layout. text: a text column; instruction: instruction/input/output; "
            "promptCompletion: prompt/completion; chat: messages with role/content; "
            "auto: detected from the columns of the first file."
        ),
    )
    text_field: Annotated[str, Field(min_length=1, max_length=256)] = Field(
        default="text", description="Column holding the text for format text."
    )
    eval_uri: DataUri | None = Field(
        default=None,
        description="Held-out eval data (s3:// or file://, same formats); when unset, evalFraction of the training rows.",
    )
    eval_fraction: Annotated[float, Field(gt=0.0, le=0.5)] = Field(
        default=0.05,
        description="Fraction of training rows held out for eval when evalUri is unset; in (0, 0.5].",
    )
    chat_template: ChatTemplate = Field(
        default=ChatTemplate.tokenizer,
        description="Template that renders chat rows: the tokenizer's own, or a named one.",
    )


class QuantizationConfig(ApiModel):
    """4-bit quantisation of the frozen base (bitsandbytes ``BitsAndBytesConfig``)."""

    quant_type: QuantType = Field(
        default=QuantType.nf4,
        description="4-bit data type: nf4 (NormalFloat4, QLoRA paper) or fp4. Default nf4.",
    )
    compute_dtype: Dtype = Field(
        default=Dtype.auto,
        description=(
            "Dtype of matmuls over dequantised weights. auto: bfloat16 on GPUs that support it, "
            "float16 on older GPUs, float32 on CPU (bf16 on CPU is about 10x slower)."
        ),
    )
    double_quant: bool = Field(
        default=True,
        description="Quantise the quantisation constants too (about 0.37 bits/param saved; QLoRA paper).",
    )


class LoraSettings(ApiModel):
    """The LoRA adapter (PEFT ``LoraConfig``)."""

    r: Annotated[int, Field(ge=1, le=1024)] = Field(default=16, description="LoRA rank r, 1..1024. Default 16.")
    alpha: Annotated[float, Field(gt=0, le=4096)] = Field(
        default=32, description="Scaling numerator lora_alpha (scale = alpha / r). Default 32."
    )
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        default=0.05, description="Dropout probability on the LoRA input, in [0, 1). Default 0.05."
    )
    target_modules: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=128)]], Field(min_length=1, max_length=64)
    ] = Field(
        default_factory=lambda: ["all-linear"],
        description=(
            "Module names to adapt (e.g. q_proj, v_proj; unique), or all-linear alone for every linear layer "
            "but the output head (the QLoRA paper found all linear layers necessary to match 16-bit). "
            "Default [all-linear]."
        ),
        json_schema_extra={
            "x-kubernetes-list-type": "set",
            **cel_rules(cel_rule("!('all-linear' in self) || self.size() == 1", MSG_ALL_LINEAR_ALONE)),
        },
    )
    bias: LoraBias = Field(default=LoraBias.none, description="Which biases to train. Default none.")

    @model_validator(mode="after")
    def _target_modules(self) -> LoraSettings:
        modules = self.target_modules
        if len(set(modules)) != len(modules):
            raise PydanticCustomError("target_modules", MSG_TARGET_MODULES_UNIQUE)
        if "all-linear" in modules and len(modules) > 1:
            raise PydanticCustomError("target_modules", MSG_ALL_LINEAR_ALONE)
        return self


class TrainingSettings(ApiModel):
    """The optimisation loop (maps to TRL ``SFTConfig``)."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            cel_rule("!(has(self.epochs) && has(self.maxSteps))", MSG_EPOCHS_AND_MAX_STEPS, fieldPath=".maxSteps"),
        )
    )

    epochs: Annotated[float, Field(gt=0, le=1000)] | None = Field(
        default=None,
        description=(
            "Passes over the training data (may be fractional), in (0, 1000]. "
            "Set at most one of epochs and maxSteps; when neither is set the run lasts 3 epochs."
        ),
    )
    max_steps: Annotated[int, Field(ge=1, le=10_000_000)] | None = Field(
        default=None,
        description="Optimizer steps to run, overriding epochs. Set at most one of epochs and maxSteps.",
    )
    micro_batch_size: Annotated[int, Field(ge=1, le=4096)] = Field(
        default=4, description="Sequences per device per forward pass. Default 4."
    )
    gradient_accumulation_steps: Annotated[int, Field(ge=1, le=4096)] = Field(
        default=4,
        description="Micro-batches per optimizer step (effective batch = microBatchSize x this x GPUs). Default 4.",
    )
    learning_rate: Annotated[float, Field(gt=0, le=1)] = Field(
        default=2e-4, description="Peak learning rate. Default 2e-4 (QLoRA paper, 7B-13B)."
    )
    lr_scheduler: LrScheduler = Field(default=LrScheduler.cosine, description="Learning-rate schedule. Default cosine.")
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = Field(
        default=0.03, description="Fraction of the steps spent warming up the learning rate, 0..1. Default 0.03."
    )
    max_seq_length: Annotated[int, Field(ge=16, le=131072)] = Field(
        default=512, description="Tokens per sequence after truncation or packing. Default 512."
    )
    packing: bool = Field(
        default=True, description="Pack several short examples into one sequence (no cross-example attention)."
    )
    gradient_checkpointing: bool = Field(
        default=True, description="Recompute activations in the backward pass (non-reentrant) to save memory."
    )
    padding_free: bool = Field(
        default=True,
        description=(
            "Concatenate each micro-batch into one row without padding; attention stays within each example "
            "(FlashAttention variable-length kernel on GPUs). Same examples and loss as padded batches, no "
            "compute spent on padding. Always on with packing. Default true."
        ),
    )
    liger_kernels: bool = Field(
        default=True,
        description=(
            "Liger Kernel's fused RMSNorm, RoPE and SwiGLU on CUDA GPUs, for the architectures Liger supports "
            "(llama, mistral, qwen2, gemma, ...); ignored on CPU. The loss is TRL's fused, chunked LM head either "
            "way (the logits are never materialised). Default true."
        ),
    )
    upcast_frozen_weights: bool = Field(
        default=False,
        description=(
            "Cast the frozen non-quantised weights (embeddings, norms, lm_head) to float32, as "
            "peft.prepare_model_for_kbit_training does. Under bf16/fp16 autocast their matmuls run in the compute "
            "dtype either way, so the copies only cost memory. Default false."
        ),
    )
    activation_offloading: bool = Field(
        default=False,
        description=(
            "With gradient checkpointing on a GPU, keep the checkpointed layer inputs in pinned host memory instead "
            "of GPU memory (layers x tokens x hidden x 2 bytes, which the pod's memory request must cover); the "
            "copies run on a side stream, overlapping compute. Ignored on CPU. Default false."
        ),
    )
    fused_lora: bool = Field(
        default=True,
        description=(
            "On CUDA GPUs under bf16/fp16 autocast, add each LoRA branch into the frozen layer's output inside the "
            "LoRA B matmul (one cuBLAS addmm: result + scaling x (dropout(x) A^T) B^T) instead of PEFT's clone, "
            "multiply and add kernels. The same function up to bf16 rounding order. Default true."
        ),
    )
    auto_micro_batch: bool = Field(
        default=True,
        description=(
            "On CUDA GPUs, train the same effective batch (microBatchSize x gradientAccumulationSteps) in fewer, "
            "larger micro-batches: the micro-batch becomes microBatchSize x k for the largest divisor k of "
            "gradientAccumulationSteps whose memory estimate fits 80 % of the GPU (accumulation divided by k). "
            "false keeps the layout as given. Default true."
        ),
    )
    checkpoint_layers: CheckpointLayers = Field(
        default=CheckpointLayers.auto,
        description=(
            "With gradientCheckpointing: which decoder layers are recomputed in the backward pass. all: every layer. "
            "auto: on CUDA GPUs, after the micro-batch is chosen, the last K layers are not checkpointed (they keep "
            "their activations, no recompute), K the most whose memory estimate fits 80 % of the GPU; on CPU, all. "
            "The same function either way, only memory and speed differ. Default auto."
        ),
    )
    optimizer: Optimizer = Field(default=Optimizer.paged_adamw_8bit, description="Optimizer. Default paged_adamw_8bit.")
    max_grad_norm: Annotated[float, Field(gt=0, le=1000)] = Field(
        default=0.3, description="Gradient clipping norm. Default 0.3 (QLoRA paper)."
    )
    weight_decay: Annotated[float, Field(ge=0, le=1)] = Field(default=0.0, description="AdamW weight decay.")
    precision: Precision = Field(
        default=Precision.auto,
        description=(
            "Mixed precision of the loop: auto follows the compute dtype. "
            "fp16 with computeDtype bfloat16 is refused (the fp16 gradient scaler crashes on bf16 gradients)."
        ),
    )
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = Field(default=42, description="Random seed. Default 42.")
    checkpoint_every_steps: Annotated[int, Field(ge=1, le=10_000_000)] = Field(
        default=100, description="Optimizer steps between checkpoints to <output>/run-<N>/checkpoints/. Default 100."
    )
    keep_checkpoints: Annotated[int, Field(ge=1, le=100)] = Field(
        default=2, description="Newest complete checkpoints kept in storage. Default 2."
    )
    eval_every_steps: Annotated[int, Field(ge=1, le=10_000_000)] = Field(
        default=100, description="Optimizer steps between evaluations. Default 100."
    )
    log_every_steps: Annotated[int, Field(ge=1, le=10_000)] = Field(
        default=1, description="Optimizer steps between progress log lines. Default 1."
    )
    parallelism: Parallelism = Field(
        default=Parallelism.auto,
        description=(
            "Multi-GPU strategy. ddp: one full 4-bit replica per GPU (fastest when the model fits one GPU); "
            "fsdp: FSDP-QLoRA, base weights sharded over all GPUs (for models too large for one GPU); "
            "auto: ddp unless the memory estimate says one GPU is too small, then fsdp. Default auto."
        ),
    )
    train_on_completions_only: bool = Field(
        default=True,
        description="Loss on completions / assistant turns only (prompts masked). Default true.",
    )
    non_finite_patience: Annotated[int, Field(ge=1, le=1000)] = Field(
        default=3,
        description="Consecutive logged steps with a non-finite loss or gradient norm before the run stops (exit 6).",
    )

    @model_validator(mode="after")
    def _one_length(self) -> TrainingSettings:
        if self.epochs is not None and self.max_steps is not None:
            raise PydanticCustomError("epochs_and_max_steps", MSG_EPOCHS_AND_MAX_STEPS)
        return self

    def resolved_epochs(self) -> float:
        """Epochs to run when ``maxSteps`` is unset (3 when neither is set)."""
        return 3.0 if self.epochs is None else self.epochs


class MergeSettings(ApiModel):
    """Optional merge of the adapter into a dequantised copy of the base."""

    enabled: bool = Field(default=False, description="Also write <output>/run-<N>/merged/ (base + adapter merged).")
    dtype: MergeDtype = Field(default=MergeDtype.bfloat16, description="Dtype of the merged weights. Default bfloat16.")


class ExportFormat(str, Enum):
    """A deployable export of the merged model (``export``)."""

    gguf = "gguf"
    vllm = "vllm"


class GgufQuantization(str, Enum):
    """GGUF tensor type, llama.cpp ``convert_hf_to_gguf.py --outtype`` (what its pure-Python writer makes)."""

    f16 = "f16"
    bf16 = "bf16"
    q8_0 = "q8_0"


#: GGUF quantization used when a gguf export names none.
DEFAULT_GGUF_QUANTIZATION = GgufQuantization.q8_0.value


class ExportTarget(ApiModel):
    """One export under ``<uri>/run-<N>/export/`` with its own ``_SUCCESS`` marker (``qlora_trainer.export``)."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            cel_rule("!has(self.quantization) || self.format == 'gguf'", MSG_EXPORT_QUANTIZATION_GGUF_ONLY),
        )
    )

    format: ExportFormat = Field(
        description=(
            "gguf: the merged model converted by llama.cpp's convert_hf_to_gguf.py into one .gguf file "
            "(export/gguf-<quantization>/); vllm: the adapter laid out for vllm serve --enable-lora, with serve.sh "
            "and a README naming the merged model (export/vllm/)."
        ),
    )
    quantization: GgufQuantization | None = Field(
        default=None,
        description="gguf only: f16, bf16 or q8_0 (8-bit blocks, about half the size of f16). Unset: q8_0.",
    )

    @model_validator(mode="after")
    def _quantization_gguf_only(self) -> ExportTarget:
        if self.quantization is not None and self.format != ExportFormat.gguf.value:
            raise PydanticCustomError("export_quantization", MSG_EXPORT_QUANTIZATION_GGUF_ONLY)
        return self

    def resolved_quantization(self) -> str | None:
        """The GGUF quantization (default q8_0); ``None`` for vllm."""
        if self.format != ExportFormat.gguf.value:
            return None
        return self.quantization or DEFAULT_GGUF_QUANTIZATION

    @property
    def name(self) -> str:
        """Directory under ``export/``: ``gguf-q8_0``, ``vllm``."""
        quant = self.resolved_quantization()
        return f"{self.format}-{quant}" if quant else str(self.format)


class OutputTarget(ApiModel):
    """Where artifacts go: ``<uri>/run-<N>/adapter/``, ``.../merged/``, ``.../checkpoints/`` (``runs``: one prefix per run)."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            cel_rule(
                "!has(self.export) || size(self.export) == 0"
                " || (has(self.merge) && has(self.merge.enabled) && self.merge.enabled)",
                MSG_EXPORT_NEEDS_MERGE,
                fieldPath=".export",
            ),
        )
    )

    uri: DataUri = Field(
        description="Output prefix (s3:// or file://); each artifact is complete when its _SUCCESS marker exists."
    )
    merge: MergeSettings = Field(
        default_factory=MergeSettings,
        description="Optionally merge the adapter into a dequantised copy of the base (<uri>/run-<N>/merged/).",
    )
    export: Annotated[list[ExportTarget], Field(max_length=2)] = Field(
        default_factory=list,
        description=(
            "Deployable exports made from the merged model (needs merge.enabled), each under "
            "<uri>/run-<N>/export/<format>[-<quantization>]/ with its own _SUCCESS marker: gguf (llama.cpp, "
            "Llama/Mistral/Qwen2/Qwen3 architectures) and vllm (LoRA serving layout). Each format at most once."
        ),
        json_schema_extra=cel_rules(
            cel_rule("self.all(e, self.filter(o, o.format == e.format).size() == 1)", MSG_EXPORT_FORMATS_UNIQUE),
        ),
    )

    @model_validator(mode="after")
    def _export_needs_merge(self) -> OutputTarget:
        formats = [e.format for e in self.export]
        if len(set(formats)) != len(formats):
            raise PydanticCustomError("export_unique", MSG_EXPORT_FORMATS_UNIQUE)
        if self.export and not self.merge.enabled:
            raise PydanticCustomError("export_needs_merge", MSG_EXPORT_NEEDS_MERGE)
        return self


class StorageSettings(ApiModel):
    """How the trainer reaches S3 (credentials come from the environment only)."""

    endpoint: EndpointUrl | None = Field(
        default=None,
        description="S3 endpoint URL (http(s)://host:port) for MinIO and other S3-compatible stores; unset: AWS.",
    )
    region: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z0-9-]+$")] = Field(
        default="us-east-1", description="Region used to sign requests. Default us-east-1."
    )
    addressing_style: AddressingStyle = Field(
        default=AddressingStyle.path, description="path (MinIO and most S3-compatible stores) or virtual (AWS)."
    )


#: MLflow tracking server URI: http(s):// (a tracking server) or file:/// (a local mlruns directory).
TRACKING_URI_PATTERN = r"^(https?://[^\s/]+(/\S*)?|file:///\S*)$"
MSG_TRACKING_URI = "must be an http://, https:// or file:/// URI such as http://mlflow.mlflow:5000"
#: MLflow tag keys (its own rule: alphanumerics, underscores, dashes, periods, spaces, slashes).
TAG_KEY_PATTERN = r"^[A-Za-z0-9_.\-/ ]{1,250}$"
MSG_TAG_KEY = "tracking.mlflow.tags: keys are 1-250 of letters, digits, _ - . / and space (MLflow's rule)"

TrackingUri = Annotated[
    str,
    Field(max_length=MAX_URI_LENGTH, json_schema_extra={"pattern": TRACKING_URI_PATTERN}),
    pattern_check(TRACKING_URI_PATTERN, MSG_TRACKING_URI),
]


def _check_tag_keys(tags: dict[str, str]) -> dict[str, str]:
    bad = [k for k in tags if not re.match(TAG_KEY_PATTERN, k)]
    if bad:
        raise PydanticCustomError("tag_key", MSG_TAG_KEY + ": {bad}", {"bad": ", ".join(sorted(bad))})
    return tags


class MlflowSettings(ApiModel):
    """MLflow tracking through transformers' ``MLflowCallback`` (``report_to: ["mlflow"]``).

    The trainer sets ``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_NAME``, ``MLFLOW_TAGS`` and, when a run of
    this job resumes, ``MLFLOW_RUN_ID``; the callback logs params at train begin and every logged metric by step.
    """

    tracking_uri: TrackingUri = Field(
        description="MLflow tracking server (http(s)://host:port[/path]) or file:///path for a local store."
    )
    experiment_name: Annotated[str, Field(min_length=1, max_length=500)] | None = Field(
        default=None, description="Experiment the run goes into (created when missing). Unset: MLflow's Default."
    )
    tags: Annotated[
        dict[Annotated[str, Field(max_length=250)], Annotated[str, Field(max_length=5000)]],
        Field(max_length=50),
        AfterValidator(_check_tag_keys),
    ] = Field(
        default_factory=dict,
        description="Tags set on the run (MLFLOW_TAGS), at most 50; the trainer adds qlora.job, qlora.namespace, qlora.run.",
    )


class TensorboardSettings(ApiModel):
    """TensorBoard event files through transformers' ``TensorBoardCallback`` (``report_to: ["tensorboard"]``)."""

    enabled: bool = Field(
        default=False, description="Write TensorBoard event files, uploaded under <output>/run-<N>/tensorboard/."
    )


class TrackingSettings(ApiModel):
    """Experiment tracking through the transformers integrations (``report_to``); none by default."""

    mlflow: MlflowSettings | None = Field(default=None, description="Log the run to an MLflow tracking server.")
    tensorboard: TensorboardSettings = Field(
        default_factory=TensorboardSettings, description="Write TensorBoard event files with the artifacts."
    )

    def report_to(self) -> list[str]:
        """transformers' ``report_to``: ``[]`` (none), ``["mlflow"]``, ``["tensorboard"]`` or both."""
        return (["mlflow"] if self.mlflow else []) + (["tensorboard"] if self.tensorboard.enabled else [])


class TrainingConfig(ApiModel):
    """Everything ``qlora-train`` needs; the ``config.json`` the operator renders.

    Loaded by :func:`load_config` from JSON or YAML with camelCase keys.
    """

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            cel_rule(
                "!has(self.training) || !has(self.quantization) || !has(self.training.precision)"
                " || !has(self.quantization.computeDtype)"
                " || !(self.training.precision == 'fp16' && self.quantization.computeDtype == 'bfloat16')",
                MSG_FP16_WITH_BF16,
                fieldPath=".training.precision",
            ),
            # One rule per pair, in the order of _output_separate's checks.
            cel_rule(
                cel_disjoint(cel_prefix("self.output.uri"), cel_prefix("self.dataset.uri")),
                MSG_OUTPUT_OVERLAPS_DATASET,
                fieldPath=".output.uri",
            ),
            cel_rule(
                "!has(self.dataset.evalUri) || "
                + cel_disjoint(cel_prefix("self.output.uri"), cel_prefix("self.dataset.evalUri")),
                MSG_OUTPUT_OVERLAPS_EVAL,
                fieldPath=".output.uri",
            ),
            cel_rule(
                cel_disjoint(cel_prefix("self.output.uri"), cel_prefix("self.model.uri")),
                MSG_OUTPUT_OVERLAPS_MODEL,
                fieldPath=".output.uri",
            ),
        )
    )

    model: ModelSource = Field(description="The base model to fine-tune (Hugging Face layout), read-only.")
    dataset: DatasetSource = Field(description="Training and eval data, and how their rows look.")
    quantization: QuantizationConfig = Field(
        default_factory=QuantizationConfig,
        description="4-bit quantisation of the frozen base (bitsandbytes BitsAndBytesConfig).",
    )
    lora: LoraSettings = Field(
        default_factory=LoraSettings,
        description="The trained LoRA adapter (PEFT LoraConfig): rank r, scaling alpha, dropout, target modules, bias.",
    )
    training: TrainingSettings = Field(
        default_factory=TrainingSettings,
        description="The optimisation loop (TRL SFTConfig): length, batch, learning rate, precision, checkpoints.",
    )
    output: OutputTarget = Field(
        description=(
            "Where artifacts go, one prefix per run N: <uri>/run-<N>/adapter/, <uri>/run-<N>/merged/, "
            "<uri>/run-<N>/checkpoints/. Must not overlap model or data."
        )
    )
    storage: StorageSettings = Field(
        default_factory=StorageSettings, description="How the trainer reaches S3 (endpoint, region, addressing)."
    )
    tracking: TrackingSettings = Field(
        default_factory=TrackingSettings,
        description="Experiment tracking: an MLflow run and/or TensorBoard event files (<output>/run-<N>/tensorboard/).",
    )

    @model_validator(mode="after")
    def _precision_matches_compute(self) -> TrainingConfig:
        if self.training.precision == Precision.fp16.value and self.quantization.compute_dtype == Dtype.bfloat16.value:
            raise PydanticCustomError("precision", MSG_FP16_WITH_BF16)
        return self

    @model_validator(mode="after")
    def _output_separate(self) -> TrainingConfig:
        # One rule per pair, in the order of the CEL rules in model_config.
        out = self.output.uri
        if uris_overlap(out, self.dataset.uri):
            raise PydanticCustomError("output_overlap", MSG_OUTPUT_OVERLAPS_DATASET)
        if self.dataset.eval_uri is not None and uris_overlap(out, self.dataset.eval_uri):
            raise PydanticCustomError("output_overlap", MSG_OUTPUT_OVERLAPS_EVAL)
        if uris_overlap(out, self.model.uri):
            raise PydanticCustomError("output_overlap", MSG_OUTPUT_OVERLAPS_MODEL)
        return self


#: pydantic error types whose message already shows the offending value, or has none.
_NO_GOT = {"missing", "extra_forbidden", "pattern_hint", "string_too_long"}


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """Render a pydantic error as one ``field.path: message`` line per problem.

    ``prefix`` (e.g. ``"spec."``) is put before every path, so the text matches what
    the API server would say about the same field. Paths use the camelCase names of
    the API; list items show as ``field[i]``.
    """
    lines = []
    for item in err.errors():
        path = ""
        for part in item["loc"]:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        msg = re.sub(r"^Value error, ", "", item["msg"])
        kind = item["type"]
        if kind == "extra_forbidden":
            msg = "unknown field (not part of the schema)"
            if item["loc"] and item["loc"][-1] == "namespace":
                msg += ": references always point into the job's own namespace"
        elif kind == "string_too_long":
            msg = f"{msg} (got {len(item['input'])})"
        elif kind not in _NO_GOT and isinstance(item.get("input"), (str, int, float, bool)):
            msg = f"{msg} (got {_short(item['input'])})"
        where = f"{prefix}{path}" if path else prefix.rstrip(".")
        lines.append(f"{where}: {msg}" if where else msg)
    return "\n".join(lines)


_M = TypeVar("_M", bound=BaseModel)


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (tuple, set, frozenset)) or (isinstance(value, Sequence) and not isinstance(value, str)):
        return list(value)
    raise TypeError(f"not JSON data: {type(value).__name__}")


def validate_like_api_server(model: type[_M], data: Any) -> _M:
    """Validate decoded JSON/YAML ``data`` as ``model`` with the API server's typing.

    JSON types are not coerced (``"2"`` is not an integer, ``"yes"`` not a boolean), as
    the CRD's schema would have it; enums, nested objects and integers for numbers are
    accepted as usual. ``model.model_validate`` stays available for lax Python use.

    Raises:
        pydantic.ValidationError: as ``model_validate`` would.
    """
    return model.model_validate_json(json.dumps(data, default=_plain), strict=True)


def parse_config(data: Any, source: str = "config") -> TrainingConfig:
    """Validate a decoded mapping as a :class:`TrainingConfig` (typed as the API server does).

    Raises:
        ConfigError: naming ``source`` and every offending field.
    """
    try:
        return validate_like_api_server(TrainingConfig, data)
    except ValidationError as err:
        raise ConfigError(f"{source}: invalid trainer config\n{format_validation_error(err)}") from None


def _yaml_loader() -> type:
    """PyYAML's SafeLoader, reading ``2e-4`` as a number like YAML 1.2 and kubectl do."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(
            r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
            |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
            |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
            |[-+]?\.(?:inf|Inf|INF)
            |\.(?:nan|NaN|NAN))$""",
            re.X,
        ),
        list("-+0123456789."),
    )
    return Loader


def load_config(path: str | Path) -> TrainingConfig:
    """Read a trainer config file (``.json``, ``.yaml`` or ``.yml``) and validate it.

    Raises:
        ConfigError: the file is missing or unreadable, is not valid JSON/YAML (with
            line number), or a field is invalid (named by its camelCase path).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except OSError as err:
        raise ConfigError(f"{p}: cannot read config file: {err.strerror or err}") from None
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{p}:{where}: not valid YAML: {getattr(err, 'problem', err)}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{p}: line {err.lineno}: not valid JSON: {err.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the config must be a mapping with model, dataset and output")
    return parse_config(data, source=str(p))
