"""Data loading and encoding (``qlora_trainer.data``, ``qlora_trainer.encode``).

Every format and file type, every bad-data case (the message names file and line),
column types not inferred from a prefix, BOM, empty lines, the pad-equals-EOS case
and truncation. The tokenizer is the real SmolLM2-135M-Instruct one from the embedded
model cache (``hack/embedded.py``; built once, about 40 s, then cached).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "hack") not in sys.path:
    sys.path.insert(0, str(REPO / "hack"))

from qlora_trainer.config import ConfigError, DatasetFormat  # noqa: E402
from qlora_trainer.data import Message, Sample, data_files, load_samples, split_eval  # noqa: E402
from qlora_trainer.errors import DataError  # noqa: E402

IGNORE = -100


@pytest.fixture(scope="session")
def tokenizer():
    """The real SmolLM2 tokenizer (pad token == EOS == ``<|im_end|>``)."""
    import embedded
    from qlora_trainer.model import load_tokenizer

    return load_tokenizer(embedded.ensure_model())


def write_jsonl(path: Path, rows: list, raw_lines: list[str] | None = None) -> Path:
    lines = [json.dumps(r) for r in rows] if raw_lines is None else raw_lines
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def load(path: Path, fmt: str = "auto", text_field: str = "text"):
    files = [
        (p, f"s3://bucket/{p.relative_to(path.parent if path.is_file() else path).as_posix()}")
        for p in data_files(path)
    ]
    return load_samples(files, fmt, text_field)


CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]}
ROWS = {
    "text": ({"text": "Plain text to learn."}, DatasetFormat.text),
    "instruction": ({"instruction": "Add", "input": "1 and 2", "output": "3"}, DatasetFormat.instruction),
    "promptCompletion": ({"prompt": "The sky is", "completion": " blue."}, DatasetFormat.prompt_completion),
    "chat": (CHAT, DatasetFormat.chat),
}


# ---------------------------------------------------------------- formats and file types
@pytest.mark.parametrize("name", sorted(ROWS))
@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
def test_each_format_loads_from_jsonl(tmp_path, name, explicit):
    row, fmt = ROWS[name]
    path = write_jsonl(tmp_path / "d.jsonl", [row, row])
    samples, stats = load(path, fmt.value if explicit else "auto")
    assert stats.rows == 2 and stats.format == fmt.value
    s = samples[0]
    if fmt == DatasetFormat.text:
        assert s.text == "Plain text to learn."
    elif fmt == DatasetFormat.prompt_completion:
        assert (s.prompt, s.completion) == ("The sky is", " blue.")
    elif fmt == DatasetFormat.instruction:
        assert s.messages == (Message("user", "Add\n\n1 and 2"), Message("assistant", "3"))
    else:
        assert s.messages == (Message("user", "Hi"), Message("assistant", "Hello there"))


def test_json_array_parquet_csv_and_a_prefix_of_shards(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a.json").write_text(json.dumps([{"prompt": "p1", "completion": "c1"}]))
    pq.write_table(pa.table({"prompt": ["p2", "p3"], "completion": ["c2", "c3"]}), shards / "b.parquet")
    (shards / "c.csv").write_text('prompt,completion\np4,"c4, with comma"\n', encoding="utf-8")
    write_jsonl(shards / "d.jsonl", [{"prompt": "p5", "completion": "c5"}])
    (shards / "_SUCCESS").write_text("{}")
    (shards / "README.md").write_text("not data")
    samples, stats = load(shards)
    assert [s.completion for s in samples] == ["c1", "c2", "c3", "c4, with comma", "c5"]
    assert [f.rsplit("/", 1)[-1] for f in stats.files] == ["a.json", "b.parquet", "c.csv", "d.jsonl"]


def test_conversational_prompt_completion_trains_on_the_completion_messages_only(tmp_path):
    row = {"prompt": [{"role": "user", "content": "Q"}], "completion": [{"role": "assistant", "content": "A"}]}
    samples, _ = load(write_jsonl(tmp_path / "d.jsonl", [row]))
    assert samples[0].messages == (Message("user", "Q"), Message("assistant", "A"))
    assert samples[0].n_prompt_messages == 1


def test_json_lines_under_a_json_name(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(CHAT) + "\n" + json.dumps(CHAT) + "\n")
    assert load(path)[1].rows == 2


# ---------------------------------------------------------------- types, BOM, empty lines
def test_a_column_null_for_thousands_of_rows_then_text_loads(tmp_path):
    rows = [{"instruction": f"q{i}", "input": None, "output": f"a{i}", "meta": None} for i in range(3000)]
    rows += [{"instruction": "q", "input": "late context", "output": "a", "meta": {"source": "x"}}]
    samples, stats = load(write_jsonl(tmp_path / "d.jsonl", rows))
    assert stats.rows == 3001
    assert samples[0].messages[0].content == "q0"
    assert samples[-1].messages[0].content == "q\n\nlate context"


def test_utf8_bom_is_stripped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "caf\u00e9"}).encode() + b"\n")
    samples, _ = load(path)
    assert samples[0].text == "caf\u00e9"
    csv_path = tmp_path / "d.csv"
    csv_path.write_bytes(b"\xef\xbb\xbftext\nhello\n")
    assert load(csv_path)[0][0].text == "hello"


def test_empty_lines_are_skipped_and_counted(tmp_path):
    lines = [json.dumps({"text": "a"}), "", "   ", json.dumps({"text": "b"}), "\t"]
    samples, stats = load(write_jsonl(tmp_path / "d.jsonl", [], raw_lines=lines))
    assert [s.text for s in samples] == ["a", "b"]
    assert stats.skipped_empty_lines == 3  # "", "   " and "\t"; the final newline ends a line, it is not one
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("text\na\n\nb\n")
    assert load(csv_path)[1].skipped_empty_lines == 1


# ---------------------------------------------------------------- bad data: file and line
BAD_JSONL = {
    "malformed JSON": ('{"text": "ok"}\n{"text": "broken\n', "line 2: not valid JSON"),
    "not an object": ('{"text": "ok"}\n\n["a", "b"]\n', "line 3: expected a JSON object, found list"),
    "missing field": ('{"text": "ok"}\n{"other": "x"}\n', "line 2: field 'text' is missing"),
    "null field": ('{"text": "ok"}\n{"text": null}\n', "line 2: field 'text' is null"),
    "wrong type": ('{"text": "ok"}\n{"text": 5}\n', "line 2: field 'text' must be a string, found int"),
    "empty text": ('{"text": "ok"}\n{"text": "  "}\n', "line 2: field 'text' is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_JSONL))
def test_bad_jsonl_names_file_and_line(tmp_path, case):
    content, expected = BAD_JSONL[case]
    path = tmp_path / "train.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        load(path, "text")
    assert str(err.value).startswith("s3://bucket/train.jsonl: ")
    assert expected in str(err.value)


BAD_CHAT = {
    "no assistant turn": ({"messages": [{"role": "user", "content": "hi"}]}, "no non-empty assistant turn"),
    "unknown role": ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role must be one of"),
    "messages not a list": ({"messages": "hello"}, "field 'messages' must be a non-empty list"),
    "content not text": ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content must be a string"),
}


@pytest.mark.parametrize("case", sorted(BAD_CHAT))
def test_bad_chat_rows_name_file_and_line(tmp_path, case):
    row, expected = BAD_CHAT[case]
    path = write_jsonl(tmp_path / "chat.jsonl", [CHAT, CHAT, row])
    with pytest.raises(DataError, match=rf"chat\.jsonl: line 3: .*{re.escape(expected)}"):
        load(path)


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl: line 2: not UTF-8"):
        load(path)


def test_csv_with_a_wrong_field_count_names_the_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,completion\np,c\n"multi\nline",c\np,c,extra\n')
    with pytest.raises(DataError, match=r"d\.csv: line 5: expected 2 fields \(prompt, completion\), found 3"):
        load(path)


def test_malformed_json_array_names_the_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n {"text": "a"},\n {"text": "b",}\n]\n')
    with pytest.raises(DataError, match=r"d\.json: line 3: not valid JSON"):
        load(path)


def test_json_array_item_that_is_not_an_object_names_the_row(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": "a"}, 7]))
    with pytest.raises(DataError, match=r"d\.json: row 2: expected a JSON object"):
        load(path)


def test_undetectable_format_names_the_fields_and_the_fix(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(
        DataError, match=r"d\.jsonl: line 1: cannot detect .*\['answer', 'question'\].*set dataset.format"
    ):
        load(path)


def test_a_file_of_empty_lines_has_no_rows(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="no rows"):
        load(path)


def test_a_prefix_without_data_files(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no data files"):
        data_files(tmp_path)


def test_eval_split_is_seeded_and_disjoint():
    samples = [Sample(f"f:{i}", text=str(i)) for i in range(100)]
    train, evals = split_eval(samples, 0.1, seed=7)
    again = split_eval(samples, 0.1, seed=7)
    assert len(evals) == 10 and len(train) == 90
    assert [s.text for s in evals] == [s.text for s in again[1]]
    assert not {s.text for s in train} & {s.text for s in evals}
    assert [s.text for s in split_eval(samples, 0.1, seed=8)[1]] != [s.text for s in evals]
    with pytest.raises(DataError, match="evalUri"):
        split_eval(samples[:1], 0.1, seed=7)


# ---------------------------------------------------------------- encoding (real tokenizer)
def targets(tokenizer, ids, labels) -> str:
    return tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE])


def test_pad_equals_eos_and_the_final_eos_is_still_a_target(tokenizer):
    from qlora_trainer.encode import Encoder
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the case under test
    eos = tokenizer.eos_token_id
    sample = Sample("f:1", messages=(Message("user", "Hi"), Message("assistant", "Hello there")))
    enc = Encoder(tokenizer, max_length=256).encode([sample])
    ids, labels = enc.input_ids[0], enc.labels[0]
    assert ids[-1] == eos and labels[-1] == eos
    assert targets(tokenizer, ids, labels) == "Hello there<|im_end|>"
    # the prompt's own <|im_end|> tokens (same id) are not targets
    assert any(t == eos and label == IGNORE for t, label in zip(ids, labels, strict=True))
    # TRL's collator pads with the pad id (== EOS) but keeps our labels: the EOS target survives
    short = Sample("f:2", prompt="a", completion="b")
    short_enc = Encoder(tokenizer, max_length=256).encode([short])
    for padding_free in (False, True):
        collate = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=padding_free)
        batch = collate(
            [{"input_ids": ids, "labels": labels}, {"input_ids": short_enc.input_ids[0], "labels": short_enc.labels[0]}]
        )
        first = batch["labels"][0][: len(ids)].tolist()
        assert first[-1] == eos
        if not padding_free:
            assert batch["input_ids"][1][-1].item() == eos  # padding really uses the EOS id
            assert batch["labels"][1][-1].item() == IGNORE  # and padding is not a target


def test_multi_turn_chat_trains_on_every_assistant_turn(tokenizer):
    from qlora_trainer.encode import Encoder

    sample = Sample(
        "f:1",
        messages=(
            Message("system", "Be brief."),
            Message("user", "One?"),
            Message("assistant", "1"),
            Message("user", "Two?"),
            Message("assistant", "2"),
        ),
    )
    enc = Encoder(tokenizer, max_length=256).encode([sample])
    assert targets(tokenizer, enc.input_ids[0], enc.labels[0]) == "1<|im_end|>\n2<|im_end|>"


@pytest.mark.parametrize(
    "template,expected",
    [
        ("chatml", "Hello there<|im_end|>"),
        ("llama2", " Hello there <|im_end|>"),
        ("alpaca", "Hello there<|im_end|>"),
    ],
)
def test_named_chat_templates(tokenizer, template, expected):
    from qlora_trainer.encode import Encoder

    sample = Sample("f:1", messages=(Message("user", "Hi"), Message("assistant", "Hello there")))
    enc = Encoder(tokenizer, max_length=256, chat_template=template).encode([sample])
    ids, labels = enc.input_ids[0], enc.labels[0]
    assert targets(tokenizer, ids, labels) == expected
    assert ids[-1] == tokenizer.eos_token_id and labels[-1] == tokenizer.eos_token_id
    assert "You are a helpful AI assistant" not in tokenizer.decode(ids)  # not the tokenizer's template


def test_text_and_prompt_completion_get_an_eos_target(tokenizer):
    from qlora_trainer.encode import Encoder

    encoder = Encoder(tokenizer, max_length=64)
    enc = encoder.encode([Sample("f:1", text="Hello world"), Sample("f:2", prompt="The sky is", completion=" blue.")])
    assert targets(tokenizer, enc.input_ids[0], enc.labels[0]) == "Hello world<|im_end|>"
    assert targets(tokenizer, enc.input_ids[1], enc.labels[1]) == " blue.<|im_end|>"
    assert tokenizer.decode(enc.input_ids[1]) == "The sky is blue.<|im_end|>"


def test_train_on_everything_when_completions_only_is_off(tokenizer):
    from qlora_trainer.encode import Encoder

    enc = Encoder(tokenizer, max_length=64, completions_only=False).encode(
        [Sample("f:1", prompt="The sky is", completion=" blue.")]
    )
    assert enc.labels[0] == enc.input_ids[0]


def test_truncation_drops_rows_whose_answer_is_cut_away_and_counts_them(tokenizer):
    from qlora_trainer.encode import Encoder

    long_prompt = "word " * 200
    rows = [
        Sample("f:1", prompt=long_prompt, completion=" answer"),  # answer beyond 32 tokens: dropped
        Sample("f:2", prompt="Q: ", completion="one two three " * 30),  # answer cut but partly kept
        Sample("f:3", prompt="Q: ", completion="short"),  # fits
    ]
    enc = Encoder(tokenizer, max_length=32).encode(rows)
    assert enc.stats.dropped_truncated == 1
    assert enc.stats.truncated == 1
    assert enc.stats.examples == 2
    assert all(len(ids) <= 32 for ids in enc.input_ids)
    assert any(label != IGNORE for label in enc.labels[0])
    assert enc.stats.as_dict()["droppedTruncated"] == 1


def test_a_tokenizer_without_a_chat_template_asks_for_a_named_one(tokenizer):
    import copy

    from qlora_trainer.encode import Encoder

    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(ConfigError, match="set dataset.chatTemplate to chatml"):
        Encoder(bare, max_length=64).encode([Sample("f:1", messages=(Message("user", "a"), Message("assistant", "b")))])
    enc = Encoder(bare, max_length=64, chat_template="chatml").encode(
        [Sample("f:1", messages=(Message("user", "a"), Message("assistant", "b")))]
    )
    assert enc.stats.examples == 1
