#!/usr/bin/env python
"""QLoRA training throughput: the reference recipe against the product's trainer (DESIGN.md section 7, issue 9).

One command, one device call. It

1. builds a random-weight model from a real architecture config (no hub): ``--shape mistral-7b``
   (MistralConfig, 7.38 B parameters with the SmolLM2 tokenizer's 49,152-token vocabulary),
   ``--shape llama3-8b`` (LlamaConfig, 128,256-token vocabulary, where the logits dominate memory) or
   ``--shape tiny`` (2 layers, hidden 64, vocabulary 2,048: CPU smoke tests). It is initialised on the device in bf16
   with a fixed seed and saved once (safetensors + tokenizer) to ``--model-dir``; later calls reuse it;
2. makes seeded, pre-tokenized data (a ``datasets.Dataset`` with an ``input_ids`` column, which TRL
   1.x's ``SFTTrainer`` takes as already processed): ``fixed`` (every example 512 tokens) and
   ``variable`` (lengths lognormal, median 250, sigma 0.9, clipped to [32, 2048]: like instruction
   data, with a long tail). Token ids are Zipf-distributed over a seeded permutation of the
   vocabulary. The same examples, in the same order, go to every variant;
3. trains each variant in a fresh subprocess (so peak GPU memory is per variant), loading the saved
   model in 4-bit with ``from_pretrained(quantization_config=...)`` as a user would:
   ``reference`` is the guide's quick start (``../shared/reference/qlora-integration.md``) as a user
   writes it today with its two breakages fixed (bf16 instead of fp16 with a bf16 compute dtype;
   current argument names), ``product`` is the product's trainer built from a ``TrainingConfig``
   with the same hyperparameters (see :func:`product_trainer`);
4. measures, after ``--warmup`` optimizer steps, ``--steps`` timed steps: real (non-padding) tokens/s,
   peak allocated / reserved GPU memory during training, MFU, and the loss of every step;
5. prints a markdown table, the loss agreement (max |loss_variant - loss_reference| over the first 20
   steps, per data setting) and writes ``results.json``, ``results.md`` and one JSON per run to ``--out``.

Throughput: tokens are counted from the batches the trainer actually trains on: the sum of
``attention_mask`` when the batch has one (padded batches), else ``input_ids.numel()`` (padding-free
batches, which carry no padding). Timing runs from the end of optimizer step ``warmup`` to the end of
the last step, with ``torch.cuda.synchronize()`` at each step end.

MFU = 4 * N * tokens_per_s / peak. LoRA on a frozen base costs about 2N FLOPs per token forward and 2N
backward (gradients with respect to activations only: the frozen base has no weight gradients; the
adapter's own FLOPs are < 1 % at r=16 and are ignored). Recomputation by gradient checkpointing is
not counted (model FLOPs, not hardware FLOPs), nor is attention's sequence-length-squared term. N is
every parameter of the base as configured (embedding and untied output head included: 7.38 B for
mistral-7b with the 49,152 vocabulary), the convention of the reference figures in DESIGN.md section 7
(4,059 tokens/s = 15 % MFU). peak = ``--peak-tflops`` (790: the measured bf16 dense peak of the H200).

Run ``python bench/bench_qlora.py --help``; bench/README.md has the device command lines.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TRAINER_SRC = REPO / "trainer"

#: Architecture shapes. ``vocab=None``: the tokenizer's vocabulary size.
SHAPES: dict[str, dict[str, Any]] = {
    "mistral-7b": dict(
        arch="mistral", vocab=None, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, rope_theta=1e6, max_position_embeddings=32768,
        rms_norm_eps=1e-5,
    ),
    "llama3-8b": dict(
        arch="llama", vocab=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, rope_theta=5e5, max_position_embeddings=8192,
        rms_norm_eps=1e-5,
    ),
    # Llama-3-70B's widths with 10 of its 80 layers (10.7 B parameters, 21 GB in bf16): a 70B-shaped FSDP
    # run that fits the GPU machine's disk; per-layer figures scale to the 80 layers (bench/RESULTS.md).
    "llama3-70b-10l": dict(
        arch="llama", vocab=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=10,
        num_attention_heads=64, num_key_value_heads=8, rope_theta=5e5, max_position_embeddings=8192,
        rms_norm_eps=1e-5,
    ),
    # CPU smoke tests: a small vocabulary too (ids stay inside the tokenizer's), the logits dominate otherwise.
    "tiny": dict(
        arch="mistral", vocab=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, rope_theta=1e6, max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    ),
}

#: The two data settings: ``max_length`` is the recipe's ``max_length`` (and the product's ``maxSeqLength``).
DATA = {
    "fixed": dict(max_length=512, length=512),
    "variable": dict(max_length=2048, median=250, sigma=0.9, lo=32, hi=2048),
}

#: Hyperparameters shared by every variant (the reference recipe's).
HP = dict(r=16, alpha=32, dropout=0.05, targets=["q_proj", "k_proj", "v_proj", "o_proj"],
          micro_batch=4, grad_accum=4, lr=2e-4)
#: Steps of the loss-agreement window.
LOSS_WINDOW = 20
#: Smallest token id drawn (below: the tokenizer's special tokens).
FIRST_ID = 32
#: Zipf exponent of the token-id distribution.
ZIPF_S = 1.1

VERSION_PACKAGES = ["torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets",
                    "liger-kernel", "pydantic", "safetensors", "numpy", "unsloth", "unsloth_zoo", "torchao", "xformers"]

#: The ``unsloth`` variants (issue 19): Unsloth's ``FastLanguageModel`` on the same model directory, LoRA,
#: data, effective batch, sequence length, optimizer and schedule, run in their own environment (its own
#: trl/datasets pins, ``--unsloth-site``). Keys override :data:`HP` (``micro_batch``, ``grad_accum``,
#: ``dropout``); ``--unsloth-variant NAME=JSON`` defines ``unsloth-NAME``. The default layout is the
#: product-mb16 variants' (16 x 1, same effective batch); dropout stays the reference's 0.05 (Unsloth
#: fuses LoRA dropout into its fast LoRA kernels, ``UNSLOTH_FUSED_LORA_DROPOUT``, so 0.05 keeps its fast path).
UNSLOTH_DEFAULT = {"micro_batch": 16, "grad_accum": 1}


# --------------------------------------------------------------------------------------------- shared


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSION_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def gib(n: float | None) -> float | None:
    return None if n is None else round(n / 2**30, 2)


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def dotted_to_dict(assignment: str) -> dict[str, Any]:
    """``training.microBatchSize=16`` -> ``{"training": {"microBatchSize": 16}}`` (value parsed as JSON, else a string)."""
    if "=" not in assignment:
        raise argparse.ArgumentTypeError(f"expected PATH=VALUE, got {assignment!r}")
    path, raw = assignment.split("=", 1)
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    out: dict[str, Any] = {}
    node = out
    keys = [k for k in path.split(".") if k]
    if not keys:
        raise argparse.ArgumentTypeError(f"empty path in {assignment!r}")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return out


# ----------------------------------------------------------------------------------------------- data


def make_examples(setting: str, n: int, vocab: int, seed: int) -> tuple[list[list[int]], str]:
    """``n`` seeded token-id examples for a data setting; returns them and a sha256 of their content."""
    import hashlib

    import numpy as np

    spec = DATA[setting]
    rng = np.random.default_rng([seed, 1 if setting == "fixed" else 2])
    if setting == "fixed":
        lengths = np.full(n, spec["length"], dtype=np.int64)
    else:
        raw = rng.lognormal(math.log(spec["median"]), spec["sigma"], n)
        lengths = np.clip(np.rint(raw), spec["lo"], spec["hi"]).astype(np.int64)
    ids_range = vocab - FIRST_ID
    weights = 1.0 / np.arange(1, ids_range + 1, dtype=np.float64) ** ZIPF_S
    weights /= weights.sum()
    ranks = rng.choice(ids_range, size=int(lengths.sum()), p=weights)
    perm = rng.permutation(ids_range) + FIRST_ID  # which token id has which frequency rank
    flat = perm[ranks]
    digest = hashlib.sha256(lengths.tobytes() + flat.astype(np.int64).tobytes()).hexdigest()[:16]
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    examples = [flat[bounds[i]:bounds[i + 1]].tolist() for i in range(n)]
    return examples, digest


def examples_needed(setting: str, total_steps: int) -> int:
    """Enough examples that no variant repeats one: a packing variant puts about 6 variable-length examples in a row."""
    per_step = HP["micro_batch"] * HP["grad_accum"]
    return total_steps * per_step * (1 if setting == "fixed" else 6)


# ------------------------------------------------------------------------------------------ the model


def model_config(shape: str, vocab: int, tok: Any) -> Any:
    from transformers import LlamaConfig, MistralConfig

    s = dict(SHAPES[shape])
    arch, theta = s.pop("arch"), s.pop("rope_theta")
    s.pop("vocab")
    common = dict(
        vocab_size=vocab, rope_parameters={"rope_type": "default", "rope_theta": theta},
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        tie_word_embeddings=False, use_cache=False, **s,
    )
    if arch == "mistral":
        return MistralConfig(sliding_window=None, **common)
    return LlamaConfig(attention_bias=False, mlp_bias=False, **common)


def child_build(spec: dict[str, Any]) -> dict[str, Any]:
    """Random-init the shape on the device (bf16 on CUDA, fp32 on CPU), save it with the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(spec["tokenizer"])
    vocab = SHAPES[spec["shape"]]["vocab"] or len(tok)
    cfg = model_config(spec["shape"], vocab, tok)
    device = spec["device"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    set_seed(spec["seed"])
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.get_input_embeddings().weight.numel() + model.get_output_embeddings().weight.numel()
    init_s = time.time() - t0
    final = Path(spec["model_dir"])
    tmp = final.with_name(final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="5GB")
    tok.save_pretrained(tmp)
    meta = {
        "shape": spec["shape"], "arch": SHAPES[spec["shape"]]["arch"], "vocab": vocab, "tokenizer_len": len(tok),
        "n_params": n_params, "n_embedding_params": n_embed, "dtype": str(dtype).removeprefix("torch."),
        "seed": spec["seed"], "init_s": round(init_s, 1), "save_s": round(time.time() - t0 - init_s, 1),
    }
    (tmp / "bench_model.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return meta


# ------------------------------------------------------------------------------------------- variants


def reference_trainer(model_dir: Path, dataset: Any, setting: str, total_steps: int, device: str, seed: int,
                      out_dir: Path, callbacks: list[Any]) -> tuple[Any, dict[str, Any]]:
    """The guide's quick start as a user writes it today, with its two breakages fixed.

    Fixed: ``fp16=True`` with a bf16 compute dtype crashes in the gradient scaler -> ``bf16=True``;
    ``max_seq_length``/``tokenizer=``/``dataset_text_field`` are gone -> ``max_length``/``processing_class``,
    and the data is pre-tokenized. Bench harness only: ``max_steps``, no saving/eval, logging every step,
    the LoRA init seeded (``set_seed`` before ``get_peft_model``) so that every variant starts from the
    same adapter, and on CPU fp32 compute without bf16 (smoke tests only).
    """
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, set_seed
    from trl import SFTConfig, SFTTrainer

    cuda = device == "cuda"
    compute = torch.bfloat16 if cuda else torch.float32
    t0 = time.time()
    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_use_double_quant=True,
    )
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), quantization_config=bnb_config, device_map="auto" if cuda else {"": "cpu"}
    )
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.pad_token = tokenizer.eos_token
    load_s = time.time() - t0
    model = prepare_model_for_kbit_training(model)
    lora_config = LoraConfig(
        r=HP["r"], lora_alpha=HP["alpha"], target_modules=["q_proj", "v_proj", "k_proj", "o_proj"],
        lora_dropout=HP["dropout"], bias="none", task_type="CAUSAL_LM",
    )
    set_seed(seed)  # bench harness: same LoRA init in every variant
    model = get_peft_model(model, lora_config)
    training_args = SFTConfig(
        output_dir=str(out_dir),
        max_steps=total_steps,
        per_device_train_batch_size=HP["micro_batch"],
        gradient_accumulation_steps=HP["grad_accum"],
        learning_rate=HP["lr"],
        bf16=cuda,
        use_cpu=not cuda,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        max_length=DATA[setting]["max_length"],
        gradient_checkpointing=True,
        seed=seed,
    )
    trainer = SFTTrainer(
        model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks
    )
    return trainer, {"load_s": round(load_s, 1), "api": "reference recipe"}


