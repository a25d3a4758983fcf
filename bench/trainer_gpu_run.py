"""One run of the product's own ``qlora-train`` path on a 7B-shaped model (GPU measurement).

Not a benchmark against the reference (that is ``bench_qlora.py``): this runs the
real CLI (``python -m qlora_trainer.cli --config FILE``) end to end — data loading,
completion-only labels, NF4 + LoRA, SFTTrainer, eval before/after, adapter + manifest +
``_SUCCESS``, and the optional merge with its equivalence check — on the random-weight
Mistral-7B shape that ``bench_qlora.py --build-only`` saves, with ``file://`` URIs
(no S3 on the GPU machine). It prints a table of the logged steps (loss, tokens/s,
peak memory) and the final metrics, and copies the manifest(s) to ``--out``.

    python bench/trainer_gpu_run.py --model-dir /tmp/qlora-bench-models/mistral-7b-s42 \\
        --data .whl/data --steps 30 --merge --out $OUT/trainer7b
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def config(model_dir: Path, data: Path, output: Path, steps: int, merge: bool,
           training: dict | None = None) -> dict:
    """The trainer config of the run: the product's defaults except the length of the run.

    ``training``: fields merged over the ``training`` section (camelCase, as in a QLoRAJob).
    """
    doc = {
        "model": {"uri": f"file://{model_dir}"},
        "dataset": {
            "uri": f"file://{data / 'train.jsonl'}",
            "evalUri": f"file://{data / 'eval.jsonl'}",
            "format": "chat",
        },
        "lora": {"r": 16, "alpha": 32, "targetModules": ["all-linear"]},
        "training": {
            "maxSteps": steps,
            "microBatchSize": 4,
            "gradientAccumulationSteps": 4,
            "maxSeqLength": 512,
            "learningRate": 2e-4,
            "checkpointEverySteps": max(steps // 2, 1),
            "evalEverySteps": 10_000,
            "logEverySteps": 1,
        },
        "output": {"uri": f"file://{output}", "merge": {"enabled": merge}},
    }
    doc["training"].update(training or {})
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="directory with train.jsonl and eval.jsonl")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--merge", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/qlora-trainer-run"))
    parser.add_argument("--nproc", type=int, default=1,
                        help="GPUs (worker processes): QLORA_NPROC_PER_NODE, the operator's contract")
    parser.add_argument("--training", default="{}",
                        help="JSON merged over the config's training section, e.g. '{\"parallelism\": \"fsdp\"}'")
    parser.add_argument("--quiet", action="store_true", help="print only the summary line")
    args = parser.parse_args(argv)
    summary = run(args)
    print("summary:", json.dumps(summary))
    return summary["exit_code"]


def run(args: argparse.Namespace) -> dict:
    """Run the CLI once as ``args`` say; print its steps and events; return a summary dict.

    The summary: exit code, wall seconds, ``tokens_per_s`` (the median of the logged steps'
    ``tokensPerSecond`` after the first two: all ranks' real tokens), ``tokens_per_s_whole_run``
    (the adapter manifest's, over the whole training time), the last logged step's peak allocated /
    reserved GiB (rank 0's GPU, since the process started) and the losses of the logged steps.
    """
    training = json.loads(args.training)
    args.out.mkdir(parents=True, exist_ok=True)
    output = args.work / "output"
    shutil.rmtree(output, ignore_errors=True)  # a fresh run, not a resume from an earlier run's checkpoints
    cfg_path = args.work / "config.json"
    args.work.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(json.dumps(config(args.model_dir.resolve(), args.data.resolve(), output, args.steps, args.merge,
                                          training)))
    env = dict(os.environ, QLORA_CACHE_DIR=str(args.work / "cache"), QLORA_NPROC_PER_NODE=str(args.nproc),
               QLORA_TERMINATION_MESSAGE_PATH=str(args.work / "termination-log"),
               PYTHONPATH=os.pathsep.join([str(REPO / "trainer"), str(REPO / "operator"), os.environ.get("PYTHONPATH", "")]))
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "qlora_trainer.cli", "--config", str(cfg_path)],
                          env=env, capture_output=True, text=True)
    wall = time.time() - t0
    (args.out / "trainer.log").write_text(proc.stderr[-8_000_000:])
    events = []
    for line in proc.stderr.splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    steps = [e for e in events if e.get("event") == "train_step"]
    manifest_path = output / "adapter" / "manifest.json"
    metrics = json.loads(manifest_path.read_text()).get("metrics", {}) if manifest_path.exists() else {}
    steady = sorted(e["tokensPerSecond"] for e in steps[2:] if e.get("tokensPerSecond"))
    summary = {
        "exit_code": proc.returncode, "wall_s": round(wall, 1), "nproc": args.nproc,
        "training": training,
        # the median of the logged steps after the first two (one step each with logEverySteps 1)
        "tokens_per_s": steady[len(steady) // 2] if steady else None,
        "tokens_per_s_whole_run": metrics.get("tokensPerSecond"),
        "peak_alloc_gib": steps[-1].get("peakAllocatedGiB") if steps else None,
        "peak_reserved_gib": steps[-1].get("peakReservedGiB") if steps else None,
        "losses": [e.get("loss") for e in steps],
    }
    if args.quiet:
        return summary
    print(f"exit code {proc.returncode}, wall {wall:.0f} s")
    print("| step | loss | tokens/s | peak alloc GiB | peak reserved GiB |")
    print("|---:|---:|---:|---:|---:|")
    for e in steps:
        print(f"| {e['step']} | {e.get('loss')} | {e.get('tokensPerSecond')} | {e.get('peakAllocatedGiB')} | "
              f"{e.get('peakReservedGiB')} |")
    for e in events:
        if e.get("event") not in ("train_step",):
            print(json.dumps(e)[:600])
    for kind in ("adapter", "merged"):
        manifest = output / kind / "manifest.json"
        if manifest.exists():
            (args.out / f"{kind}-manifest.json").write_text(manifest.read_text())
            doc = json.loads(manifest.read_text())
            print(f"{kind} manifest metrics:", json.dumps(doc.get("metrics") or doc.get("merge"), indent=1)[:3000])
    term = args.work / "termination-log"
    if term.exists():
        print("termination message:", term.read_text()[:4000])
    return summary


if __name__ == "__main__":
    sys.exit(main())
