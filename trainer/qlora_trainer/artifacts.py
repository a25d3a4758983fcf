"""Artifacts in storage: ``<output>/adapter/`` (and ``merged/``) with ``manifest.json``, marker last.

``manifest.json`` is the lineage record of one result (DESIGN.md section 4):

* ``baseModel``: URI and per-file ETags (S3) or SHA-256 (local), and one digest over them;
* ``datasets``: train/eval URIs with per-file ETags or SHA-256, or the seeded fraction
  the eval rows were taken from;
* ``data``: counts (rows, skipped empty lines, truncated, dropped by truncation, tokens);
* ``config``: the full resolved trainer config (camelCase, defaults filled in);
* ``metrics``: eval loss before and after, train loss, steps, tokens/s, batch shape;
* ``run``: resumedFromStep, OOM back-offs, hardware, start and end times;
* ``versions``: python, torch, transformers, peft, trl, bitsandbytes, accelerate, ...
"""

from __future__ import annotations

import json
import platform
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

from . import contract
from .config import TrainingConfig
from .storage import Storage, as_prefix, join_uri

MANIFEST = contract.MANIFEST
_PACKAGES = (
    "qlora-operator",
    "torch",
    "transformers",
    "peft",
    "trl",
    "bitsandbytes",
    "accelerate",
    "datasets",
    "safetensors",
    "tokenizers",
    "boto3",
)


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that shape the result (``None`` for missing ones omitted)."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    try:
        import torch

        if torch.version.cuda:
            out["cuda"] = str(torch.version.cuda)
    except ImportError:  # pragma: no cover
        pass
    return out


def build_manifest(
    *,
    kind: str,
    cfg: TrainingConfig,
    base_lineage: dict[str, Any],
    data_lineage: dict[str, Any],
    data_stats: dict[str, Any],
    metrics: dict[str, Any],
    run: dict[str, Any],
) -> dict[str, Any]:
    """The manifest dict (see the module docstring); ``kind`` is ``adapter`` or ``merged``."""
    return {
        "kind": kind,
        "formatVersion": 1,
        "baseModel": base_lineage,
        "datasets": data_lineage,
        "data": data_stats,
        "config": cfg.model_dump(mode="json", by_alias=True),
        "metrics": metrics,
        "run": run,
        "versions": library_versions(),
    }


def save_adapter(
    model: Any, tokenizer: Any, local_dir: Path, base_uri: str, state_dict: dict[str, Any] | None = None
) -> Path:
    """Write the adapter (safetensors + ``adapter_config.json``) and tokenizer into ``local_dir``.

    ``base_model_name_or_path`` in the adapter config is set to the base model's URI
    (not the pod-local download path), so the artifact names where its base lives.
    ``state_dict``: the full adapter gathered from FSDP shards (``train.gather_adapter_state``);
    ``None`` reads it from ``model``.
    """
    local_dir = Path(local_dir)
    if local_dir.exists():
        shutil.rmtree(local_dir)
    local_dir.mkdir(parents=True)
    if state_dict is None:
        model.save_pretrained(str(local_dir), safe_serialization=True)
    else:
        model.save_pretrained(str(local_dir), safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(str(local_dir))
    config_path = local_dir / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    adapter_config["base_model_name_or_path"] = base_uri
    config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
    (local_dir / "README.md").unlink(missing_ok=True)  # PEFT's empty model card template
    return local_dir


def publish(storage: Storage, local_dir: Path, uri: str, manifest: dict[str, Any]) -> dict[str, str]:
    """Write ``manifest.json`` into ``local_dir``, upload all of it to ``uri``, ``_SUCCESS`` last.

    Returns ``{"uri": <prefix>, "manifestUri": <prefix>manifest.json}``.
    """
    (Path(local_dir) / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    prefix = as_prefix(uri)
    storage.upload_dir(Path(local_dir), prefix, marker={"kind": manifest.get("kind")})
    return {"uri": prefix, "manifestUri": join_uri(prefix, MANIFEST)}
