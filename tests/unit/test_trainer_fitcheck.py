"""The fit check before any GPU is taken (``qlora-train fitcheck``): decision and what it reads.

The model directory holds only ``config.json`` (Llama-3-70B widths, no weights): the check
must decide from it alone, and report that it read exactly that object.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora_trainer.cli import main as train_main
from qlora_trainer.fitcheck import decide

from helpers import LLAMA3_70B, MISTRAL_7B
from tests.unit.test_trainer_estimate import config


def test_70b_on_one_24gib_gpu_does_not_fit_and_names_what_would() -> None:
    result = decide(LLAMA3_70B, config(), world_size=1, gpu_gib=24.0)
    assert result["fits"] is False
    assert result["neededGiB"] > 24.0
    assert "training does not fit" in result["message"]
    assert "Would fit:" in result["message"]
    assert "24.0 GiB" in result["message"]


def test_7b_on_one_24gib_gpu_fits() -> None:
    result = decide(MISTRAL_7B, config(), world_size=1, gpu_gib=24.0)
    assert result["fits"] is True
    assert result["parallelism"] == "single"
    assert result["neededGiB"] < 24.0


def test_model_the_estimate_does_not_cover_is_not_refused() -> None:
    result = decide({"model_type": "mixtral", "num_local_experts": 8}, config(), world_size=1, gpu_gib=24.0)
    assert result["fits"] is None
    assert result["message"].startswith("not checked:")


def _job_config(tmp_path: Path, model_config: dict) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(model_config))
    cfg = {
        "model": {"uri": model.as_uri()},
        "dataset": {"uri": (tmp_path / "train.jsonl").as_uri()},
        "output": {"uri": (tmp_path / "out").as_uri() + "/"},
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize(
    ("model_config", "code", "reason", "fits"),
    [(LLAMA3_70B, 7, "InsufficientGPUMemory", False), (MISTRAL_7B, 0, "Fits", True)],
)
def test_cli_reads_only_config_json_and_writes_the_result(tmp_path, monkeypatch, model_config, code, reason, fits) -> None:
    term = tmp_path / "termination-log"
    monkeypatch.setenv("QLORA_TERMINATION_MESSAGE_PATH", str(term))
    cfg = _job_config(tmp_path, model_config)
    assert train_main(["fitcheck", "--config", str(cfg), "--gpus", "1", "--gpu-memory", "24"]) == code
    result = json.loads(term.read_text())
    assert result["exitCode"] == code and result["reason"] == reason
    assert result["fitCheck"]["fits"] is fits
    assert result["fitCheck"]["read"] == [(tmp_path / "model" / "config.json").as_uri()]


def test_cli_missing_config_json_is_a_storage_error_not_a_fit(tmp_path, monkeypatch) -> None:
    term = tmp_path / "termination-log"
    monkeypatch.setenv("QLORA_TERMINATION_MESSAGE_PATH", str(term))
    cfg = _job_config(tmp_path, MISTRAL_7B)
    (tmp_path / "model" / "config.json").unlink()
    assert train_main(["fitcheck", "--config", str(cfg), "--gpus", "1", "--gpu-memory", "24"]) == 4
    result = json.loads(term.read_text())
    assert result["reason"] == "StorageError" and "config.json" in result["message"]


def test_cli_bad_gpu_memory_is_invalid_config(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("QLORA_TERMINATION_MESSAGE_PATH", str(tmp_path / "t"))
    cfg = _job_config(tmp_path, MISTRAL_7B)
    assert train_main(["fitcheck", "--config", str(cfg), "--gpus", "1", "--gpu-memory", "0"]) == 2
