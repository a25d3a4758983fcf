"""``qlora_trainer.tracking``: the integrations' environment, the MLflow run id kept across attempts.

Real objects only: ``file://`` storage (a temp directory, the same ``Storage`` class as S3)
and a real MLflow file store (``file:///`` tracking URI, the client of ``mlflow-skinny``),
so "the next attempt continues the same run" is checked against MLflow itself, not
against a stand-in. The same path against a real MLflow server and a real, killed trainer
is ``tests/integration/test_mlflow_tracking_s3.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from qlora_trainer import tracking
from qlora_trainer.config import TrainingConfig
from qlora_trainer.runs import RunIdentity, RunLayout
from qlora_trainer.storage import SUCCESS_MARKER, Storage

#: Every variable ``tracking`` sets or reads; restored after each test.
ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_TAGS", "MLFLOW_RUN_ID", "MLFLOW_ALLOW_FILE_STORE",
       "TENSORBOARD_LOGGING_DIR")
ME = RunIdentity(run=2, generation=3, namespace="team-a", name="bot", uid="uid-1")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """tracking.prepare writes os.environ: register every key with monkeypatch so it is restored."""
    for key in ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


def cfg(out: str, **tracking_section) -> TrainingConfig:
    return TrainingConfig.model_validate({
        "model": {"uri": "s3://models/m/"}, "dataset": {"uri": "s3://data/a.jsonl"}, "output": {"uri": out},
        "tracking": tracking_section,
    })


@pytest.fixture
def out(tmp_path) -> str:
    return f"file://{tmp_path}/out"


def test_no_tracking_sets_nothing_and_reports_to_no_integration(tmp_path, out):
    config = cfg(out)
    assert config.tracking.report_to() == []
    assert tracking.prepare(config, Storage(), RunLayout(out, 1).root, tmp_path / "work", ME) == {}
    assert not {k for k in ENV if k in os.environ}


@pytest.mark.parametrize(
    ("section", "report_to"),
    [
        ({"mlflow": {"trackingUri": "http://mlflow:5000"}}, ["mlflow"]),
        ({"tensorboard": {"enabled": True}}, ["tensorboard"]),
        ({"mlflow": {"trackingUri": "http://mlflow:5000"}, "tensorboard": {"enabled": True}}, ["mlflow", "tensorboard"]),
        ({"tensorboard": {"enabled": False}}, []),
    ],
)
def test_report_to(section, report_to, out):
    assert cfg(out, **section).tracking.report_to() == report_to


def test_prepare_sets_the_mlflow_environment(tmp_path, out):
    config = cfg(out, mlflow={"trackingUri": "http://mlflow.mlflow:5000", "experimentName": "support-bot",
                              "tags": {"team": "support"}})
    os.environ["MLFLOW_RUN_ID"] = "stale-from-the-image"  # never inherited: only the record resumes a run
    assert tracking.prepare(config, Storage(), RunLayout(out, 2).root, tmp_path / "work", ME) == {}
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://mlflow.mlflow:5000"
    assert os.environ["MLFLOW_EXPERIMENT_NAME"] == "support-bot"
    assert json.loads(os.environ["MLFLOW_TAGS"]) == {
        "qlora.run": "2", "qlora.job": "bot", "qlora.namespace": "team-a", "team": "support"
    }
    assert "MLFLOW_RUN_ID" not in os.environ
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ  # only for a file:/// store


def test_prepare_outside_the_operator_tags_only_the_run(tmp_path, out):
    config = cfg(out, mlflow={"trackingUri": "http://mlflow:5000"})
    os.environ["MLFLOW_EXPERIMENT_NAME"] = "left-over"
    tracking.prepare(config, Storage(), RunLayout(out, 1).root, tmp_path / "work", RunIdentity())
    assert json.loads(os.environ["MLFLOW_TAGS"]) == {"qlora.run": "1"}
    assert "MLFLOW_EXPERIMENT_NAME" not in os.environ, "unset experimentName: MLflow's Default experiment"


def test_a_record_of_this_run_resumes_its_mlflow_run(tmp_path, out):
    config = cfg(out, mlflow={"trackingUri": "http://mlflow:5000"})
    storage = Storage()
    run2 = RunLayout(out, 2).root
    storage.put_bytes(tracking.record_uri(run2),
                      json.dumps({"runId": "abc123", "experimentId": "4", "trackingUri": "http://mlflow:5000"}).encode())
    assert tracking.record_uri(run2) == f"{out}/run-2/tracking/mlflow.json"
    assert tracking.prepare(config, storage, run2, tmp_path / "work", ME) == {"mlflowRunId": "abc123"}
    assert os.environ["MLFLOW_RUN_ID"] == "abc123"
    # Run 3 of the same job (a changed spec) has its own prefix: a new MLflow run.
    assert tracking.prepare(config, storage, RunLayout(out, 3).root, tmp_path / "work", ME) == {}
    assert "MLFLOW_RUN_ID" not in os.environ


@pytest.mark.parametrize(
    ("record", "why"),
    [
        (json.dumps({"runId": "abc123", "experimentId": "4", "trackingUri": "http://old-mlflow:5000"}),
         "another server: that run id does not exist on this one"),
        (json.dumps({"experimentId": "4", "trackingUri": "http://mlflow:5000"}), "no run id"),
        ('{"runId": "abc1', "torn write"),
        ("[1, 2]", "not an object"),
    ],
)
def test_records_that_cannot_resume_start_a_new_run(tmp_path, out, record, why):
    config = cfg(out, mlflow={"trackingUri": "http://mlflow:5000"})
    storage = Storage()
    root = RunLayout(out, 1).root
    storage.put_bytes(tracking.record_uri(root), record.encode())
    assert tracking.prepare(config, storage, root, tmp_path / "work", ME) == {}, why
    assert "MLFLOW_RUN_ID" not in os.environ, why


def test_tensorboard_gets_a_local_logdir(tmp_path, out):
    tracking.prepare(cfg(out, tensorboard={"enabled": True}), Storage(), RunLayout(out, 1).root, tmp_path / "work", ME)
    assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "work" / "tensorboard")
    assert (tmp_path / "work" / "tensorboard").is_dir()
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_upload_tensorboard_publishes_event_files_with_a_marker(tmp_path, out):
    config = cfg(out, tensorboard={"enabled": True})
    root = RunLayout(out, 1).root
    storage = Storage()
    tracking.prepare(config, storage, root, tmp_path / "work", ME)
    info: dict = {}
    tracking.upload_tensorboard(config, storage, root, info)
    assert info == {} and not storage.exists(f"{root}/tensorboard/{SUCCESS_MARKER}"), "no event files: nothing"

    logdir = Path(os.environ["TENSORBOARD_LOGGING_DIR"])
    (logdir / "run-x").mkdir()
    (logdir / "run-x" / "events.out.tfevents.1.host").write_bytes(b"\x00events")
    tracking.upload_tensorboard(config, storage, root, info)
    assert info == {"tensorboardUri": f"{out}/run-1/tensorboard"}
    assert storage.read_bytes(f"{root}/tensorboard/run-x/events.out.tfevents.1.host") == b"\x00events"
    marker = json.loads(storage.read_bytes(f"{root}/tensorboard/{SUCCESS_MARKER}"))
    assert marker["kind"] == "tensorboard"


@pytest.mark.parametrize(
    ("uri", "link"),
    [
        ("http://mlflow:5000", "http://mlflow:5000/#/experiments/4/runs/abc"),
        ("https://mlflow.example.com/ml/", "https://mlflow.example.com/ml/#/experiments/4/runs/abc"),
        ("file:///tmp/mlruns", None),
    ],
)
def test_run_uri(uri, link):
    assert tracking.run_uri(uri, "4", "abc") == link


# ---------------------------------------------------------------- against MLflow itself (file store)
def start_like_the_callback(experiment: str | None):
    """What transformers' MLflowCallback.setup does with the environment prepare() set."""
    import mlflow

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    if experiment:
        mlflow.set_experiment(experiment)
    return mlflow.start_run(run_name="out")


