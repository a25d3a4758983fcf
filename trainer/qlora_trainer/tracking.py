"""Experiment tracking (``tracking``) through transformers' own integrations.

transformers' ``MLflowCallback`` and ``TensorBoardCallback`` do the logging (``report_to``);
this module only sets their environment and keeps the MLflow run across attempts:

- ``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_NAME``, ``MLFLOW_TAGS`` (JSON: the spec's tags plus
  ``qlora.job``, ``qlora.namespace``, ``qlora.run``) from ``tracking.mlflow`` (and, for a ``file:///``
  store, ``MLFLOW_ALLOW_FILE_STORE=true``: MLflow 3 refuses its file store without it); credentials
  (``MLFLOW_TRACKING_USERNAME``/``PASSWORD``/``TOKEN``) are already in the environment (the pod's Secret).
- The run id is recorded in ``<output>/run-<N>/tracking/mlflow.json`` at train begin; a later
  attempt of the same run N sets ``MLFLOW_RUN_ID`` from it, so ``mlflow.start_run`` continues that run
  (a record of another tracking server is ignored: that run does not exist on this one).
- The published adapter directory is logged as the run's artifacts under ``adapter/``
  (:func:`log_adapter`; a failure is logged and never fails the job).
- ``TENSORBOARD_LOGGING_DIR`` is a local directory whose event files are uploaded to
  ``<output>/run-<N>/tensorboard/`` at every checkpoint (:class:`SyncTensorboard`, no marker) and
  after training (:func:`upload_tensorboard`, with ``_SUCCESS``). Each attempt writes its own
  event file (transformers names it by time, host and pid), so a killed attempt's curve up to its
  last checkpoint stays beside the resumed attempt's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from . import contract
from .config import TrainingConfig
from .storage import join_uri

#: The run-id record under ``<output>/run-<N>/``.
RECORD = "tracking/mlflow.json"
#: TensorBoard event files under ``<output>/run-<N>/``.
TENSORBOARD_DIR = contract.TENSORBOARD_DIR


def record_uri(run_root: str) -> str:
    """``<run_root>/tracking/mlflow.json``."""
    return join_uri(run_root, RECORD)


def run_uri(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The MLflow UI link ``<trackingUri>/#/experiments/<id>/runs/<runId>`` (``None`` for file:// stores)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def read_record(storage: Any, run_root: str) -> dict[str, Any] | None:
    """The run-id record ``{"runId", "experimentId", "trackingUri"}`` of ``run_root``; ``None`` when
    there is none or it is not a JSON object (a torn write: the attempt then starts a new run).

    Raises ``StorageError`` when storage cannot be read.
    """
    uri = record_uri(run_root)
    if not storage.exists(uri):
        return None
    try:
        record = json.loads(storage.read_bytes(uri))
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def prepare(cfg: TrainingConfig, storage: Any, run_root: str, work_dir: Path, identity: Any) -> dict[str, Any]:
    """Set the integrations' environment for ``cfg.tracking``; returns what is known so far.

    Returns ``{"mlflowRunId": <id of an earlier attempt>}`` when an earlier attempt of this run
    recorded a run on the same tracking server, else ``{}``.
    Raises ``StorageError`` when the run-id record cannot be read.
    """
    out: dict[str, Any] = {}
    mlflow = cfg.tracking.mlflow
    if mlflow is not None:
        os.environ["MLFLOW_TRACKING_URI"] = mlflow.tracking_uri
        if mlflow.tracking_uri.startswith("file:"):
            # MLflow 3 refuses its file store ("maintenance mode") unless this opts in; a file:/// trackingUri
            # is a local mlruns directory by the API's own rule (TRACKING_URI_PATTERN).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        if mlflow.experiment_name:
            os.environ["MLFLOW_EXPERIMENT_NAME"] = mlflow.experiment_name
        else:
            os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)
        tags = {"qlora.run": str(identity.run), **({"qlora.job": identity.name} if identity.name else {}),
                **({"qlora.namespace": identity.namespace} if identity.namespace else {}), **mlflow.tags}
        os.environ["MLFLOW_TAGS"] = json.dumps(tags)
        os.environ.pop("MLFLOW_RUN_ID", None)
        previous = read_record(storage, run_root)
        if previous and previous.get("trackingUri") == mlflow.tracking_uri:
            if previous.get("runId"):
                os.environ["MLFLOW_RUN_ID"] = str(previous["runId"])
                out["mlflowRunId"] = str(previous["runId"])
    if cfg.tracking.tensorboard.enabled:
        logdir = Path(work_dir) / "tensorboard"
        logdir.mkdir(parents=True, exist_ok=True)
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(logdir)
    return out


#: Prefix of the params :func:`config_params` adds to the run (transformers logs its TrainingArguments unprefixed).
PARAM_PREFIX = "qlora."
#: MLflow's limits: characters of a param value, params per ``log_params`` batch.
MAX_PARAM_VALUE, PARAMS_PER_BATCH = 6000, 100


def config_params(cfg: TrainingConfig) -> dict[str, str]:
    """The trainer config as flat MLflow params: ``{"qlora.lora.r": "16", "qlora.lora.alpha": "32.0",
    "qlora.quantization.quantType": "nf4", "qlora.lora.targetModules": '["all-linear"]', ...}``.

    transformers' ``MLflowCallback`` logs ``TrainingArguments`` and the base model's config, but
    nothing of LoRA or quantization; these fill that gap. Keys are the camelCase config paths;
    lists and objects are JSON, ``None`` is left out, as is ``tracking`` and any value longer than
    MLflow's :data:`MAX_PARAM_VALUE` characters. A run's config is fixed (a changed spec is a new
    run), so a resumed attempt logs the same values again, which MLflow accepts.
    """
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}", item)
        elif value is not None:
            text = value if isinstance(value, str) else json.dumps(value)
            if len(text) <= MAX_PARAM_VALUE:
                out[prefix] = text

    for key, value in cfg.model_dump(by_alias=True, mode="json", exclude={"tracking"}).items():
        walk(PARAM_PREFIX + key, value)
    return out


class RecordMlflowRun(TrainerCallback):
    """After ``MLflowCallback`` started (or resumed) its run at train begin, record the run id
    and log :func:`config_params`.

    Must come after the integration callbacks (the Trainer adds ``report_to`` callbacks before
    the ones it is given). Writes :func:`record_uri` on global rank 0 and fills ``info``
    (``mlflowRunId``, ``mlflowExperimentId``, ``mlflowRunUri``) for the termination message.
    A failure to log the params is a ``tracking_failed`` event; a failure to write the record
    raises ``StorageError`` (the next attempt could not continue the run).
    """

    def __init__(self, cfg: TrainingConfig, storage: Any, run_root: str, info: dict[str, Any], is_main: bool) -> None:
        self.cfg, self.storage, self.run_root, self.info, self.is_main = cfg, storage, run_root, info, is_main

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.is_main or self.cfg.tracking.mlflow is None:
            return
        import mlflow

        run = mlflow.active_run()
        if run is None:
            return
        run_id, exp_id = run.info.run_id, run.info.experiment_id
        # MLflowCallback ends the run at train end; later logs (the eval after training) start a run
        # through mlflow's fluent API, which continues MLFLOW_RUN_ID instead of opening a second one.
        os.environ["MLFLOW_RUN_ID"] = run_id
        self.info.update(mlflowRunId=run_id, mlflowExperimentId=exp_id)
        link = run_uri(self.cfg.tracking.mlflow.tracking_uri, exp_id, run_id)
        if link:
            self.info["mlflowRunUri"] = link
        record = {"runId": run_id, "experimentId": exp_id, "trackingUri": self.cfg.tracking.mlflow.tracking_uri}
        self.storage.put_bytes(record_uri(self.run_root), json.dumps(record).encode(), "application/json")
        params = list(config_params(self.cfg).items())
        try:
            for i in range(0, len(params), PARAMS_PER_BATCH):
                mlflow.log_params(dict(params[i : i + PARAMS_PER_BATCH]))
        except Exception as err:  # noqa: BLE001 - params are worth an event, not a failed run
            from .report import log_event

            log_event("tracking_failed", what="log config params", error=f"{type(err).__name__}: {err}"[:500])


class SyncTensorboard(TrainerCallback):
    """On global rank 0, after each checkpoint save: flush the Trainer's TensorBoard writers and
    upload the event files that changed since the last upload to ``<run_root>/tensorboard/``.

    No ``_SUCCESS`` marker (:func:`upload_tensorboard` writes it when training ends). Set
    ``trainer`` after the Trainer is built (its ``TensorBoardCallback`` holds the writer, which
    otherwise flushes every 120 s). A failed upload is a ``tracking_failed`` event, not a failed run.
    """

    def __init__(self, cfg: TrainingConfig, storage: Any, run_root: str, is_main: bool) -> None:
        self.cfg, self.storage, self.run_root, self.is_main = cfg, storage, run_root, is_main
        self.trainer: Any = None
        self.uploaded: dict[str, tuple[int, int]] = {}

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        logdir = os.environ.get("TENSORBOARD_LOGGING_DIR")
        if not (self.is_main and self.cfg.tracking.tensorboard.enabled and logdir):
            return
        for callback in getattr(getattr(self.trainer, "callback_handler", None), "callbacks", []):
            writer = getattr(callback, "tb_writer", None)
            if writer is not None:
                writer.flush()
        prefix = join_uri(self.run_root, TENSORBOARD_DIR)
        try:
            for path in sorted(Path(logdir).rglob("events.out.tfevents.*")):
                rel, stat = path.relative_to(logdir).as_posix(), path.stat()
                if self.uploaded.get(rel) != (stat.st_size, stat.st_mtime_ns):
                    self.storage.upload_file(path, join_uri(prefix, rel))
                    self.uploaded[rel] = (stat.st_size, stat.st_mtime_ns)
        except Exception as err:  # noqa: BLE001 - the curve is worth an event, not a failed run
            from .report import log_event

            log_event("tracking_failed", what="upload tensorboard events", error=f"{type(err).__name__}: {err}"[:500])


def upload_tensorboard(cfg: TrainingConfig, storage: Any, run_root: str, info: dict[str, Any]) -> None:
    """Upload ``TENSORBOARD_LOGGING_DIR`` to ``<run_root>/tensorboard/`` (with a ``_SUCCESS`` marker)."""
    if not cfg.tracking.tensorboard.enabled:
        return
    logdir = os.environ.get("TENSORBOARD_LOGGING_DIR")
    if not logdir or not any(Path(logdir).rglob("events.out.tfevents.*")):
        return
    uri = join_uri(run_root, TENSORBOARD_DIR)
    storage.upload_dir(Path(logdir), uri, marker={"kind": "tensorboard"})
    info["tensorboardUri"] = uri


#: Artifact path of the adapter in the MLflow run.
ADAPTER_ARTIFACT_PATH = "adapter"


def log_adapter(cfg: TrainingConfig, info: dict[str, Any], adapter_dir: Path) -> bool:
    """Log ``adapter_dir`` (safetensors, adapter config, tokenizer, manifest) to the MLflow run
    ``info["mlflowRunId"]`` under :data:`ADAPTER_ARTIFACT_PATH`, through ``MlflowClient`` (no fluent
    run state); the server stores it where its artifact root says.

    Returns ``True`` when logged; ``False`` without MLflow tracking or run id, or when the upload
    failed (logged as a ``tracking_failed`` event: the adapter is already published, tracking is
    never worth a failed job).
    """
    mlflow = cfg.tracking.mlflow
    run_id = info.get("mlflowRunId")
    if mlflow is None or not run_id:
        return False
    from .report import log_event

    try:
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=mlflow.tracking_uri).log_artifacts(run_id, str(adapter_dir), ADAPTER_ARTIFACT_PATH)
    except Exception as err:  # noqa: BLE001 - see the docstring
        log_event("tracking_failed", what="log adapter artifacts", error=f"{type(err).__name__}: {err}"[:500])
        return False
    return True
