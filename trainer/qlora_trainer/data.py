"""Dataset files -> normalised :class:`Sample` rows (no tokenizer here; see ``encode``).

Sources: one local file or a directory of shards (``storage.fetch`` puts S3 data on
disk first). Extensions: ``.jsonl``/``.ndjson`` (one JSON object per line), ``.json``
(an array of objects, or a JSON-lines file with a ``.json`` name), ``.parquet``,
``.csv`` (header row). Shards of a directory are read in sorted path order; other
files (``_SUCCESS``, READMEs) are ignored.

Column types are never inferred from a prefix of the file: JSON-lines and CSV are
parsed here row by row, so a field that is null for the first thousands of rows and
text later loads like any other (a pyarrow/pandas reader guessing the type from the
first block would fail or drop it). Parquet carries its own schema.

Formats (``dataset.format``), with the fields each needs:

* ``text``: ``<textField>`` (string); every token is a target.
* ``instruction``: ``instruction``, optional ``input``, ``output``; becomes a user
  turn (instruction, blank line, input) and an assistant turn (output).
* ``promptCompletion``: ``prompt`` and ``completion`` strings (concatenated as they
  are), or lists of messages (conversational: the completion messages are targets).
* ``chat``: ``messages``, a list of ``{role, content}`` with roles ``system``,
  ``user``, ``assistant`` (``tool`` too); every assistant turn is a target.
* ``auto``: detected from the fields of the first row, in that order of preference:
  ``messages`` -> chat, ``prompt``+``completion`` -> promptCompletion,
  ``instruction``+``output`` -> instruction, ``<textField>`` -> text.

Errors are :class:`~qlora_trainer.errors.DataError` naming the file (its URI) and
the line (row for JSON arrays and Parquet): exit code 3.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import DatasetFormat
from .errors import DataError

#: File extensions read as data, by reader.
EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
#: Roles accepted in chat messages.
ROLES = frozenset({"system", "user", "assistant", "tool"})
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Message:
    """One chat turn."""

    role: str
    content: str


@dataclass(frozen=True)
class Sample:
    """A normalised row; exactly one of the three shapes is set.

    * ``text``: plain text, all of it trained on.
    * ``prompt`` + ``completion``: strings concatenated as-is; the completion is the target.
    * ``messages``: a conversation rendered by a chat template; assistant turns at index
      ``>= n_prompt_messages`` are targets.

    ``origin`` is ``"<file uri>:<line>"`` (or ``row``) for error messages.
    """

    origin: str
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    messages: tuple[Message, ...] | None = None
    n_prompt_messages: int = 0


@dataclass
class DataStats:
    """Counts reported in the manifest (camelCase keys in :meth:`as_dict`)."""

    files: list[str] = field(default_factory=list)
    rows: int = 0
    skipped_empty_lines: int = 0
    format: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "rows": self.rows,
            "skippedEmptyLines": self.skipped_empty_lines,
            "format": self.format,
        }


@dataclass(frozen=True)
class Record:
    """A raw row: its fields and where it came from (``unit`` is ``line`` or ``row``)."""

    name: str
    number: int
    unit: str
    fields: dict[str, Any]

    @property
    def origin(self) -> str:
        return f"{self.name}: {self.unit} {self.number}"

    def fail(self, message: str) -> DataError:
        return DataError(f"{self.origin}: {message}")


# ---------------------------------------------------------------------- files
def data_files(path: Path) -> list[Path]:
    """The data files at ``path``: the file itself, or the supported files under a directory, sorted.

    Raises:
        DataError: an unsupported extension for a single file, or a directory with no data files.
    """
    path = Path(path)
    if path.is_file():
        if _kind(path) is None:
            raise DataError(f"{path.name}: unsupported file type: use one of {', '.join(sorted(EXTENSIONS))}")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".") and _kind(p) is not None)
    if not files:
        raise DataError(f"{path}: no data files ({', '.join(sorted(EXTENSIONS))}) under this prefix")
    return files


def _kind(path: Path) -> str | None:
    return EXTENSIONS.get(path.suffix.lower())


def read_records(path: Path, name: str, stats: DataStats) -> Iterator[Record]:
    """Yield the rows of one data file; ``name`` (its URI) is used in messages.

    Empty lines (JSON-lines, CSV) are skipped and counted in ``stats``.

    Raises:
        DataError: malformed content, with file and line.
    """
    kind = _kind(path)
    if kind == "jsonl":
        yield from _read_jsonl(path, name, stats)
    elif kind == "json":
        yield from _read_json(path, name, stats)
    elif kind == "csv":
        yield from _read_csv(path, name, stats)
    elif kind == "parquet":
        yield from _read_parquet(path, name)
    else:
        raise DataError(f"{name}: unsupported file type: use one of {', '.join(sorted(EXTENSIONS))}")


def _read_jsonl(path: Path, name: str, stats: DataStats, data: bytes | None = None) -> Iterator[Record]:
    with io.BytesIO(data) if data is not None else open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if number == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{name}: line {number}: not UTF-8 text (byte {err.start + 1})") from None
            if not line.strip():
                stats.skipped_empty_lines += 1
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{name}: line {number}: not valid JSON: {err.msg} (column {err.colno})") from None
            if not isinstance(value, dict):
                raise DataError(f"{name}: line {number}: expected a JSON object, found {type(value).__name__}")
            yield Record(name, number, "line", value)


def _read_json(path: Path, name: str, stats: DataStats) -> Iterator[Record]:
    data = path.read_bytes()
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(f"{name}: line {line}: not UTF-8 text") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # JSON lines under a .json name
            yield from _read_jsonl(path, name, stats, data=data)
            return
        raise DataError(f"{name}: line {err.lineno}: not valid JSON: {err.msg} (column {err.colno})") from None
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(value) == 1 and lists:
            value = lists[0]
        else:
            value = [value]
    if not isinstance(value, list):
        raise DataError(f"{name}: expected a JSON array of objects, found {type(value).__name__}")
    for number, item in enumerate(value, start=1):
        if not isinstance(item, dict):
            raise DataError(f"{name}: row {number}: expected a JSON object, found {type(item).__name__}")
        yield Record(name, number, "row", item)


def _read_csv(path: Path, name: str, stats: DataStats) -> Iterator[Record]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh, strict=True)
            header: list[str] | None = None
            line = 0
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as err:
                    raise DataError(f"{name}: line {reader.line_num}: malformed CSV: {err}") from None
                start_line, line = line + 1, reader.line_num
                if not row or (len(row) == 1 and not row[0].strip()):
                    stats.skipped_empty_lines += 1
                    continue
                if header is None:
                    header = [h.strip() for h in row]
                    continue
                if len(row) != len(header):
                    raise DataError(
                        f"{name}: line {start_line}: expected {len(header)} fields ({', '.join(header)}), "
                        f"found {len(row)}"
                    )
                yield Record(name, start_line, "line", dict(zip(header, row, strict=True)))
    except UnicodeDecodeError as err:
        raise DataError(f"{name}: not UTF-8 text (byte {err.start + 1})") from None


def _read_parquet(path: Path, name: str) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{name}: not a readable Parquet file: {err}") from None
    number = 0
    for batch in pf.iter_batches(batch_size=1024):
        for item in batch.to_pylist():
            number += 1
            yield Record(name, number, "row", item)


# ---------------------------------------------------------------------- formats
def detect_format(fields: dict[str, Any], text_field: str = "text") -> DatasetFormat:
    """The format a row's field names imply (see the module docstring for the order).

    Raises:
        DataError: no known layout fits (message lists the fields found and the layouts).
    """
    keys = set(fields)
    if "messages" in keys:
        return DatasetFormat.chat
    if {"prompt", "completion"} <= keys:
        return DatasetFormat.prompt_completion
    if {"instruction", "output"} <= keys:
        return DatasetFormat.instruction
    if text_field in keys:
        return DatasetFormat.text
    raise DataError(
        f"cannot detect the dataset format from the fields {sorted(keys)}: expected messages (chat), "
        f"prompt+completion (promptCompletion), instruction+output (instruction) or {text_field!r} (text); "
        "set dataset.format and dataset.textField"
    )


def _string(record: Record, key: str, *, required: bool = True) -> str:
    value = record.fields.get(key)
    if value is None:
        if required:
            missing = "missing" if key not in record.fields else "null"
            raise record.fail(f"field {key!r} is {missing}: it must be a non-empty string")
        return ""
    if not isinstance(value, str):
        raise record.fail(f"field {key!r} must be a string, found {type(value).__name__}")
    if required and not value.strip():
        raise record.fail(f"field {key!r} is empty")
    return value


def _messages(record: Record, key: str, value: Any) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise record.fail(f"field {key!r} must be a non-empty list of {{role, content}} objects")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise record.fail(f"{key}[{i}] must be an object with role and content, found {type(item).__name__}")
        role = item.get("role")
        if role not in ROLES:
            raise record.fail(f"{key}[{i}].role must be one of {sorted(ROLES)}, found {role!r}")
        content = item.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise record.fail(f"{key}[{i}].content must be a string, found {type(content).__name__}")
        out.append(Message(role, content))
    return tuple(out)


def normalise(record: Record, fmt: DatasetFormat | str, text_field: str = "text") -> Sample:
    """Turn one raw row into a :class:`Sample` of format ``fmt`` (not ``auto``).

    Raises:
        DataError: a required field is missing, null, empty or of the wrong type; a
            conversation has no assistant turn to train on (file and line named).
    """
    fmt = DatasetFormat(fmt)
    origin = f"{record.name}:{record.number}"
    if fmt == DatasetFormat.text:
        return Sample(origin, text=_string(record, text_field))
    if fmt == DatasetFormat.instruction:
        instruction = _string(record, "instruction")
        extra = _string(record, "input", required=False)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        output = _string(record, "output")
        return Sample(origin, messages=(Message("user", user), Message("assistant", output)))
    if fmt == DatasetFormat.prompt_completion:
        prompt, completion = record.fields.get("prompt"), record.fields.get("completion")
        if isinstance(prompt, list) or isinstance(completion, list):
            p = _messages(record, "prompt", prompt)
            c = _messages(record, "completion", completion)
            if not any(m.role == "assistant" for m in c):
                raise record.fail("field 'completion' has no assistant message to train on")
            return Sample(origin, messages=p + c, n_prompt_messages=len(p))
        return Sample(
            origin, prompt=_string(record, "prompt", required=False), completion=_string(record, "completion")
        )
    if fmt == DatasetFormat.chat:
        messages = _messages(record, "messages", record.fields.get("messages"))
        if not any(m.role == "assistant" and m.content.strip() for m in messages):
            raise record.fail("messages has no non-empty assistant turn to train on")
        return Sample(origin, messages=messages)
    raise ValueError(f"normalise() needs a concrete format, not {fmt.value}")


def load_samples(
    files: Sequence[tuple[Path, str]], fmt: DatasetFormat | str = DatasetFormat.auto, text_field: str = "text"
) -> tuple[list[Sample], DataStats]:
    """Read and normalise every row of ``files`` (pairs of local path and display URI).

    ``auto`` is resolved from the first row of the first file and then applies to all.

    Raises:
        DataError: a malformed file or row, an undetectable format, or no rows at all.
    """
    stats = DataStats(files=[name for _, name in files])
    fmt = DatasetFormat(fmt)
    samples: list[Sample] = []
    for path, name in files:
        for record in read_records(path, name, stats):
            if fmt == DatasetFormat.auto:
                try:
                    fmt = detect_format(record.fields, text_field)
                except DataError as err:
                    raise record.fail(str(err)) from None
            samples.append(normalise(record, fmt, text_field))
    if not samples:
        raise DataError(f"{', '.join(stats.files) or 'dataset'}: no rows (only empty lines or empty files)")
    stats.rows = len(samples)
    stats.format = fmt.value
    return samples, stats


def split_eval(samples: Sequence[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out ``fraction`` of ``samples`` (at least one) for eval, chosen with ``seed``.

    Deterministic for a given input order and seed; the train rows keep their order.

    Raises:
        DataError: fewer than two rows (nothing left to train on).
    """
    n = len(samples)
    if n < 2:
        raise DataError(f"only {n} row(s): cannot hold out dataset.evalFraction for eval; set dataset.evalUri")
    n_eval = min(n - 1, max(1, round(n * fraction)))
    held = set(random.Random(seed).sample(range(n), n_eval))
    train = [s for i, s in enumerate(samples) if i not in held]
    evals = [s for i, s in enumerate(samples) if i in held]
    return train, evals
