"""Deployable exports of a run (``output.export``, issue 17), each under ``<output>/run-<N>/export/``.

=================================  ===========================================================
``export/gguf-<quant>/``           ``model-<quant>.gguf`` (llama.cpp), ``manifest.json``, ``_SUCCESS`` last
``export/vllm/``                   ``adapter_config.json`` + ``adapter_model.safetensors``, ``serve.sh``,
                                   ``README.md`` (the exact ``vllm serve`` line), ``manifest.json``,
                                   ``_SUCCESS`` last
=================================  ===========================================================

GGUF is made from the merged model (``output.merge.enabled`` is required, by the CRD's
CEL rule and the config validator) with llama.cpp's own ``convert_hf_to_gguf.py``
(its Hugging Face architecture and tokenizer mapping; never a hand-written tensor map),
``--outtype`` f16, bf16 or q8_0. The script and its ``gguf-py`` come pinned from the
llama-cpp-python sdist :data:`CONVERTER_VERSION` (sha256 checked) by
``hack/fetch-converter.sh`` (``make converter``; the trainer image runs it at build
time into ``/opt/llama.cpp``). It is found at ``QLORA_LLAMA_CPP_DIR``, else
``${XDG_CACHE_HOME:-~/.cache}/qlora-operator/llama.cpp/llama-cpp-python-<version>/``.
The bundled ``gguf-py`` (gguf 0.19.0) is the one it runs with; it equals the pinned
``gguf`` package transformers reads GGUF with.

Every GGUF's tokenizer is checked before it is published (:func:`check_gguf_tokenizer`):
transformers' GGUF loader must encode :data:`TOKENIZER_PROBES` to the merged model's token ids.
llama.cpp's converter picks its vocabulary reader from the shape of ``tokenizer.json`` and can
write a wrong one without failing (a byte-level BPE with byte fallback is read as a Llama
SentencePiece vocabulary, without merges): such a GGUF answers garbage, so it fails the export.

Supported architectures (:data:`SUPPORTED_ARCHITECTURES`, from the base's ``config.json``
``architectures``/``model_type``): Llama (SmolLM2 is one), Mistral, Qwen2, Qwen3. Others are
refused before training (:func:`check_exportable`: exit 2, reason ``InvalidConfig``).

vLLM serves the adapter itself (``--enable-lora --lora-modules name=path``); the
merged model (``<output>/run-<N>/merged/``) is named in the README as the other way.
vLLM needs a GPU: this layout is checked with PEFT's loader and the file names vLLM
reads, not by vLLM here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from . import contract
from .artifacts import publish
from .config import ExportTarget, TrainingConfig
from .errors import EXIT_INVALID_CONFIG, TrainerError
from .storage import Storage, join_uri

#: llama-cpp-python release whose vendored llama.cpp provides ``convert_hf_to_gguf.py`` (``hack/versions.env``).
CONVERTER_VERSION = "0.3.36"
#: ``config.json`` ``architectures`` -> ``model_type`` the GGUF export supports.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
#: Texts the GGUF's tokenizer must encode to the merged model's token ids: words, punctuation, digits,
#: whitespace runs, non-ASCII letters and an emoji (byte-level pieces), a code line.
TOKENIZER_PROBES = (
    "What is the capital of France?",
    "In 1984, 12345 people paid $3.50 each.",
    "  two  spaces\tand a tab\n\nand newlines",
    "héllo wörld, naïve café 😀",
    "def f(x): return x**2  # square",
)
#: Files of the vLLM layout that vLLM's LoRA loader reads.
VLLM_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class ExportError(TrainerError):
    """The converter failed or is missing; the message names the export and the converter's last lines."""

    reason = contract.EXPORT_FAILED


class UnsupportedExportError(TrainerError):
    """``output.export`` asks for a format this base model's architecture cannot be exported to (before training)."""

    exit_code = EXIT_INVALID_CONFIG
    reason = contract.INVALID_CONFIG


def converter_dir() -> Path:
    """Where ``convert_hf_to_gguf.py`` lives (see the module docstring)."""
    env = os.environ.get(contract.ENV_LLAMA_CPP_DIR)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qlora-operator" / "llama.cpp" / f"llama-cpp-python-{CONVERTER_VERSION}"


