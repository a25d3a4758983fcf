"""Stamp files: which input hash an image in podman's storage was built from.

A stamp is ``<cache>/stamps/<name>.json``:
``{"key": <sha256 of the inputs>, "ref": <tag>, "id": <image ID>, "seconds": <build time>, "builtAt": ...}``.
An image is up to date when its stamp's key equals the key of the current inputs and
the tag still resolves to the stamped image ID (an image removed or retagged by hand is
rebuilt).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from pathlib import Path

from localimages import engine

#: Files and directories skipped when hashing a COPY source (what .dockerignore drops).
SKIPPED_NAMES = ("__pycache__", ".pytest_cache")
SKIPPED_SUFFIXES = (".pyc", ".egg-info")


def _stamp_path(name: str) -> Path:
    path = engine.cache_dir() / "stamps"
    path.mkdir(exist_ok=True)
    return path / f"{name}.json"


def read(name: str) -> dict | None:
    """The stamp of ``name``, or ``None`` when there is none (or it is unreadable)."""
    try:
        return json.loads(_stamp_path(name).read_text())
    except (OSError, ValueError):
        return None


def write(name: str, key: str, ref: str, image: str, seconds: float) -> dict:
    """Record that ``ref`` (ID ``image``) was built from inputs hashing to ``key``."""
    stamp = {"key": key, "ref": ref, "id": image, "seconds": round(seconds, 1),
             "builtAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = _stamp_path(name)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(stamp, indent=1) + "\n")
    tmp.replace(path)
    return stamp


def current(name: str, key: str) -> dict | None:
    """The stamp of ``name`` when it matches ``key`` and its image is still there, else ``None``."""
    stamp = read(name)
    if not stamp or stamp.get("key") != key:
        return None
    return stamp if engine.image_id(stamp["ref"]) == stamp["id"] else None


def _files(path: Path) -> Iterable[Path]:
    if path.is_file():
        yield path
        return
    for child in sorted(path.iterdir()):
        if child.name in SKIPPED_NAMES or child.name.endswith(SKIPPED_SUFFIXES):
            continue
        yield from _files(child)


def hash_inputs(root: Path, sources: Iterable[str], extra: Iterable[str] = ()) -> str:
    """SHA-256 over the relative path and content of every file under ``sources`` plus ``extra`` strings.

    Raises:
        FileNotFoundError: a source does not exist under ``root``.
    """
    digest = hashlib.sha256()
    for source in sorted(set(sources)):
        top = root / source
        if not top.exists():
            raise FileNotFoundError(f"image input {source!r} does not exist under {root}")
        for path in _files(top):
            digest.update(str(path.relative_to(root)).encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    for item in extra:
        digest.update(item.encode() + b"\0")
    return digest.hexdigest()
