#!/usr/bin/env python
"""Training quality (issue 22): the product's QLoRA against 16-bit LoRA, then the merge check's numbers.

One command (CPU, the embedded SmolLM2-135M-Instruct and the embedded chat corpus; no hub):

1. **QLoRA vs 16-bit LoRA.** The same data (the demo corpus: ``hack/embedded.build_corpus``,
   encoded by the product's ``qlora_trainer.inputs.prepare_data``), seed, LoRA settings,
   optimizer, schedule and steps are trained twice through the product's own trainer
   assembly (``qlora_trainer.assemble.build_sft_trainer``):

   * ``qlora``: the product's model (``assemble.build_model``: the base 4-bit NF4 with double
     quantisation, the run's compute dtype);
   * ``lora16``: the same LoRA on the unquantised base, loaded in the run's compute dtype
     (float32 on CPU, where the checkpoint's bf16 weights are exact in fp32; bf16 on a GPU).

   Each reports the eval loss before and after training (the Trainer's ``evaluate`` on the
   held-out split) and the relative gap ``(qlora - lora16) / lora16`` after training, then the
   greedy answers of both to the first ``--answers`` held-out user turns (chat template,
   ``--answer-tokens`` new tokens). Target (the QLoRA paper's claim, Dettmers et al. 2023,
   section 4): the gap within 2 %.

2. **Merge check** (``qlora_trainer.merge``): the ``qlora`` adapter merged onto the NF4-dequantised
   base in float32 and bfloat16, at its own scale and planted wrong scales (the LoRA B matrices
   multiplied by 0: no adapter; 1.1; 2) against base + adapter unmerged in the same dtype:
   max |logit diff|, teacher-forced top-1 agreement, free-running greedy tokens agreeing, and
   whether ``merge.passes`` accepts it. These are the measurements the rule was chosen from.

Prints markdown tables and writes ``results.json`` and ``results.md`` to ``--out``. About 15-25
minutes on two CPU cores at the defaults (bf16 on CPU is slow; ``--dtypes float32`` halves the
merge part). On a GPU (``--device cuda``) pass ``--model-dir`` with a Hugging Face model
directory (the device machine has no hub; bench/README.md).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for sub in ("trainer", "hack"):
    if str(REPO / sub) not in sys.path:
        sys.path.insert(0, str(REPO / sub))

#: Planted LoRA-B scales of the merge table: 0 (the adapter's own effect), 1 (the honest merge), 1.1, 2.
MERGE_SCALES = (0.0, 1.0, 1.1, 2.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="directory for results.json, results.md and the adapters")
    p.add_argument("--model-dir", type=Path, help="a Hugging Face model directory (default: the embedded SmolLM2-135M)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per variant (default 60)")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--accumulation", type=int, default=2)
    p.add_argument("--max-seq-length", type=int, default=256)
    p.add_argument("--learning-rate", type=float, default=5e-4)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--eval-rows", type=int, default=64, help="held-out conversations evaluated (default 64)")
    p.add_argument("--answers", type=int, default=4, help="held-out prompts answered greedily (default 4)")
    p.add_argument("--answer-tokens", type=int, default=24)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--dtypes", default="float32,bfloat16", help="merge dtypes of the merge table")
    p.add_argument("--skip-merge", action="store_true", help="only the QLoRA vs 16-bit table")
    return p.parse_args(argv)


def training_config(args: argparse.Namespace, model_dir: Path, train: Path, evals: Path, out: Path) -> Any:
    """The run's ``TrainingConfig``: the same for both variants (only the base's loading differs)."""
    from qlora_trainer.config import parse_config

    return parse_config(
        {
            "model": {"uri": f"file://{model_dir}"},
            "dataset": {"uri": f"file://{train}", "evalUri": f"file://{evals}"},
            "lora": {"r": args.r, "alpha": 2 * args.r, "dropout": 0.05, "targetModules": ["all-linear"]},
            "training": {
                "maxSteps": args.steps,
                "microBatchSize": args.micro_batch,
                "gradientAccumulationSteps": args.accumulation,
                "maxSeqLength": args.max_seq_length,
                "learningRate": args.learning_rate,
                "seed": args.seed,
                "gradientCheckpointing": False,
                "evalEverySteps": 100000,
                "checkpointEverySteps": 100000,
                "optimizer": "adamw_torch",
            },
            "output": {"uri": f"file://{out}/unused-output"},
        },
        source="bench quality config",
    )


def hardware(device: str) -> Any:
    import torch
    from qlora_trainer.model import Hardware

    if device == "cuda":
        return Hardware("cuda", bool(torch.cuda.is_bf16_supported()), torch.cuda.get_device_name(0))
    return Hardware("cpu", False, "cpu")


def lora16_model(cfg: Any, model_dir: Path, dtype: Any, hw: Any) -> Any:
    """The same LoRA as the product's, on the unquantised base in ``dtype`` (every base weight frozen)."""
    from peft import get_peft_model
    from qlora_trainer.model import adapter_to_float32, device_map, lora_config
    from transformers import AutoModelForCausalLM, set_seed

    from qlora_trainer.speed import attention_implementation

    t = cfg.training  # the same attention as the product's model (varlen on a GPU for packed rows)
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=dtype, device_map=device_map(hw),
        attn_implementation=attention_implementation(t.padding_free or t.packing, hw.device),
    )
    model.config.use_cache = False
    for param in model.parameters():
        param.requires_grad = False
    set_seed(cfg.training.seed)  # the same LoRA initialisation as assemble.build_model
    model = get_peft_model(model, lora_config(cfg.lora))
    adapter_to_float32(model)
    if cfg.training.fused_lora and hw.device == "cuda":  # the same LoRA forward as assemble.build_model's
        from qlora_trainer.speed import fuse_lora

        fuse_lora(model)
    return model


