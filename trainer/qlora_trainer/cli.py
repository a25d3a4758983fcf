"""``qlora-train --config FILE``: parse, build configs, load, train, save (like TRL's ``sft.py``).

Exit codes and the termination message follow DESIGN.md section 4 (see ``errors``):
0 success, 2 invalid config (the message on stderr, no traceback), 3 invalid data,
4 storage, 5 CUDA out of memory after back-offs, 6 non-finite loss, 7 the memory
estimate says the GPUs are too small, 8 the merged model failed its equivalence check
(the adapter is published, the merged model is not), 143 preempted.
The last line on stdout is the result JSON that is also written as the termination
message (``QLORA_TERMINATION_MESSAGE_PATH``, default ``/dev/termination-log``).

Multi-GPU (``distributed``): with ``QLORA_NNODES`` x ``QLORA_NPROC_PER_NODE`` > 1 this
process becomes the launcher: it checks the config, then runs one worker per GPU with
``torch.distributed.run`` (the workers run this same module under torchrun), forwards
SIGTERM to them and exits with the code ``distributed.final_result`` picks; it alone
writes the termination message and the result line. Inside the workers only global
rank 0 reports progress, uploads and writes the result.

``qlora-train estimate --config FILE --model-config config.json --gpus N [--nodes M]
[--gpu-memory GIB]`` prints the per-GPU memory estimate (``estimate``) as a table and
exits 0 when the run fits, 7 when it does not, 2 for an unusable config.

``qlora-train fitcheck --config FILE --gpus N [--nodes M] --gpu-memory GIB`` reads only
``<model.uri>/config.json`` and reports the fit as its termination message
(``qlora_trainer.fitcheck``; the operator's CPU-only preflight pod runs it).

Caches (Hugging Face, datasets, torch, triton) go under ``QLORA_CACHE_DIR`` (default:
a new temp dir, shared by the workers of a multi-GPU pod), so the trainer runs with a
read-only root filesystem and an emptyDir for that directory. The hub is switched off
unless the model is ``hf://``.

torch and transformers are imported only after the environment is set up, so a bad
config fails fast and ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from .config import ConfigError, TrainingConfig, load_config
from .distributed import (
    Dist,
    LaunchSpec,
    classify,
    is_worker,
    needs_launch,
    single_gpu_visible,
    write_worker_result,
)
from . import contract
from .contract import EXIT_CUDA_OOM, EXIT_DOES_NOT_FIT, EXIT_INVALID_CONFIG, EXIT_OK
from .errors import (
    MergeCheckFailedError,
    OutputInUseError,
    TrainerError,
)
from .runs import RunIdentity, RunLayout
from .report import ProgressReporter, log_event, now_rfc3339, set_rank, write_termination_message

log = logging.getLogger("qlora_trainer")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="qlora-train",
        description="QLoRA fine-tuning: a base model and data from S3 (or file://) in, a LoRA adapter out.",
        epilog="qlora-train estimate --help: the per-GPU memory estimate of a config, without training.",
    )
    parser.add_argument("--config", required=True, type=Path, help="trainer config, JSON or YAML (DESIGN.md section 3)")
    return parser.parse_args(argv)


def parse_estimate_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="qlora-train estimate",
        description=(
            "Per-GPU memory estimate of a trainer config for a model (its Hugging Face config.json), "
            "at the config's micro-batch and at micro-batch 1 (what the trainer's preflight checks). "
            "Exit 0: fits; 7: does not fit; 2: unusable config."
        ),
    )
    parser.add_argument(
        "--config", required=True, type=Path,
        help="trainer config, or a QLoRAJob manifest (its spec; resources.gpus/nodes become the defaults), JSON or YAML",
    )
    parser.add_argument("--model-config", required=True, type=Path, help="the model's config.json")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs per node (default: the manifest's, else 1)")
    parser.add_argument("--nodes", type=int, default=None, help="nodes (default: the manifest's, else 1)")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    return parser.parse_args(argv)


def prepare_environment(cfg: TrainingConfig | None = None) -> Path:
    """Point every library cache at ``QLORA_CACHE_DIR`` (created; default a new temp dir) and return it."""
    root = os.environ.get(contract.ENV_CACHE_DIR)
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


def check_run_prefix_owner(storage: Any, layout: Any, identity: Any) -> None:
    """Refuse (exit 2, reason InvalidConfig) to write into ``<output>/run-<N>/`` when its published
    adapter belongs to another QLoRAJob (a deleted and re-created job, or two jobs sharing one
    ``spec.output.uri``): nothing there is overwritten or pruned. Jobs without a uid (standalone
    ``qlora-train``) are not checked.

    Raises:
        OutputInUseError: the adapter's manifest names another QLoRAJob uid.
        StorageError: the manifest could not be read.
    """
    from .artifacts import MANIFEST
    from .storage import join_uri

    if not identity.uid or not storage.is_complete(layout.adapter):
        return
    try:
        manifest = json.loads(storage.read_bytes(join_uri(layout.adapter, MANIFEST)))
    except ValueError:
        return
    job = ((manifest.get("run") or {}).get("job") or {}) if isinstance(manifest, dict) else {}
    if job.get("uid") and job["uid"] != identity.uid:
        raise OutputInUseError(
            f"spec.output.uri: {layout.root}/ already holds run {identity.run} of another QLoRAJob "
            f"({job.get('namespace')}/{job.get('name')}, uid {job['uid']}): nothing was written; give this job "
            "its own spec.output.uri (or move that prefix away)"
        )


def stage_inputs(cfg: TrainingConfig, storage: Any, cache: Path, dist: Dist) -> tuple[Any, Any, Any]:
    """Base model, tokenizer and encoded data; each node's local rank 0 fetches first, the others then
    find the files in the node's cache. A failure on any rank stops every rank (``Dist.agree``)."""
    from .inputs import fetch_model, prepare_data
    from .model import load_tokenizer

    def fetch() -> tuple[Any, Any, Any]:
        base = fetch_model(cfg.model, storage, cache / "inputs")
        tokenizer = load_tokenizer(base.path)
        return base, tokenizer, prepare_data(cfg, storage, tokenizer, cache / "inputs")

    staged, error = None, None
    for turn in (True, False):  # local rank 0 first, then the rest
        if dist.is_local_main == turn:
            try:
                staged = fetch()
            except Exception as err:  # noqa: BLE001 - shared with every rank by agree()
                error = err
        dist.agree(error)
    assert staged is not None
    return staged


