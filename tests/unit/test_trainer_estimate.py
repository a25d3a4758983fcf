"""The per-GPU memory estimate (``qlora_trainer.estimate``), its preflight and ``qlora-train estimate``.

The 7B rows are measurements on one H200 (torch 2.11, transformers 5.17, bitsandbytes
0.50.2; see the module docstring): the estimate must stay within its stated error of
each (-1 % .. +8 % of the allocated peak). The 70B cases check the decisions the
preflight makes from the same numbers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import LLAMA3_70B, MISTRAL_7B
from qlora_trainer.config import TrainingConfig
from qlora_trainer.estimate import CUDA_CONTEXT_GIB, NCCL_GIB, EstimateError, ModelShape, estimate, plan

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def config(**training) -> TrainingConfig:
    lora = training.pop("lora", {})
    return TrainingConfig.model_validate(
        {
            "model": {"uri": "file:///models/m"},
            "dataset": {"uri": "file:///data/train.jsonl"},
            "output": {"uri": "file:///out/"},
            "quantization": {"computeDtype": "bfloat16"},
            "lora": lora,
            "training": training,
        }
    )


# Measured peak allocated GiB (one accumulation step): the path as measured had the non-4-bit
# weights upcast to float32, no Liger Kernel and SDPA attention with a packed-row mask.
MEASURED = [
    ("q/k/v/o fused AdamW", 32000, {"targetModules": QKVO}, 4, 512, True, "adamw_torch_fused", 6.4405),
    ("q/k/v/o AdamW dropout 0", 32000, {"targetModules": QKVO, "dropout": 0.0}, 4, 512, True, "adamw_torch", 6.3935),
    ("all-linear AdamW", 32000, {}, 4, 512, True, "adamw_torch", 6.8562),
    ("all-linear mb1", 32000, {}, 1, 512, True, "adamw_torch", 5.4981),
    ("all-linear s2048", 32000, {}, 1, 2048, True, "adamw_torch", 6.821),
    ("all-linear s4096 mb2", 32000, {}, 2, 4096, True, "adamw_torch", 12.958),
    ("all-linear paged 8-bit", 32000, {}, 4, 512, True, "paged_adamw_8bit", 6.582),
    ("all-linear r64", 32000, {"r": 64, "alpha": 128}, 4, 512, True, "adamw_torch", 8.278),
    ("no checkpointing mb1", 32000, {}, 1, 512, False, "adamw_torch", 10.5026),
    ("no checkpointing mb2 s1024", 32000, {}, 2, 1024, False, "adamw_torch", 27.3224),
    # bench/RESULTS.md (vocab 49152, 4 accumulation steps)
    ("bench reference q/k/v/o", 49152, {"targetModules": QKVO}, 4, 512, True, "adamw_torch_fused", 6.88),
    ("bench product all-linear", 49152, {}, 4, 512, True, "paged_adamw_8bit", 7.42),
]


@pytest.mark.parametrize("name,vocab,lora,mb,seq,gc,optim,measured", MEASURED, ids=[m[0] for m in MEASURED])
def test_7b_estimate_is_within_the_stated_error_of_measurements(name, vocab, lora, mb, seq, gc, optim, measured):
    cfg = config(
        lora=lora,
        microBatchSize=mb,
        maxSeqLength=seq,
        gradientCheckpointing=gc,
        optimizer=optim,
        upcastFrozenWeights=True,
        ligerKernels=False,
    )
    est = estimate({**MISTRAL_7B, "vocab_size": vocab}, cfg, world_size=1, gpu_gib=141, attention="sdpa")
    error = est.allocated_gib / measured - 1
    assert -0.01 <= error <= 0.08, f"{name}: estimated {est.allocated_gib:.2f} GiB vs measured {measured} ({error:+.1%})"


# The product path of bench/RESULTS.md (issue 9): no upcast, Liger, FlashAttention varlen, q/k/v/o,
# micro-batch 16 x 512, fused AdamW, vocabulary 49,152; peak allocated GiB on an H200.
MEASURED_PRODUCT = [("micro-batch 16", False, 8.02), ("micro-batch 16, activation offloading", True, 6.25)]


@pytest.mark.parametrize("name,offload,measured", MEASURED_PRODUCT, ids=[m[0] for m in MEASURED_PRODUCT])
def test_product_path_estimate_is_within_2_percent_below_to_8_above(name, offload, measured):
    cfg = config(lora={"targetModules": QKVO}, microBatchSize=16, gradientAccumulationSteps=1, maxSeqLength=512,
                 optimizer="adamw_torch_fused", activationOffloading=offload)
    est = estimate({**MISTRAL_7B, "vocab_size": 49152}, cfg, world_size=1, gpu_gib=141, attention="varlen")
    error = est.allocated_gib / measured - 1
    assert -0.02 <= error <= 0.08, f"{name}: estimated {est.allocated_gib:.2f} GiB vs measured {measured} ({error:+.1%})"
    assert any("pinned host memory" in n for n in est.notes) == offload


def test_weights_match_the_measured_4bit_load():
    # Loaded and upcast as the trainer does: 4.3668 GiB allocated (buffers included).
    est = estimate(MISTRAL_7B, config(upcastFrozenWeights=True), world_size=1, gpu_gib=141)
    rows = {r.name: r.gib for r in est.rows}
    assert abs(rows["4-bit base weights"] + rows["other weights"] - 4.3668) < 0.05
    shape = ModelShape.from_config(MISTRAL_7B)
    assert shape.quantised_params == 6_979_321_856 and shape.other_params == 262_410_240


def test_70b_is_refused_on_one_24_gib_gpu_with_the_numbers_and_what_would_fit():
    decision = plan(LLAMA3_70B, config(), world_size=1, gpu_gib=24)
    assert not decision.fits and decision.parallelism == "single"
    msg = decision.message
    assert "training does not fit" in msg and "GiB per GPU" in msg and "24.0 GiB" in msg and "70.6 B parameters" in msg
    assert "Would fit:" in msg and "training.parallelism fsdp" in msg


def test_70b_fits_fsdp_on_two_80_gib_gpus_and_auto_prefers_ddp_when_a_replica_fits():
    fsdp = plan(LLAMA3_70B, config(parallelism="fsdp"), world_size=2, gpu_gib=80)
    assert fsdp.fits and fsdp.parallelism == "fsdp"
    ddp = estimate(LLAMA3_70B, config(), world_size=2, gpu_gib=80, parallelism="ddp")
    assert fsdp.estimate.peak_gib < ddp.peak_gib / 1.5, "FSDP shards the 4-bit weights"
    auto = plan(LLAMA3_70B, config(), world_size=2, gpu_gib=80)
    assert auto.fits and auto.parallelism == "ddp"


def test_auto_picks_fsdp_when_a_replica_does_not_fit_but_shards_do():
    # 8 GPUs: the FSDP load peak (the whole 4-bit model + an eighth, ~43.5 GiB) fits 44 GiB, a DDP replica
    # (~45.8 GiB) does not. On 4 such GPUs the load peak (whole + a quarter) would not fit either.
    auto = plan(LLAMA3_70B, config(), world_size=8, gpu_gib=44)
    assert auto.fits and auto.parallelism == "fsdp"
    assert not plan(LLAMA3_70B, config(), world_size=4, gpu_gib=44).fits
    ddp = plan(LLAMA3_70B, config(parallelism="ddp"), world_size=8, gpu_gib=44)
    assert not ddp.fits and "training.parallelism fsdp (or auto) on the same GPUs" in ddp.message


def test_fsdp_load_peak_matches_the_two_h200_measurement():
    # bench/RESULTS.md: Llama-3-70B widths, 10 of 80 layers, all-linear r16, FSDP on 2 H200s: 12.22 GiB
    # allocated after FSDP wrapping (the whole 4-bit model, 8.42 GiB, plus its shard), above the training steps.
    shape = {**LLAMA3_70B, "num_hidden_layers": 10}
    est = estimate(shape, config(parallelism="fsdp", microBatchSize=4), world_size=2, gpu_gib=139.8,
                   parallelism="fsdp", compute_dtype="bfloat16")
    allocator_part = est.load_peak_gib - CUDA_CONTEXT_GIB - NCCL_GIB  # outside torch.cuda.max_memory_allocated
    assert -0.02 <= allocator_part / 12.22 - 1 <= 0.08


def test_fsdp_load_peak_refuses_70b_on_two_24_gib_gpus():
    # Answer.AI trains a 70B on 2 x 24 GB by quantising layer by layer on the CPU; with the
    # Hugging Face stack every rank loads the whole 4-bit model onto its GPU first.
    decision = plan(LLAMA3_70B, config(parallelism="fsdp"), world_size=2, gpu_gib=24)
    assert not decision.fits
    assert decision.estimate.peak_gib < decision.estimate.load_peak_gib
    assert "loading the whole 4-bit model" in decision.message


def test_shorter_sequences_are_offered_when_they_fit():
    cfg = config(maxSeqLength=16384, gradientCheckpointing=False, upcastFrozenWeights=True)
    decision = plan(MISTRAL_7B, cfg, world_size=1, gpu_gib=24)
    assert not decision.fits and "training.maxSeqLength" in decision.message


@pytest.mark.parametrize(
    "change,row,smaller",
    [
        ({"upcastFrozenWeights": False}, "other weights", True),
        ({"gradientCheckpointing": False}, "stored activations", False),
        ({"activationOffloading": True}, "stored activations", True),
    ],
)
def test_switches_move_the_rows_they_should(change, row, smaller):
    base = {r.name: r.gib for r in estimate(MISTRAL_7B, config(upcastFrozenWeights=True), gpu_gib=80).rows}
    new = {r.name: r.gib for r in estimate(MISTRAL_7B, config(**{"upcastFrozenWeights": True, **change}), gpu_gib=80).rows}
    assert (new[row] < base[row]) == smaller and new[row] != base[row]


def test_double_quant_and_fsdp_sharding_change_the_4bit_row():
    dq = estimate(MISTRAL_7B, config(), gpu_gib=80).rows[0].gib
    plain = estimate(
        MISTRAL_7B, config().model_copy(update={"quantization": config().quantization.model_copy(update={"double_quant": False})}), gpu_gib=80
    ).rows[0].gib
    assert plain - dq == pytest.approx(6_979_321_856 * (4 / 64 - 1 / 64 - 4 / 64 / 256) / 2**30, rel=1e-6)
    sharded = estimate(MISTRAL_7B, config(), world_size=4, gpu_gib=80, parallelism="fsdp").rows[0].gib
    assert sharded == pytest.approx((6_979_321_856 * 0.5 / 4 + 6_979_321_856 * (1 / 64 + 4 / 64 / 256)) / 2**30)


@pytest.mark.parametrize(
    "broken,field",
    [({"hidden_size": None}, "hidden_size"), ({"num_local_experts": 8}, "mixture-of-experts"), ({"vocab_size": 0}, "vocab_size")],
)
def test_unusable_model_configs_name_the_field(broken, field):
    with pytest.raises(EstimateError, match=field):
        ModelShape.from_config({**MISTRAL_7B, **broken})


def test_nested_text_config_and_defaults():
    shape = ModelShape.from_config({"text_config": {k: v for k, v in MISTRAL_7B.items() if k != "num_key_value_heads"}})
    assert shape.kv_heads == shape.heads == 32 and shape.head_dim == 128 and not shape.tied


def test_preflight_refuses_with_exit_7_before_loading(tmp_path):
    from qlora_trainer.distributed import Dist
    from qlora_trainer.errors import EXIT_DOES_NOT_FIT, DoesNotFitError
    from qlora_trainer.model import Hardware
    from qlora_trainer.train import preflight

    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_70B))
    gpu = Hardware("cuda", True, "test GPU")
    with pytest.raises(DoesNotFitError) as err:
        preflight(config(), tmp_path, gpu, Dist.single(), gpu_gib=24)
    assert err.value.exit_code == EXIT_DOES_NOT_FIT == 7 and err.value.reason == "InsufficientGPUMemory"
    assert preflight(config(), tmp_path, gpu, Dist.single(), gpu_gib=80) == "single"
    # No CUDA: nothing to check against.
    assert preflight(config(), tmp_path, Hardware("cpu", False, "cpu"), Dist.single()) == "single"


def run_estimate(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(config().model_dump(mode="json", by_alias=True)))
    model = tmp_path / "model-config.json"
    model.write_text(json.dumps(LLAMA3_70B))
    return subprocess.run(
        [sys.executable, "-m", "qlora_trainer.cli", "estimate", "--config", str(cfg), "--model-config", str(model), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_estimate_command_exits_0_when_it_fits_and_prints_the_table(tmp_path):
    proc = run_estimate(tmp_path, "--gpus", "2", "--gpu-memory", "80")
    assert proc.returncode == 0, proc.stderr
    for text in ("4-bit base weights", "LoRA weights", "stored activations", "micro-batch 1", "fits:"):
        assert text in proc.stdout


def test_estimate_command_notes_the_host_memory_of_offloading_at_the_configured_micro_batch(tmp_path):
    cfg = tmp_path / "config.json"
    offload = config(microBatchSize=16, gradientAccumulationSteps=1, activationOffloading=True)
    cfg.write_text(json.dumps(offload.model_dump(mode="json", by_alias=True)))
    model = tmp_path / "model-config.json"
    model.write_text(json.dumps(MISTRAL_7B))
    proc = subprocess.run(
        [sys.executable, "-m", "qlora_trainer.cli", "estimate", "--config", str(cfg), "--model-config", str(model),
         "--gpu-memory", "80"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    # 32 layers x 16 x 512 tokens x 4096 x 2 bytes = 2 GiB (not the micro-batch-1 figure, 0.12)
    assert "keeps 2.00 GiB of pinned host memory per GPU" in proc.stdout


def test_estimate_command_exits_7_when_it_does_not_fit(tmp_path):
    proc = run_estimate(tmp_path, "--gpus", "1", "--gpu-memory", "24")
    assert proc.returncode == 7, proc.stdout + proc.stderr
    assert "training does not fit" in proc.stdout


def test_estimate_command_exits_2_for_an_unreadable_model_config(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(config().model_dump(mode="json", by_alias=True)))
    proc = subprocess.run(
        [sys.executable, "-m", "qlora_trainer.cli", "estimate", "--config", str(cfg), "--model-config", str(tmp_path / "nope.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "nope.json" in proc.stderr


def test_estimate_command_reads_a_qlorajob_manifest_and_its_resources(tmp_path):
    """examples/llama-70b.yaml as a user would pass it: spec read, resources.gpus/nodes the defaults.

    On 48 GiB GPUs: one does not fit (about 58 GiB with DDP); eight do (FSDP, auto).
    """
    import yaml

    manifest = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples/llama-70b.yaml").read_text())
    model = tmp_path / "model-config.json"
    model.write_text(json.dumps(LLAMA3_70B))

    def run(gpus: int, *args: str) -> subprocess.CompletedProcess:
        manifest["spec"].setdefault("resources", {})["gpus"] = gpus
        path = tmp_path / f"job-{gpus}.yaml"
        path.write_text(yaml.safe_dump(manifest))
        return subprocess.run(
            [sys.executable, "-m", "qlora_trainer.cli", "estimate", "--config", str(path), "--model-config", str(model),
             "--gpu-memory", "48", *args],
            capture_output=True, text=True, timeout=120,
        )

    one = run(1)
    assert one.returncode == 7, one.stdout + one.stderr
    assert "on 1 GPU" in one.stdout or "1 GPU(s)" in one.stdout, one.stdout
    eight = run(8)
    assert eight.returncode == 0, eight.stdout + eight.stderr
    assert "8 GPU(s)" in eight.stdout, eight.stdout
    assert run(1, "--gpus", "8").returncode == 0  # the flag overrides the manifest


@pytest.mark.parametrize(
    ("training", "gpu_gib", "expected"),
    [
        ({"microBatchSize": 4, "gradientAccumulationSteps": 4}, 80.0, (16, 1)),  # the guide's 4 x 4 -> 16 x 1
        ({"microBatchSize": 2, "gradientAccumulationSteps": 6}, 80.0, (12, 1)),
        ({"microBatchSize": 16, "gradientAccumulationSteps": 1}, 80.0, (16, 1)),  # nothing to merge
        ({"microBatchSize": 4, "gradientAccumulationSteps": 4, "autoMicroBatch": False}, 80.0, (4, 4)),
        ({"microBatchSize": 4, "gradientAccumulationSteps": 4, "maxSeqLength": 4096}, 12.0, (4, 4)),  # too small a GPU
        ({"microBatchSize": 1, "gradientAccumulationSteps": 4, "maxSeqLength": 4096}, 16.0, (2, 2)),  # 4 x 1: 14.3 GiB
    ],
)
def test_micro_batch_layout_keeps_the_effective_batch(training, gpu_gib, expected):
    """The largest micro-batch x k (k | accumulation) whose estimate fits 80 % of the GPU; same sequences per step."""
    from qlora_trainer.estimate import AUTO_MICRO_BATCH_SHARE, micro_batch_layout

    cfg = config(**training)
    layout = micro_batch_layout(MISTRAL_7B, cfg, gpu_gib=gpu_gib)
    got = (layout.micro_batch_size, layout.gradient_accumulation_steps)
    assert got == expected, layout.summary()
    assert got[0] * got[1] == cfg.training.micro_batch_size * cfg.training.gradient_accumulation_steps
    if got[0] > cfg.training.micro_batch_size:
        assert layout.estimate_gib <= AUTO_MICRO_BATCH_SHARE * gpu_gib
        bigger = estimate(MISTRAL_7B, cfg, gpu_gib=gpu_gib, micro_batch_size=got[0] * 2)
        assert got[1] == 1 or bigger.needed_gib > AUTO_MICRO_BATCH_SHARE * gpu_gib
    assert layout.summary()["given"] == f"{cfg.training.micro_batch_size}x{cfg.training.gradient_accumulation_steps}"


def test_micro_batch_layout_on_the_machine():
    """CPU or a model the estimate cannot read: the layout as given (the CPU trainer and unit tests see no change)."""
    from qlora_trainer.assemble import micro_batch_layout_for
    from qlora_trainer.model import Hardware

    cfg = config(microBatchSize=4, gradientAccumulationSteps=4)
    cpu = micro_batch_layout_for(cfg, MISTRAL_7B, Hardware("cpu", False, "cpu"))
    assert (cpu.micro_batch_size, cpu.gradient_accumulation_steps) == (4, 4) and "no CUDA" in cpu.reason
    gpu = micro_batch_layout_for(cfg, MISTRAL_7B, Hardware("cuda", True, "H100"), gpu_gib=80.0)
    assert (gpu.micro_batch_size, gpu.gradient_accumulation_steps) == (16, 1)
    odd = micro_batch_layout_for(cfg, {"model_type": "mystery"}, Hardware("cuda", True, "H100"), gpu_gib=80.0)
    assert (odd.micro_batch_size, odd.gradient_accumulation_steps) == (4, 4) and odd.reason.startswith("as given")


def test_run_layout_reads_config_json_and_logs_it(tmp_path, monkeypatch, capsys):
    """The trainer's layout: from the model's config.json and the GPU's total memory (rank 0), logged."""
    import torch

    from qlora_trainer import train
    from qlora_trainer.distributed import Dist
    from qlora_trainer.model import Hardware

    (tmp_path / "config.json").write_text(json.dumps(MISTRAL_7B))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (0, 80 * 2**30))
    cfg = config(microBatchSize=4, gradientAccumulationSteps=4)
    layout = train.run_layout(cfg, tmp_path, Hardware("cuda", True, "H100"), Dist.single(), "single")
    assert (layout.micro_batch_size, layout.gradient_accumulation_steps) == (16, 1)
    missing = train.run_layout(cfg, tmp_path / "none", Hardware("cuda", True, "H100"), Dist.single(), "single")
    assert (missing.micro_batch_size, missing.gradient_accumulation_steps) == (4, 4)
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    logged = [e for e in events if e["event"] == "micro_batch_layout"]
    assert [e["microBatchSize"] for e in logged] == [16, 4] and logged[1]["reason"].startswith("as given: config.json")
