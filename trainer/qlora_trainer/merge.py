"""Merge the adapter into a full-precision copy of the base: ``<output>/run-<N>/merged/`` (``output.merge.enabled``).

The base is loaded again in ``output.merge.dtype`` (bfloat16 by default), never in
4-bit: merging into quantised weights would re-quantise the sum and quietly change
the model. The adapter is applied with PEFT, ``merge_and_unload`` folds it in, and
the result is saved as sharded safetensors with the tokenizer and a manifest
(``kind: merged``), ``_SUCCESS`` last.

Which weights the adapter is merged onto (``onto``):

* ``nf4-dequantised`` (the default): every weight that training saw 4-bit quantised is
  replaced by its dequantised value (the 4-bit model is loaded with the run's
  quantisation settings and compute dtype and ``bitsandbytes.functional.dequantize_4bit``
  is read out of each ``Linear4bit``), then cast to the merge dtype; the rest
  (embeddings, norms, head) is the original weights, as during training. This is the
  model the adapter was trained and evaluated against.
* ``original``: the original (bf16) checkpoint weights.

Measured with :func:`compare_merge_targets` (CPU, the embedded SmolLM2-135M-Instruct,
NF4 + double quant, fp32 compute; adapter: the step-9 checkpoint of a CPU run on the
chatterbot corpus, all-linear r=16 alpha=32, lr 1e-3, micro-batch 2 x 128 tokens; the
4 :data:`CHECK_PROMPTS`, 20 greedy tokens each; merged models in float32; reference =
the 4-bit base + the unmerged adapter, i.e. the model training optimised and
evaluated)::

    merged onto       max |logit diff|   greedy tokens agreeing   shortest identical prefix
    nf4-dequantised   8.4e-05            80 / 80                  20 / 20
    original          18.3               20 / 80                   1 / 20
    (no adapter:      8.8                15 / 80                   0 / 20   = the adapter's own effect)

Merging onto the original weights moves the logits by twice what the whole adapter
does (NF4's quantisation error, which the adapter partly learned to compensate, is
larger than the adapter's update) and changes the greedy answer within one or two
tokens: it is not the model that was trained. Merging onto the dequantised weights
reproduces it to float32 rounding. So ``nf4-dequantised`` is the default; ``original``
remains available (:func:`merge_adapter` ``onto=``) for who prefers the unquantised
base and accepts the difference, which the check below then quantifies. (Numbers
depend on model and adapter; rerun :func:`compare_merge_targets` for another one.)

Equivalence check (every merge, recorded in the manifest as ``merge.check``, in the
result's ``artifacts.mergeCheck`` and so in ``status.artifacts.mergeCheck``, and logged
as ``merge_check``): on the fixed :data:`CHECK_PROMPTS`, base + adapter unmerged (on the
same weights, in the merge dtype) generates :data:`CHECK_NEW_TOKENS` greedy tokens per
prompt; the merged model is then run teacher-forced on prompt + that continuation and
free-running from the prompt. Measured: the maximum absolute logit difference
(``maxAbsLogitDiff``), the share of continuation positions whose top-1 token is the
reference's (``top1Agreement``, teacher-forced: one near-tie flips one position, not
the rest of the answer) and the free-running greedy tokens that agree
(``greedyTokensAgree`` of ``greedyTokens``). The rule (:func:`passes`), per merge dtype:

* float32: ``maxAbsLogitDiff <= 1e-3`` and every greedy token agrees (merging only
  changes summation order).
* bfloat16 and float16: ``maxAbsLogitDiff <= 3.0`` and ``top1Agreement >= 0.95``.

Chosen from measurements on a real model (``bench/quality.py``, table in bench/RESULTS.md;
CPU, the embedded SmolLM2-135M-Instruct, an adapter trained 60 steps on the demo corpus,
all-linear r=16, merged onto ``nf4-dequantised``, 4 prompts x 20 tokens)::

    merge dtype  adapter scale    max |logit diff|  top-1 agreement  greedy tokens agree
    float32      1 (honest)       1.2e-4            1.000            80 / 80
    float32      1.1              3.78              0.988            79 / 80
    float32      2                23.1              0.900            31 / 80
    float32      0 (no adapter)   13.8              0.850            30 / 80
    bfloat16     1 (honest)       1.75              0.988            61 / 80
    bfloat16     1.1              3.34              0.988            80 / 80
    bfloat16     2                24.8              0.875            32 / 80
    bfloat16     0 (no adapter)   14.6              0.863            30 / 80

Storing ``W + BA`` in bf16 rounds every merged weight to 8 mantissa bits, which the
unmerged model (``W`` and ``BA`` apart) does not: the honest bf16 merge moves the logits
by 1.75 and flips one of the 80 teacher-forced top-1 tokens, and because a free-running
greedy answer diverges for good after one flip, only 61 of 80 free-running tokens agree;
so free-running agreement is recorded but not required in bf16, teacher-forced top-1
agreement is. 3.0 leaves 1.7x headroom over the honest merge and still refuses the
adapter merged at 1.1x its scale; a merge at 2x, or a merge that lost the adapter, is
refused by both measures. An earlier 1.0 tolerance had been set on random weights
(Mistral-7B shape on an H200: 0.47-0.56), where near-flat logits make agreement
meaningless. Larger models may round to a larger difference; if an honest bf16 merge is
refused, merge in float32 (exact). fp16 (11 mantissa bits) is given the bf16 rule,
which bounds it from above (not measured separately).

A merge that fails the rule raises :class:`~qlora_trainer.errors.MergeCheckFailedError`
(exit 8, reason ``MergeCheckFailed``) before anything of the merged model is written:
the adapter stays published, ``merged/`` stays empty, and the operator reports the
check's numbers. For an exact check, merge in float32 (``output.merge.dtype``).
"""

