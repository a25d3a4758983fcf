"""Merge the adapter into a full-precision copy of the base: ``<output>/merged/`` (``output.merge.enabled``).

The base is loaded again in ``output.merge.dtype`` (bfloat16 by default), never in
4-bit: merging into quantised weights would re-quantise the sum and quietly change
the model. The adapter is applied with PEFT, ``merge_and_unload`` folds it in, and
the result is saved as sharded safetensors with the tokenizer and a manifest
(``kind: merged``), ``_SUCCESS`` last.

Equivalence check: before and after merging, the logits of one fixed prompt are
computed (base+adapter unmerged vs merged, same dtype); the maximum absolute
difference and whether the greedy next tokens agree go into the manifest
(``merge.check``). The merge is onto the original (not NF4-dequantised) weights, the
weights users deploy; the gap to what the adapter was trained against is what the
check quantifies.
"""

from __future__ import annotations

import copy
import gc
import logging
from pathlib import Path
from typing import Any

import torch

from .artifacts import publish
from .config import TrainingConfig
from .inputs import ModelInput
from .report import log_event
from .storage import Storage, join_uri

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
#: Prompt of the equivalence check.
CHECK_PROMPT = "Question: What does a merged LoRA adapter change?\nAnswer:"


def merge_adapter(base_path: Path, adapter_dir: Path, dtype: torch.dtype, tokenizer: Any) -> tuple[Any, dict[str, Any]]:
    """Base (in ``dtype``) + adapter -> merged model, and the equivalence check numbers.

    Returns ``(model, {"maxAbsLogitDiff", "greedyAgree", "dtype"})``.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=dtype, device_map={"": device})
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    peft_model.eval()
    inputs = tokenizer(CHECK_PROMPT, return_tensors="pt").to(device)
    with torch.no_grad():
        before = peft_model(**inputs).logits.float()
    merged = peft_model.merge_and_unload()
    with torch.no_grad():
        after = merged(**inputs).logits.float()
    check = {
        "dtype": str(dtype).removeprefix("torch."),
        "maxAbsLogitDiff": float((before - after).abs().max()),
        "greedyAgree": bool(torch.equal(before.argmax(-1), after.argmax(-1))),
        "prompt": CHECK_PROMPT,
    }
    return merged, check


def merge_and_publish(
    cfg: TrainingConfig,
    base: ModelInput,
    adapter_dir: Path,
    tokenizer: Any,
    storage: Storage,
    work_dir: Path,
    adapter_manifest: dict[str, Any],
) -> dict[str, str]:
    """Merge, save sharded safetensors + tokenizer + manifest, upload to ``<output>/merged/`` (marker last)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    dtype = _DTYPES[cfg.output.merge.dtype]
    merged, check = merge_adapter(base.path, adapter_dir, dtype, tokenizer)
    log_event("merge_check", **check)
    local = Path(work_dir) / "artifacts" / "merged"
    local.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(local), max_shard_size="2GB", safe_serialization=True)
    tokenizer.save_pretrained(str(local))
    del merged
    gc.collect()
    manifest = copy.deepcopy(adapter_manifest)
    manifest["kind"] = "merged"
    manifest["merge"] = {
        "adapterUri": join_uri(cfg.output.uri, "adapter") + "/",
        "onto": "original-weights",
        "check": check,
    }
    return publish(storage, local, join_uri(cfg.output.uri, "merged"), manifest)