def run(
    cfg: TrainingConfig, reporter: ProgressReporter, cache: Path, result: dict[str, Any], dist: Dist | None = None
) -> None:
    """The whole job; fills ``result`` (artifacts, metrics, resumedFromStep) as it goes.

    Every rank of a multi-GPU job runs it; only global rank 0 writes to storage.
    """
    from .artifacts import build_manifest, publish, save_adapter
    from .model import Hardware
    from .storage import Storage
    from .train import preflight, train

    dist = dist or Dist.single()
    started = now_rfc3339()
    hw = Hardware.detect()
    storage = Storage(cfg.storage)
    identity = RunIdentity.from_env()
    layout = RunLayout(cfg.output.uri, identity.run)

    reporter.stage(contract.STAGE_LOADING)
    error = None
    if dist.is_main:
        try:
            check_writable(storage, cfg.output.uri)
            check_run_prefix_owner(storage, layout, identity)
        except Exception as err:  # noqa: BLE001
            error = err
    dist.agree(error)
    base, tokenizer, data = stage_inputs(cfg, storage, cache, dist)
    log_event("data", **data.summary())
    if cfg.output.export:
        from .export import check_exportable

        check_exportable(cfg, base.path)  # exit 2 before training for an unsupported architecture
    parallelism = preflight(cfg, base.path, hw, dist)
    if hw.device == "cuda":
        log_event("cuda_allocator", PYTORCH_CUDA_ALLOC_CONF=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
                  setBy=os.environ.get(ALLOC_CONF_SET_BY, "environment"))
    if dist.active:
        log_event("distributed", worldSize=dist.world_size, parallelism=parallelism, backend=hw.device)

    trained = train(
        cfg, base, tokenizer, data, storage, reporter, cache, hw, dist=dist, parallelism=parallelism, identity=identity
    )
    result["resumedFromStep"] = trained.resumed_from_step
    result["artifacts"]["lastCheckpointUri"] = trained.last_checkpoint_uri
    if trained.tracking:
        result["artifacts"]["tracking"] = trained.tracking
    if not dist.is_main:
        return  # rank 0 saves and uploads; the others wait for its verdict (cli.train_main)

    reporter.stage(contract.STAGE_UPLOADING)
    adapter_dir = save_adapter(
        trained.model, tokenizer, cache / "artifacts" / "adapter", base.uri, state_dict=trained.adapter_state
    )
    run_info = {
        **identity.record(),
        "checkpoints": trained.resume,
        "startedAt": started,
        "finishedAt": now_rfc3339(),
        "resumedFromStep": trained.resumed_from_step,
        "oomBackoffs": trained.backoffs,
        "hardware": {"device": hw.device, "name": hw.name},
        "distributed": {"worldSize": dist.world_size, "parallelism": parallelism},
        "tracking": trained.tracking,
    }
    loss_png = _loss_plot(trained, adapter_dir, identity)
    manifest = build_manifest(
        kind="adapter",
        cfg=cfg,
        base_lineage=base.lineage,
        data_lineage=data.lineage,
        data_stats=data.stats,
        metrics=trained.metrics,
        run=run_info,
    )
    if cfg.output.export:
        from .export import planned

        manifest["exports"] = planned(cfg, layout.export)
    adapter = publish(storage, adapter_dir, layout.adapter, manifest)
    result["artifacts"].update(adapterUri=adapter["uri"], manifestUri=adapter["manifestUri"])
    if loss_png is not None:
        from .storage import join_uri

        result["artifacts"]["lossPlotUri"] = join_uri(adapter["uri"], loss_png.name)
    result["metrics"] = {
        k: trained.metrics.get(k)
        for k in ("evalLossBefore", "evalLossAfter", "trainLoss", "steps", "tokensPerSecond", "secondsPerStep")
    }
    log_event("adapter", uri=adapter["uri"], manifest=adapter["manifestUri"])
    if cfg.tracking.mlflow is not None:
        from .tracking import log_adapter

        log_adapter(cfg, trained.tracking, adapter_dir)  # the published adapter, as the MLflow run's artifacts

    if cfg.output.merge.enabled:
        from .merge import merge_and_publish

        trained.model = None  # free the 4-bit training model before loading the base again

        reporter.stage(contract.STAGE_MERGING)
        try:
            merged = merge_and_publish(
                cfg, base, adapter_dir, tokenizer, storage, cache, manifest,
                adapter_uri=adapter["uri"], merged_uri=layout.merged,
            )
        except MergeCheckFailedError as err:
            result["artifacts"]["mergeCheck"] = err.check
            raise
        result["artifacts"].update(mergedUri=merged["uri"], mergeCheck=merged["check"])
        log_event("merged", uri=merged["uri"])
        if cfg.output.export:
            result["artifacts"]["exports"] = _export(cfg, storage, cache, layout, adapter_dir, manifest, merged["uri"],
                                                     identity, reporter)
    reporter.stage(contract.STAGE_DONE, evalLoss=trained.metrics.get("evalLossAfter"))