from __future__ import annotations

import copy
import gc
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .artifacts import publish
from .config import QuantizationConfig, TrainingConfig
from .errors import MergeCheckFailedError
from .inputs import ModelInput
from .report import log_event
from .storage import Storage

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

#: Targets of the merge (see the module docstring); the first is the default.
ONTO_TARGETS = ("nf4-dequantised", "original")
DEFAULT_ONTO = "nf4-dequantised"

#: Fixed prompts of the equivalence check (plain text: no chat template needed).
CHECK_PROMPTS = (
    "Question: What does a merged LoRA adapter change?\nAnswer:",
    "The three primary colours are",
    "def fibonacci(n):\n",
    "Hello! How are you today?",
)
#: Greedy tokens generated per prompt and compared.
CHECK_NEW_TOKENS = 20
#: Maximum absolute logit difference allowed between merged and unmerged, per merge dtype
#: (measured: see the module docstring and bench/quality.py).
LOGIT_TOLERANCE = {"float32": 1e-3, "bfloat16": 3.0, "float16": 3.0}
#: Least share of teacher-forced continuation positions whose top-1 token must agree.
MIN_TOP1_AGREEMENT = {"float32": 1.0, "bfloat16": 0.95, "float16": 0.95}
#: Merge dtypes whose check also requires every free-running greedy token to agree.
GREEDY_REQUIRED = ("float32",)
#: Fields of a check that go into the result and ``status.artifacts.mergeCheck``.
SUMMARY_FIELDS = (
    "passed", "dtype", "onto", "maxAbsLogitDiff", "tolerance", "top1Agreement", "minTop1Agreement",
    "greedyTokensAgree", "greedyTokens",
)


# ---------------------------------------------------------------- check primitives
def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _encode(tokenizer: Any, prompts: Sequence[str], device: str) -> list[torch.Tensor]:
    return [tokenizer(p, return_tensors="pt")["input_ids"].to(device) for p in prompts]


@torch.no_grad()
def greedy_tokens(model: Any, prompt_ids: torch.Tensor, new_tokens: int = CHECK_NEW_TOKENS) -> torch.Tensor:
    """``new_tokens`` greedy continuation tokens of one prompt (full forward per token, no cache, no EOS stop)."""
    ids = prompt_ids
    out = []
    for _ in range(new_tokens):
        nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        ids = torch.cat([ids, nxt], dim=1)
    return torch.cat(out, dim=1)[0]


@torch.no_grad()
def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits[0].float()


def reference_outputs(model: Any, prompts_ids: list[torch.Tensor], new_tokens: int) -> list[dict[str, torch.Tensor]]:
    """Greedy continuation and teacher-forced logits (prompt + continuation) of the reference model."""
    out = []
    for ids in prompts_ids:
        tokens = greedy_tokens(model, ids, new_tokens)
        full = torch.cat([ids[0], tokens]).unsqueeze(0)
        out.append({"prompt": ids, "tokens": tokens, "full": full, "logits": _logits(model, full)})
    return out


