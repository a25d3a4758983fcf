"""Containers shaped like pods for the image tests.

:func:`pod_run` runs a command in an image the way a kubelet runs the pod spec the
operator renders (``render.render_pod_spec``) or the chart's Deployment: the container's
user and group, ``readOnlyRootFilesystem`` (podman's ``--read-only`` without its extra
tmpfs mounts), capabilities dropped, no privilege escalation, every ``emptyDir`` a
fresh directory of mode 0777 on the host (``medium: Memory`` a tmpfs), the literal
``env`` values, and no network.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "hack") not in sys.path:
    sys.path.insert(0, str(REPO / "hack"))

from localimages import engine  # noqa: E402

from qlora_operator import render  # noqa: E402
from qlora_operator.api import QLoRAJobSpec  # noqa: E402
from qlora_operator.settings import OperatorSettings  # noqa: E402

PROBES = Path(__file__).resolve().parent / "probes"


@dataclass
class PodShape:
    """What a pod spec asks of its container, in podman terms."""

    user: str
    group_add: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    empty_dirs: list[str] = field(default_factory=list)
    memory_dirs: list[str] = field(default_factory=list)
    read_only: bool = True


def trainer_pod_shape() -> PodShape:
    """The trainer container of the pod spec the operator renders for a minimal QLoRAJob."""
    body = {"metadata": {"name": "image-test", "namespace": "default", "uid": "0", "generation": 1}}
    spec = QLoRAJobSpec.model_validate({
        "model": {"uri": "s3://models/m/"}, "dataset": {"uri": "s3://data/d.jsonl"},
        "output": {"uri": "s3://artifacts/out/"},
    })
    pod = render.render_pod_spec(body, spec, OperatorSettings())
    container = pod["containers"][0]
    volumes = {v["name"]: v for v in pod["volumes"]}
    shape = PodShape(user=f"{container['securityContext']['runAsUser']}:{container['securityContext']['runAsGroup']}",
                     group_add=[str(pod["securityContext"]["fsGroup"])],
                     read_only=container["securityContext"]["readOnlyRootFilesystem"])
    # Only literal values: fieldRef/secretKeyRef ones need an API server (reporting stays off).
    shape.env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "emptyDir" in volume:
            target = shape.memory_dirs if volume["emptyDir"].get("medium") == "Memory" else shape.empty_dirs
            target.append(mount["mountPath"])
    return shape


def operator_pod_shape() -> PodShape:
    """The operator container of the chart's Deployment: uid/gid 10001, read-only root, an emptyDir on /tmp."""
    return PodShape(user="10001:10001", empty_dirs=["/tmp"])


def pod_run(image: str, command: Sequence[str], shape: PodShape, tmp_path: Path, *,
            binds: Mapping[str, str] = (), env: Mapping[str, str] = (), timeout: float = 300,
            files: Mapping[str, str] = ()) -> subprocess.CompletedProcess:
    """``podman run`` ``command`` (replacing the entrypoint) in ``image`` shaped like ``shape``.

    ``binds``: host path -> container path, read-only. ``files``: container path -> host
    file, writable (e.g. the termination-message file a kubelet mounts). emptyDirs are
    ``tmp_path/emptydir-<n>`` (left for the test to inspect). Returns the completed
    process (text output); never raises on a non-zero exit.
    """
    cmd = ["podman", "run", "--rm", "--pull=never", "--network=none", "--user", shape.user,
           "--cap-drop=all", "--security-opt=no-new-privileges"]
    for group in shape.group_add:
        cmd += ["--group-add", group]
    if shape.read_only:
        cmd += ["--read-only", "--read-only-tmpfs=false"]
    for n, path in enumerate(shape.empty_dirs):
        host = tmp_path / f"emptydir-{n}"
        host.mkdir(exist_ok=True)
        host.chmod(0o777)
        cmd += ["-v", f"{host}:{path}:rw"]
    for path in shape.memory_dirs:
        cmd += ["--mount", f"type=tmpfs,destination={path},tmpfs-mode=1777"]
    for host, path in dict(binds).items():
        cmd += ["-v", f"{host}:{path}:ro"]
    for path, host in dict(files).items():
        cmd += ["-v", f"{host}:{path}:rw"]
    for key, value in {**shape.env, **dict(env)}.items():
        cmd += ["--env", f"{key}={value}"]
    cmd += ["--entrypoint", command[0], image, *command[1:]]
    return subprocess.run(cmd, env=engine.podman_env(), capture_output=True, text=True, timeout=timeout)


def emptydir(tmp_path: Path, shape: PodShape, path: str) -> Path:
    """The host directory that backs the emptyDir mounted at ``path`` in :func:`pod_run`."""
    return tmp_path / f"emptydir-{shape.empty_dirs.index(path)}"
