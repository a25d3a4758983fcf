"""Run isolation in the trainer (``qlora_trainer.runs``): layout, fingerprint, the resume decision.

The decision is pure (checkpoints with their ``qlora_state.json`` in, a choice out); the
file:// storage tests move a real directory tree. The end-to-end behaviour with the
real trainer image on the real node, MinIO and the operator is ``tests/node/test_gitops_runs.py``.
"""

from __future__ import annotations

import json

import pytest

from qlora_trainer.config import TrainingConfig
from qlora_trainer.distributed import classify
from qlora_trainer.errors import describe_unexpected
from qlora_trainer.runs import RunIdentity, RunLayout, decide_resume, fingerprint, incompatibility
from qlora_trainer.storage import SUCCESS_MARKER, Checkpoint, Storage

BASE = {"uri": "s3://models/m/", "files": [{"path": "model.safetensors", "etag": "aa"}], "digest": "sha256:m1"}
DATA = {"train": {"uri": "s3://data/a.jsonl", "files": [{"path": "a.jsonl", "etag": "d1"}]}}


def cfg(**overrides) -> TrainingConfig:
    data = {"model": {"uri": "s3://models/m/"}, "dataset": {"uri": "s3://data/a.jsonl"}, "output": {"uri": "s3://out/x/"}}
    data.update(overrides)
    return TrainingConfig.model_validate(data)


def state(run: int = 2, uid: str | None = "uid-1", fp: dict | None = None) -> dict:
    return {"owner": {"run": run, "generation": 3, "job": {"namespace": "ns", "name": "bot", "uid": uid}},
            "fingerprint": fp or fingerprint(cfg(), BASE, DATA)}


ME = RunIdentity(run=2, generation=3, namespace="ns", name="bot", uid="uid-1")


def test_layout_gives_every_run_its_own_prefix():
    layout = RunLayout("s3://out/x/", 3)
    assert layout.checkpoints == "s3://out/x/run-3/checkpoints"
    assert layout.adapter == "s3://out/x/run-3/adapter"
    assert layout.merged == "s3://out/x/run-3/merged"
    assert layout.refused == "s3://out/x/run-3/refused"
    assert layout.of_run(2).adapter == "s3://out/x/run-2/adapter"


def test_identity_from_env_prefers_the_training_run_of_a_group_restart(monkeypatch):
    monkeypatch.setenv("QLORA_RUN", "4")
    monkeypatch.setenv("QLORA_TRAINING_RUN", "2")
    monkeypatch.setenv("QLORA_GENERATION", "7")
    monkeypatch.setenv("QLORA_JOB_UID", "u")
    ident = RunIdentity.from_env()
    assert (ident.run, ident.generation, ident.uid) == (2, 7, "u")
    monkeypatch.delenv("QLORA_TRAINING_RUN")
    monkeypatch.delenv("QLORA_RUN")
    assert RunIdentity.from_env().run == 1  # a standalone qlora-train


@pytest.mark.parametrize(
    ("changed", "part"),
    [
        (dict(lora={"r": 8}), "lora"),
        (dict(quantization={"doubleQuant": False}), "quantization"),
        (dict(training={"learningRate": 1e-3}), "training"),
        (dict(dataset={"uri": "s3://data/a.jsonl", "format": "chat"}), "data"),
        (dict(model={"uri": "s3://models/m/", "revision": "v2"}), "model"),
    ],
)
def test_fingerprint_names_the_part_that_differs(changed, part):
    theirs = fingerprint(cfg(**changed), BASE, DATA)
    why = incompatibility(state(fp=theirs), ME, fingerprint(cfg(), BASE, DATA))
    assert why == f"config fingerprint differs in {part}"


def test_fingerprint_follows_the_data_checksums_and_ignores_the_output():
    expected = fingerprint(cfg(), BASE, DATA)
    new_data = {"train": {"uri": "s3://data/a.jsonl", "files": [{"path": "a.jsonl", "etag": "d2"}]}}
    assert incompatibility(state(fp=fingerprint(cfg(), BASE, new_data)), ME, expected) == "config fingerprint differs in data"
    new_base = {**BASE, "digest": "sha256:m2"}
    assert incompatibility(state(fp=fingerprint(cfg(), new_base, DATA)), ME, expected) == "config fingerprint differs in model"
    moved = fingerprint(cfg(output={"uri": "s3://elsewhere/"}), BASE, DATA)
    assert moved == expected