def check_exportable(cfg: TrainingConfig, model_dir: Path) -> None:
    """Refuse (exit 2) a gguf export of an unsupported architecture, or without the converter, before training.

    Raises:
        UnsupportedExportError: the base's ``architectures`` are not in :data:`SUPPORTED_ARCHITECTURES`,
            or the converter is not installed.
    """
    for i, target in enumerate(cfg.output.export):
        if target.format != "gguf":
            continue
        try:
            model_config = json.loads((Path(model_dir) / "config.json").read_text())
        except (OSError, ValueError) as err:
            raise UnsupportedExportError(f"output.export[{i}]: cannot read the base model's config.json: {err}") from None
        archs = model_config.get("architectures") or []
        if not any(SUPPORTED_ARCHITECTURES.get(a) == model_config.get("model_type") for a in archs):
            raise UnsupportedExportError(
                f"output.export[{i}]: gguf export supports {', '.join(sorted(SUPPORTED_ARCHITECTURES))}; the base "
                f"model is {', '.join(archs) or 'of no listed architecture'} (model_type "
                f"{model_config.get('model_type')!r}): remove the gguf export or use a supported base"
            )
        script = converter_dir() / "convert_hf_to_gguf.py"
        if not script.is_file():
            raise UnsupportedExportError(
                f"output.export[{i}]: llama.cpp's converter is not installed at {script} (set QLORA_LLAMA_CPP_DIR, "
                "or run `make converter`; the trainer image carries it)"
            )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def convert_gguf(merged_dir: Path, quantization: str, out_dir: Path) -> Path:
    """Run ``convert_hf_to_gguf.py merged_dir --outtype quantization``; returns the ``.gguf`` file.

    Raises:
        ExportError: the converter exited non-zero (its last output lines in the message).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"model-{quantization}.gguf"
    script = converter_dir() / "convert_hf_to_gguf.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    env.pop("NO_LOCAL_GGUF", None)  # the gguf-py that ships with the script
    proc = subprocess.run(
        [sys.executable, str(script), str(merged_dir), "--outtype", quantization, "--outfile", str(target)],
        capture_output=True, text=True, env=env, cwd=str(out_dir),
    )
    if proc.returncode != 0 or not target.is_file():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
        raise ExportError(f"output.export gguf {quantization}: convert_hf_to_gguf.py exited {proc.returncode}: {tail}")
    return target


def check_gguf_tokenizer(merged_dir: Path, gguf: Path, quantization: str) -> None:
    """Refuse a GGUF whose tokenizer does not encode :data:`TOKENIZER_PROBES` as the merged model's does.

    Both tokenizers are loaded with transformers (``gguf_file=`` for the GGUF, as the demo and a
    transformers user load it); ids are compared without special tokens. About 5 s for a 49k
    vocabulary; a GGUF without BPE merges takes longer to load (transformers rebuilds them).

    Raises:
        ExportError: the first probe whose ids differ, with both id lists' heads and the GGUF's
            ``tokenizer.ggml.model``.
    """
    from transformers import AutoTokenizer

    source = AutoTokenizer.from_pretrained(str(merged_dir))
    exported = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    for text in TOKENIZER_PROBES:
        want = source(text, add_special_tokens=False)["input_ids"]
        got = exported(text, add_special_tokens=False)["input_ids"]
        if got != want:
            from gguf import GGUFReader

            field = GGUFReader(str(gguf)).fields.get("tokenizer.ggml.model")
            kind = field.contents() if field is not None else None
            raise ExportError(
                f"output.export gguf {quantization}: the GGUF's tokenizer (tokenizer.ggml.model {kind!r}) encodes "
                f"{text!r} as {got[:8]}... ({len(got)} ids), the merged model's tokenizer as {want[:8]}... "
                f"({len(want)} ids): llama.cpp's converter misread {merged_dir.name}/tokenizer.json; nothing published"
            )


def vllm_serve_line(base: str, name: str, adapter_path: str, rank: int) -> str:
    """The ``vllm serve`` command that serves ``adapter_path`` as LoRA module ``name`` on ``base``."""
    line = f"vllm serve {base} --enable-lora --lora-modules {name}={adapter_path}"
    if rank > 16:  # vLLM's default --max-lora-rank is 16
        line += f" --max-lora-rank {rank}"
    return line


def _base_for_vllm(model_uri: str) -> str:
    return model_uri.removeprefix("hf://") if model_uri.startswith("hf://") else "/models/base"


def write_vllm(adapter_dir: Path, out_dir: Path, cfg: TrainingConfig, *, name: str, merged_uri: str | None) -> Path:
    """The vLLM LoRA layout in ``out_dir``: adapter files, ``serve.sh`` and ``README.md``."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    for fname in VLLM_ADAPTER_FILES:
        shutil.copy2(Path(adapter_dir) / fname, out_dir / fname)
    base = _base_for_vllm(cfg.model.uri)
    line = vllm_serve_line("${BASE_MODEL}", name, "${ADAPTER_DIR}", cfg.lora.r)
    (out_dir / "serve.sh").write_text(
        "#!/bin/sh\n"
        "# Serve this LoRA adapter with vLLM (needs a GPU). BASE_MODEL: the base model, a hub id or a local copy of\n"
        f"# {cfg.model.uri}; ADAPTER_DIR: a local copy of this directory.\n"
        "set -eu\n"
        f'BASE_MODEL="${{BASE_MODEL:-{base}}}"\n'
        'ADAPTER_DIR="${ADAPTER_DIR:-$(cd "$(dirname "$0")" && pwd)}"\n'
        f'exec {line} "$@"\n'
    )
    (out_dir / "serve.sh").chmod(0o755)
    merged = (
        f"\nOr serve the merged model ({merged_uri}, safetensors) without LoRA:\n\n    vllm serve /models/merged\n"
        if merged_uri else ""
    )
    (out_dir / "README.md").write_text(
        f"# LoRA adapter `{name}` for vLLM\n\n"
        f"Base model: `{cfg.model.uri}` (copy it to `{base}`, or use its hub id). With this directory at "
        "`/adapters/" + name + "`:\n\n"
        f"    {vllm_serve_line(base, name, '/adapters/' + name, cfg.lora.r)}\n\n"
        f"then request `\"model\": \"{name}\"` from the OpenAI-compatible API. `sh serve.sh` runs the same line "
        "(BASE_MODEL and ADAPTER_DIR override the paths).\n"
        f"{merged}"
    )
    return out_dir