def compare_to_reference(model: Any, reference: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """How close ``model`` is to the reference outputs.

    Returns ``maxAbsLogitDiff`` (over every position of prompt + reference continuation,
    teacher-forced), ``top1Agreement`` (share of the continuation positions, teacher-forced,
    where the top-1 token is the reference's: in [0, 1]), ``greedyTokensAgree`` /
    ``greedyTokens`` (same token at the same position of the two free-running greedy
    continuations), ``minPrefixAgree`` (the fewest leading tokens identical, over
    prompts) and ``greedyAgree`` (all identical).
    """
    max_diff, agree, total, min_prefix, top1, positions = 0.0, 0, 0, None, 0, 0
    for ref in reference:
        logits = _logits(model, ref["full"])
        max_diff = max(max_diff, float((logits - ref["logits"]).abs().max()))
        n = len(ref["tokens"])
        # logits at position i predict token i + 1: the continuation's predictions are the n
        # positions before the last one.
        predicted = logits[-n - 1 : -1].argmax(-1)
        top1 += int((predicted == ref["logits"][-n - 1 : -1].argmax(-1)).sum())
        positions += n
        tokens = greedy_tokens(model, ref["prompt"], len(ref["tokens"]))
        same = (tokens == ref["tokens"]).tolist()
        agree += sum(same)
        total += len(same)
        prefix = same.index(False) if False in same else len(same)
        min_prefix = prefix if min_prefix is None else min(min_prefix, prefix)
    return {
        "maxAbsLogitDiff": max_diff,
        "top1Agreement": top1 / positions if positions else 1.0,
        "greedyTokensAgree": agree,
        "greedyTokens": total,
        "minPrefixAgree": min_prefix,
        "greedyAgree": agree == total,
    }


def passes(check: dict[str, Any]) -> bool:
    """Whether a check (fields of :func:`compare_to_reference` and ``dtype``) meets the rule of its merge dtype.

    The rule is the module docstring's: ``maxAbsLogitDiff`` within :data:`LOGIT_TOLERANCE`,
    ``top1Agreement`` at least :data:`MIN_TOP1_AGREEMENT`, and for :data:`GREEDY_REQUIRED`
    dtypes every free-running greedy token equal. Raises ``KeyError`` for another dtype.
    """
    dtype = check["dtype"]
    return (
        check["maxAbsLogitDiff"] <= LOGIT_TOLERANCE[dtype]
        and check["top1Agreement"] >= MIN_TOP1_AGREEMENT[dtype]
        and (check["greedyAgree"] or dtype not in GREEDY_REQUIRED)
    )


def check_summary(check: dict[str, Any]) -> dict[str, Any]:
    """The :data:`SUMMARY_FIELDS` of a check, floats rounded to 4 significant digits (result and status)."""
    return {
        k: float(f"{check[k]:.4g}") if isinstance(check[k], float) else check[k]
        for k in SUMMARY_FIELDS
        if k in check
    }


def describe_failure(check: dict[str, Any]) -> str:
    """One line naming what failed, e.g. ``bfloat16 merge onto nf4-dequantised: max |logit diff| 18.3 > 3 ...``."""
    return (
        f"{check['dtype']} merge onto {check['onto']} answers differently from base + adapter: "
        f"max |logit diff| {check['maxAbsLogitDiff']:.3g} (tolerance {check['tolerance']:g}), "
        f"top-1 agreement {check['top1Agreement']:.3f} (at least {check['minTop1Agreement']:g}), "
        f"{check['greedyTokensAgree']}/{check['greedyTokens']} greedy tokens agree; "
        "the adapter is published, the merged model is not"
    )


#: Test hook (unset in production, like ``callbacks``' hooks): ``QLORA_TEST_MERGE_ADAPTER_SCALE=F``
#: multiplies every ``lora_B`` weight by ``F`` after the reference outputs and before the
#: merge, planting a wrong merge (``F=2``: the adapter folded in at twice its scale).
PLANT_SCALE_ENV = "QLORA_TEST_MERGE_ADAPTER_SCALE"


@torch.no_grad()
def scale_adapter(peft_model: Any, scale: float) -> None:
    """Multiply every ``lora_B`` weight of ``peft_model`` by ``scale`` in place (the adapter's update ``BA`` scales alike)."""
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.mul_(scale)


def plant_wrong_scale(peft_model: Any) -> None:
    """Apply :data:`PLANT_SCALE_ENV` when set (tests only); raises ``ValueError`` for a non-number."""
    value = os.environ.get(PLANT_SCALE_ENV)
    if not value:
        return
    scale = float(value)
    log.warning("test hook %s=%s: merging the adapter at %g x its scale", PLANT_SCALE_ENV, value, scale)
    scale_adapter(peft_model, scale)


def fold_adapter(peft_model: Any) -> Any:
    """``peft_model.merge_and_unload()``: the base with every LoRA update added into its weights."""
    plant_wrong_scale(peft_model)
    return peft_model.merge_and_unload()


# ---------------------------------------------------------------- loading the merge target
def load_4bit(base_path: Path, quant: QuantizationConfig, compute: torch.dtype) -> Any:
    """The base 4-bit quantised exactly as training loads it (``model.bnb_config``), for inference."""
    from transformers import AutoModelForCausalLM

    from .model import bnb_config, keep_4bit_trainable_on_cpu

    model = AutoModelForCausalLM.from_pretrained(
        str(base_path),
        quantization_config=bnb_config(quant, compute),
        dtype=compute,
        device_map={"": _device()},
        low_cpu_mem_usage=True,
    )
    keep_4bit_trainable_on_cpu(model)  # same kernels as training (no CPU repacking)
    model.eval()
    return model


@torch.no_grad()
def dequantise_into(model: Any, quantised: Any) -> int:
    """Overwrite every weight of ``model`` that is a ``Linear4bit`` in ``quantised`` with its dequantised value.

    Returns how many weights were replaced.
    """
    import bitsandbytes as bnb

    targets = dict(model.named_modules())
    n = 0
    for name, module in quantised.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = module.weight
            full = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
            dest = targets[name].weight
            dest.copy_(full.reshape(dest.shape).to(dest.dtype))
            n += 1
    return n


def load_merge_base(
    base_path: Path,
    dtype: torch.dtype,
    onto: str,
    quant: QuantizationConfig | None = None,
    compute: torch.dtype | None = None,
) -> Any:
    """The base in ``dtype``: original weights, or with the NF4-dequantised ones (``onto``)."""
    from transformers import AutoModelForCausalLM

    if onto not in ONTO_TARGETS:
        raise ValueError(f"onto must be one of {ONTO_TARGETS}, not {onto!r}")
    model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=dtype, device_map={"": _device()})
    if onto == "nf4-dequantised":
        from .model import Hardware, compute_dtype

        quant = quant or QuantizationConfig()
        compute = compute or compute_dtype(quant.compute_dtype, Hardware.detect())
        quantised = load_4bit(base_path, quant, compute)
        replaced = dequantise_into(model, quantised)
        del quantised
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.info("merge base: %d weights replaced by their %s-dequantised values", replaced, quant.quant_type)
    model.eval()
    return model


