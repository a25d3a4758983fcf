"""Merging the adapter (``qlora_trainer.merge``) on CPU with the embedded SmolLM2-135M-Instruct.

The adapter is a LoRA on every linear layer with random (non-zero) A and B, so it
changes the model's greedy output: a zero-initialised adapter would make the checks
trivial. The equivalence check compares the merged model with base+adapter unmerged
on the fixed :data:`~qlora_trainer.merge.CHECK_PROMPTS`: the first 20 greedy tokens
of every prompt must agree and the maximum absolute logit difference must be under
:data:`~qlora_trainer.merge.LOGIT_TOLERANCE` (1e-3 in float32: merging only changes
summation order), for both merge targets (original and NF4-dequantised weights).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "hack") not in sys.path:
    sys.path.insert(0, str(REPO / "hack"))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_and_adapter(tmp_path_factory):
    import embedded
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = embedded.ensure_model()
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    peft_model = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.05)  # a noticeable but not destructive change
    adapter_dir = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(str(adapter_dir))
    return model_dir, adapter_dir, AutoTokenizer.from_pretrained(str(model_dir))


@pytest.mark.parametrize("onto", ["nf4-dequantised", "original"])
def test_merged_model_matches_base_plus_adapter_in_float32(model_and_adapter, onto):
    from qlora_trainer.merge import CHECK_NEW_TOKENS, CHECK_PROMPTS, LOGIT_TOLERANCE, merge_adapter

    model_dir, adapter_dir, tokenizer = model_and_adapter
    merged, check = merge_adapter(model_dir, adapter_dir, torch.float32, tokenizer, onto=onto)
    print(f"\n{onto}: {({k: v for k, v in check.items() if k != 'prompts'})}", file=sys.stderr)
    assert check["onto"] == onto and check["dtype"] == "float32"
    assert check["greedyTokens"] == len(CHECK_PROMPTS) * CHECK_NEW_TOKENS == len(CHECK_PROMPTS) * 20
    assert check["greedyTokensAgree"] == check["greedyTokens"] and check["minPrefixAgree"] == 20
    assert check["greedyAgree"] and check["greedyRequired"] and check["passed"]
    assert check["top1Agreement"] == 1.0
    assert check["maxAbsLogitDiff"] < LOGIT_TOLERANCE["float32"] == 1e-3
    assert not any("lora" in name for name, _ in merged.named_parameters()), "the adapter is folded in"

    # The adapter is not a no-op: the merged model's logits differ from the base it was merged onto.
    from qlora_trainer.merge import load_merge_base

    base = load_merge_base(model_dir, torch.float32, onto)
    ids = tokenizer(CHECK_PROMPTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        effect = (base(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max().item()
    assert effect > 100 * LOGIT_TOLERANCE["float32"], effect


def test_nf4_dequantised_weights_are_what_the_4bit_model_computes_with(model_and_adapter):
    """The merge base ``nf4-dequantised`` reproduces the 4-bit model's logits (same weights, fp32 compute)."""
    from qlora_trainer.config import QuantizationConfig
    from qlora_trainer.merge import load_4bit, load_merge_base

    model_dir, _, tokenizer = model_and_adapter
    quant = QuantizationConfig()
    four_bit = load_4bit(model_dir, quant, torch.float32)
    dequantised = load_merge_base(model_dir, torch.float32, "nf4-dequantised", quant, torch.float32)
    original = load_merge_base(model_dir, torch.float32, "original")
    ids = tokenizer("The three primary colours are", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = four_bit(input_ids=ids).logits
        near = (dequantised(input_ids=ids).logits - ref).abs().max().item()
        far = (original(input_ids=ids).logits - ref).abs().max().item()
    print(f"\nvs 4-bit: nf4-dequantised {near:.2e}, original {far:.2e}", file=sys.stderr)
    assert near < 1e-3 < far


def test_a_planted_wrong_merge_fails_the_check(model_and_adapter, monkeypatch):
    """The adapter folded in at twice its scale (test hook) answers differently: the check says so."""
    from qlora_trainer.merge import LOGIT_TOLERANCE, PLANT_SCALE_ENV, merge_adapter

    model_dir, adapter_dir, tokenizer = model_and_adapter
    monkeypatch.setenv(PLANT_SCALE_ENV, "2")
    _, check = merge_adapter(model_dir, adapter_dir, torch.float32, tokenizer, onto="original")
    print(f"\nplanted x2: {check['maxAbsLogitDiff']:.3g} max |logit diff|, top-1 {check['top1Agreement']:.3f}, "
          f"{check['greedyTokensAgree']}/{check['greedyTokens']} greedy", file=sys.stderr)
    assert not check["passed"]
    assert check["maxAbsLogitDiff"] > 100 * LOGIT_TOLERANCE["float32"]
    assert check["greedyTokensAgree"] < check["greedyTokens"]


def check_of(dtype: str, diff: float, top1: float, greedy: int) -> dict:
    return {"dtype": dtype, "maxAbsLogitDiff": diff, "top1Agreement": top1, "greedyTokensAgree": greedy,
            "greedyTokens": 80, "greedyAgree": greedy == 80}


@pytest.mark.parametrize(
    ("check", "passes"),
    [
        # float32: merging only reorders sums (measured 9.4e-5, 80/80)
        (check_of("float32", 9.4e-5, 1.0, 80), True),
        (check_of("float32", 9.4e-5, 1.0, 79), False),  # one greedy token differs
        (check_of("float32", 2e-3, 1.0, 80), False),
        # bfloat16: the rounding of W + BA to 8 mantissa bits; see bench/RESULTS.md for the measured rows
        (check_of("bfloat16", 1.2, 1.0, 80), True),
        (check_of("bfloat16", 2.9, 0.96, 70), True),
        (check_of("bfloat16", 3.1, 1.0, 80), False),  # beyond the tolerance
        (check_of("bfloat16", 1.2, 0.9, 80), False),  # too many top-1 tokens differ
        (check_of("float16", 1.2, 1.0, 80), True),
    ],
)
def test_the_rule(check, passes):
    from qlora_trainer import merge

    assert merge.passes(check) is passes


def test_check_summary_is_small_and_rounded():
    from qlora_trainer import merge

    check = {**check_of("bfloat16", 1.23456789, 0.987654321, 80), "onto": "nf4-dequantised", "tolerance": 3.0,
             "minTop1Agreement": 0.95, "passed": True, "prompts": ["a"] * 4, "newTokens": 20}
    summary = merge.check_summary(check)
    assert set(summary) == set(merge.SUMMARY_FIELDS)
    assert summary["maxAbsLogitDiff"] == 1.235 and summary["top1Agreement"] == 0.9877
