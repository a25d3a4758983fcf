"""Progress reporting and the termination message (``qlora_trainer.report``).

The reporter's API object here is a recorder standing in for the kubernetes
``CustomObjectsApi`` (the patch against a real API server belongs to the operator's
integration tests, which install the CRD and the per-job Role).
"""

from __future__ import annotations

import json
import math

import pytest
from qlora_trainer.report import (
    TERMINATION_LIMIT,
    ProgressReporter,
    _api_client,
    log_event,
    write_termination_message,
)


class Recorder:
    """Records ``patch_namespaced_custom_object_status`` calls; can be told to fail."""

    def __init__(self, fail: bool = False):
        self.calls: list[tuple] = []
        self.fail = fail

    def patch_namespaced_custom_object_status(self, group, version, namespace, plural, name, body, **kwargs):
        self.calls.append((group, version, namespace, plural, name, body))
        if self.fail:
            raise RuntimeError("403 Forbidden")


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def make(api=None, interval=10.0):
    clock = Clock()
    reporter = ProgressReporter("job-a", "team-a", min_interval=interval, api=api or Recorder(), clock=clock)
    return reporter, reporter._api, clock


def test_patches_its_own_qlorajob_status_with_camelcase_progress():
    reporter, api, _ = make()
    reporter.stage("Training", step=0, totalSteps=100)
    group, version, namespace, plural, name, body = api.calls[0]
    assert (group, version, namespace, plural, name) == ("qlora.dev", "v1alpha1", "team-a", "qlorajobs", "job-a")
    progress = body["status"]["progress"]
    assert progress["stage"] == "Training" and progress["progress"] == "0/100"
    assert progress["updatedAt"].endswith("Z") and "T" in progress["updatedAt"]
    assert set(body) == {"status"} and set(body["status"]) == {"progress"}  # merge patch of progress only


def test_throttled_within_a_stage_forced_at_stage_changes():
    reporter, api, clock = make()
    reporter.stage("Training", step=0, totalSteps=10)
    for step in range(1, 6):
        clock.now += 2
        reporter.update(step=step, loss=1.0 / step, tokensPerSecond=100.0, etaSeconds=20)
    assert len(api.calls) == 2  # the stage change, then one after 10 s
    assert api.calls[1][5]["status"]["progress"]["step"] == 5
    assert api.calls[1][5]["status"]["progress"]["eta"] == "20s"  # the printer column's text
    clock.now += 1
    reporter.stage("Evaluating")
    assert len(api.calls) == 3, "a stage change is reported at once"
    reporter.update(step=6)
    assert len(api.calls) == 3
    assert reporter.flush() and api.calls[-1][5]["status"]["progress"]["step"] == 6


def test_a_failing_report_never_raises_and_training_continues():
    reporter, api, _ = make(api=Recorder(fail=True))
    assert reporter.stage("Loading") is None
    assert reporter.update(force=True, step=1) is False
    assert reporter.failures == 2


def test_disabled_without_job_env(monkeypatch):
    monkeypatch.delenv("QLORA_JOB_NAME", raising=False)
    monkeypatch.setenv("QLORA_JOB_NAMESPACE", "x")
    reporter = ProgressReporter.from_env()
    assert not reporter.enabled
    assert reporter.update(force=True, step=3) is False
    assert reporter.progress["step"] == 3


def test_non_finite_numbers_are_reported_as_null():
    reporter, api, _ = make()
    reporter.update(force=True, loss=float("nan"), learningRate=float("inf"))
    progress = api.calls[0][5]["status"]["progress"]
    assert progress["loss"] is None and progress["learningRate"] is None
    json.dumps(api.calls[0][5], allow_nan=False)


def test_unknown_stage_is_a_programming_error():
    reporter, _, _ = make()
    with pytest.raises(ValueError):
        reporter.stage("Sleeping")


def test_in_cluster_auth_from_the_token_dir(monkeypatch, tmp_path):
    (tmp_path / "token").write_text("tok-1\n")
    (tmp_path / "ca.crt").write_text("CA")
    monkeypatch.setenv("QLORA_SA_TOKEN_DIR", str(tmp_path))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    cfg = _api_client().configuration
    assert cfg.host == "https://127.0.0.1:6443"
    assert cfg.ssl_ca_cert == str(tmp_path / "ca.crt")
    assert cfg.get_api_key_with_prefix("authorization") == "Bearer tok-1"
    (tmp_path / "token").write_text("tok-2")  # projected tokens rotate
    cfg.refresh_api_key_hook(cfg)
    assert cfg.get_api_key_with_prefix("authorization") == "Bearer tok-2"


def test_termination_message_fits_and_stays_json(tmp_path):
    path = tmp_path / "term"
    result = {
        "exitCode": 3,
        "reason": "InvalidData",
        "message": "x\u00e9" * 5000,
        "artifacts": {"adapterUri": "s3://b/a/"},
        "metrics": {"evalLossBefore": 1.0},
        "resumedFromStep": None,
    }
    text = write_termination_message(result, str(path))
    assert len(text.encode()) <= TERMINATION_LIMIT < 4096
    decoded = json.loads(path.read_text())
    assert decoded["exitCode"] == 3 and decoded["reason"] == "InvalidData"
    assert decoded["message"].endswith("...(truncated)")
    assert "resumedFromStep" not in decoded  # None values are left out
    small = {"exitCode": 0, "reason": "Succeeded", "message": "ok", "metrics": {"loss": 1.5}}
    assert json.loads(write_termination_message(small, str(path))) == small


def test_termination_message_to_an_unwritable_path_is_ignored(tmp_path):
    text = write_termination_message({"exitCode": 0, "reason": "Succeeded"}, str(tmp_path / "no" / "dir" / "x"))
    assert json.loads(text)["reason"] == "Succeeded"


def test_log_event_is_one_json_line(capsys):
    log_event("train_step", step=3, loss=float("nan"), tokensPerSecond=12.5)
    line = capsys.readouterr().err
    assert line.endswith("\n") and line.count("\n") == 1
    record = json.loads(line)
    assert record["event"] == "train_step" and record["step"] == 3 and record["loss"] is None
    assert not math.isnan(record["tokensPerSecond"])


@pytest.mark.parametrize(
    "seconds,text",
    [(0, "0s"), (-3, "0s"), (44.6, "45s"), (60, "1m00s"), (750, "12m30s"), (3600, "1h00m"), (11100, "3h05m"),
     (187200, "2d04h")],
)
def test_eta_is_formatted_like_kubectl_age(seconds, text):
    from qlora_trainer.report import format_duration

    assert format_duration(seconds) == text