def _loss_plot(trained: Any, adapter_dir: Path, identity: Any) -> Path | None:
    """``loss.png`` into the adapter directory (``plots``); a failure is logged, never fails the run."""
    try:
        from .plots import loss_plot

        title = f"{identity.namespace}/{identity.name} run {identity.run}" if identity.name else f"run {identity.run}"
        return loss_plot(trained.history, Path(adapter_dir) / contract.LOSS_PLOT, title=title)
    except Exception as err:  # noqa: BLE001 - a plot is never worth a failed run
        log_event("loss_plot_failed", error=f"{type(err).__name__}: {err}"[:500])
        return None


def _export(cfg: TrainingConfig, storage: Any, cache: Path, layout: Any, adapter_dir: Path,
            manifest: dict[str, Any], merged_uri: str, identity: Any, reporter: Any) -> list[dict[str, str]]:
    """``output.export`` from the merged model ``merge_and_publish`` left in ``<cache>/artifacts/merged``
    (downloaded from ``merged_uri`` when it is not there)."""
    from .export import export_all

    reporter.stage(contract.STAGE_UPLOADING)  # the exports are uploads of the merged model in other formats
    merged_dir = cache / "artifacts" / "merged"
    if not (merged_dir / "config.json").is_file():
        merged_dir = cache / "artifacts" / "merged-download"
        storage.download_prefix(merged_uri, merged_dir)
    exports = export_all(
        cfg, storage, merged_dir=merged_dir, adapter_dir=adapter_dir, work_dir=cache, export_root=layout.export,
        adapter_manifest=manifest, merged_uri=merged_uri, name=identity.name or "adapter",
    )
    for entry in exports:
        log_event("exported", **entry)
    return exports


