"""MLflow tracking of the real trainer against a real MLflow server (issue 17 item 2); no mocks.

``test_one_mlflow_run_across_a_killed_attempt_and_its_resume``: the MLflow server is the
pinned ``mlflow`` from PyPI (``mlflow_server`` fixture: SQLite store, proxied artifact
store); the data and the output live in the cluster's MinIO; ``qlora-train`` (the real
``python -m qlora_trainer.cli``, in a subprocess) trains the embedded SmolLM2 on CPU with
``tracking.mlflow`` pointing at the server and ``tracking.tensorboard`` on. Attempt 1 is
SIGKILLed at step 3, after its step-2 checkpoint is complete in S3; attempt 2 (same config,
the same cache path emptied, as a new pod's emptyDir) resumes from step 2 and finishes. Asserted through the MLflow client, that is
the server's REST API:

- the experiment holds exactly one run, whose id is the one recorded in
  ``<output>/run-1/tracking/mlflow.json`` and reported in the termination message
  (``artifacts.tracking``: run id, experiment id, UI link), status ``FINISHED``;
- params: the trainer config (``qlora.lora.r`` ...) and transformers' TrainingArguments
  (``learning_rate``, ``max_steps``); tags: the spec's and ``qlora.run``;
- ``loss`` by step: attempt 1's steps up to the kill and attempt 2's steps 3..6 in that same
  run, attempt 2's values equal to the losses its log lines report;
- the published adapter is the run's ``adapter/`` artifacts, byte-identical to S3's;
- TensorBoard event files under ``<output>/run-1/tensorboard/`` with ``_SUCCESS``: one per
  attempt, the killed attempt's (uploaded at its step-2 checkpoint) holding ``train/loss`` of
  steps 1-2, the resumed attempt's steps 3-6.

Tiny settings (6 steps, checkpoint every 2, 64-token rows) as in
``test_trainer_resilience_s3.py``, whose subprocess helpers this reuses.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest
from test_trainer_resilience_s3 import RUN_TIMEOUT, Run, cli_argv, complete_steps, keys, training_config

pytestmark = pytest.mark.slow

MAX_STEPS = 6
CHECKPOINT_EVERY = 2
KILL_AT = 3


@pytest.fixture(scope="module")
def small_inputs(tmp_path_factory):
    from helpers import embedded_inputs

    return embedded_inputs(tmp_path_factory.mktemp("tracking-inputs"), 64, 4)


def attempt_env(cluster, tmp_path: Path, attempt: int) -> dict[str, str]:
    """A pod's environment: S3 credentials, the same cache path for every attempt, its own termination file."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("QLORA_", "AWS_", "MLFLOW_"))}
    env.update(cluster.s3_environ())
    env.update(
        QLORA_CACHE_DIR=str(tmp_path / "cache"),
        QLORA_TERMINATION_MESSAGE_PATH=str(tmp_path / f"attempt-{attempt}.term"),
        PYTHONUNBUFFERED="1",
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="true",
    )
    return env