def product_config_dict(model_dir: Path, setting: str, total_steps: int, seed: int, out_dir: Path) -> dict[str, Any]:
    """The product's ``TrainingConfig`` (camelCase, as a user would write it) with the reference's hyperparameters.

    Set to match the reference so the two compute the same thing: q/k/v/o r=16 alpha 32 dropout 0.05,
    micro-batch 4 x 4 accumulation, lr 2e-4, the recipe's ``max_length``, gradient checkpointing, seed,
    and the optimizer/schedule the reference gets from transformers' defaults (fused AdamW, linear decay,
    no warm-up, gradient clipping at 1.0, no weight decay), and packing off, so that every optimizer
    step trains on the same 16 examples as the reference's and the losses compare step by step (the
    product's padding-free batches then differ from the reference's padded ones only in not computing
    padding). Everything else -- the speed switches (:mod:`qlora_trainer.speed`) -- is left at the
    product's defaults, so the bench measures what the product does; ``--product-set`` /
    ``--product-variant`` override any field (e.g. ``training.microBatchSize``).
    """
    return {
        "model": {"uri": Path(model_dir).resolve().as_uri()},
        # Not read: the bench passes the pre-tokenized dataset directly.
        "dataset": {"uri": (Path(out_dir).resolve() / "unused-dataset.jsonl").as_uri(), "format": "text"},
        "quantization": {"quantType": "nf4", "doubleQuant": True, "computeDtype": "auto"},
        "lora": {"r": HP["r"], "alpha": HP["alpha"], "dropout": HP["dropout"], "targetModules": list(HP["targets"]),
                 "bias": "none"},
        "training": {
            "maxSteps": total_steps,
            "microBatchSize": HP["micro_batch"],
            "gradientAccumulationSteps": HP["grad_accum"],
            "learningRate": HP["lr"],
            "lrScheduler": "linear",
            "warmupRatio": 0.0,
            "optimizer": "adamw_torch_fused",
            "maxGradNorm": 1.0,
            "weightDecay": 0.0,
            "maxSeqLength": DATA[setting]["max_length"],
            "gradientCheckpointing": True,
            "packing": False,
            "precision": "auto",
            "seed": seed,
            "checkpointEverySteps": 10_000_000,
            "evalEverySteps": 10_000_000,
            "logEverySteps": 1,
        },
        "output": {"uri": (Path(out_dir).resolve() / "product-output").as_uri() + "/"},
    }


