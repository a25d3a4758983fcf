"""Multi-GPU ``qlora-train`` (``qlora_trainer.distributed``): the launcher contract and real DDP runs on CPU.

Fast tests cover the operator's environment contract, the torchrun arguments, the rules
for the pod's exit code when ranks disagree and the DDP/FSDP training arguments.

The slow tests run the real console entry point with ``QLORA_NPROC_PER_NODE=2``: the
CLI launches two torchrun workers (gloo on CPU) on the embedded model with ``file://``
inputs, as ``test_trainer_resilience`` does for one process:

* DDP over 2 processes, micro-batch 1 x accumulation 2 per rank, against one process
  with micro-batch 1 x accumulation 4: the same effective batch (4) and, through the
  Trainer's seeded sampler and accelerate's batch sharding, the same 4 examples in every
  optimizer step (rank 0 gets batches 0 and 2, rank 1 batches 1 and 3). The eval batches
  are the same too (2 examples each), so even the eval loss, which transformers averages
  per batch and then per example, is comparable. LoRA dropout is 0. Tolerances: on this
  machine DDP and the single process agreed to 4 decimals on every logged loss, to
  2e-6 relative on the gradient norms and to 5e-7 on the eval loss, and two identical
  single-process runs were bitwise equal; CPU runs elsewhere have shown run-to-run
  differences in the third decimal of the step-1 gradient norm, so the bounds are 5e-3
  on losses and 1 % on gradient norms. The failure they guard against is large: without
  the DDP wrapping (evaluating before ``train()`` used to skip it) the step-1 gradient
  norm was 40 % off and the step-3 loss 2 %.
* Resume under DDP from a complete checkpoint (the newest one's marker removed).
* SIGTERM to the launcher: both ranks checkpoint the same step, exit 143.
* NaN loss: every rank stops at the same logged step with exit 6.

Each run loads the 4-bit model in each worker; about 30 s per run on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qlora_trainer.config import ConfigError
from qlora_trainer.distributed import LaunchSpec, final_result, reason_for, single_gpu_visible

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "hack") not in sys.path:
    sys.path.insert(0, str(REPO / "hack"))


# ----------------------------------------------------------------------------- contract (fast)


def test_launch_spec_defaults_to_one_process():
    spec = LaunchSpec.from_env({})
    assert (spec.nnodes, spec.nproc_per_node, spec.node_rank, spec.master_port, spec.world_size) == (1, 1, 0, 29500, 1)


def test_launch_spec_reads_the_operator_variables_and_renders_static_torchrun_args():
    env = {
        "QLORA_NNODES": "2",
        "QLORA_NPROC_PER_NODE": "4",
        "QLORA_NODE_RANK": "1",
        "QLORA_MASTER_ADDR": "job-0.job-svc",
        "QLORA_MASTER_PORT": "29400",
    }
    spec = LaunchSpec.from_env(env)
    assert spec.world_size == 8
    assert spec.torchrun_args(["--config", "/etc/qlora/config.json"]) == [
        "--nnodes=2",
        "--nproc-per-node=4",
        "--node-rank=1",
        "--master-addr=job-0.job-svc",
        "--master-port=29400",
        "--max-restarts=0",
        "--signals-to-handle=SIGINT,SIGHUP,SIGQUIT",
        "-m",
        "qlora_trainer.cli",
        "--config",
        "/etc/qlora/config.json",
    ]


@pytest.mark.parametrize(
    "env,message",
    [
        ({"QLORA_NPROC_PER_NODE": "two"}, "QLORA_NPROC_PER_NODE: must be an integer (got 'two')"),
        ({"QLORA_NPROC_PER_NODE": "0"}, "QLORA_NPROC_PER_NODE: must be in 1..64 (got 0)"),
        ({"QLORA_NNODES": "2", "QLORA_NODE_RANK": "2", "QLORA_MASTER_ADDR": "h"}, "QLORA_NODE_RANK: must be in 0..1"),
        ({"QLORA_NNODES": "2"}, "QLORA_MASTER_ADDR: required when QLORA_NNODES > 1"),
        ({"QLORA_MASTER_PORT": "70000"}, "QLORA_MASTER_PORT: must be in 1..65535"),
    ],
)
def test_launch_spec_errors_name_the_variable(env, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        LaunchSpec.from_env(env)


def test_bad_launch_environment_exits_2_naming_the_variable(tmp_path):
    term = tmp_path / "term"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QLORA_", "LOCAL_RANK"))}
    env.update(QLORA_NPROC_PER_NODE="x", QLORA_TERMINATION_MESSAGE_PATH=str(term))
    proc = subprocess.run(
        [sys.executable, "-m", "qlora_trainer.cli", "--config", str(tmp_path / "c.json")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2 and "QLORA_NPROC_PER_NODE" in proc.stderr
    assert json.loads(term.read_text())["reason"] == "InvalidConfig"


SPEC = LaunchSpec(nnodes=2, nproc_per_node=2, node_rank=0, master_addr="h")


def test_rank0_result_decides_even_when_another_rank_failed_later():
    rank0 = {"exitCode": 0, "reason": "Succeeded", "message": "adapter written", "artifacts": {"adapterUri": "s3://b/a/"}}
    assert final_result(SPEC, rank0, {1: (-15, 100.0)}) is rank0


def test_without_rank0_result_the_earliest_failure_decides_and_signals_map_to_128_plus_n():
    result = final_result(SPEC, None, {1: (5, 100.0), 0: (-9, 101.0), 3: (-15, 100.0)})
    assert (result["exitCode"], result["reason"]) == (5, "CudaOutOfMemory")
    assert "worker rank 1 exited 5 first" in result["message"] and "ranks [0, 3]" in result["message"]
    killed = final_result(SPEC, None, {2: (-9, 50.0)})
    assert (killed["exitCode"], killed["reason"]) == (137, "Killed")
    assert "killed by signal 9" in killed["message"]


def test_other_nodes_report_success_when_their_workers_finished():
    node1 = LaunchSpec(nnodes=2, nproc_per_node=2, node_rank=1, master_addr="h")
    result = final_result(node1, None, {})
    assert result["exitCode"] == 0 and "node 1" in result["message"]


@pytest.mark.parametrize(
    "code,reason",
    [(0, "Succeeded"), (2, "InvalidConfig"), (3, "InvalidData"), (4, "StorageError"), (5, "CudaOutOfMemory"),
     (6, "NonFiniteLoss"), (7, "InsufficientGPUMemory"), (143, "Preempted"), (137, "Killed"), (1, "TrainerError"), (9, "Error")],
)
def test_reasons_of_exit_codes(code, reason):
    assert reason_for(code) == reason


@pytest.mark.parametrize(
    "env,expected",
    [
        ({}, "0"),  # all GPUs of the machine visible: the first (no DataParallel, which SFTTrainer refuses)
        ({"CUDA_VISIBLE_DEVICES": "2,3"}, "2"),
        ({"CUDA_VISIBLE_DEVICES": "1"}, None),  # already one
        ({"CUDA_VISIBLE_DEVICES": ""}, None),  # none: left alone
        ({"QLORA_NPROC_PER_NODE": "2"}, None),  # the launcher: torchrun places the workers
        ({"LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "0,1"}, None),  # a torchrun worker
    ],
)
def test_a_one_process_run_sees_one_gpu(env, expected):
    assert single_gpu_visible(LaunchSpec.from_env(env), env) == expected


def test_bitsandbytes_optimizers_become_adamw_torch_under_fsdp_only():
    from qlora_trainer.model import optimizer_for

    assert optimizer_for("paged_adamw_8bit", "fsdp") == "adamw_torch"
    assert optimizer_for("adamw_8bit", "fsdp") == "adamw_torch"
    assert optimizer_for("adamw_torch_fused", "fsdp") == "adamw_torch_fused"
    assert optimizer_for("paged_adamw_8bit", "ddp") == "paged_adamw_8bit"
    assert optimizer_for("paged_adamw_8bit", "single") == "paged_adamw_8bit"


def test_ddp_and_fsdp_training_arguments():
    import torch
    from trl import SFTConfig

    from qlora_trainer.config import QuantizationConfig
    from qlora_trainer.model import bnb_config, parallel_settings

    assert parallel_settings("single", "cuda") == {}
    assert parallel_settings("ddp", "cpu") == {"ddp_backend": "gloo", "ddp_find_unused_parameters": False}
    fsdp = parallel_settings("fsdp", "cuda", ["LlamaDecoderLayer"])
    assert fsdp["ddp_backend"] == "nccl" and fsdp["fsdp"] is True
    assert fsdp["fsdp_config"] == {
        "version": 2,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
        "reshard_after_forward": True,
        "cpu_ram_efficient_loading": False,
        "state_dict_type": "FULL_STATE_DICT",
        "activation_checkpointing": False,
    }
    # What transformers 5.17 makes of them: accelerate's FSDP2 plugin arguments (ddp_backend left
    # out here: it needs a process group, which only a torchrun worker has).
    args = SFTConfig(
        output_dir="/tmp/qlora-test-fsdp-args",
        use_cpu=True,
        report_to="none",
        fsdp=fsdp["fsdp"],
        fsdp_config=fsdp["fsdp_config"],
    )
    plugin = args.fsdp_plugin_args
    assert plugin["fsdp_version"] == 2 and plugin["transformer_cls_names_to_wrap"] == "LlamaDecoderLayer"
    assert plugin["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and plugin["state_dict_type"] == "FULL_STATE_DICT"
    assert plugin["cpu_ram_efficient_loading"] is False and plugin["reshard_after_forward"] is True
    # FSDP-QLoRA stores the packed 4-bit weights in the compute dtype (a float FSDP can shard).
    assert bnb_config(QuantizationConfig(), torch.bfloat16, fsdp=True).bnb_4bit_quant_storage == torch.bfloat16
    assert bnb_config(QuantizationConfig(), torch.bfloat16).bnb_4bit_quant_storage == torch.uint8


# ----------------------------------------------------------------------------- real runs (slow)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from helpers import embedded_inputs

    return embedded_inputs(tmp_path_factory.mktemp("inputs"), 48, 4)


def config(inputs, out: Path, **training) -> dict:
    return {
        "model": {"uri": f"file://{inputs['model']}"},
        "dataset": {"uri": f"file://{inputs['train']}", "evalUri": f"file://{inputs['eval']}"},
        "lora": {"dropout": 0.0},
        "training": {
            "maxSteps": 4,
            "microBatchSize": 1,
            "gradientAccumulationSteps": 2,
            "maxSeqLength": 64,
            "learningRate": 5e-4,
            "gradientCheckpointing": False,
            "checkpointEverySteps": 2,
            "keepCheckpoints": 3,
            "evalEverySteps": 1000,
            "optimizer": "adamw_torch",
            **training,
        },
        "output": {"uri": f"file://{out}"},
    }


_PORT = [29650]


def launch_env(tmp_path: Path, name: str, nproc: int, **env: str) -> dict:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("QLORA_", "LOCAL_RANK", "RANK", "WORLD_SIZE"))}
    _PORT[0] += 1
    full.update(
        QLORA_CACHE_DIR=str(tmp_path / f"cache-{name}"),
        QLORA_TERMINATION_MESSAGE_PATH=str(tmp_path / f"{name}.term"),
        QLORA_NPROC_PER_NODE=str(nproc),
        QLORA_MASTER_PORT=str(_PORT[0]),
        **env,
    )
    return full


def train(tmp_path: Path, cfg: dict, name: str, nproc: int, **env: str):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    proc = subprocess.run(
        [sys.executable, "-m", "qlora_trainer.cli", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=900,
        env=launch_env(tmp_path, name, nproc, **env),
    )
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith('{"event"')]
    term = tmp_path / f"{name}.term"
    return proc, (json.loads(term.read_text()) if term.exists() else None), events


def steps(events: list[dict]) -> dict[int, dict]:
    return {e["step"]: e for e in events if e["event"] == "train_step"}


@pytest.fixture(scope="module")
def ddp_and_single(inputs, tmp_path_factory):
    """One DDP run (2 x micro-batch 1 x accumulation 2) and its single-process twin (micro-batch 1 x 4)."""
    tmp = tmp_path_factory.mktemp("ddp")
    t0 = time.monotonic()
    single = train(tmp, config(inputs, tmp / "out-single", gradientAccumulationSteps=4), "single", 1)
    t1 = time.monotonic()
    ddp = train(tmp, config(inputs, tmp / "out-ddp"), "ddp", 2)
    t2 = time.monotonic()
    return {"tmp": tmp, "single": single, "ddp": ddp, "seconds": (round(t1 - t0, 1), round(t2 - t1, 1))}


@pytest.mark.slow
def test_ddp_matches_a_single_process_with_the_same_effective_batch(ddp_and_single):
    (sproc, sres, sev), (dproc, dres, dev) = ddp_and_single["single"], ddp_and_single["ddp"]
    assert sproc.returncode == 0, sproc.stderr[-4000:]
    assert dproc.returncode == 0, dproc.stderr[-4000:]
    single, ddp = steps(sev), steps(dev)
    assert sorted(ddp) == sorted(single) == [1, 2, 3, 4]
    for step in single:
        assert abs(ddp[step]["loss"] - single[step]["loss"]) <= 5e-3, (step, ddp[step], single[step])
        assert ddp[step]["gradNorm"] == pytest.approx(single[step]["gradNorm"], rel=1e-2), step
    sm, dm = sres["metrics"], dres["metrics"]
    assert abs(dm["evalLossBefore"] - sm["evalLossBefore"]) <= 5e-3
    assert abs(dm["evalLossAfter"] - sm["evalLossAfter"]) <= 5e-3
    assert dm["evalLossAfter"] < dm["evalLossBefore"] - 0.1, "training moved the eval loss"
    manifest = json.loads((ddp_and_single["tmp"] / "out-ddp/run-1/adapter/manifest.json").read_text())
    m = manifest["metrics"]
    assert (m["worldSize"], m["parallelism"], m["effectiveBatchSize"]) == (2, "ddp", 4)
    assert manifest["run"]["distributed"] == {"worldSize": 2, "parallelism": "ddp"}


@pytest.mark.slow
def test_ddp_has_one_progress_stream_one_result_and_one_set_of_artifacts(ddp_and_single):
    proc, result, events = ddp_and_single["ddp"]
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Only global rank 0 logs progress: each step once.
    assert [e["step"] for e in events if e["event"] == "train_step"] == [1, 2, 3, 4]
    assert {e.get("rank") for e in events if e["event"] not in ("launch",)} == {0}
    assert sum(e["event"] == "adapter" for e in events) == 1
    # One result line on stdout (the launcher's) and one termination message, with rank 0's artifacts.
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and json.loads(lines[0]) == result
    assert result["exitCode"] == 0 and result["artifacts"]["adapterUri"].endswith("/out-ddp/run-1/adapter/")
    out = ddp_and_single["tmp"] / "out-ddp"
    assert (out / "run-1/adapter/_SUCCESS").exists() and (out / "run-1/adapter/adapter_model.safetensors").exists()
    assert sorted(p.name for p in (out / "run-1/checkpoints").iterdir()) == ["step-2", "step-4"]
    # The checkpoint carries both ranks' RNG states (rank 0 uploads after every rank wrote its part).
    assert {"rng_state_0.pth", "rng_state_1.pth", "_SUCCESS"} <= {p.name for p in (out / "run-1/checkpoints/step-4").iterdir()}


@pytest.mark.slow
def test_ddp_resumes_from_the_newest_complete_checkpoint(inputs, ddp_and_single):
    tmp = ddp_and_single["tmp"]
    first = ddp_and_single["ddp"][1]["metrics"]
    out = tmp / "out-resume"
    shutil.copytree(tmp / "out-ddp", out)
    (out / "run-1/checkpoints/step-4/_SUCCESS").unlink()  # as if the pod died while uploading step 4
    shutil.rmtree(out / "run-1/adapter")
    proc, result, events = train(tmp, config(inputs, out), "resume", 2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert result["resumedFromStep"] == 2
    assert [e["step"] for e in events if e["event"] == "resume"] == [2]
    assert [e["step"] for e in events if e["event"] == "train_step"] == [3, 4]
    assert not [e for e in events if e["event"] == "eval_before"], "eval-before comes from the checkpoint"
    assert result["metrics"]["evalLossBefore"] == first["evalLossBefore"]
    assert abs(result["metrics"]["evalLossAfter"] - first["evalLossAfter"]) < 1e-3
    assert (out / "run-1/checkpoints/step-4/_SUCCESS").exists() and (out / "run-1/adapter/_SUCCESS").exists()


@pytest.mark.slow
def test_ddp_non_finite_loss_stops_every_rank_with_exit_6(inputs, tmp_path):
    cfg = config(inputs, tmp_path / "out", maxSteps=6, nonFinitePatience=2)
    proc, result, events = train(tmp_path, cfg, "nan", 2, QLORA_TEST_NAN_FROM_STEP="1")
    assert proc.returncode == 6, proc.stderr[-4000:]
    assert result["reason"] == "NonFiniteLoss" and "2 consecutive logged steps" in result["message"]
    errors = [e for e in events if e["event"] == "error"]
    assert sorted(e["rank"] for e in errors) == [0, 1] and {e["exitCode"] for e in errors} == {6}
    assert not (tmp_path / "out/run-1/adapter").exists()


@pytest.mark.slow
def test_ddp_sigterm_checkpoints_the_same_step_on_every_rank_and_exits_143(inputs, tmp_path):
    cfg = config(inputs, tmp_path / "out", maxSteps=50, checkpointEverySteps=1000)
    path = tmp_path / "term.json"
    path.write_text(json.dumps(cfg))
    proc = subprocess.Popen(
        [sys.executable, "-m", "qlora_trainer.cli", "--config", str(path)],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=launch_env(tmp_path, "term", 2),
    )
    from helpers import signal_at_first_step

    code, seen = signal_at_first_step(proc, signal.SIGTERM)  # the launcher only
    assert code == 143, "".join(seen)[-4000:]
    result = json.loads((tmp_path / "term.term").read_text())
    assert result["reason"] == "Preempted"
    errors = [json.loads(x) for x in seen if x.startswith('{"event": "error"')]
    assert sorted(e["rank"] for e in errors) == [0, 1] and {e["exitCode"] for e in errors} == {143}
    # Both ranks stopped at the same step: one checkpoint, complete, with both RNG states.
    ckpts = list((tmp_path / "out/run-1/checkpoints").iterdir())
    assert len(ckpts) == 1 and (ckpts[0] / "_SUCCESS").exists()
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in ckpts[0].iterdir()}
    assert f"SIGTERM at step {ckpts[0].name.removeprefix('step-')}" in result["message"]


def test_fsdp_without_cuda_runs_ddp_and_says_so(tmp_path, capsys):
    # accelerate enables FSDP for accelerator devices only; on CPU it would silently run DDP
    # (measured: a 2-process CPU run with fsdp settings trained an unsharded DDP replica).
    from qlora_trainer.config import TrainingConfig
    from qlora_trainer.distributed import Dist
    from qlora_trainer.model import Hardware
    from qlora_trainer.train import _plan_on_rank0

    cfg = TrainingConfig.model_validate(
        {"model": {"uri": "file:///m"}, "dataset": {"uri": "file:///d.jsonl"}, "output": {"uri": f"file://{tmp_path}"},
         "training": {"parallelism": "fsdp"}}
    )
    chosen = _plan_on_rank0(cfg, tmp_path, Hardware("cpu", False, "cpu"), Dist(0, 0, 2), "fsdp", None)
    assert chosen == "ddp"
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert {"event": "parallelism", "requested": "fsdp", "using": "ddp"}.items() <= events[0].items()
