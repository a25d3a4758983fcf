"""``output.export`` without training: config rules, names, the pinned converter, the vLLM files (fast)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from qlora_trainer.config import ConfigError, parse_config
from qlora_trainer.export import (
    CONVERTER_VERSION,
    UnsupportedExportError,
    check_exportable,
    planned,
    vllm_serve_line,
    write_vllm,
)

REPO = Path(__file__).resolve().parents[2]
BASE = {"model": {"uri": "s3://models/m/"}, "dataset": {"uri": "s3://data/d.jsonl"}}


def cfg(output: dict):
    return parse_config({**BASE, "output": {"uri": "s3://out/x/", **output}})


@pytest.mark.parametrize("output,fragment", [
    ({"export": [{"format": "gguf"}]}, "output.export needs output.merge.enabled: true"),
    ({"merge": {"enabled": True}, "export": [{"format": "vllm"}, {"format": "vllm"}]}, "each format may be listed once"),
    ({"merge": {"enabled": True}, "export": [{"format": "vllm", "quantization": "f16"}]}, "gguf only"),
    ({"merge": {"enabled": True}, "export": [{"format": "onnx"}]}, "output.export.0.format"),
])
def test_invalid_exports_are_refused_naming_the_field(output, fragment):
    with pytest.raises(ConfigError) as info:
        cfg(output)
    assert fragment in str(info.value).replace("[0]", ".0"), str(info.value)


def test_gguf_defaults_to_q8_0_and_planned_uris():
    c = cfg({"merge": {"enabled": True}, "export": [{"format": "gguf"}, {"format": "vllm"}]})
    assert [t.name for t in c.output.export] == ["gguf-q8_0", "vllm"]
    assert planned(c, "s3://out/x/run-2/export") == [
        {"format": "gguf", "uri": "s3://out/x/run-2/export/gguf-q8_0/", "quantization": "q8_0"},
        {"format": "vllm", "uri": "s3://out/x/run-2/export/vllm/"},
    ]


def test_converter_version_is_the_pinned_one():
    env = dict(re.findall(r"^(\w+)=(\S+)$", (REPO / "hack/versions.env").read_text(), re.M))
    assert env["LLAMA_CPP_PYTHON_VERSION"] == CONVERTER_VERSION
    assert re.fullmatch(r"[0-9a-f]{64}", env["LLAMA_CPP_PYTHON_SHA256"])


@pytest.mark.parametrize("archs,model_type,ok", [
    (["LlamaForCausalLM"], "llama", True), (["MistralForCausalLM"], "mistral", True),
    (["Qwen2ForCausalLM"], "qwen2", True), (["Qwen3ForCausalLM"], "qwen3", True),
    (["Gemma2ForCausalLM"], "gemma2", False), ([], None, False),
])
def test_architectures(tmp_path, monkeypatch, archs, model_type, ok):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": archs, "model_type": model_type}))
    conv = tmp_path / "conv"
    conv.mkdir()
    (conv / "convert_hf_to_gguf.py").write_text("")
    monkeypatch.setenv("QLORA_LLAMA_CPP_DIR", str(conv))
    c = cfg({"merge": {"enabled": True}, "export": [{"format": "gguf"}]})
    if ok:
        check_exportable(c, tmp_path)
    else:
        with pytest.raises(UnsupportedExportError, match=r"output.export\[0\]: gguf export supports"):
            check_exportable(c, tmp_path)


def test_vllm_layout_and_serve_line(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"x")
    c = parse_config({"model": {"uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct"}, "dataset": BASE["dataset"],
                      "lora": {"r": 64}, "output": {"uri": "s3://out/x/", "merge": {"enabled": True},
                                                    "export": [{"format": "vllm"}]}})
    out = write_vllm(adapter, tmp_path / "vllm", c, name="bot", merged_uri="s3://out/x/run-1/merged/")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                      "serve.sh"]
    line = "vllm serve HuggingFaceTB/SmolLM2-135M-Instruct --enable-lora --lora-modules bot=/adapters/bot --max-lora-rank 64"
    assert line in (out / "README.md").read_text() and "s3://out/x/run-1/merged/" in (out / "README.md").read_text()
    assert vllm_serve_line("b", "n", "/p", 16) == "vllm serve b --enable-lora --lora-modules n=/p"