def unsloth_trainer(model_dir: Path, dataset: Any, setting: str, total_steps: int, device: str, seed: int,
                    out_dir: Path, callbacks: list[Any], overrides: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Unsloth's documented QLoRA path on the bench model: ``FastLanguageModel`` + TRL's ``SFTTrainer``.

    ``FastLanguageModel.from_pretrained(model_name=<the saved directory>, max_seq_length, dtype=bf16,
    load_in_4bit=True)`` (Unsloth's 4-bit config: NF4, double quantisation, bf16 compute, as the
    reference's), ``FastLanguageModel.get_peft_model`` with the reference's LoRA (q/k/v/o, r 16, alpha 32,
    dropout 0.05, bias none), ``use_gradient_checkpointing="unsloth"`` and ``random_state=seed``; then
    ``SFTTrainer`` with the reference's ``SFTConfig`` fields except the layout (``UNSLOTH_DEFAULT``, same
    effective batch) and ``gradient_checkpointing`` (left to Unsloth, which installed its own). Unsloth's
    defaults stay (its automatic padding-free batching when packing is off, its fused loss and kernels).
    CUDA only. ``unsloth`` must be imported before transformers/trl: :func:`child_main` does that.
    """
    import torch
    from unsloth import FastLanguageModel
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    if device != "cuda":
        raise SystemExit("the unsloth variants need a GPU")
    hp = {**HP, **UNSLOTH_DEFAULT, **overrides}
    max_len = DATA[setting]["max_length"]
    t0 = time.time()
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(model_dir), max_seq_length=max_len, dtype=torch.bfloat16, load_in_4bit=True,
        use_exact_model_name=True,
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    load_s = time.time() - t0
    set_seed(seed)  # bench harness: same LoRA init as the other variants
    model = FastLanguageModel.get_peft_model(
        model, r=hp["r"], target_modules=list(hp["targets"]), lora_alpha=hp["alpha"], lora_dropout=hp["dropout"],
        bias="none", use_gradient_checkpointing="unsloth", random_state=seed,
    )
    args = SFTConfig(
        output_dir=str(out_dir),
        max_steps=total_steps,
        per_device_train_batch_size=hp["micro_batch"],
        gradient_accumulation_steps=hp["grad_accum"],
        learning_rate=hp["lr"],
        bf16=True,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        max_length=max_len,
        seed=seed,
        # Unsloth's patched SFTConfig defaults to adamw_8bit and a short warm-up (measured 2026-12-07):
        # the reference's transformers defaults, spelled out.
        optim="adamw_torch_fused",
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=callbacks)
    return trainer, {"load_s": round(load_s, 1), "api": "unsloth.FastLanguageModel + trl.SFTTrainer",
                     "unsloth_hp": {k: hp[k] for k in ("r", "alpha", "dropout", "micro_batch", "grad_accum")}}


def compile_decoder_layers(model: Any) -> int:
    """Probe (not a product switch yet): ``torch.compile`` each decoder layer in place; returns how many.

    Every ``transformers.modeling_layers.GradientCheckpointingLayer`` gets ``nn.Module.compile()``:
    its forward runs compiled inside gradient checkpointing (the checkpoint wrapper stays eager,
    the recompute calls the same compiled code); the layers share their code, so one graph serves
    all of them. Compilation happens at the first forward, in the warm-up steps.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.compile()
    return len(layers)


def keep_layers_callback(count: int) -> Any:
    """Probe (selective checkpointing by layer): the last ``count`` decoder layers run without checkpointing.

    A ``TrainerCallback`` whose ``on_train_begin`` (after the Trainer enables gradient
    checkpointing, before the activation offloader wraps the checkpointed layers) sets
    ``gradient_checkpointing = False`` on the last ``count`` ``GradientCheckpointingLayer``
    modules: they keep their whole activations for the backward pass (no recompute forward, and
    not offloaded), the others are checkpointed as before. Same function, other memory/time.
    """
    from transformers import TrainerCallback
    from transformers.modeling_layers import GradientCheckpointingLayer

    class KeepLayers(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
            for layer in layers[len(layers) - count:]:
                layer.gradient_checkpointing = False
            self.kept = min(count, len(layers))

    return KeepLayers()


def product_trainer(model_dir: Path, dataset: Any, setting: str, total_steps: int, device: str, seed: int,
                    out_dir: Path, callbacks: list[Any], overrides: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The product's trainer on the bench data, built from a ``TrainingConfig`` through the product's own code.

    ``qlora_trainer.assemble.build_trainer`` is the code path ``qlora-train`` runs (model load with the
    speed switches, the LoRA adapter seeded with ``training.seed``, SFTConfig, SFTTrainer and its
    post-construction fixes). Only modules without boto3 / kubernetes imports are loaded.
    """
    import torch

    if str(TRAINER_SRC) not in sys.path:
        sys.path.insert(0, str(TRAINER_SRC))
    from qlora_trainer import config as qconfig
    from qlora_trainer import model as qmodel
    from qlora_trainer.assemble import build_trainer

    overrides = dict(overrides)
    compile_layers = bool(overrides.pop("benchCompileLayers", False))  # probe: torch.compile per decoder layer
    keep_layers = int(overrides.pop("benchNoCheckpointLayers", 0))  # probe: the last N layers not checkpointed
    overrides.pop("benchAllocConf", None)  # probe: PYTORCH_CUDA_ALLOC_CONF of the run's process (set in run_child)
    if keep_layers:
        callbacks = [keep_layers_callback(keep_layers)] + list(callbacks)
    raw = deep_merge(product_config_dict(model_dir, setting, total_steps, seed, out_dir), overrides)
    cfg = qconfig.parse_config(raw, source="bench product config")
    if device == "cuda":
        hw = qmodel.Hardware("cuda", bool(torch.cuda.is_bf16_supported()), torch.cuda.get_device_name(0))
    else:
        hw = qmodel.Hardware("cpu", False, "cpu")
    info: dict[str, Any] = {"config": cfg.model_dump(mode="json", by_alias=True)}
    t0 = time.time()
    trainer, extra = build_trainer(cfg, Path(model_dir), dataset, hw=hw, output_dir=out_dir / "run",
                                   callbacks=callbacks, eval_dataset=None)
    info.update(extra)
    if compile_layers:
        info["compiled_layers"] = compile_decoder_layers(trainer.model)
    if keep_layers:
        info["no_checkpoint_layers"] = keep_layers
    info["api"] = "qlora_trainer.assemble.build_trainer"
    info["build_s"] = round(time.time() - t0, 1)
    return trainer, info


# ----------------------------------------------------------------------------------------- measurement


def make_meter(device: str, warmup: int, max_train_s: float) -> Any:
    """A ``TrainerCallback`` that times optimizer steps and counts real tokens per step."""
    import torch
    from transformers import TrainerCallback

    cuda = device == "cuda"

    class Meter(TrainerCallback):
        def __init__(self) -> None:
            self.pending_real: list[Any] = []
            self.pending_slots: list[int] = []
            self.step_real: list[int] = []
            self.step_slots: list[int] = []
            self.step_end: list[float] = []
            self.start = 0.0
            self.stopped_early = False

        def count(self, inputs: dict[str, Any]) -> None:
            ids = inputs["input_ids"]
            mask = inputs.get("attention_mask")
            self.pending_real.append(mask.sum() if mask is not None else ids.numel())
            self.pending_slots.append(ids.numel())

        def _now(self) -> float:
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001
            self.start = self._now()

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            now = self._now()
            self.step_end.append(now)
            self.step_real.append(int(sum(int(x) for x in self.pending_real)))
            self.step_slots.append(int(sum(self.pending_slots)))
            self.pending_real, self.pending_slots = [], []
            if len(self.step_end) > warmup and now - self._t_begin() > max_train_s:
                self.stopped_early = True
                control.should_training_stop = True

        def _t_begin(self) -> float:
            return self.step_end[warmup - 1] if warmup else self.start

        def summary(self) -> dict[str, Any]:
            done = len(self.step_end)
            if done <= warmup:
                return {"steps_done": done, "steps_timed": 0}
            seconds = self.step_end[-1] - self._t_begin()
            real = sum(self.step_real[warmup:])
            slots = sum(self.step_slots[warmup:])
            timed = done - warmup
            return {
                "steps_done": done, "steps_timed": timed, "seconds_timed": round(seconds, 3),
                "s_per_step": round(seconds / timed, 3), "tokens_timed": real,
                "tokens_per_s": round(real / seconds, 1), "tokens_per_step": round(real / timed, 1),
                "padding_fraction": round(1 - real / slots, 4) if slots else None,
                "stopped_early_by_time_limit": self.stopped_early,
            }

    return Meter()


#: Kernel-name fragments -> category, for the profile summary (first match wins).
PROFILE_CATEGORIES = [
    ("dequant", "4-bit dequantize (bitsandbytes)"), ("kDequantize", "4-bit dequantize (bitsandbytes)"),
    ("flash", "attention"), ("fmha", "attention"), ("attention", "attention"), ("varlen", "attention"),
    ("gemm", "matmul (GEMM)"), ("gemv", "matmul (GEMM)"), ("cutlass", "matmul (GEMM)"), ("sm90_xmma", "matmul (GEMM)"),
    ("nvjet", "matmul (GEMM)"), ("cublas", "matmul (GEMM)"),
    ("Memcpy", "memory copies"), ("Memset", "memory copies"),
    ("elementwise", "elementwise / casts"), ("vectorized", "elementwise / casts"), ("reduce", "reductions"),
    ("dropout", "elementwise / casts"), ("at::native", "other ATen kernels"),
    ("triton", "Triton (Liger) kernels"), ("_forward_kernel", "Triton (Liger) kernels"),
    ("_backward_kernel", "Triton (Liger) kernels"),
]


def idle_gaps(events: Any, wall_ms: float, floor_us: float = 50.0) -> dict[str, Any]:
    """Where the GPU waits: idle intervals between kernels and the host ops running meanwhile.

    ``events``: ``torch.profiler`` ``FunctionEvent`` list (CPU ops and CUDA kernels, one clock, us).
    Returns the idle time in gaps of at least ``floor_us``, and that time attributed to the shortest
    host op covering each gap's midpoint (the op the host was in while the GPU waited).
    """
    import torch

    cuda_type = torch.autograd.DeviceType.CUDA
    gpu = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type == cuda_type)
    cpu = [e for e in events if e.device_type != cuda_type]
    if not gpu:
        return {}
    merged: list[list[float]] = []
    for start, end in gpu:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    by_op: dict[str, float] = {}
    total = 0.0
    count = 0
    for (_, prev_end), (start, _) in zip(merged, merged[1:]):
        gap = start - prev_end
        if gap < floor_us:
            continue
        total += gap
        count += 1
        mid = prev_end + gap / 2
        covering = [e for e in cpu if e.time_range.start <= mid <= e.time_range.end]
        name = min(covering, key=lambda e: e.time_range.end - e.time_range.start).name if covering else "(no op)"
        by_op[name] = by_op.get(name, 0.0) + gap
    return {
        "gaps": count, "idle_ms_in_gaps": round(total / 1e3, 1), "wall_ms": round(wall_ms, 1),
        "idle_by_host_op_ms": {k[:80]: round(v / 1e3, 1)
                               for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])[:20]},
    }


def make_profiler(device: str, warmup: int, out_dir: Path, trace: Path | None = None) -> Any:
    """A callback that profiles optimizer steps 2..``warmup - 1`` (excluded from timing) with ``torch.profiler``.

    ``result``: GPU kernel time per category (:data:`PROFILE_CATEGORIES`), the top kernels, total GPU
    busy time against the wall time of the profiled steps (the rest is the GPU waiting on the host:
    Python, launch overhead, synchronisation; :func:`idle_gaps` says during which host ops), and the
    25 ops with the most self GPU time. ``trace``: also write the Chrome trace there (gzipped JSON).
    """
    import torch
    from transformers import TrainerCallback

    class Profiler(TrainerCallback):
        def __init__(self) -> None:
            self.prof = None
            self.t0 = 0.0
            self.steps = 0
            self.result: dict[str, Any] = {}

        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001
            if self.prof is None and state.global_step == 1 and warmup >= 3 and not self.result:
                acts = [torch.profiler.ProfilerActivity.CPU]
                if device == "cuda":
                    acts.append(torch.profiler.ProfilerActivity.CUDA)
                    torch.cuda.synchronize()
                self.prof = torch.profiler.profile(activities=acts)
                self.prof.__enter__()
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            if self.prof is None:
                return
            self.steps += 1
            # Stop at the end of step warmup-1: the trace is processed (slow) before step ``warmup`` starts,
            # and timing starts at the end of step ``warmup``.
            if state.global_step < warmup - 1:
                return
            if device == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)
            events = self.prof.key_averages()
            kernels: dict[str, float] = {}
            for e in self.prof.events():
                if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA:
                    kernels[e.name] = kernels.get(e.name, 0.0) + e.device_time_total / 1e3  # us -> ms
            cats: dict[str, float] = {}
            for name, ms in kernels.items():
                cat = next((c for frag, c in PROFILE_CATEGORIES if frag.lower() in name.lower()), "other kernels")
                cats[cat] = cats.get(cat, 0.0) + ms
            busy = sum(kernels.values())
            self.result = {
                "steps": self.steps, "wall_ms": round(wall * 1e3, 1), "gpu_busy_ms": round(busy, 1),
                "gpu_busy_fraction": round(busy / (wall * 1e3), 3) if wall else None,
                "categories_ms": {k: round(v, 1) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
                "top_kernels_ms": [[n[:90], round(ms, 1)] for n, ms in
                                   sorted(kernels.items(), key=lambda kv: -kv[1])[:15]],
            }
            if device == "cuda":
                self.result["gpu_idle"] = idle_gaps(self.prof.events(), wall * 1e3)
            if trace is not None:
                import gzip

                raw = out_dir / "trace.json"
                self.prof.export_chrome_trace(str(raw))
                trace.parent.mkdir(parents=True, exist_ok=True)
                with raw.open("rb") as src, gzip.open(trace, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                raw.unlink()
            try:
                table = events.table(sort_by="self_cuda_time_total" if device == "cuda" else "self_cpu_time_total",
                                     row_limit=25)
                (out_dir / "profile.txt").write_text(table)
                self.result["ops_table"] = table
            except Exception as err:  # noqa: BLE001 - diagnostics only
                self.result["ops_table_error"] = repr(err)
            self.prof = None

    return Profiler()


def install_token_counter(trainer: Any, meter: Any) -> None:
    """Count the tokens of every micro-batch the trainer trains on (wraps ``training_step``)."""
    inner = trainer.training_step

    def training_step(model, inputs, *args, **kwargs):  # noqa: ANN001, ANN202
        meter.count(inputs)
        return inner(model, inputs, *args, **kwargs)

    trainer.training_step = training_step


def describe_model(model: Any) -> dict[str, Any]:
    """Dtypes of the non-quantised big tensors and the attention kernel, to see what a variant trains."""
    out: dict[str, Any] = {}
    try:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        out["embed_dtype"] = str(base.get_input_embeddings().weight.dtype).removeprefix("torch.")
        out["lm_head_dtype"] = str(base.get_output_embeddings().weight.dtype).removeprefix("torch.")
        out["attn_implementation"] = getattr(base.config, "_attn_implementation", None)
        lora = [p for n, p in model.named_parameters() if p.requires_grad]
        out["trainable_params"] = sum(p.numel() for p in lora)
        out["trainable_dtypes"] = sorted({str(p.dtype).removeprefix("torch.") for p in lora})
    except Exception as err:  # noqa: BLE001 - diagnostics only
        out["error"] = repr(err)
    return out


SFT_FIELDS = ["per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "packing",
              "packing_strategy", "padding_free", "bf16", "fp16", "gradient_checkpointing",
              "gradient_checkpointing_kwargs", "optim", "lr_scheduler_type", "warmup_steps", "max_grad_norm",
              "learning_rate", "use_liger_kernel", "liger_kernel_config", "loss_type", "activation_offloading",
              "torch_compile", "seed", "data_seed", "train_sampling_strategy", "model_init_kwargs"]


def child_run(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import Dataset

    device, setting, variant = spec["device"], spec["data"], spec["variant"]
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    model_dir = Path(spec["model_dir"])
    meta = json.loads((model_dir / "bench_model.json").read_text())
    total_steps = spec["warmup"] + spec["steps"]
    examples, digest = make_examples(setting, examples_needed(setting, total_steps), meta["vocab"], spec["seed"])
    dataset = Dataset.from_dict({"input_ids": examples})
    out_dir = Path(spec["work_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    meter = make_meter(device, spec["warmup"], spec["max_train_s"])

    t0 = time.time()
    if variant == "reference":
        trainer, info = reference_trainer(model_dir, dataset, setting, total_steps, device, spec["seed"], out_dir,
                                          [meter])
    elif variant.startswith("unsloth"):
        trainer, info = unsloth_trainer(model_dir, dataset, setting, total_steps, device, spec["seed"], out_dir,
                                        [meter], spec.get("overrides") or {})
    else:
        trainer, info = product_trainer(model_dir, dataset, setting, total_steps, device, spec["seed"], out_dir,
                                        [meter], spec.get("overrides") or {})
    build_s = time.time() - t0
    install_token_counter(trainer, meter)
    trace = Path(spec["trace"]) if spec.get("trace") else None
    profiler = make_profiler(device, spec["warmup"], out_dir, trace) if spec.get("profile") else None
    if profiler is not None:
        trainer.add_callback(profiler)
    load_peak = gib(torch.cuda.max_memory_allocated()) if device == "cuda" else None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t1 = time.time()
    trainer.train()
    train_s = time.time() - t1
    res: dict[str, Any] = {
        "variant": variant, "data": setting, "shape": spec["shape"], "device": device, "data_sha": digest,
        "n_examples": len(examples), "warmup_steps": spec["warmup"], "build_s": round(build_s, 1),
        "train_s": round(train_s, 1), "load_peak_alloc_gib": load_peak, **meter.summary(),
    }
    if device == "cuda":
        res["peak_alloc_gib"] = gib(torch.cuda.max_memory_allocated())
        res["peak_reserved_gib"] = gib(torch.cuda.max_memory_reserved())
    else:
        import resource

        res["peak_alloc_gib"] = res["peak_reserved_gib"] = None
        res["cpu_max_rss_gib"] = gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    losses = {int(h["step"]): float(h["loss"]) for h in trainer.state.log_history if "loss" in h and "step" in h}
    res["losses"] = [losses[k] for k in sorted(losses)]
    res["grad_norms"] = [float(h["grad_norm"]) for h in trainer.state.log_history if "grad_norm" in h]
    tps = res.get("tokens_per_s")
    res["n_params"] = meta["n_params"]
    res["mfu"] = (4 * meta["n_params"] * tps / (spec["peak_tflops"] * 1e12)) if (tps and device == "cuda") else None
    if profiler is not None:
        res["profile"] = profiler.result
    offloaders = [cb.offloader for cb in trainer.callback_handler.callbacks if hasattr(cb, "offloader")]
    if offloaders:
        res["offload_stats"] = dict(offloaders[0].stats)
    if info.get("compiled_layers"):
        from torch._dynamo.utils import counters

        res["dynamo"] = {k: dict(counters[k]) for k in ("stats", "graph_break", "recompiles") if counters.get(k)}
    if variant.startswith("product"):
        from qlora_trainer import speed as qspeed

        res["varlen_fallback"] = qspeed._VARLEN_ERROR
    res["model"] = describe_model(trainer.model)
    res["sft_args"] = {k: _jsonable(getattr(trainer.args, k, None)) for k in SFT_FIELDS if hasattr(trainer.args, k)}
    res["collator"] = type(trainer.data_collator).__name__
    res["padding_free"] = getattr(trainer, "padding_free", None)
    if res["padding_free"] is None and hasattr(trainer.args, "padding_free"):
        res["padding_free"] = trainer.args.padding_free
    res["train_rows_after_prep"] = len(trainer.train_dataset) if hasattr(trainer.train_dataset, "__len__") else None
    res.update({k: v for k, v in info.items() if k != "config"})
    if "config" in info:
        res["product_config"] = info["config"]
    return res


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        return str(value)


def child_env_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"versions": versions(), "platform": platform.platform(),
                            "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=gib(props.total_memory),
                    cuda=torch.version.cuda, gpu_count=torch.cuda.device_count())
    else:
        info.update(gpu=None, cpu_count=os.cpu_count())
    return info


def child_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result_path = Path(spec["result"])
    try:
        if spec["kind"] == "run" and spec["variant"].startswith("unsloth"):
            import unsloth  # noqa: F401 - before transformers / trl / peft, as Unsloth requires

        if spec["kind"] == "build":
            result = child_build(spec)
        else:
            result = child_run(spec)
        result["env"] = child_env_info(spec["device"])
        result["ok"] = True
    except BaseException as err:  # noqa: BLE001 - reported to the parent, then re-raised
        import traceback

        result = {"ok": False, "error": f"{type(err).__name__}: {str(err)[:2000]}",
                  "traceback": traceback.format_exc()[-6000:]}
        if spec["kind"] != "build":
            result.update(variant=spec["variant"], data=spec["data"])
            try:
                import torch

                if torch.cuda.is_available():
                    result["peak_alloc_gib"] = gib(torch.cuda.max_memory_allocated())
                    result["peak_reserved_gib"] = gib(torch.cuda.max_memory_reserved())
            except Exception:  # noqa: BLE001
                pass
        result_path.write_text(json.dumps(result, indent=1))
        raise
    result_path.write_text(json.dumps(result, indent=1))


# ------------------------------------------------------------------------------------------ the parent


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.time() + seconds

    def left(self) -> float:
        return self.end - time.time()


def run_child(spec: dict[str, Any], name: str, out: Path, timeout: float) -> dict[str, Any]:
    (out / "specs").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    spec_path = out / "specs" / f"{name}.json"
    result_path = out / "runs" / f"{name}.json"
    result_path.unlink(missing_ok=True)
    spec = {**spec, "result": str(result_path)}
    spec_path.write_text(json.dumps(spec, indent=1))
    log_path = out / "logs" / f"{name}.log"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if spec.get("kind") == "run" and str(spec.get("variant", "")).startswith("unsloth"):
        # Unsloth's own environment: its wheel set (trl <= 1.15, datasets < 5) ahead of the product's.
        compile_dir = Path(spec["work_dir"]) / "unsloth_compiled_cache"
        compile_dir.mkdir(parents=True, exist_ok=True)
        env.update(UNSLOTH_DISABLE_STATISTICS="1", UNSLOTH_COMPILE_LOCATION=str(compile_dir))
        if spec.get("unsloth_site"):
            env["PYTHONPATH"] = os.pathsep.join([spec["unsloth_site"]] + [x for x in [os.environ.get("PYTHONPATH")] if x])
    if spec.get("kind") == "run" and str(spec.get("variant", "")).startswith("product"):
        # The allocator settings qlora-train gives its process (qlora_trainer.speed.allocator_env), unless the
        # variant names its own (probe ``benchAllocConf``, e.g. "expandable_segments:False" = PyTorch's default).
        conf = (spec.get("overrides") or {}).get("benchAllocConf")
        if conf is not None:
            env["PYTORCH_CUDA_ALLOC_CONF"] = str(conf)
        else:
            if str(TRAINER_SRC) not in sys.path:
                sys.path.insert(0, str(TRAINER_SRC))
            from qlora_trainer.speed import allocator_env

            allocator_env(env)
    t0 = time.time()
    with open(log_path, "w") as fh:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "_child", str(spec_path)],
                                stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
        try:
            rc = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
    wall = time.time() - t0
    if result_path.exists():
        result = json.loads(result_path.read_text())
    else:
        result = {"ok": False, "error": "timed out" if rc is None else f"exit code {rc}, no result"}
    result["wall_s"] = round(wall, 1)
    if not result.get("ok"):
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        log(f"{name} FAILED ({result.get('error')}); last log lines ({log_path}):\n    " + "\n    ".join(tail))
        result_path.write_text(json.dumps(result, indent=1))
    return result


def fmt(value: Any, spec: str = "", dash: str = "-") -> str:
    if value is None:
        return dash
    return format(value, spec)


def table(rows: list[dict[str, Any]]) -> str:
    head = ["variant", "data", "tokens/s", "ratio", "peak alloc GiB", "peak reserved GiB", "MFU %", "loss@1",
            "loss@20", "tokens/step", "steps timed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        if not r.get("ok"):
            err = " ".join(str(r.get("error")).split()).replace("|", "/")[:100]
            lines.append(f"| {r.get('variant')} | {r.get('data')} | FAILED: {err} |"
                         + " |" * (len(head) - 3))
            continue
        losses = r.get("losses") or []
        mfu = r.get("mfu")
        lines.append("| " + " | ".join([
            r["variant"], r["data"], fmt(r.get("tokens_per_s"), ",.0f"), fmt(r.get("ratio"), ".2f") + ("x" if r.get("ratio") else ""),
            fmt(r.get("peak_alloc_gib"), ".2f"), fmt(r.get("peak_reserved_gib"), ".2f"),
            fmt(None if mfu is None else 100 * mfu, ".1f"),
            fmt(losses[0] if losses else None, ".4f"),
            fmt(losses[LOSS_WINDOW - 1] if len(losses) >= LOSS_WINDOW else None, ".4f"),
            fmt(r.get("tokens_per_step"), ",.0f"), fmt(r.get("steps_timed")),
        ]) + " |")
    return "\n".join(lines)


def loss_agreement(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for setting in DATA:
        ref = next((r for r in rows if r.get("ok") and r["data"] == setting and r["variant"] == "reference"), None)
        if ref is None:
            continue
        for r in rows:
            if not r.get("ok") or r["data"] != setting or r["variant"] == "reference":
                continue
            n = min(LOSS_WINDOW, len(ref["losses"]), len(r["losses"]))
            if n == 0:
                continue
            diffs = [abs(a - b) for a, b in zip(r["losses"][:n], ref["losses"][:n])]
            worst = max(range(n), key=lambda i: diffs[i])
            out.append({"data": setting, "variant": r["variant"], "steps_compared": n,
                        "max_abs_diff": diffs[worst], "at_step": worst + 1,
                        "loss1_diff": diffs[0],
                        "mean_abs_diff": sum(diffs) / n,
                        "max_rel_diff": max(d / abs(b) for d, b in zip(diffs, ref["losses"][:n]) if b)})
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="QLoRA throughput bench: the reference recipe vs the product's trainer on one GPU "
                    "(random-weight model of a real architecture, seeded token-id data). See bench/README.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--shape", choices=sorted(SHAPES), default="mistral-7b", help="model architecture shape")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer directory (the embedded SmolLM2 tokenizer files); default: bench/tok if it "
                        "exists, else ${XDG_CACHE_HOME:-~/.cache}/qlora-operator/models/smollm2-135m-instruct")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="where the random-weight model is saved/reused; default /tmp/qlora-bench-models/SHAPE-sSEED")
    p.add_argument("--rebuild", action="store_true", help="rebuild the model even if --model-dir has one")
    p.add_argument("--build-only", action="store_true", help="only build/save the model, then exit")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    p.add_argument("--data", default="fixed,variable", help="comma-separated data settings: fixed, variable")
    p.add_argument("--variants", default="reference,product",
                   help="comma-separated: reference, product, and product-NAME defined by --product-variant")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=None,
                   help="optimizer steps before timing starts (not timed); default 3 on cuda, 1 on cpu")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 dense peak for MFU (H200: ~790 measured)")
    p.add_argument("--max-train-s", type=float, default=150.0,
                   help="stop a run's timed phase after this many seconds (fewer steps timed; reported)")
    p.add_argument("--run-timeout", type=float, default=420.0, help="kill a run's subprocess after this many seconds")
    p.add_argument("--deadline", type=float, default=570.0,
                   help="total seconds for the whole bench: runs that would start after it are skipped")
    p.add_argument("--product-set", action="append", default=[], metavar="PATH=VALUE",
                   help="override a TrainingConfig field for every product variant (camelCase dotted path, JSON "
                        "value), e.g. training.microBatchSize=16; repeatable")
    p.add_argument("--product-variant", action="append", default=[], metavar="NAME=JSON",
                   help="define variant product-NAME as the product with these TrainingConfig overrides (JSON, "
                        "deep-merged), e.g. 'mb16={\"training\":{\"microBatchSize\":16,\"gradientAccumulationSteps\":1}}'")
    p.add_argument("--unsloth-site", type=Path, default=None,
                   help="directory with Unsloth's own packages (pip install --target), put first on PYTHONPATH of "
                        "the unsloth variants' subprocesses only")
    p.add_argument("--unsloth-variant", action="append", default=[], metavar="NAME=JSON",
                   help="define variant unsloth-NAME with these overrides of the recipe (keys micro_batch, "
                        "grad_accum, dropout), e.g. 'mb4={\"micro_batch\":4,\"grad_accum\":4}'")
    p.add_argument("--profile", default="", metavar="VARIANTS",
                   help="comma-separated variants (or 'all') whose warm-up steps 2..warmup-1 are profiled with "
                        "torch.profiler (GPU time per kernel category, busy fraction); needs --warmup >= 3")
    p.add_argument("--trace", default="", metavar="VARIANTS",
                   help="comma-separated profiled variants that also write a Chrome trace (OUT/trace-DATA-VARIANT.json.gz)")
    p.add_argument("--out", type=Path, default=Path("/tmp/qlora-bench-out"),
                   help="results directory: results.md, results.json, runs/*.json, logs/*.log")
    return p.parse_args(argv)


def default_tokenizer() -> Path:
    local = HERE / "tok"
    if (local / "tokenizer_config.json").exists():
        return local
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qlora-operator" / "models" / "smollm2-135m-instruct"


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    deadline = Deadline(args.deadline)
    t_start = time.time()
    if args.device is None:
        try:
            import torch

            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:
            args.device = "cpu"
    if args.warmup is None:
        args.warmup = 3 if args.device == "cuda" else 1
    tokenizer = (args.tokenizer or default_tokenizer()).resolve()
    if not (tokenizer / "tokenizer_config.json").exists():
        print(f"error: no tokenizer at {tokenizer} (pass --tokenizer DIR)", file=sys.stderr)
        return 2
    settings = [s.strip() for s in args.data.split(",") if s.strip()]
    for s in settings:
        if s not in DATA:
            print(f"error: unknown data setting {s!r} (fixed, variable)", file=sys.stderr)
            return 2
    product_set: dict[str, Any] = {}
    for item in args.product_set:
        product_set = deep_merge(product_set, dotted_to_dict(item))
    product_variants: dict[str, dict[str, Any]] = {"product": product_set}
    for item in args.product_variant:
        name, _, raw = item.partition("=")
        try:
            extra = json.loads(raw)
        except json.JSONDecodeError as err:
            print(f"error: --product-variant {item!r}: not JSON: {err}", file=sys.stderr)
            return 2
        product_variants[f"product-{name}"] = deep_merge(product_set, extra)
    unsloth_variants: dict[str, dict[str, Any]] = {"unsloth": {}}
    for item in args.unsloth_variant:
        name, _, raw = item.partition("=")
        try:
            unsloth_variants[f"unsloth-{name}"] = json.loads(raw)
        except json.JSONDecodeError as err:
            print(f"error: --unsloth-variant {item!r}: not JSON: {err}", file=sys.stderr)
            return 2
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v != "reference" and v not in product_variants and v not in unsloth_variants:
            print(f"error: unknown variant {v!r} (reference, {', '.join(product_variants)}, "
                  f"{', '.join(unsloth_variants)})", file=sys.stderr)
            return 2

    profiled = {v.strip() for v in args.profile.split(",") if v.strip()}
    traced = {v.strip() for v in args.trace.split(",") if v.strip()}
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    model_dir = (args.model_dir or Path("/tmp/qlora-bench-models") / f"{args.shape}-s{args.seed}").resolve()
    settings_info = {
        "shape": args.shape, "shape_config": SHAPES[args.shape], "device": args.device, "steps": args.steps,
        "warmup": args.warmup, "seed": args.seed, "peak_tflops": args.peak_tflops, "data": settings,
        "variants": variants, "product_overrides": {k: v for k, v in product_variants.items() if k in variants},
        "unsloth_overrides": {k: {**UNSLOTH_DEFAULT, **v} for k, v in unsloth_variants.items() if k in variants},
        "hyperparameters": HP, "data_settings": {s: DATA[s] for s in settings}, "zipf_s": ZIPF_S,
        "max_train_s": args.max_train_s, "tokenizer": str(tokenizer), "model_dir": str(model_dir),
        "argv": argv,
    }
    log(f"shape {args.shape}, device {args.device}, data {settings}, variants {variants}, "
        f"{args.warmup} warm-up + {args.steps} timed steps, out {out}")

    meta_path = model_dir / "bench_model.json"
    build: dict[str, Any] | None = None
    if args.rebuild or not meta_path.exists():
        model_dir.parent.mkdir(parents=True, exist_ok=True)
        log(f"building the random-weight {args.shape} model in {model_dir}")
        build = run_child({"kind": "build", "shape": args.shape, "tokenizer": str(tokenizer), "device": args.device,
                           "seed": args.seed, "model_dir": str(model_dir)}, "build", out, deadline.left())
        if not build.get("ok"):
            return 1
        log(f"built: {build['n_params'] / 1e9:.3f} B params, vocab {build['vocab']}, init {build['init_s']} s, "
            f"save {build['save_s']} s (wall {build['wall_s']} s)")
    meta = json.loads(meta_path.read_text())
    if meta["shape"] != args.shape:
        print(f"error: {model_dir} holds shape {meta['shape']}, not {args.shape} (use --rebuild or --model-dir)",
              file=sys.stderr)
        return 2
    if args.build_only:
        return 0

    work_root = Path(tempfile.gettempdir()) / "qlora-bench-work"
    shutil.rmtree(work_root, ignore_errors=True)
    rows: list[dict[str, Any]] = []

    def summarize(final: bool) -> str:
        for setting in settings:
            ref = next((r for r in rows if r.get("ok") and r["data"] == setting and r["variant"] == "reference"), None)
            for r in rows:
                if r.get("ok") and r["data"] == setting and ref and ref.get("tokens_per_s") and r.get("tokens_per_s"):
                    r["ratio"] = r["tokens_per_s"] / ref["tokens_per_s"]
        agreement = loss_agreement(rows)
        env = next((r["env"] for r in rows if r.get("env")), None) or (build or {}).get("env") or {}
        text = render(env, settings_info, meta, rows, agreement, time.time() - t_start)
        if not final:
            text += "\n\n(partial: the bench is still running)"
        (out / "results.md").write_text(text + "\n")
        (out / "results.json").write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "complete": final, "env": env, "settings": settings_info,
            "model": meta, "rows": rows, "loss_agreement": agreement, "wall_s": round(time.time() - t_start, 1),
        }, indent=1))
        return text

    for setting in settings:
        for variant in variants:
            name = f"{setting}-{variant}"
            left = deadline.left()
            if left < 60:
                log(f"{name}: skipped, {left:.0f} s left of --deadline")
                rows.append({"ok": False, "variant": variant, "data": setting, "error": "skipped: deadline"})
                continue
            spec = {"kind": "run", "variant": variant, "data": setting, "shape": args.shape, "device": args.device,
                    "seed": args.seed, "steps": args.steps, "warmup": args.warmup, "model_dir": str(model_dir),
                    "work_dir": str(work_root / name), "peak_tflops": args.peak_tflops,
                    "max_train_s": args.max_train_s,
                    "overrides": (unsloth_variants if variant.startswith("unsloth") else product_variants).get(variant, {}),
                    "unsloth_site": str(args.unsloth_site.resolve()) if args.unsloth_site else None,
                    "profile": variant in profiled or "all" in profiled,
                    "trace": str(out / f"trace-{name}.json.gz") if variant in traced else None}
            log(f"{name}: starting")
            r = run_child(spec, name, out, min(args.run_timeout, left))
            rows.append(r)
            if r.get("ok"):
                log(f"{name}: {fmt(r.get('tokens_per_s'), ',.0f')} tokens/s over {r.get('steps_timed')} steps, "
                    f"peak {fmt(r.get('peak_alloc_gib'))} GiB alloc / {fmt(r.get('peak_reserved_gib'))} GiB reserved, "
                    f"load {fmt(r.get('load_s'))} s, build {r.get('build_s')} s, train {r.get('train_s')} s, wall {r.get('wall_s')} s "
                    f"[{r.get('api')}]")
            summarize(final=False)

    print(summarize(final=True), flush=True)
    shutil.rmtree(work_root, ignore_errors=True)
    return 0 if all(r.get("ok") for r in rows) else 1


def render(env: dict[str, Any], s: dict[str, Any], meta: dict[str, Any], rows: list[dict[str, Any]],
           agreement: list[dict[str, Any]], wall: float) -> str:
    v = env.get("versions", {})
    lines = [
        f"## QLoRA bench: {s['shape']} ({meta['n_params'] / 1e9:.3f} B params, vocab {meta['vocab']}), "
        f"{time.strftime('%Y-%m-%d')}",
        "",
        f"- device: {env.get('gpu') or 'cpu'}"
        + (f" ({env.get('gpu_memory_gib')} GiB, CUDA {env.get('cuda')})" if env.get("gpu") else ""),
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        f"- model: {meta['arch']} shape {s['shape']}, random weights (seed {meta['seed']}), saved "
        f"{meta['dtype']}, loaded 4-bit NF4 + double quant; N = {meta['n_params']:,} params "
        f"({meta['n_embedding_params']:,} in embedding + head)",
        f"- recipe: LoRA q/k/v/o r={HP['r']} alpha={HP['alpha']} dropout {HP['dropout']}, micro-batch "
        f"{HP['micro_batch']} x {HP['grad_accum']} accumulation, lr {HP['lr']}, gradient checkpointing, "
        f"seed {s['seed']}; max_length 512 (fixed) / 2048 (variable)",
        f"- data: fixed = every example 512 tokens; variable = lognormal(median 250, sigma 0.9) clipped to "
        f"[32, 2048]; Zipf({ZIPF_S}) token ids; same examples for every variant",
        f"- timing: {s['warmup']} warm-up optimizer steps excluded, then up to {s['steps']} timed steps "
        f"(time limit {s['max_train_s']:.0f} s per run); tokens/s counts real (non-padding) tokens",
        f"- MFU = 4 x N x tokens/s / {s['peak_tflops']:.0f} TFLOP/s (forward 2N + activation-gradient backward 2N;"
        " no weight gradients for the frozen base; recompute and attention s^2 terms not counted)",
    ]
    for name, ov in s.get("product_overrides", {}).items():
        if ov:
            lines.append(f"- {name} TrainingConfig overrides: `{json.dumps(ov)}`")
    for name, ov in s.get("unsloth_overrides", {}).items():
        lines.append(f"- {name} recipe overrides: `{json.dumps(ov)}`")
    for r in rows:
        if r.get("ok") and r["variant"].startswith("unsloth"):
            uv = (r.get("env") or {}).get("versions", {})
            lines.append(f"- {r['data']}/{r['variant']} environment: "
                         + ", ".join(f"{k} {val}" for k, val in uv.items() if val and val != v.get(k)))
    for r in rows:
        if r.get("ok") and r["variant"] != "reference":
            lines.append(f"- {r['data']}/{r['variant']}: api = {r.get('api')}; padding_free={r.get('padding_free')}, "
                         f"packing={r.get('sft_args', {}).get('packing')}, "
                         f"embed/lm_head {r.get('model', {}).get('embed_dtype')}/{r.get('model', {}).get('lm_head_dtype')}")
    lines += ["", table(rows), "", "Loss agreement with the reference (first "
              f"{LOSS_WINDOW} steps; tolerance 1 % relative, bench/RESULTS.md):", ""]
    if agreement:
        lines.append("| data | variant | steps | max abs diff | at step | loss@1 diff | mean abs diff | max rel diff |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for a in agreement:
            lines.append(f"| {a['data']} | {a['variant']} | {a['steps_compared']} | {a['max_abs_diff']:.4g} | "
                         f"{a['at_step']} | {a['loss1_diff']:.4g} | {a['mean_abs_diff']:.4g} | {a['max_rel_diff']:.3g} |")
    else:
        lines.append("(no pair to compare)")
    lines += ["", f"Wall time of the bench: {wall:.0f} s."]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "_child":
        child_main(sys.argv[2])
        sys.exit(0)
    sys.exit(main(sys.argv[1:]))