def _record_failure(result: dict[str, Any], err: BaseException) -> None:
    """Fill ``result`` with the exit code, reason and message of ``err`` (logging it as it deserves)."""
    if isinstance(err, ConfigError):
        print(str(err), file=sys.stderr)
        result.update(exitCode=EXIT_INVALID_CONFIG, reason=contract.INVALID_CONFIG, message=str(err))
        return
    if isinstance(err, TrainerError):
        log_event("error", reason=err.reason, exitCode=err.exit_code, message=str(err))
        result.update(exitCode=err.exit_code, reason=err.reason, message=str(err))
        return
    import torch

    if isinstance(err, torch.OutOfMemoryError):
        result.update(
            exitCode=EXIT_CUDA_OOM, reason=contract.CUDA_OOM, message=f"CUDA out of memory outside training: {err}"
        )
    else:
        traceback.print_exc()
        code, reason, message = classify(err)
        result.update(exitCode=code, reason=reason, message=message)
    log_event("error", reason=result["reason"], exitCode=result["exitCode"], message=result["message"][:2000])


def _finish(result: dict[str, Any], t0: float) -> str:
    result["artifacts"] = {k: v for k, v in result.get("artifacts", {}).items() if v}
    result["durationSeconds"] = round(time.monotonic() - t0, 1)
    return json.dumps(result)


