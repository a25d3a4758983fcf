"""Images for the real node: the small static images built here, and the import of any
podman image into the node's containerd.

- :func:`static_image` builds ``localhost/qlora-local/<name>:<hash>`` as a ``FROM scratch``
  image holding one static Go program of ``hack/nodeimages/<name>/`` (``pause``: the pod
  sandbox; ``probe``: what the real-node tests run in pods). The tag is the hash of the
  program's sources, so an unchanged program is neither rebuilt nor re-imported.
- :func:`import_image` copies a podman image into containerd
  (``podman save --format docker-archive REF | ctr -n k8s.io --address SOCK images import -``)
  and labels it with the podman image ID; an image whose ID is already there is skipped,
  so a 6 GB image is imported once per containerd root.

podman runs through :mod:`localimages.engine` (``CONTAINERS_CONF`` for this machine kind).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from localcluster.binaries import HACK_DIR
from localimages import engine

SOURCES = HACK_DIR / "nodeimages"
REPOSITORY = "localhost/qlora-local"
#: the containerd namespace the CRI plugin (and so the kubelet) uses.
K8S_NAMESPACE = "k8s.io"
#: containerd image label holding the podman image ID it was imported from.
ID_LABEL = "qlora.dev/podman-image-id"


class ImageError(RuntimeError):
    """Building or importing an image failed; the message holds the command's output."""


@dataclass(frozen=True)
class Imported:
    """Result of :func:`import_image`: the ref, the podman image ID, whether it was copied
    (False: already present), and the seconds it took."""

    ref: str
    image_id: str
    imported: bool
    seconds: float


def _source_hash(name: str) -> str:
    digest = hashlib.sha256()
    for path in sorted([SOURCES / "go.mod", *(SOURCES / name).rglob("*.go")]):
        digest.update(path.relative_to(SOURCES).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def static_image(name: str, log=print) -> str:
    """Build (unless present) the ``FROM scratch`` image of ``hack/nodeimages/<name>``; return its ref.

    The program is ``/<name>`` and the image's entrypoint. Needs ``go`` on PATH (the
    cluster's binaries are built with it) and podman.

    Raises:
        ValueError: there is no ``hack/nodeimages/<name>/`` directory.
        ImageError: podman is missing and cannot be installed, or the Go or podman build failed.
    """
    if not (SOURCES / name).is_dir():
        raise ValueError(f"no image sources {SOURCES / name}")
    ref = f"{REPOSITORY}/{name}:{_source_hash(name)}"
    try:
        engine.ensure_tools(log)  # podman (apt-get as root when missing)
    except engine.EngineError as exc:
        raise ImageError(str(exc)) from exc
    if engine.image_id(ref):
        return ref
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"nodeimage-{name}-") as tmp:
        env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod"}
        build = subprocess.run(["go", "build", "-trimpath", "-ldflags", "-s -w", "-o", f"{tmp}/{name}", f"./{name}"],
                               cwd=SOURCES, env=env, capture_output=True, text=True)
        if build.returncode != 0:
            raise ImageError(f"go build ./{name} in {SOURCES} failed:\n{build.stderr[-4000:]}")
        Path(tmp, "Containerfile").write_text(f'FROM scratch\nCOPY {name} /{name}\nENTRYPOINT ["/{name}"]\n')
        try:
            engine.podman("build", "--quiet", "--tag", ref, tmp)
        except engine.EngineError as exc:
            raise ImageError(str(exc)) from exc
    log(f"built image {ref} in {time.monotonic() - start:.1f}s")
    return ref


def ctr_argv(address: Path | str, *args: str) -> list[str]:
    """``ctr`` with the node's containerd socket and the ``k8s.io`` namespace, then ``args``."""
    ctr = shutil.which("ctr") or "ctr"
    return [ctr, "--address", str(address), "--namespace", K8S_NAMESPACE, *args]


def _present_id(address: Path | str, ref: str) -> str | None:
    """The podman image ID ``ref`` was imported from (its label), or None when absent/unlabelled."""
    proc = subprocess.run(ctr_argv(address, "images", "ls", f"name=={ref}"), capture_output=True, text=True)
    if proc.returncode != 0:
        raise ImageError(f"ctr images ls failed: {proc.stderr.strip()}")
    for line in proc.stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == ref:
            for label in fields[-1].split(","):
                key, _, value = label.partition("=")
                if key == ID_LABEL:
                    return value
    return None


def drop_other_tags(ref: str, address: Path | str) -> list[str]:
    """Remove from containerd every other tag of ``ref``'s repository (tags are keyed by the
    images' inputs, so those are older builds: a trainer tag holds about 13 GB there); returns
    the refs removed. Only ``localhost/`` repositories are touched."""
    repository = ref.rsplit(":", 1)[0]
    if not repository.startswith("localhost/"):
        return []
    listed = subprocess.run(ctr_argv(address, "images", "ls", "-q"), capture_output=True, text=True)
    others = [r for r in listed.stdout.split() if r.rsplit(":", 1)[0] == repository and r != ref]
    if others:
        subprocess.run(ctr_argv(address, "images", "rm", "--sync", *others), capture_output=True, text=True)
    return others


def import_image(ref: str, address: Path | str, log=print) -> Imported:
    """Import the podman image ``ref`` into the containerd at socket ``address`` (namespace k8s.io).

    Skipped when containerd already holds ``ref`` labelled with the same podman image ID.
    Pods then use it with ``imagePullPolicy: Never`` or ``IfNotPresent``.

    Raises:
        ImageError: podman has no image ``ref``, or ``podman save``/``ctr import`` failed.
    """
    start = time.monotonic()
    image = engine.image_id(ref)
    if image is None:
        raise ImageError(f"podman has no image {ref} (build it first)")
    if _present_id(address, ref) == image:
        return Imported(ref, image, False, round(time.monotonic() - start, 2))
    dropped = drop_other_tags(ref, address)
    if dropped:
        log(f"removed older tags of {ref.rsplit(':', 1)[0]} from containerd: {', '.join(dropped)}")
    save = subprocess.Popen(["podman", "save", "--format", "docker-archive", ref], env=engine.podman_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    load = subprocess.run(ctr_argv(address, "images", "import", "-"), stdin=save.stdout, capture_output=True,
                          text=True)
    assert save.stdout is not None and save.stderr is not None
    save.stdout.close()
    save_err = save.stderr.read().decode(errors="replace")
    if save.wait() != 0:
        raise ImageError(f"podman save {ref} exited {save.returncode}: {save_err.strip()[-2000:]}")
    if load.returncode != 0:
        raise ImageError(f"ctr images import of {ref} exited {load.returncode}: {load.stderr.strip()[-2000:]}")
    label = subprocess.run(ctr_argv(address, "images", "label", ref, f"{ID_LABEL}={image}"),
                           capture_output=True, text=True)
    if label.returncode != 0:
        raise ImageError(f"ctr images label {ref} failed: {label.stderr.strip()} (import output: {load.stdout})")
    seconds = round(time.monotonic() - start, 2)
    log(f"imported {ref} into containerd in {seconds:.1f}s")
    return Imported(ref, image, True, seconds)