def export_all(
    cfg: TrainingConfig,
    storage: Storage,
    *,
    merged_dir: Path,
    adapter_dir: Path,
    work_dir: Path,
    export_root: str,
    adapter_manifest: dict[str, Any],
    merged_uri: str | None,
    name: str,
) -> list[dict[str, str]]:
    """Make and publish every ``cfg.output.export`` (marker last each); returns ``[{format, quantization?, uri, file}]``."""
    out = []
    for target in cfg.output.export:
        uri = join_uri(export_root, target.name)
        local = Path(work_dir) / "artifacts" / "export" / target.name
        if local.exists():
            shutil.rmtree(local)
        detail: dict[str, Any] = {"format": target.format}
        if target.format == "gguf":
            quant = target.resolved_quantization()
            gguf = convert_gguf(Path(merged_dir), quant, local)
            check_gguf_tokenizer(Path(merged_dir), gguf, quant)
            detail.update(quantization=quant, file=gguf.name, sha256=_sha256(gguf), bytes=gguf.stat().st_size,
                          converter={"package": "llama-cpp-python", "version": CONVERTER_VERSION,
                                     "script": "vendor/llama.cpp/convert_hf_to_gguf.py"})
        else:
            write_vllm(adapter_dir, local, cfg, name=name, merged_uri=merged_uri)
            detail.update(file="serve.sh", mergedUri=merged_uri)
        manifest = {**adapter_manifest, "kind": f"export-{target.format}", "export": detail}
        published = publish(storage, local, uri, manifest)
        entry = {"format": target.format, "uri": published["uri"], "file": join_uri(published["uri"], detail["file"])}
        if detail.get("quantization"):
            entry["quantization"] = detail["quantization"]
        out.append(entry)
    return out


def planned(cfg: TrainingConfig, export_root: str) -> list[dict[str, Any]]:
    """The adapter manifest's ``exports``: each requested export and its URI (complete once its _SUCCESS exists)."""
    out = []
    for target in cfg.output.export:
        entry: dict[str, Any] = {"format": target.format, "uri": join_uri(export_root, target.name) + "/"}
        if target.resolved_quantization():
            entry["quantization"] = target.resolved_quantization()
        out.append(entry)
    return out


__all__ = [
    "CONVERTER_VERSION", "SUPPORTED_ARCHITECTURES", "TOKENIZER_PROBES", "ExportError", "ExportTarget", "UnsupportedExportError",
    "check_exportable", "check_gguf_tokenizer", "convert_gguf", "converter_dir", "export_all", "planned", "vllm_serve_line", "write_vllm",
]
