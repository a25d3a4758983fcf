"""The fit check before any GPU is taken: ``qlora-train fitcheck``.

Runs in a small CPU-only pod (no GPU request) with the job's own credentials, before the
operator creates the GPU Job. It reads exactly one object, the model's ``config.json``
(``<spec.model.uri>/config.json``; never a weight), runs the memory estimate
(:func:`qlora_trainer.estimate.plan`, the same check the trainer's in-pod preflight makes,
at micro-batch 1) for ``nodes x gpus`` GPUs of ``gpu_gib`` GiB each, and reports the
decision in its termination message under ``fitCheck``::

    {"exitCode": 7, "reason": "InsufficientGPUMemory", "message": "training does not fit: ...",
     "fitCheck": {"fits": false, "parallelism": "single", "neededGiB": 41.3, "gpuGiB": 24.0,
                  "worldSize": 1, "read": ["s3://models/llama-70b/config.json"]}}

Exit codes: 0 fits (or the estimate does not cover the model: ``fits`` is null and the
GPU Job proceeds, where the trainer's own preflight checks again), 7 does not fit,
2 unusable config, 4 the config.json cannot be read.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from . import contract
from .config import ConfigError, TrainingConfig, load_config
from .errors import EXIT_DOES_NOT_FIT, EXIT_INVALID_CONFIG, EXIT_OK, EXIT_STORAGE
from .estimate import EstimateError, plan
from .report import write_termination_message
from .storage import join_uri

REASON_DOES_NOT_FIT = contract.INSUFFICIENT_GPU_MEMORY


def model_config_uri(cfg: TrainingConfig) -> str:
    """The one object the fit check reads: ``<spec.model.uri>/config.json``."""
    return join_uri(cfg.model.uri, "config.json")


def decide(model_config: dict[str, Any], cfg: TrainingConfig, *, world_size: int, gpu_gib: float) -> dict[str, Any]:
    """The fit decision for ``world_size`` GPUs of ``gpu_gib`` GiB (pure).

    Returns ``{"fits": bool | None, "parallelism", "neededGiB", "gpuGiB", "worldSize", "message"}``;
    ``fits`` is None (with ``message`` saying why) when the estimate does not cover the model
    (e.g. mixture-of-experts, missing fields). ``message``, when it does not fit, names the
    estimate, the GPU memory and what would fit (more GPUs with FSDP, a shorter
    ``training.maxSeqLength``, or larger GPUs), from :func:`qlora_trainer.estimate.does_not_fit_message`.
    """
    try:
        decision = plan(model_config, cfg, world_size=world_size, gpu_gib=gpu_gib)
    except EstimateError as err:
        return {"fits": None, "worldSize": world_size, "gpuGiB": gpu_gib, "message": f"not checked: {err}"}
    est = decision.estimate
    return {
        "fits": decision.fits,
        "parallelism": decision.parallelism,
        "neededGiB": round(max(est.peak_gib, est.load_peak_gib), 2),
        "gpuGiB": gpu_gib,
        "worldSize": world_size,
        "message": decision.message
        or f"fits: {est.needed_gib:.1f} GiB per GPU at micro-batch 1 with {decision.parallelism}",
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="qlora-train fitcheck",
        description="Read only the model's config.json and check the memory estimate against the requested GPUs "
        "(exit 0 fits, 7 does not fit, 2 bad config, 4 config.json unreadable); the result is the termination message.",
    )
    parser.add_argument("--config", required=True, type=Path, help="the trainer config the operator rendered")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs per node")
    parser.add_argument("--nodes", type=int, default=1, help="nodes")
    parser.add_argument("--gpu-memory", type=float, required=True, help="memory of one GPU in GiB")
    return parser.parse_args(argv)


def main(argv: list[str], storage_factory: Any = None) -> int:
    """``qlora-train fitcheck``: write the result as the termination message (and stdout); return the exit code."""
    t0 = time.monotonic()
    args = parse_args(argv)
    result: dict[str, Any]
    read: list[str] = []
    try:
        if args.gpus < 1 or args.nodes < 1 or args.gpu_memory <= 0:
            raise ConfigError("--gpus and --nodes must be at least 1 and --gpu-memory positive")
        cfg = load_config(args.config)
        uri = model_config_uri(cfg)
        if uri.startswith("hf://"):
            check = {"fits": None, "message": "not checked: hf:// models are checked by the trainer's preflight"}
        else:
            from .storage import Storage

            storage = (storage_factory or Storage)(cfg.storage)
            read.append(uri)
            try:
                model_config = json.loads(storage.read_bytes(uri))
            except Exception as err:  # noqa: BLE001 - any read or parse failure is reported with the URI
                result = {"exitCode": EXIT_STORAGE, "reason": contract.STORAGE_ERROR,
                          "message": f"{uri}: cannot read the model's config.json: {err}"}
                raise _Done(result) from None
            check = decide(model_config, cfg, world_size=args.gpus * args.nodes, gpu_gib=args.gpu_memory)
        check["read"] = read
        fits = check["fits"] is not False
        result = {
            "exitCode": EXIT_OK if fits else EXIT_DOES_NOT_FIT,
            "reason": contract.FITS if fits else REASON_DOES_NOT_FIT,
            "message": check.pop("message"),
            "fitCheck": check,
        }
    except ConfigError as err:
        result = {"exitCode": EXIT_INVALID_CONFIG, "reason": contract.INVALID_CONFIG, "message": str(err)}
    except _Done as done:
        result = done.result
    result.setdefault("fitCheck", {"fits": None, "read": read})
    result["fitCheck"]["seconds"] = round(time.monotonic() - t0, 3)
    print(write_termination_message(result), flush=True)
    return int(result["exitCode"])


class _Done(Exception):
    def __init__(self, result: dict[str, Any]) -> None:
        super().__init__(result.get("message"))
        self.result = result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