def test_the_next_attempt_continues_the_recorded_mlflow_run(tmp_path, out):
    """Attempt 1 starts a run and RecordMlflowRun records it; attempt 2 (after a kill: the run was
    never ended) gets MLFLOW_RUN_ID from the record, and MLflow continues that very run."""
    import mlflow
    from mlflow.tracking import MlflowClient

    store = f"file://{tmp_path}/mlruns"
    config = cfg(out, mlflow={"trackingUri": store, "experimentName": "exp"})
    storage = Storage()
    root = RunLayout(out, 1).root
    try:
        assert tracking.prepare(config, storage, root, tmp_path / "w1", ME) == {}
        assert os.environ["MLFLOW_ALLOW_FILE_STORE"] == "true"  # MLflow 3 refuses a file store without it
        first = start_like_the_callback("exp").info.run_id
        info: dict = {}
        tracking.RecordMlflowRun(config, storage, root, info, is_main=True).on_train_begin(None, None, None)
        mlflow.log_metric("loss", 2.0, step=1)
        record = json.loads(storage.read_bytes(tracking.record_uri(root)))
        assert record == {"runId": first, "experimentId": info["mlflowExperimentId"], "trackingUri": store}
        assert info["mlflowRunId"] == first and "mlflowRunUri" not in info  # no UI link for a file store
        mlflow.end_run(status="KILLED")  # the fluent state of the killed process is gone

        resumed = tracking.prepare(config, storage, root, tmp_path / "w2", ME)
        assert resumed == {"mlflowRunId": first} and os.environ["MLFLOW_RUN_ID"] == first
        second = start_like_the_callback("exp").info.run_id
        assert second == first
        again: dict = {}
        tracking.RecordMlflowRun(config, storage, root, again, is_main=True).on_train_begin(None, None, None)
        assert again == info and json.loads(storage.read_bytes(tracking.record_uri(root))) == record
        mlflow.log_metric("loss", 1.5, step=2)
        mlflow.end_run()
    finally:
        while mlflow.active_run():
            mlflow.end_run()
    client = MlflowClient(store)
    runs = client.search_runs([info["mlflowExperimentId"]])
    assert [r.info.run_id for r in runs] == [first], "one run, continued"
    assert [(m.step, m.value) for m in client.get_metric_history(first, "loss")] == [(1, 2.0), (2, 1.5)]
    params = runs[0].data.params
    assert params["qlora.lora.r"] == "16" and params["qlora.lora.alpha"] == "32.0"  # logged twice, same values
    assert params == tracking.config_params(config)