def train_main(args: argparse.Namespace) -> int:
    """One training process: a single-GPU run, or one torchrun worker of a multi-GPU run."""
    t0 = time.monotonic()
    result: dict[str, Any] = {"exitCode": EXIT_OK, "reason": contract.SUCCEEDED, "message": "", "artifacts": {}}
    dist = Dist.single()
    reporter = ProgressReporter(None, None)
    try:
        if is_worker():
            dist = Dist.init()
            set_rank(dist.rank)
            if not dist.is_main:
                os.environ["TRANSFORMERS_VERBOSITY"] = "error"
                logging.getLogger().setLevel(logging.WARNING)
        if dist.is_main:
            reporter = ProgressReporter.from_env()
        cfg = load_config(args.config)
        cache = prepare_environment(cfg)
        run(cfg, reporter, cache, result, dist)
        result["message"] = f"adapter written to {result['artifacts'].get('adapterUri')}"
    except Exception as err:  # noqa: BLE001 - turn anything else into a reported failure
        _record_failure(result, err)
    if dist.is_main:
        if result["exitCode"] != EXIT_OK:
            reporter.flush()
        _finish(result, t0)
        if not write_worker_result(result):
            print(write_termination_message(result), flush=True)
    code = dist.final_code(int(result["exitCode"]))
    if dist.active:
        # Every result is written and every rank knows the verdict: exit now, without tearing the
        # process groups down. With gloo on CPU a rank tearing down while its peer had already
        # closed the connection was seen aborting after a successful run ("terminate called
        # without an active exception", exit 134), which restarted the whole group
        # (tests/node/test_multinode.py::test_two_nodes_real_trainer, 1 run in 4 on the former stand-in node).
        # The OS closes the sockets; os._exit skips the C++ destructors where that abort happens.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def launch_main(spec: LaunchSpec, argv: list[str], args: argparse.Namespace) -> int:
    """The launcher of a multi-GPU pod: check the config, run the workers, report this pod's result."""
    from .distributed import launch

    t0 = time.monotonic()
    try:
        cfg = load_config(args.config)
    except ConfigError as err:
        print(str(err), file=sys.stderr)
        result = {"exitCode": EXIT_INVALID_CONFIG, "reason": contract.INVALID_CONFIG, "message": str(err), "artifacts": {}}
        _finish(result, t0)
        print(write_termination_message(result), flush=True)
        return EXIT_INVALID_CONFIG
    cache = prepare_environment(cfg)
    os.environ[contract.ENV_CACHE_DIR] = str(cache)  # one node-local cache for all workers of this pod
    log_event(
        "launch",
        nnodes=spec.nnodes,
        nprocPerNode=spec.nproc_per_node,
        nodeRank=spec.node_rank,
        masterAddr=spec.master_addr,
        masterPort=spec.master_port,
    )
    result = launch(spec, argv, cache / "launcher")
    result.setdefault("artifacts", {})
    _finish(result, t0)
    print(write_termination_message(result), flush=True)
    return int(result["exitCode"])


#: QLoRAJob spec fields that are not part of the trainer config (the operator's runtime fields).
_RUNTIME_FIELDS = ("resources", "image", "scheduling", "runPolicy")


def load_config_or_manifest(path: Path) -> tuple[TrainingConfig, dict[str, Any]]:
    """A trainer config file, or a QLoRAJob manifest: ``(config, spec.resources or {})``.

    From a manifest (``kind: QLoRAJob``) the trainer reads ``spec`` without the operator's
    runtime fields (:data:`_RUNTIME_FIELDS`, ``storage.credentialsSecretRef``).

    Raises:
        ConfigError: unreadable file or invalid fields (named as in ``spec``).
    """
    from .config import _yaml_loader, parse_config

    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.load(path.read_text(encoding="utf-8-sig"), Loader=_yaml_loader())  # noqa: S506 - SafeLoader
        except (OSError, yaml.YAMLError):
            data = None
        if isinstance(data, dict) and data.get("kind") == "QLoRAJob" and isinstance(data.get("spec"), dict):
            spec = {k: v for k, v in data["spec"].items() if k not in _RUNTIME_FIELDS}
            if isinstance(spec.get("storage"), dict):
                spec["storage"] = {k: v for k, v in spec["storage"].items() if k != "credentialsSecretRef"}
            return parse_config(spec, source=f"{path}: spec"), dict(data["spec"].get("resources") or {})
    return load_config(path), {}


def estimate_main(argv: list[str]) -> int:
    """``qlora-train estimate``: print the breakdown; exit 0 (fits), 7 (does not fit) or 2."""
    from .estimate import EstimateError, estimate, plan

    args = parse_estimate_args(argv)
    try:
        cfg, resources = load_config_or_manifest(args.config)
        args.gpus = args.gpus if args.gpus is not None else int(resources.get("gpus", 1))
        args.nodes = args.nodes if args.nodes is not None else int(resources.get("nodes", 1))
        try:
            model_config = json.loads(args.model_config.read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"{args.model_config}: cannot read the model's config.json: {err}") from None
        if args.gpus < 1 or args.nodes < 1 or args.gpu_memory <= 0:
            raise ConfigError("--gpus and --nodes must be at least 1 and --gpu-memory positive")
        world = args.gpus * args.nodes
        decision = plan(model_config, cfg, world_size=world, gpu_gib=args.gpu_memory)
        configured = estimate(
            model_config, cfg, world_size=world, gpu_gib=args.gpu_memory, parallelism=decision.parallelism
        )
    except (ConfigError, EstimateError) as err:
        print(str(err), file=sys.stderr)
        return EXIT_INVALID_CONFIG
    _print_estimate(configured, decision)
    return EXIT_OK if decision.fits else EXIT_DOES_NOT_FIT


