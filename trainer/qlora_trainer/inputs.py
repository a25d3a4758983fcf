"""Resolve the run's inputs: the base model directory and the encoded train/eval data, with lineage.

* Model: an ``s3://`` prefix is mirrored under the cache dir (ETags recorded); a
  ``file://`` directory is used in place (files hashed with SHA-256); ``hf://org/name``
  is fetched with the hub client (needs hub access). The directory must be in Hugging
  Face layout (``config.json`` plus weights and tokenizer files).
* Data: ``dataset.uri`` (a file or a prefix of shards) is read, normalised and encoded;
  the eval split comes from ``dataset.evalUri`` or, when unset, a seeded
  ``dataset.evalFraction`` of the training rows.

The lineage dicts returned here go into ``manifest.json`` unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import DatasetSource, ModelSource, TrainingConfig
from .data import DataStats, Sample, data_files, load_samples, split_eval
from .encode import Encoded, Encoder
from .errors import DataError, StorageError
from .storage import ObjectInfo, Storage, checksums, parse_uri

log = logging.getLogger(__name__)


def _digest(entries: list[dict[str, Any]]) -> str:
    """SHA-256 over the sorted JSON of file entries: one value that changes when any file does."""
    blob = json.dumps(sorted(entries, key=lambda e: e["path"]), sort_keys=True).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


@dataclass
class ModelInput:
    """The base model on local disk: ``path`` (HF layout) and its ``lineage`` (uri, files, digest)."""

    uri: str
    path: Path
    lineage: dict[str, Any]


def fetch_model(source: ModelSource, storage: Storage, cache_dir: Path) -> ModelInput:
    """Make the base model available locally.

    Raises:
        StorageError: the prefix is empty or unreadable, or holds no ``config.json``.
    """
    uri = source.uri
    if uri.startswith("hf://"):
        from huggingface_hub import snapshot_download

        repo = uri[len("hf://") :]
        try:
            path = Path(snapshot_download(repo, revision=source.revision))
        except Exception as err:  # noqa: BLE001 - hub errors are many; all are storage-like
            raise StorageError("download", uri, f"{type(err).__name__}: {err}") from err
        files = [
            {"path": p.relative_to(path).as_posix(), "size": p.stat().st_size}
            for p in sorted(path.rglob("*"))
            if p.is_file()
        ]
        lineage = {"uri": uri, "revision": source.revision or "main", "snapshot": path.name, "files": files}
    else:
        loc = parse_uri(uri)
        if loc.scheme == "file":
            path = loc.path
            if not path.is_dir():
                raise StorageError("download", uri, "404: no such directory")
            objects = storage.list(uri)
        else:
            path = Path(cache_dir) / "models" / loc.bucket / loc.key.strip("/")
            objects = storage.list(uri)
            if not objects:
                raise StorageError("download", uri, "404: no objects under this prefix")
            storage.download_prefix(uri, path)
        entries = checksums([o for o in objects if not o.relpath.startswith(".")])
        lineage = {"uri": uri, "files": entries, "digest": _digest(entries)}
    if not (path / "config.json").is_file():
        raise StorageError("download", uri, "no config.json: not a Hugging Face model directory")
    return ModelInput(uri, path, lineage)


def _data_files(uri: str, storage: Storage, cache_dir: Path) -> tuple[list[tuple[Path, str]], list[ObjectInfo]]:
    """Local data files of ``uri`` paired with their display URIs, and the objects for lineage."""
    local, objects = storage.fetch(uri, Path(cache_dir) / "data")
    if local.is_file():
        return [(local, uri)], objects
    base = uri.rstrip("/")
    files = data_files(local)
    return [(p, f"{base}/{p.relative_to(local).as_posix()}") for p in files], objects


@dataclass
class DataInput:
    """Encoded train and eval data with their counts and lineage."""

    train: Encoded
    eval: Encoded
    stats: dict[str, Any]
    lineage: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        """``stats`` with file lists replaced by their length (for a log line; the manifest keeps the lists)."""
        return {
            split: {k: len(v) if k == "files" else v for k, v in counts.items()} if isinstance(counts, dict) else counts
            for split, counts in self.stats.items()
        }


def _load(
    uri: str, ds: DatasetSource, storage: Storage, cache_dir: Path
) -> tuple[list[Sample], DataStats, dict[str, Any]]:
    files, objects = _data_files(uri, storage, cache_dir)
    used = {name for _, name in files}
    if not used:
        raise DataError(f"{uri}: no data files")
    samples, stats = load_samples(files, ds.format, ds.text_field)
    entries = checksums([o for o in objects if o.uri in used]) or checksums(objects)
    return samples, stats, {"uri": uri, "files": entries, "digest": _digest(entries)}


def prepare_data(cfg: TrainingConfig, storage: Storage, tokenizer: Any, cache_dir: Path) -> DataInput:
    """Read, split and encode the datasets of ``cfg``.

    Raises:
        DataError: malformed data (file and line named), no usable rows, or every row
            dropped by truncation.
        StorageError: a data URI cannot be read.
    """
    ds = cfg.dataset
    train_samples, train_stats, train_lineage = _load(ds.uri, ds, storage, cache_dir)
    lineage: dict[str, Any] = {"train": train_lineage}
    if ds.eval_uri:
        eval_samples, eval_stats, eval_lineage = _load(ds.eval_uri, ds, storage, cache_dir)
        lineage["eval"] = eval_lineage
    else:
        train_samples, eval_samples = split_eval(train_samples, ds.eval_fraction, cfg.training.seed)
        eval_stats = None
        lineage["eval"] = {"fromTrain": True, "fraction": ds.eval_fraction, "seed": cfg.training.seed}
    encoder = Encoder(
        tokenizer,
        max_length=cfg.training.max_seq_length,
        chat_template=ds.chat_template,
        completions_only=cfg.training.train_on_completions_only,
    )
    train = encoder.encode(train_samples)
    evals = encoder.encode(eval_samples)
    if not train.input_ids:
        raise DataError(
            f"{ds.uri}: every training row was dropped because its answer lies beyond "
            f"training.maxSeqLength={cfg.training.max_seq_length} tokens: raise training.maxSeqLength"
        )
    if not evals.input_ids:
        raise DataError(
            f"{ds.eval_uri or ds.uri}: every eval row was dropped by truncation at "
            f"training.maxSeqLength={cfg.training.max_seq_length}: raise training.maxSeqLength"
        )
    stats = {
        "train": {**train_stats.as_dict(), "rows": len(train_samples), **train.stats.as_dict()},
        "eval": {
            **(eval_stats.as_dict() if eval_stats else {"files": [], "skippedEmptyLines": 0}),
            "rows": len(eval_samples),
            **evals.stats.as_dict(),
        },
        "format": train_stats.format,
        "chatTemplate": encoder.template_name,
    }
    return DataInput(train, evals, stats, lineage)
