#!/usr/bin/env python
"""Multi-GPU scaling of the product's ``qlora-train`` (issue 10): 1 GPU against N GPUs, DDP and FSDP-QLoRA.

Runs the real CLI (:mod:`bench.trainer_gpu_run`: model and data from ``file://`` URIs, the
launcher started from ``QLORA_NPROC_PER_NODE`` exactly as in a trainer pod) once per layout,
with the same per-GPU micro-batch and accumulation, so N GPUs train N times the tokens per
optimizer step, and prints a table: GPUs, parallelism, real tokens/s (all ranks; the median of
the logged steps after the first two, no checkpoints in between), scaling
efficiency = tokens/s on N GPUs / (N x tokens/s on 1 GPU), peak allocated / reserved GPU
memory of rank 0, exit code.

    python bench/scaling.py --model-dir /tmp/qlora-bench-models/mistral-7b-s42 --data .whl/data \\
        --gpus 2 --steps 12 --training '{"microBatchSize": 16, "gradientAccumulationSteps": 1}'
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import trainer_gpu_run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--gpus", type=int, default=2, help="N: GPUs of the multi-GPU runs")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--training", default="{}", help="JSON merged over every run's training section")
    parser.add_argument("--layouts", default="single,ddp,fsdp",
                        help="comma-separated: single (1 GPU), ddp and fsdp (N GPUs each)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/qlora-scaling"))
    args = parser.parse_args(argv)
    common = json.loads(args.training)
    rows = []
    for layout in [x.strip() for x in args.layouts.split(",") if x.strip()]:
        nproc = 1 if layout == "single" else args.gpus
        training = {"checkpointEverySteps": 10_000, **common, "parallelism": "auto" if layout == "single" else layout}
        run_args = argparse.Namespace(
            model_dir=args.model_dir, data=args.data, steps=args.steps, merge=False, out=args.out / layout,
            work=args.work / layout, nproc=nproc, training=json.dumps(training), quiet=True,
        )
        summary = trainer_gpu_run.run(run_args)
        summary["layout"] = layout
        rows.append(summary)
        print(f"{layout}: {json.dumps(summary)}", flush=True)
    base = next((r["tokens_per_s"] for r in rows if r["layout"] == "single" and r["tokens_per_s"]), None)
    print("\n| GPUs | parallelism | tokens/s | scaling efficiency | peak alloc GiB (rank 0) | peak reserved GiB | exit |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        tps = r["tokens_per_s"]
        eff = f"{tps / (r['nproc'] * base):.1%}" if (tps and base) else "-"
        print(f"| {r['nproc']} | {r['layout']} | {tps if tps is not None else '-'} | {eff} | "
              f"{r['peak_alloc_gib']} | {r['peak_reserved_gib']} | {r['exit_code']} |")
    (args.out / "scaling.json").write_text(json.dumps(rows, indent=1))
    return max(r["exit_code"] for r in rows)


if __name__ == "__main__":
    sys.exit(main())