def test_config_params_flatten_the_trainer_config(out):
    config = TrainingConfig.model_validate({
        "model": {"uri": "s3://models/m/"}, "dataset": {"uri": "s3://data/a.jsonl"}, "output": {"uri": out},
        "lora": {"r": 8, "alpha": 16, "targetModules": ["q_proj", "v_proj"]},
        "training": {"maxSteps": 6, "learningRate": 1e-3},
        "tracking": {"mlflow": {"trackingUri": "http://mlflow:5000", "tags": {"secretish": "x"}}},
    })
    params = tracking.config_params(config)
    assert params["qlora.lora.r"] == "8" and params["qlora.lora.alpha"] == "16.0"
    assert params["qlora.lora.targetModules"] == '["q_proj", "v_proj"]'
    assert params["qlora.training.maxSteps"] == "6" and params["qlora.training.learningRate"] == "0.001"
    assert params["qlora.quantization.quantType"] == "nf4" and params["qlora.model.uri"] == "s3://models/m/"
    assert params["qlora.output.uri"] == out
    assert "qlora.training.epochs" not in params, "None is left out"
    assert not [k for k in params if k.startswith("qlora.tracking")]
    assert all(isinstance(v, str) and len(v) <= tracking.MAX_PARAM_VALUE for v in params.values())


def test_record_is_written_only_by_global_rank_0_with_an_active_run(tmp_path, out):
    config = cfg(out, mlflow={"trackingUri": "http://mlflow:5000"})
    storage = Storage()
    root = RunLayout(out, 1).root
    info: dict = {}
    tracking.RecordMlflowRun(config, storage, root, info, is_main=False).on_train_begin(None, None, None)
    tracking.RecordMlflowRun(config, storage, root, info, is_main=True).on_train_begin(None, None, None)  # no run
    assert info == {} and not storage.exists(tracking.record_uri(root))


