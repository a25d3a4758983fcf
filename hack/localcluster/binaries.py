"""Locate the pinned local-cluster binaries, building them when the cache lacks one.

``hack/build-binaries.sh`` builds every binary from Go modules and caches it under
``${XDG_CACHE_HOME:-$HOME/.cache}/qlora-operator/bin/<name>-<version>/<name>``; its last
stdout lines are ``NAME=PATH``. Versions come from ``hack/versions.env``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

HACK_DIR = Path(__file__).resolve().parent.parent
VERSIONS_FILE = HACK_DIR / "versions.env"
BUILD_SCRIPT = HACK_DIR / "build-binaries.sh"

#: binary name -> the versions.env key holding its version (the cache key).
VERSION_KEYS = {
    "kube-apiserver": "KUBERNETES_VERSION",
    "kube-controller-manager": "KUBERNETES_VERSION",
    "kube-scheduler": "KUBERNETES_VERSION",
    "kubectl": "KUBERNETES_VERSION",
    "kubelet": "KUBERNETES_VERSION",
    "kube-proxy": "KUBERNETES_VERSION",
    "etcd": "ETCD_VERSION",
    "minio": "MINIO_VERSION",
    "helm": "HELM_VERSION",
    "kueue": "KUEUE_VERSION",
    "coredns": "COREDNS_VERSION",
}


class BinariesError(RuntimeError):
    """The binaries could not be found or built; the message holds the build output."""


def read_versions(path: Path = VERSIONS_FILE) -> dict[str, str]:
    """Parse ``versions.env`` (``KEY=VALUE`` lines, ``#`` comments) into a dict."""
    versions: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        versions[key.strip()] = value.strip().strip('"').strip("'")
    return versions


def cache_dir() -> Path:
    """The binary cache: ``${XDG_CACHE_HOME:-$HOME/.cache}/qlora-operator/bin``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qlora-operator" / "bin"


def cache_key(name: str, versions: dict[str, str]) -> str:
    """The cache directory suffix of ``name``: its version (as ``build-binaries.sh`` names it).

    helm's key also carries the Kubernetes minor version its ldflags default to.
    """
    key = versions[VERSION_KEYS[name]]
    if name == "helm":
        key += f"-kube1.{versions['KUBERNETES_VERSION'].split('.')[1]}"
    return key


def expected_paths() -> dict[str, Path]:
    """Where each binary lives in the cache for the pinned versions (may not exist)."""
    versions = read_versions()
    root = cache_dir()
    return {name: root / f"{name}-{cache_key(name, versions)}" / name for name in VERSION_KEYS}


def parse_build_output(stdout: str) -> dict[str, Path]:
    """Parse the build script's ``NAME=PATH`` lines (a PATH that is a directory means PATH/NAME)."""
    found: dict[str, Path] = {}
    for line in stdout.splitlines():
        name, sep, value = line.strip().partition("=")
        if not sep or name not in VERSION_KEYS:
            continue
        path = Path(value)
        found[name] = path / name if path.is_dir() else path
    return found


def find_binaries(build: bool = True, timeout_s: float = 3 * 3600,
                  names: tuple[str, ...] | None = None) -> dict[str, Path]:
    """Return ``{name: path}`` for every pinned binary (the ``names`` ones must exist; default all).

    Takes them from the cache when those exist; otherwise runs the build script (when
    ``build`` is true; a cold build takes tens of minutes) and parses its output.

    Raises:
        BinariesError: a binary is missing and ``build`` is false, the build failed,
            or the build did not produce an executable for every name.
    """
    paths = expected_paths()
    wanted = names or tuple(VERSION_KEYS)
    missing = [name for name in wanted if not os.access(paths[name], os.X_OK)]
    if not missing:
        return paths
    if not build:
        raise BinariesError(f"binaries missing from the cache {cache_dir()}: {', '.join(missing)}; "
                            f"run: bash {BUILD_SCRIPT}")
    proc = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise BinariesError(f"{BUILD_SCRIPT} failed with exit code {proc.returncode}:\n{proc.stderr[-4000:]}")
    found = parse_build_output(proc.stdout)
    bad = [name for name in wanted if name not in found or not os.access(found[name], os.X_OK)]
    if bad:
        raise BinariesError(f"{BUILD_SCRIPT} did not produce: {', '.join(bad)}\n{proc.stdout[-2000:]}")
    return found
