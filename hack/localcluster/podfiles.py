"""Where the node agent keeps each pod's files (no Kubernetes imports: tests use this too).

Layout under the cluster's ``pods/`` directory::

    <namespace>_<pod>_<uid>/
        <container>.log          stdout and stderr of every run of the container
        <container>.termination  the host file behind its terminationMessagePath
        volumes/<volume>/        emptyDir, configMap, secret, projected, downwardAPI volumes
        tmp/                     TMPDIR of the pod's processes
        work/                    working directory when the container sets none

Logs stay after the pod is deleted; ``volumes/`` and ``tmp/`` are removed then.
"""

from __future__ import annotations

from pathlib import Path


def pod_dir(pods_dir: Path, namespace: str, pod: str, uid: str) -> Path:
    """The directory of one pod incarnation (namespace, name and uid)."""
    return Path(pods_dir) / f"{namespace}_{pod}_{uid}"


def find_pod_dir(pods_dir: Path, namespace: str, pod: str) -> Path:
    """The newest directory of the pod named ``namespace/pod`` (any uid).

    Raises:
        FileNotFoundError: the node agent never ran a pod of that name.
    """
    candidates = [p for p in Path(pods_dir).glob(f"{namespace}_{pod}_*")
                  if p.is_dir() and p.name.count("_") >= 2 and p.name.rsplit("_", 1)[0] == f"{namespace}_{pod}"]
    if not candidates:
        raise FileNotFoundError(f"no files of pod {namespace}/{pod} under {pods_dir}")
    return max(candidates, key=lambda p: p.stat().st_mtime)


def pod_log(pods_dir: Path, namespace: str, pod: str, container: str | None = None) -> str:
    """The log (stdout and stderr) of a container of the pod ``namespace/pod``.

    ``container`` may be omitted when the pod has a single container log.

    Raises:
        FileNotFoundError: no such pod or container log.
        ValueError: ``container`` omitted but the pod has several logs.
    """
    directory = find_pod_dir(pods_dir, namespace, pod)
    if container is None:
        logs = sorted(directory.glob("*.log"))
        if len(logs) != 1:
            names = ", ".join(p.stem for p in logs) or "none"
            raise ValueError(f"pod {namespace}/{pod} has container logs {names}: name one")
        return logs[0].read_text(errors="replace")
    path = directory / f"{container}.log"
    if not path.exists():
        raise FileNotFoundError(f"no log of container {container!r} of pod {namespace}/{pod} in {directory}")
    return path.read_text(errors="replace")