@pytest.mark.timeout(900)
def test_one_mlflow_run_across_a_killed_attempt_and_its_resume(cluster, mlflow_server, small_inputs, tmp_path):
    from mlflow.tracking import MlflowClient

    s3 = cluster.s3_client()
    bucket = f"track-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    s3.upload_file(str(small_inputs["train"]), bucket, "data/train.jsonl")
    s3.upload_file(str(small_inputs["eval"]), bucket, "data/eval.jsonl")
    storage = {"endpoint": cluster.s3_endpoint, "region": cluster.s3_region, "addressingStyle": "path"}
    experiment = f"qlora-it-{uuid.uuid4().hex[:8]}"
    config = training_config(
        small_inputs, f"s3://{bucket}/data/train.jsonl", f"s3://{bucket}/data/eval.jsonl", f"s3://{bucket}/out/",
        storage, maxSteps=MAX_STEPS, checkpointEverySteps=CHECKPOINT_EVERY,
    )
    config["tracking"] = {"mlflow": {"trackingUri": mlflow_server.url, "experimentName": experiment,
                                     "tags": {"suite": "integration"}}, "tensorboard": {"enabled": True}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))

    # ---- attempt 1: SIGKILL at step 3, after the step-2 checkpoint is complete
    t0 = time.monotonic()
    first = Run(cli_argv(path), attempt_env(cluster, tmp_path, 1), tmp_path, "attempt-1")
    try:
        ckpt = first.wait_event(lambda e: e["event"] == "checkpoint", RUN_TIMEOUT, "the first checkpoint")
        assert ckpt["step"] == CHECKPOINT_EVERY
        first.wait_event(lambda e: e["event"] == "train_step" and e["step"] >= KILL_AT, RUN_TIMEOUT, f"step {KILL_AT}")
        first.proc.send_signal(signal.SIGKILL)
        code, _ = first.finish()
    finally:
        if first.proc.poll() is None:
            first.proc.kill()
    assert code == -signal.SIGKILL, first.tail()
    killed_at = max(e["step"] for e in first.events if e["event"] == "train_step")
    record = json.loads(s3.get_object(Bucket=bucket, Key="out/run-1/tracking/mlflow.json")["Body"].read())
    assert record["trackingUri"] == mlflow_server.url and record["runId"]
    newest = max(complete_steps(s3, bucket, "out/run-1/checkpoints/"))
    t1 = time.monotonic()

    # ---- attempt 2: resumes the checkpoint and the MLflow run (a new pod: its cache emptyDir is empty)
    shutil.rmtree(tmp_path / "cache")
    second = Run(cli_argv(path), attempt_env(cluster, tmp_path, 2), tmp_path, "attempt-2")
    code, result = second.finish()
    assert code == 0, second.tail()
    t2 = time.monotonic()
    print(f"\nattempt 1 (killed at step {killed_at}): {t1 - t0:.1f}s, attempt 2 (resumed from {newest}): "
          f"{t2 - t1:.1f}s", file=sys.stderr)
    assert result["resumedFromStep"] == newest
    resumed_steps = {e["step"]: e["loss"] for e in second.events if e["event"] == "train_step"}
    assert sorted(resumed_steps) == list(range(newest + 1, MAX_STEPS + 1))
    failures = [e for run in (first, second) for e in run.events if e["event"] == "tracking_failed"]
    assert not failures, failures

    # ---- one run in the experiment: the recorded one, reported in the termination message
    client = MlflowClient(tracking_uri=mlflow_server.url)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment} was not created"
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [record["runId"]], "one MLflow run for both attempts"
    run = runs[0]
    run_id = run.info.run_id
    tracked = result["artifacts"]["tracking"]
    assert tracked == {
        "mlflowRunId": run_id, "mlflowExperimentId": exp.experiment_id,
        "mlflowRunUri": f"{mlflow_server.url}/#/experiments/{exp.experiment_id}/runs/{run_id}",
        "tensorboardUri": f"s3://{bucket}/out/run-1/tensorboard",
    }
    assert run.info.status == "FINISHED"

    # ---- params (ours and transformers') and tags
    params = run.data.params
    assert params["qlora.lora.r"] == "16" and params["qlora.lora.alpha"] == "32.0"
    assert params["qlora.quantization.quantType"] == "nf4" and params["qlora.training.maxSteps"] == str(MAX_STEPS)
    assert params["qlora.model.uri"] == config["model"]["uri"]
    assert params["learning_rate"] == "0.001" and params["max_steps"] == str(MAX_STEPS)
    assert run.data.tags["suite"] == "integration" and run.data.tags["qlora.run"] == "1"

    # ---- per-step loss: both attempts in the one run, the resumed steps as attempt 2 logged them
    history = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: (m.step, m.timestamp))
    steps = [m.step for m in history]
    print(f"loss history (step: value): {[(m.step, round(m.value, 4)) for m in history]}", file=sys.stderr)
    assert set(steps) == set(range(1, MAX_STEPS + 1)), steps
    assert 1 in steps and min(steps) == 1, "attempt 1's first steps are in the same run"
    last_by_step = {m.step: m.value for m in history}  # the newest value of each step: attempt 2 for > newest
    for step, loss in resumed_steps.items():
        assert last_by_step[step] == pytest.approx(loss, rel=1e-4, abs=1e-4), (step, last_by_step[step], loss)
    for key in ("learning_rate", "grad_norm"):
        assert {m.step for m in client.get_metric_history(run_id, key)} == set(range(1, MAX_STEPS + 1)), key
    evals = {m.step: m.value for m in client.get_metric_history(run_id, "eval_loss")}
    assert set(evals) == {0, MAX_STEPS}, evals  # before training (attempt 1) and after it (attempt 2)
    assert evals[MAX_STEPS] == pytest.approx(result["metrics"]["evalLossAfter"], rel=1e-5)
    manifest = json.loads(s3.get_object(Bucket=bucket, Key="out/run-1/adapter/manifest.json")["Body"].read())
    assert manifest["run"]["tracking"]["mlflowRunId"] == run_id

    # ---- the adapter is the run's artifacts, byte-identical to the published one
    listed = {f.path: f.file_size for f in client.list_artifacts(run_id, "adapter")}
    published = keys(s3, bucket, "out/run-1/adapter/")
    for name in ("adapter_model.safetensors", "adapter_config.json", "manifest.json"):
        assert listed.get(f"adapter/{name}") == published[name]["Size"], (name, sorted(listed))
    local = Path(client.download_artifacts(run_id, "adapter/adapter_config.json", str(tmp_path / "dl")))
    s3_body = s3.get_object(Bucket=bucket, Key="out/run-1/adapter/adapter_config.json")["Body"].read()
    assert local.read_bytes() == s3_body and json.loads(s3_body)["r"] == 16
    stored = list(mlflow_server.artifacts_dir.rglob("adapter_model.safetensors"))
    assert len(stored) == 1 and run_id in str(stored[0]), "the server stores what the run logged"

    # ---- TensorBoard event files next to the artifacts
    tensorboard = keys(s3, bucket, "out/run-1/tensorboard/")
    events = [k for k in tensorboard if Path(k).name.startswith("events.out.tfevents.")]
    assert len(events) == 2 and "_SUCCESS" in tensorboard, sorted(tensorboard)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    loss_steps = []
    for name in events:
        local = tmp_path / "tb" / name
        local.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, f"out/run-1/tensorboard/{name}", str(local))
        acc = EventAccumulator(str(local))
        acc.Reload()
        loss_steps.append(sorted(e.step for e in acc.Scalars("train/loss")))
    assert sorted(loss_steps) == [list(range(1, newest + 1)), list(range(newest + 1, MAX_STEPS + 1))], loss_steps