def _print_estimate(configured: Any, decision: Any) -> None:
    at_one = decision.estimate
    title = (
        f"Per-GPU memory, GiB: {configured.parallelism} on {configured.world_size} GPU(s) of "
        f"{configured.gpu_gib:g} GiB, maxSeqLength {configured.max_seq_length}"
    )
    rows = [(r.name, r.gib, at_one_row.gib, r.detail) for r, at_one_row in zip(configured.rows, at_one.rows)]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich comes with typer
        print(title)
        for name, gib, one, detail in rows:
            print(f"  {name:32s} {gib:8.2f} {one:8.2f}  {detail}")
        print(f"  {'total':32s} {configured.needed_gib:8.2f} {at_one.needed_gib:8.2f}")
    else:
        table = Table(title=title)
        table.add_column("component")
        table.add_column(f"micro-batch {configured.micro_batch_size}", justify="right")
        table.add_column("micro-batch 1", justify="right")
        table.add_column("what")
        for name, gib, one, detail in rows:
            table.add_row(name, f"{gib:.2f}", f"{one:.2f}", detail)
        table.add_row("total", f"{configured.peak_gib:.2f}", f"{at_one.peak_gib:.2f}", "training peak per GPU", end_section=True)
        if at_one.load_peak_gib:
            table.add_row("load peak", f"{configured.load_peak_gib:.2f}", f"{at_one.load_peak_gib:.2f}",
                          "whole 4-bit model and its shard, while sharding")
        Console(width=140).print(table)
    for note in configured.notes:  # at the configured micro-batch (host memory for offloading grows with it)
        print(f"note: {note}")
    if decision.fits:
        more = "" if configured.fits else (
            f" (at micro-batch {configured.micro_batch_size}: {configured.needed_gib:.1f} GiB, more than the GPU: "
            "the single-GPU trainer backs the micro-batch off)"
        )
        when = "while loading and sharding" if at_one.load_peak_gib > at_one.peak_gib else "at micro-batch 1"
        print(f"fits: {at_one.needed_gib:.1f} GiB per GPU {when} with {decision.parallelism}{more}")
    else:
        print(decision.message)


#: Set (to ``qlora-train``) when :func:`main` chose ``PYTORCH_CUDA_ALLOC_CONF`` (log line ``cuda_allocator``).
ALLOC_CONF_SET_BY = "QLORA_ALLOC_CONF_SET_BY"


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``qlora-train``; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["estimate"]:
        return estimate_main(argv[1:])
    if argv[:1] == ["fitcheck"]:
        from .fitcheck import main as fitcheck_main

        return fitcheck_main(argv[1:])
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        spec = LaunchSpec.from_env()
    except ConfigError as err:
        print(str(err), file=sys.stderr)
        result = {"exitCode": EXIT_INVALID_CONFIG, "reason": contract.INVALID_CONFIG, "message": str(err), "artifacts": {}}
        print(write_termination_message(result), flush=True)
        return EXIT_INVALID_CONFIG
    from .speed import allocator_env

    if allocator_env(os.environ):  # before any CUDA allocation, here and in the workers a launch starts
        os.environ[ALLOC_CONF_SET_BY] = "qlora-train"
    if needs_launch(spec):
        return launch_main(spec, argv, args)
    one_gpu = single_gpu_visible(spec)
    if one_gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = one_gpu
    return train_main(args)


if __name__ == "__main__":
    sys.exit(main())