def greedy_answers(model: Any, tokenizer: Any, prompts: list[list[dict[str, str]]], new_tokens: int) -> list[str]:
    """Greedy continuations (``new_tokens``, stopping at EOS) of chat prompts, decoded."""
    import torch

    device = next(model.parameters()).device
    out = []
    model.eval()
    for messages in prompts:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        ids = {k: v.to(device) for k, v in ids.items()}
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False, use_cache=True)
        out.append(tokenizer.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return out


def train_variant(name: str, cfg: Any, model_dir: Path, data: Any, tokenizer: Any, hw: Any, out: Path,
                  prompts: list[list[dict[str, str]]], args: argparse.Namespace) -> dict[str, Any]:
    """Train one variant; returns its eval losses, train loss, seconds and answers (adapter saved under ``out``)."""
    import torch
    from qlora_trainer.assemble import build_model, build_sft_trainer
    from qlora_trainer.model import compute_dtype

    dtype = compute_dtype(cfg.quantization.compute_dtype, hw)
    model = build_model(cfg, model_dir, dtype, hw) if name == "qlora" else lora16_model(cfg, model_dir, dtype, hw)
    trainer = build_sft_trainer(
        cfg, model, data.train.to_dataset(), tokenizer, hw=hw, dtype=dtype, output_dir=out / f"run-{name}",
        callbacks=[], eval_dataset=data.eval.to_dataset(),
    )
    sequences = len(trainer.train_dataset)  # after TRL's packing: sequences of at most maxSeqLength tokens
    before = trainer.evaluate()["eval_loss"]
    t0 = time.monotonic()
    result = trainer.train()
    seconds = time.monotonic() - t0
    after = trainer.evaluate()["eval_loss"]
    answers = greedy_answers(trainer.model, tokenizer, prompts, args.answer_tokens)
    adapter_dir = out / f"adapter-{name}"
    quant_type = getattr(cfg.quantization.quant_type, "value", cfg.quantization.quant_type)
    trainer.model.save_pretrained(str(adapter_dir))
    row = {
        "variant": name,
        "base": (f"4-bit {quant_type}, double quant" if name == "qlora" else "unquantised")
        + f", compute {str(dtype).removeprefix('torch.')}",
        "evalLossBefore": before,
        "evalLossAfter": after,
        "trainLoss": result.training_loss,
        "seconds": round(seconds, 1),
        "trainSequences": sequences,
        "epochs": round(args.steps * args.micro_batch * args.accumulation / sequences, 2),
        "answers": answers,
        "adapterDir": str(adapter_dir),
    }
    del trainer, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def merge_table(model_dir: Path, adapter_dir: Path, tokenizer: Any, cfg: Any, hw: Any, dtypes: list[str]) -> list[dict[str, Any]]:
    """Rows of the merge check for each merge dtype and each of :data:`MERGE_SCALES` (onto nf4-dequantised).

    The reference (base + adapter unmerged, in the merge dtype) is computed once per dtype; each
    scale merges a copy of the adapter with its LoRA B matrices multiplied by the scale.
    """
    import torch
    from peft import PeftModel
    from qlora_trainer import merge
    from qlora_trainer.model import compute_dtype

    compute = compute_dtype(cfg.quantization.compute_dtype, hw)
    rows = []
    for name in dtypes:
        dtype = getattr(torch, name)
        t0 = time.monotonic()
        base = merge.load_merge_base(model_dir, dtype, "nf4-dequantised", cfg.quantization, compute)
        tuned = PeftModel.from_pretrained(base, str(adapter_dir))
        tuned.eval()
        prompts = merge._encode(tokenizer, merge.CHECK_PROMPTS, merge._device())
        reference = merge.reference_outputs(tuned, prompts, merge.CHECK_NEW_TOKENS)
        for scale in MERGE_SCALES:
            planted = copy.deepcopy(tuned)
            merge.scale_adapter(planted, scale)
            merged = planted.merge_and_unload()
            merged.eval()
            check = {"dtype": name, "onto": "nf4-dequantised", **merge.compare_to_reference(merged, reference)}
            rows.append({
                "dtype": name,
                "scale": scale,
                **{k: check[k] for k in ("maxAbsLogitDiff", "top1Agreement", "greedyTokensAgree", "greedyTokens", "minPrefixAgree")},
                "tolerance": merge.LOGIT_TOLERANCE[name],
                "minTop1Agreement": merge.MIN_TOP1_AGREEMENT[name],
                "passes": merge.passes(check),
            })
            del planted, merged
            gc.collect()
        rows[-1]["dtypeSeconds"] = round(time.monotonic() - t0, 1)
        del tuned, base
        gc.collect()
    return rows


def markdown(quality: list[dict[str, Any]], gap: float, merges: list[dict[str, Any]], setup: dict[str, Any],
             prompts: list[list[dict[str, str]]]) -> str:
    lines = [
        f"Setup: {setup['model']}, {setup['device']}; {setup['trainRows']} train / {setup['evalRows']} eval "
        f"conversations (demo corpus, {quality[0]['trainSequences']} packed sequences), {setup['steps']} steps x "
        f"{setup['effectiveBatch']} sequences of at most {setup['maxSeqLength']} tokens ({quality[0]['epochs']} "
        f"epochs), LoRA r={setup['r']} alpha={2 * setup['r']} all-linear, lr "
        f"{setup['learningRate']}, AdamW, seed {setup['seed']}.",
        "",
        "| variant | base | eval loss before | eval loss after | train loss | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for q in quality:
        lines.append(
            f"| {q['variant']} | {q['base']} | {q['evalLossBefore']:.4f} | {q['evalLossAfter']:.4f} | "
            f"{q['trainLoss']:.4f} | {q['seconds']} |"
        )
    lines += ["", f"Relative gap after training, (qlora - lora16) / lora16: **{gap * 100:+.2f} %** (target within 2 %).", ""]
    lines += ["| held-out prompt | qlora | lora16 |", "|---|---|---|"]
    for i, messages in enumerate(prompts):
        user = messages[-1]["content"].replace("|", "\\|")
        a, b = (q["answers"][i].replace("|", "\\|").replace("\n", " ") for q in quality)
        lines.append(f"| {user} | {a} | {b} |")
    if merges:
        lines += [
            "",
            "Merge check (the qlora adapter onto nf4-dequantised, against base + adapter unmerged in the same dtype; "
            "4 prompts x 20 greedy tokens; scale: LoRA B multiplied before the merge, 0 = no adapter):",
            "",
            "| merge dtype | scale | max \\|logit diff\\| | top-1 agreement | greedy tokens agree | rule | passes |",
            "|---|---|---|---|---|---|---|",
        ]
        for m in merges:
            lines.append(
                f"| {m['dtype']} | {m['scale']:g} | {m['maxAbsLogitDiff']:.3g} | {m['top1Agreement']:.3f} | "
                f"{m['greedyTokensAgree']}/{m['greedyTokens']} | <= {m['tolerance']:g}, >= {m['minTop1Agreement']:g} | "
                f"{'yes' if m['passes'] else 'no'} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import embedded
    from qlora_trainer.inputs import prepare_data
    from qlora_trainer.model import load_tokenizer
    from qlora_trainer.storage import Storage

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    model_dir = args.model_dir or embedded.ensure_model()
    corpus = embedded.build_corpus(out / "data", seed=args.seed)
    evals = (out / "data" / "eval.jsonl").read_text().splitlines()[: args.eval_rows]
    (out / "data" / "eval-slice.jsonl").write_text("\n".join(evals) + "\n")
    cfg = training_config(args, model_dir, Path(corpus["trainPath"]), out / "data" / "eval-slice.jsonl", out)
    hw = hardware(args.device)
    tokenizer = load_tokenizer(Path(model_dir))
    data = prepare_data(cfg, Storage(cfg.storage), tokenizer, out / "cache")
    prompts = [json.loads(line)["messages"][:1] for line in evals[: args.answers]]

    quality = [train_variant(v, cfg, Path(model_dir), data, tokenizer, hw, out, prompts, args) for v in ("qlora", "lora16")]
    gap = (quality[0]["evalLossAfter"] - quality[1]["evalLossAfter"]) / quality[1]["evalLossAfter"]
    merges = [] if args.skip_merge else merge_table(
        Path(model_dir), Path(quality[0]["adapterDir"]), tokenizer, cfg, hw, [d for d in args.dtypes.split(",") if d]
    )
    setup = {
        "model": "SmolLM2-135M-Instruct (embedded)" if args.model_dir is None else str(args.model_dir.name),
        "device": hw.name if hw.device == "cuda" else "CPU",
        "trainRows": corpus["train"],
        "evalRows": len(evals),
        "steps": args.steps,
        "effectiveBatch": args.micro_batch * args.accumulation,
        "maxSeqLength": args.max_seq_length,
        "r": args.r,
        "learningRate": args.learning_rate,
        "seed": args.seed,
    }
    text = markdown(quality, gap, merges, setup, prompts)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(
        {"setup": setup, "quality": quality, "relativeGap": gap, "withinTarget": math.fabs(gap) <= 0.02,
         "merge": merges}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