# ---------------------------------------------------------------- merge
def merge_adapter(
    base_path: Path,
    adapter_dir: Path,
    dtype: torch.dtype,
    tokenizer: Any,
    *,
    onto: str = DEFAULT_ONTO,
    quant: QuantizationConfig | None = None,
    compute: torch.dtype | None = None,
    prompts: Sequence[str] = CHECK_PROMPTS,
    new_tokens: int = CHECK_NEW_TOKENS,
) -> tuple[Any, dict[str, Any]]:
    """Base (in ``dtype``, ``onto`` weights) + adapter -> merged model, and the equivalence check.

    ``quant``/``compute``: the run's quantisation settings and compute dtype (for
    ``nf4-dequantised``; default: the config defaults on this hardware).

    Returns ``(model, check)``; ``check`` has ``dtype``, ``onto``, ``prompts``,
    ``newTokens``, ``tolerance``, ``minTop1Agreement``, ``greedyRequired``, ``passed``
    (:func:`passes`) and the fields of :func:`compare_to_reference`.
    """
    from peft import PeftModel

    model = load_merge_base(base_path, dtype, onto, quant, compute)
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    peft_model.eval()
    reference = reference_outputs(peft_model, _encode(tokenizer, prompts, _device()), new_tokens)
    merged = fold_adapter(peft_model)
    merged.eval()
    name = str(dtype).removeprefix("torch.")
    check = {"dtype": name, "onto": onto, **compare_to_reference(merged, reference)}
    check.update(
        tolerance=LOGIT_TOLERANCE[name],
        minTop1Agreement=MIN_TOP1_AGREEMENT[name],
        greedyRequired=name in GREEDY_REQUIRED,
        prompts=list(prompts),
        newTokens=new_tokens,
    )
    check["passed"] = passes(check)
    return merged, check