def test_only_this_runs_own_checkpoints_are_compatible():
    expected = fingerprint(cfg(), BASE, DATA)
    assert incompatibility(state(), ME, expected) is None
    assert incompatibility(state(run=1), ME, expected) == "written by run 1, not run 2"
    assert "another QLoRAJob (ns/bot, uid uid-0)" in incompatibility(state(uid="uid-0"), ME, expected)
    assert incompatibility(None, ME, expected).startswith("no qlora_state.json")
    assert incompatibility(state(uid=None), ME, expected) is None  # written outside the operator: the fingerprint decides


def test_decision_resumes_the_newest_compatible_and_refuses_the_rest():
    expected = fingerprint(cfg(), BASE, DATA)
    planted = fingerprint(cfg(lora={"r": 8}), BASE, DATA)
    candidates = [
        (Checkpoint(2, "s3://out/x/run-2/checkpoints/step-2"), state()),
        (Checkpoint(6, "s3://out/x/run-2/checkpoints/step-6"), state(fp=planted)),
        (Checkpoint(4, "s3://out/x/run-2/checkpoints/step-4"), state()),
    ]
    decision = decide_resume(candidates, ME, expected, previous=1)
    assert decision.decision == "Resumed" and decision.checkpoint.step == 4
    assert [(r.step, r.why) for r in decision.refused] == [(6, "config fingerprint differs in lora")]
    message = decision.message(ME)
    assert message.startswith("resumed run 2 from its checkpoint at step 4")
    assert "refused 1 checkpoint(s) under run 2: step-6: config fingerprint differs in lora" in message
    assert decision.record(ME)["fromStep"] == 4


def test_decision_starts_fresh_naming_the_previous_run():
    decision = decide_resume([], ME, fingerprint(cfg(), BASE, DATA), previous=1)
    assert decision.decision == "StartedFresh" and decision.checkpoint is None
    assert decision.message(ME) == "started fresh: previous checkpoints belong to run 1; run 2 started fresh at step 0"
    record = decision.record(ME)
    assert record["decision"] == "StartedFresh" and record["previousRunWithCheckpoints"] == 1


def test_move_prefix_keeps_every_file_and_the_marker(tmp_path):
    src = tmp_path / "run-2" / "checkpoints" / "step-6"
    (src / "sub").mkdir(parents=True)
    (src / "adapter_model.safetensors").write_bytes(b"w" * 100)
    (src / "sub" / "rng.pth").write_bytes(b"r")
    (src / SUCCESS_MARKER).write_text("{}")
    storage = Storage()
    moved = storage.move_prefix(f"file://{src}", f"file://{tmp_path}/run-2/refused/step-6-x")
    dest = tmp_path / "run-2" / "refused" / "step-6-x"
    assert moved == 3 and not src.exists()
    assert (dest / "adapter_model.safetensors").read_bytes() == b"w" * 100
    assert (dest / "sub" / "rng.pth").exists() and (dest / SUCCESS_MARKER).exists()


def test_an_unnamed_exception_is_a_trainer_error_with_its_last_line():
    err = RuntimeError("Error(s) in loading state_dict for PeftModel:\n\tsize mismatch for lora_A: [16, 576] vs [8, 576].\n")
    assert describe_unexpected(err) == "RuntimeError: size mismatch for lora_A: [16, 576] vs [8, 576]."
    code, reason, message = classify(err)
    assert (code, reason) == (1, "TrainerError") and message == describe_unexpected(err)
    assert json.dumps(describe_unexpected(ValueError())) == '"ValueError"'


def test_a_run_prefix_holding_another_jobs_adapter_is_refused(tmp_path):
    from qlora_trainer.cli import check_run_prefix_owner
    from qlora_trainer.errors import OutputInUseError

    layout = RunLayout(f"file://{tmp_path}/out", 1)
    adapter = tmp_path / "out" / "run-1" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "manifest.json").write_text(json.dumps({"run": {"run": 1, "job": {"namespace": "ns", "name": "bot", "uid": "old"}}}))
    storage = Storage()
    check_run_prefix_owner(storage, layout, RunIdentity(run=1, uid="new"))  # no marker: an incomplete upload, not a result
    (adapter / SUCCESS_MARKER).write_text("{}")
    check_run_prefix_owner(storage, layout, RunIdentity(run=1, uid="old"))  # the same job again (a retry after upload)
    check_run_prefix_owner(storage, layout, RunIdentity(run=1))  # standalone: not checked
    with pytest.raises(OutputInUseError) as err:
        check_run_prefix_owner(storage, layout, RunIdentity(run=1, uid="new"))
    assert err.value.exit_code == 2 and "spec.output.uri" in str(err.value) and "uid old" in str(err.value)
