"""``qlora-train`` as a process: exit codes, stderr and the termination message for failures
that happen before any training (invalid config -> 2, invalid data -> 3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_cli(tmp_path: Path, config_text: str, name: str = "config.json", *extra: str, timeout: float = 300):
    config = tmp_path / name
    config.write_text(config_text)
    term = tmp_path / "termination"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_JOB_")}
    env.update(QLORA_TERMINATION_MESSAGE_PATH=str(term), QLORA_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run(
        [sys.executable, "-m", "qlora_trainer.cli", "--config", str(config), *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    return proc, (json.loads(term.read_text()) if term.exists() else None)


@pytest.mark.parametrize(
    "text,name,expected",
    [
        (
            '{"model": {"uri": "s3://models/x/"}, "dataset": {"uri": "s3://data/d.jsonl"}, '
            '"output": {"uri": "s3://out/"}, "lora": {"r": 0}}',
            "config.json",
            "lora.r: ",
        ),
        (
            '{"model": {"uri": "s3://models/x/"}, "dataset": {"uri": "http://data/d.jsonl"}, "output": {"uri": "s3://out/"}}',
            "config.json",
            "dataset.uri: ",
        ),
        ('{"model": {"uri": "s3://models/x/"},\n  "dataset": ', "config.json", "line 2: not valid JSON"),
        (
            "model:\n  uri: s3://models/x/\n  bogus: 1\ndataset:\n  uri: s3://data/x.jsonl\noutput:\n  uri: s3://out/\n",
            "c.yaml",
            "model.bogus: ",
        ),
    ],
    ids=["out of range", "bad scheme", "broken json", "unknown yaml key"],
)
def test_invalid_config_exits_2_with_the_message_and_no_traceback(tmp_path, text, name, expected):
    proc, term = run_cli(tmp_path, text, name)
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr
    assert term["exitCode"] == 2 and term["reason"] == "InvalidConfig" and expected in term["message"]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == term


def test_missing_config_file_exits_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "qlora_trainer.cli", "--config", str(tmp_path / "nope.json")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "QLORA_TERMINATION_MESSAGE_PATH": str(tmp_path / "t")},
    )
    assert proc.returncode == 2 and "cannot read config file" in proc.stderr


def test_malformed_data_exits_3_naming_file_and_line(tmp_path):
    sys.path.insert(0, str(REPO / "hack"))
    import embedded

    model = embedded.ensure_model()
    data = tmp_path / "train.jsonl"
    data.write_text(
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]\n'
    )
    config = {
        "model": {"uri": f"file://{model}"},
        "dataset": {"uri": f"file://{data}"},
        "output": {"uri": f"file://{tmp_path}/out"},
    }
    proc, term = run_cli(tmp_path, json.dumps(config))
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert term["reason"] == "InvalidData"
    assert term["message"].startswith(f"file://{data}: line 2: not valid JSON")
    assert not (tmp_path / "out" / "adapter").exists(), "nothing is written for invalid data"
    assert "Traceback" not in proc.stderr


def test_help_is_fast_and_names_the_option():
    proc = subprocess.run(
        [sys.executable, "-m", "qlora_trainer.cli", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and "--config" in proc.stdout
