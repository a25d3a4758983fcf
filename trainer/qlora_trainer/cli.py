"""``qlora-train --config FILE``: parse, build configs, load, train, save (like TRL's ``sft.py``).

Exit codes and the termination message follow DESIGN.md section 4 (see ``errors``):
0 success, 2 invalid config (the message on stderr, no traceback), 3 invalid data,
4 storage, 5 CUDA out of memory after back-offs, 6 non-finite loss, 143 preempted.
The last line on stdout is the result JSON that is also written as the termination
message (``QLORA_TERMINATION_MESSAGE_PATH``, default ``/dev/termination-log``).

Caches (Hugging Face, datasets, torch, triton) go under ``QLORA_CACHE_DIR`` (default:
a new temp dir), so the trainer runs with a read-only root filesystem and an
emptyDir for that directory. The hub is switched off unless the model is ``hf://``.

torch and transformers are imported only after the environment is set up, so a bad
config fails fast and ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from .config import ConfigError, TrainingConfig, load_config
from .errors import EXIT_CUDA_OOM, EXIT_INVALID_CONFIG, EXIT_OK, TrainerError
from .report import ProgressReporter, log_event, now_rfc3339, write_termination_message

log = logging.getLogger("qlora_trainer")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="qlora-train",
        description="QLoRA fine-tuning: a base model and data from S3 (or file://) in, a LoRA adapter out.",
    )
    parser.add_argument("--config", required=True, type=Path, help="trainer config, JSON or YAML (DESIGN.md section 3)")
    return parser.parse_args(argv)


def prepare_environment(cfg: TrainingConfig | None = None) -> Path:
    """Point every library cache at ``QLORA_CACHE_DIR`` (created; default a new temp dir) and return it."""
    root = os.environ.get("QLORA_CACHE_DIR")
    cache = Path(root) if root else Path(tempfile.mkdtemp(prefix="qlora-train-"))
    cache.mkdir(parents=True, exist_ok=True)
    for var, sub in (
        ("HF_HOME", "hf"),
        ("HF_DATASETS_CACHE", "hf/datasets"),
        ("TRITON_CACHE_DIR", "triton"),
        ("TORCHINDUCTOR_CACHE_DIR", "inductor"),
        ("MPLCONFIGDIR", "matplotlib"),
    ):
        os.environ.setdefault(var, str(cache / sub))
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "warning")
    # Progress bars are noise in pod logs: the JSON lines report progress.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if cfg is not None and not cfg.model.uri.startswith("hf://"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return cache


def check_writable(storage: Any, output_uri: str) -> None:
    """Fail fast (exit 4) when the output prefix cannot be written, before hours of training.

    Writes and deletes ``<output>/.qlora-write-check``.
    """
    from .storage import join_uri

    probe = join_uri(output_uri, ".qlora-write-check")
    storage.put_bytes(probe, b"ok")
    storage.delete(probe)


def run(cfg: TrainingConfig, reporter: ProgressReporter, cache: Path, result: dict[str, Any]) -> None:
    """The whole job; fills ``result`` (artifacts, metrics, resumedFromStep) as it goes."""
    from .artifacts import build_manifest, publish, save_adapter
    from .inputs import fetch_model, prepare_data
    from .model import Hardware, load_tokenizer
    from .storage import Storage, join_uri
    from .train import train

    started = now_rfc3339()
    hw = Hardware.detect()
    storage = Storage(cfg.storage)

    reporter.stage("Loading")
    check_writable(storage, cfg.output.uri)
    base = fetch_model(cfg.model, storage, cache / "inputs")
    tokenizer = load_tokenizer(base.path)
    data = prepare_data(cfg, storage, tokenizer, cache / "inputs")
    log_event("data", **data.summary())

    trained = train(cfg, base, tokenizer, data, storage, reporter, cache, hw)
    result["resumedFromStep"] = trained.resumed_from_step
    result["artifacts"]["lastCheckpointUri"] = trained.last_checkpoint_uri

    reporter.stage("Uploading")
    adapter_dir = save_adapter(trained.model, tokenizer, cache / "artifacts" / "adapter", base.uri)
    run_info = {
        "startedAt": started,
        "finishedAt": now_rfc3339(),
        "resumedFromStep": trained.resumed_from_step,
        "oomBackoffs": trained.backoffs,
        "hardware": {"device": hw.device, "name": hw.name},
        "job": {"name": os.environ.get("QLORA_JOB_NAME"), "namespace": os.environ.get("QLORA_JOB_NAMESPACE")},
    }
    manifest = build_manifest(
        kind="adapter",
        cfg=cfg,
        base_lineage=base.lineage,
        data_lineage=data.lineage,
        data_stats=data.stats,
        metrics=trained.metrics,
        run=run_info,
    )
    adapter = publish(storage, adapter_dir, join_uri(cfg.output.uri, "adapter"), manifest)
    result["artifacts"].update(adapterUri=adapter["uri"], manifestUri=adapter["manifestUri"])
    result["metrics"] = {
        k: trained.metrics.get(k)
        for k in ("evalLossBefore", "evalLossAfter", "trainLoss", "steps", "tokensPerSecond", "secondsPerStep")
    }
    log_event("adapter", uri=adapter["uri"], manifest=adapter["manifestUri"])

    if cfg.output.merge.enabled:
        from .merge import merge_and_publish

        trained.model = None  # free the 4-bit training model before loading the base again

        reporter.stage("Merging")
        merged = merge_and_publish(cfg, base, adapter_dir, tokenizer, storage, cache, manifest)
        result["artifacts"]["mergedUri"] = merged["uri"]
        log_event("merged", uri=merged["uri"])
    reporter.stage("Done", evalLoss=trained.metrics.get("evalLossAfter"))


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``qlora-train``; returns the process exit code."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    reporter = ProgressReporter.from_env()
    result: dict[str, Any] = {"exitCode": EXIT_OK, "reason": "Succeeded", "message": "", "artifacts": {}}
    t0 = time.monotonic()
    try:
        cfg = load_config(args.config)
        cache = prepare_environment(cfg)
        run(cfg, reporter, cache, result)
        result["message"] = f"adapter written to {result['artifacts'].get('adapterUri')}"
    except ConfigError as err:
        print(str(err), file=sys.stderr)
        result.update(exitCode=EXIT_INVALID_CONFIG, reason="InvalidConfig", message=str(err))
    except TrainerError as err:
        log_event("error", reason=err.reason, exitCode=err.exit_code, message=str(err))
        result.update(exitCode=err.exit_code, reason=err.reason, message=str(err))
    except Exception as err:  # noqa: BLE001 - turn anything else into a reported failure
        import torch

        if isinstance(err, torch.OutOfMemoryError):
            result.update(
                exitCode=EXIT_CUDA_OOM, reason="CudaOutOfMemory", message=f"CUDA out of memory outside training: {err}"
            )
        else:
            traceback.print_exc()
            result.update(exitCode=1, reason="Error", message=f"{type(err).__name__}: {err}")
    result["artifacts"] = {k: v for k, v in result["artifacts"].items() if v}
    result["durationSeconds"] = round(time.monotonic() - t0, 1)
    if result["exitCode"] != EXIT_OK:
        reporter.flush()
    text = write_termination_message(result)
    print(text, flush=True)
    return int(result["exitCode"])


if __name__ == "__main__":
    sys.exit(main())
