"""Resilience paths of ``qlora-train`` on CPU with ``file://`` storage (tiny runs, seconds per step).

* CUDA OOM back-off (test hook ``QLORA_TEST_OOM_AT_MICRO_BATCH``): the micro-batch is
  halved, accumulation doubled (same effective batch) and the run finishes; the merged
  model (``output.merge``) matches base+adapter.
* Non-finite loss (test hook ``QLORA_TEST_NAN_FROM_STEP``): exit 6, no adapter.
* A planted wrong merge (test hook ``QLORA_TEST_MERGE_ADAPTER_SCALE=2``: the adapter folded
  in at twice its scale): exit 8 ``MergeCheckFailed``, the adapter published, no merged model.
* Resume: a checkpoint without its marker is ignored; the run resumes from the newest
  complete one and ends where an uninterrupted run with the same seed ends.
* SIGTERM (preemption, eviction): a checkpoint is written at the end of the current
  step, with its marker, and the process exits 143 (reason ``Preempted``).

Each test runs the real console entry point in a subprocess. Marked ``slow``: each
trainer run loads the 4-bit model (about 15 s) and trains a few 64-token steps.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "hack") not in sys.path:
    sys.path.insert(0, str(REPO / "hack"))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from helpers import embedded_inputs

    return embedded_inputs(tmp_path_factory.mktemp("inputs"), 48, 4)


def config(inputs, out: Path, **training) -> dict:
    return {
        "model": {"uri": f"file://{inputs['model']}"},
        "dataset": {"uri": f"file://{inputs['train']}", "evalUri": f"file://{inputs['eval']}"},
        "training": {
            "maxSteps": 2,
            "microBatchSize": 2,
            "gradientAccumulationSteps": 1,
            "maxSeqLength": 64,
            "learningRate": 5e-4,
            "gradientCheckpointing": False,
            "checkpointEverySteps": 1,
            "evalEverySteps": 1000,
            "optimizer": "adamw_torch",
            **training,
        },
        "output": {"uri": f"file://{out}"},
    }


def train(tmp_path: Path, cfg: dict, name: str, **env: str) -> tuple[subprocess.CompletedProcess, dict, list[dict]]:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    term = tmp_path / f"{name}.term"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("QLORA_JOB_", "QLORA_TEST_"))}
    full_env.update(QLORA_CACHE_DIR=str(tmp_path / f"cache-{name}"), QLORA_TERMINATION_MESSAGE_PATH=str(term), **env)
    proc = subprocess.run(
        [sys.executable, "-m", "qlora_trainer.cli", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=900,
        env=full_env,
    )
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith('{"event"')]
    return proc, json.loads(term.read_text()), events


def test_oom_backoff_keeps_the_effective_batch_and_finishes_then_merges(inputs, tmp_path):
    cfg = config(inputs, tmp_path / "out")
    cfg["output"]["merge"] = {"enabled": True, "dtype": "float32"}
    proc, result, events = train(tmp_path, cfg, "oom", QLORA_TEST_OOM_AT_MICRO_BATCH="1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    backoffs = [e for e in events if e["event"] == "oom_backoff"]
    assert [(e["previousMicroBatch"], e["microBatch"], e["gradientAccumulationSteps"]) for e in backoffs] == [(2, 1, 2)]
    manifest = json.loads((tmp_path / "out/run-1/adapter/manifest.json").read_text())
    assert manifest["run"]["oomBackoffs"] == [
        {"atStep": 0, "fromMicroBatch": 2, "toMicroBatch": 1, "gradientAccumulationSteps": 2}
    ]
    metrics = manifest["metrics"]
    assert (metrics["microBatchSize"], metrics["gradientAccumulationSteps"], metrics["effectiveBatchSize"]) == (1, 2, 2)
    assert metrics["steps"] == 2
    # merged copy: full precision, marker last, equivalent to base+adapter
    merged = tmp_path / "out/run-1/merged"
    assert (merged / "_SUCCESS").exists() and (merged / "model.safetensors").exists()
    check = json.loads((merged / "manifest.json").read_text())["merge"]["check"]
    assert check["greedyAgree"] and check["maxAbsLogitDiff"] < 1e-3  # float32: only summation order differs
    assert result["artifacts"]["mergedUri"] == f"file://{tmp_path}/out/run-1/merged/"
    summary = result["artifacts"]["mergeCheck"]
    assert summary["passed"] is True and summary["dtype"] == "float32" and summary["onto"] == "nf4-dequantised"
    assert summary["greedyTokensAgree"] == summary["greedyTokens"] == 80 and summary["top1Agreement"] == 1.0


def test_a_planted_wrong_merge_exits_8_keeping_the_adapter_and_publishing_no_merged_model(inputs, tmp_path):
    cfg = config(inputs, tmp_path / "out")
    cfg["output"]["merge"] = {"enabled": True, "dtype": "float32"}
    proc, result, events = train(tmp_path, cfg, "planted", QLORA_TEST_MERGE_ADAPTER_SCALE="2")
    assert proc.returncode == 8, proc.stderr[-4000:]
    assert result["reason"] == "MergeCheckFailed"
    assert "answers differently from base + adapter" in result["message"]
    assert "the adapter is published, the merged model is not" in result["message"]
    check = result["artifacts"]["mergeCheck"]
    assert check["passed"] is False and check["maxAbsLogitDiff"] > check["tolerance"] == 1e-3
    assert "mergedUri" not in result["artifacts"]
    assert result["artifacts"]["adapterUri"] == f"file://{tmp_path}/out/run-1/adapter/"
    assert (tmp_path / "out/run-1/adapter/_SUCCESS").exists()
    assert not (tmp_path / "out/run-1/merged").exists()
    assert [e["passed"] for e in events if e["event"] == "merge_check"] == [False]


def test_oom_at_micro_batch_one_exits_5_naming_what_was_tried(inputs, tmp_path):
    proc, result, _ = train(
        tmp_path, config(inputs, tmp_path / "out", microBatchSize=2), "oom1", QLORA_TEST_OOM_AT_MICRO_BATCH="0"
    )
    assert proc.returncode == 5, proc.stderr[-4000:]
    assert result["reason"] == "CudaOutOfMemory" and "micro-batch tried (2, 1" in result["message"]
    assert not (tmp_path / "out/run-1/adapter").exists()


def test_non_finite_loss_exits_6_without_an_adapter(inputs, tmp_path):
    cfg = config(inputs, tmp_path / "out", maxSteps=6, nonFinitePatience=2)
    proc, result, events = train(tmp_path, cfg, "nan", QLORA_TEST_NAN_FROM_STEP="1")
    assert proc.returncode == 6, proc.stderr[-4000:]
    assert result["reason"] == "NonFiniteLoss" and "2 consecutive logged steps" in result["message"]
    assert [e["streak"] for e in events if e["event"] == "non_finite"] == [1, 2]
    assert not (tmp_path / "out/run-1/adapter").exists()
    assert "adapterUri" not in result.get("artifacts", {})


def test_resume_ignores_an_incomplete_checkpoint_and_matches_an_uninterrupted_run(inputs, tmp_path):
    cfg = config(inputs, tmp_path / "out", maxSteps=4, checkpointEverySteps=2, keepCheckpoints=3)
    proc, full, events = train(tmp_path, cfg, "full")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert full.get("resumedFromStep") is None
    # As if the pod died while uploading step-4: its files are there, its marker is not.
    ckpts = tmp_path / "out/run-1/checkpoints"
    (ckpts / "step-4" / "_SUCCESS").unlink()
    shutil.rmtree(tmp_path / "out/run-1/adapter")
    proc, resumed, events = train(tmp_path, cfg, "resumed")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert resumed["resumedFromStep"] == 2
    assert [e["step"] for e in events if e["event"] == "train_step"] == [3, 4]
    assert not [e for e in events if e["event"] == "eval_before"], "eval-before comes from the checkpoint"
    first = json.loads((tmp_path / "full.term").read_text())["metrics"]
    second = resumed["metrics"]
    assert second["evalLossBefore"] == first["evalLossBefore"]
    # Same seed, data order, optimizer/scheduler/RNG state: only float summation order may differ.
    assert abs(second["evalLossAfter"] - first["evalLossAfter"]) < 1e-3, (first, second)
    assert (ckpts / "step-4" / "_SUCCESS").exists()


def test_sigterm_checkpoints_the_current_step_and_exits_143(inputs, tmp_path):
    cfg = config(inputs, tmp_path / "out", maxSteps=50, checkpointEverySteps=1000)
    path = tmp_path / "term.json"
    path.write_text(json.dumps(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QLORA_JOB_", "QLORA_TEST_"))}
    env.update(QLORA_CACHE_DIR=str(tmp_path / "cache"), QLORA_TERMINATION_MESSAGE_PATH=str(tmp_path / "term"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "qlora_trainer.cli", "--config", str(path)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    from helpers import signal_at_first_step

    code, seen = signal_at_first_step(proc, signal.SIGTERM)
    assert code == 143, "".join(seen)[-4000:]
    result = json.loads((tmp_path / "term").read_text())
    assert result["reason"] == "Preempted"
    steps = [c.name for c in (tmp_path / "out/run-1/checkpoints").iterdir()]
    assert len(steps) == 1 and (tmp_path / "out/run-1/checkpoints" / steps[0] / "_SUCCESS").exists()
    assert int(steps[0].removeprefix("step-")) < 50
    assert not (tmp_path / "out/run-1/adapter").exists()