def test_log_adapter_puts_the_adapter_into_the_run(tmp_path, out):
    from mlflow.tracking import MlflowClient

    store = f"file://{tmp_path}/mlruns"
    config = cfg(out, mlflow={"trackingUri": store})
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    (adapter / "adapter_model.safetensors").write_bytes(b"w" * 64)
    assert tracking.log_adapter(config, {}, adapter) is False, "no run id: nothing to log to"
    tracking.prepare(config, Storage(), RunLayout(out, 1).root, tmp_path / "w", ME)
    client = MlflowClient(store)
    run_id = client.create_run(client.create_experiment("adapters")).info.run_id
    assert tracking.log_adapter(config, {"mlflowRunId": run_id}, adapter) is True
    listed = {f.path: f.file_size for f in client.list_artifacts(run_id, "adapter")}
    assert listed == {"adapter/adapter_config.json": 8, "adapter/adapter_model.safetensors": 64}


def test_log_adapter_failure_is_an_event_not_an_error(tmp_path, out, capsys):
    config = cfg(out, mlflow={"trackingUri": "http://127.0.0.1:9"})  # nothing listens on the discard port
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        assert tracking.log_adapter(config, {"mlflowRunId": "0" * 32}, adapter) is False
    finally:
        del os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith('{"event"')]
    assert [e["event"] for e in events] == ["tracking_failed"]
    assert events[0]["what"] == "log adapter artifacts"


def test_record_only_for_mlflow(tmp_path, out):
    info: dict = {}
    callback = tracking.RecordMlflowRun(cfg(out, tensorboard={"enabled": True}), Storage(), RunLayout(out, 1).root,
                                        info, is_main=True)
    callback.on_train_begin(SimpleNamespace(), SimpleNamespace(), SimpleNamespace())
    assert info == {}


def test_tensorboard_events_are_flushed_and_uploaded_at_each_checkpoint_without_a_marker(tmp_path, out):
    """A killed attempt keeps its curve up to its last checkpoint: at ``on_save`` the Trainer's real
    ``TensorBoardCallback`` writer is flushed and the changed event files uploaded (no ``_SUCCESS``)."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = cfg(out, tensorboard={"enabled": True})
    root = RunLayout(out, 1).root
    storage = Storage()
    tracking.prepare(config, storage, root, tmp_path / "work", ME)
    logdir = Path(os.environ["TENSORBOARD_LOGGING_DIR"])
    board = TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(logdir), flush_secs=3600))
    sync = tracking.SyncTensorboard(config, storage, root, is_main=True)
    sync.trainer = SimpleNamespace(callback_handler=SimpleNamespace(callbacks=[board]))

    def uploaded_steps() -> list[int]:
        (name,) = [p.name for p in (Path(root.removeprefix("file://")) / "tensorboard").iterdir()]
        local = tmp_path / "dl" / name
        local.parent.mkdir(exist_ok=True)
        local.write_bytes(storage.read_bytes(f"{root}/tensorboard/{name}"))
        acc = EventAccumulator(str(local))
        acc.Reload()
        return [e.step for e in acc.Scalars("train/loss")]

    for step in (1, 2):
        board.tb_writer.add_scalar("train/loss", 3.0 - step / 10, step)
    sync.on_save(None, None, None)
    assert uploaded_steps() == [1, 2], "flushed before the upload (the writer alone would wait 3600 s)"
    assert not storage.exists(f"{root}/tensorboard/{SUCCESS_MARKER}")
    board.tb_writer.add_scalar("train/loss", 2.7, 3)
    board.tb_writer.add_scalar("train/loss", 2.6, 4)
    sync.on_save(None, None, None)
    assert uploaded_steps() == [1, 2, 3, 4]
    board.tb_writer.close()

    quiet = tracking.SyncTensorboard(config, storage, root, is_main=False)  # other ranks upload nothing
    quiet.trainer = sync.trainer
    quiet.on_save(None, None, None)
    assert quiet.uploaded == {} and len(sync.uploaded) == 1