def compare_merge_targets(
    base_path: Path,
    adapter_dir: Path,
    quant: QuantizationConfig | None = None,
    prompts: Sequence[str] = CHECK_PROMPTS,
    *,
    tokenizer: Any = None,
    dtype: torch.dtype = torch.float32,
    compute: torch.dtype | None = None,
    new_tokens: int = CHECK_NEW_TOKENS,
) -> dict[str, Any]:
    """Merge onto each of :data:`ONTO_TARGETS` and measure each against 4-bit base + adapter.

    The reference is what training evaluated: the base 4-bit quantised with ``quant``
    (compute dtype ``compute``, default as in training on this hardware) with the
    unmerged adapter. Each merged model (in ``dtype``) is compared with
    :func:`compare_to_reference`. ``adapterEffect`` is the same comparison for the
    4-bit base without the adapter: the scale of what the adapter changes.

    Returns ``{"reference": ..., "adapterEffect": {...}, "targets": {onto: {...}}}``.
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    from .model import Hardware, compute_dtype

    quant = quant or QuantizationConfig()
    compute = compute or compute_dtype(quant.compute_dtype, Hardware.detect())
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(base_path))
    prompts_ids = _encode(tokenizer, prompts, _device())

    four_bit = load_4bit(base_path, quant, compute)
    tuned = PeftModel.from_pretrained(four_bit, str(adapter_dir))
    tuned.eval()
    reference = reference_outputs(tuned, prompts_ids, new_tokens)
    with tuned.disable_adapter():
        effect = compare_to_reference(tuned, reference)
    del tuned, four_bit
    gc.collect()

    targets = {}
    for onto in ONTO_TARGETS:
        merged, _ = merge_adapter(
            base_path, adapter_dir, dtype, tokenizer, onto=onto, quant=quant, compute=compute,
            prompts=prompts[:1], new_tokens=1,
        )
        targets[onto] = compare_to_reference(merged, reference)
        del merged
        gc.collect()
    return {
        "reference": f"4-bit {quant.quant_type} base (compute {str(compute).removeprefix('torch.')}) + adapter",
        "dtype": str(dtype).removeprefix("torch."),
        "prompts": list(prompts),
        "newTokens": new_tokens,
        "adapterEffect": effect,
        "targets": targets,
    }


def merge_and_publish(
    cfg: TrainingConfig,
    base: ModelInput,
    adapter_dir: Path,
    tokenizer: Any,
    storage: Storage,
    work_dir: Path,
    adapter_manifest: dict[str, Any],
    onto: str = DEFAULT_ONTO,
    *,
    adapter_uri: str,
    merged_uri: str,
) -> dict[str, str]:
    """Merge, check, save sharded safetensors + tokenizer + manifest, upload to ``merged_uri`` (marker last).

    ``adapter_uri`` / ``merged_uri``: the run's ``<output>/run-<N>/adapter`` and ``.../merged``
    (``runs.RunLayout``). Returns :func:`~qlora_trainer.artifacts.publish`'s ``uri`` and
    ``manifestUri`` with ``check`` (:func:`check_summary`).

    Raises:
        MergeCheckFailedError: the merged model fails :func:`passes`; nothing was saved or
            uploaded (its ``check`` attribute holds the summary).
    """
    from .model import Hardware, compute_dtype

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    dtype = _DTYPES[cfg.output.merge.dtype]
    compute = compute_dtype(cfg.quantization.compute_dtype, Hardware.detect())
    merged, check = merge_adapter(
        base.path, adapter_dir, dtype, tokenizer, onto=onto, quant=cfg.quantization, compute=compute
    )
    log_event("merge_check", **{k: v for k, v in check.items() if k != "prompts"})
    if not check["passed"]:
        del merged
        gc.collect()
        raise MergeCheckFailedError(describe_failure(check), check_summary(check))
    local = Path(work_dir) / "artifacts" / "merged"
    local.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(local), max_shard_size="2GB", safe_serialization=True)
    tokenizer.save_pretrained(str(local))
    del merged
    gc.collect()
    manifest = copy.deepcopy(adapter_manifest)
    manifest["kind"] = "merged"
    manifest["merge"] = {
        "adapterUri": adapter_uri.rstrip("/") + "/",
        "onto": onto,
        "check": check,
    }
    return {**publish(storage, local, merged_uri, manifest), "check": check_summary(check)}
