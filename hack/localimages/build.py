"""Build the operator and trainer images from the project's Dockerfiles with podman.

:func:`build_images` is the API (``python -m localimages`` and ``make images`` call it;
test fixtures and the demo may too). Each image is tagged
``localhost/qlora-<name>:<key>`` where ``<key>`` is the first 16 hex digits of a SHA-256
over its inputs (:func:`input_key`): the Dockerfile, every file its ``COPY``
instructions take from the build context (``pyproject.toml``, ``constraints.txt``,
``README.md``, ``operator/``, ``trainer/``), the build arguments and the IDs of the
local base images (which change with their recipe, :mod:`localimages.bases`). A tag
that exists and carries the same key in its ``dev.qlora.inputs`` label is up to date:
a warm call builds nothing. Images live in podman's storage (outside the clone).

The Dockerfiles' base-image ``ARG`` defaults are the public images; here they are
replaced with ``--build-arg`` by the local bases, and the machine's CA bundle goes in as
the build secret ``egress-ca`` (:mod:`localimages.ca`), mounted only while a ``RUN``
step downloads packages and never part of an image.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from localimages import bases, ca, engine, stamps

#: The repository root (build context of both images).
ROOT = Path(__file__).resolve().parents[2]
#: Label holding the input key of a built image.
LABEL = "dev.qlora.inputs"
#: Bump to rebuild both images when the build procedure here changes in a way the key misses.
BUILD_VERSION = "1"


@dataclass(frozen=True)
class ImageSpec:
    """One image of the project: its name, Dockerfile and repository (tag without the key)."""

    name: str
    dockerfile: str
    repository: str


OPERATOR = ImageSpec("operator", "Dockerfile.operator", "localhost/qlora-operator")
TRAINER = ImageSpec("trainer", "Dockerfile.trainer", "localhost/qlora-trainer")
IMAGES = (OPERATOR, TRAINER)


@dataclass(frozen=True)
class Built:
    """The result for one image: ``ref`` (tag), image ``id``, whether this call built it, seconds taken."""

    name: str
    ref: str
    id: str
    built: bool
    seconds: float


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not pending and not line):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        pending = ""
        out.append((keyword.upper(), args.strip()))
    return out


def copied_sources(dockerfile: Path) -> list[str]:
    """Build-context paths the Dockerfile's ``COPY``/``ADD`` instructions read (``--from`` ones excluded).

    Raises:
        ValueError: an instruction copies a URL or a glob (the key could not cover it).
    """
    sources: list[str] = []
    for keyword, args in _instructions(dockerfile.read_text()):
        if keyword not in ("COPY", "ADD"):
            continue
        words = args.split()
        if any(w.startswith("--from") for w in words):
            continue
        *srcs, _dest = [w for w in words if not w.startswith("--")]
        for src in srcs:
            if "://" in src or any(c in src for c in "*?["):
                raise ValueError(f"{dockerfile.name}: {keyword} {src}: URLs and globs are not supported by the image key")
            sources.append(src.rstrip("/") or ".")
    return sources


def build_args(dockerfile: Path, local_bases: dict[str, bases.Base]) -> dict[str, str]:
    """``--build-arg`` values for ``dockerfile``: each ``ARG <X>_IMAGE`` it declares gets its local base.

    Raises:
        ValueError: the Dockerfile declares an image ARG no local base stands in for.
    """
    by_arg = {"CUDA_IMAGE": "debian", "PYTHON_IMAGE": "python", "UV_IMAGE": "uv"}
    args: dict[str, str] = {}
    for keyword, rest in _instructions(dockerfile.read_text()):
        if keyword == "ARG" and (m := re.match(r"([A-Z_]+_IMAGE)\b", rest)):
            if m.group(1) not in by_arg:
                raise ValueError(f"{dockerfile.name}: ARG {m.group(1)} has no local base (known: {sorted(by_arg)})")
            args[m.group(1)] = local_bases[by_arg[m.group(1)]].ref
    return args


def input_key(spec: ImageSpec, args: dict[str, str], local_bases: dict[str, bases.Base], root: Path = ROOT) -> str:
    """The 16-hex-digit key of ``spec``'s inputs (see the module docstring)."""
    dockerfile = root / spec.dockerfile
    used = sorted({local_bases[n].id for n in local_bases if local_bases[n].ref in args.values()})
    extra = [BUILD_VERSION, *(f"{k}={v}" for k, v in sorted(args.items())), *used]
    return stamps.hash_inputs(root, [spec.dockerfile, ".dockerignore", *copied_sources(dockerfile)], extra)[:16]


def _label(ref: str) -> str | None:
    out = engine.podman("image", "inspect", "--format", "{{index .Labels \"" + LABEL + "\"}}", ref)
    return out.strip() or None


def build_image(spec: ImageSpec, local_bases: dict[str, bases.Base], log=print, root: Path = ROOT) -> Built:
    """Build ``spec`` unless its keyed tag is already in podman's storage; return the result.

    Raises:
        engine.EngineError: podman build failed (its output was streamed above).
    """
    dockerfile = root / spec.dockerfile
    args = build_args(dockerfile, local_bases)
    key = input_key(spec, args, local_bases, root)
    ref = f"{spec.repository}:{key}"
    image = engine.image_id(ref)
    if image and _label(ref) == key:
        log(f"{spec.name}: {ref} is up to date")
        return Built(spec.name, ref, image, False, 0.0)
    cmd = ["build", "--pull=never", "--layers", "-f", str(dockerfile), "-t", ref, "--label", f"{LABEL}={key}"]
    for name, value in args.items():
        cmd += ["--build-arg", f"{name}={value}"]
    bundle = ca.host_bundle()
    if bundle is not None:
        cmd += ["--secret", f"id=egress-ca,src={bundle}"]
    log(f"{spec.name}: building {ref} from {spec.dockerfile}")
    start = time.monotonic()
    engine.podman(*cmd, str(root), stream=True)
    seconds = time.monotonic() - start
    image = engine.image_id(ref)
    if image is None:
        raise engine.EngineError(f"{ref} is not in podman's storage after podman build")
    log(f"{spec.name}: built {ref} in {seconds:.0f} s ({engine.image_size(ref) / 1e9:.2f} GB)")
    return Built(spec.name, ref, image, True, seconds)


def local_bases(log=print) -> dict[str, bases.Base]:
    """The local stand-ins for the Dockerfiles' public bases (built once, cached)."""
    engine.ensure_tools(log)
    debian = bases.debian(log)
    return {
        "debian": debian,
        "python": bases.python(debian, log),
        "uv": bases.uv(bases.uv_version(ROOT / TRAINER.dockerfile), log),
    }


def build_all(names: tuple[str, ...] = ("operator", "trainer"), log=print) -> dict[str, Built]:
    """:func:`build_image` for each named image (bases first); ``{name: Built}``.

    Raises:
        ValueError: an unknown image name.
        engine.EngineError: installing the tools, a base or an image build failed.
    """
    specs = {spec.name: spec for spec in IMAGES}
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise ValueError(f"unknown image {unknown}: choose from {sorted(specs)}")
    found = local_bases(log)
    return {name: build_image(specs[name], found, log) for name in names}


def stale_tags(current: dict[str, Built]) -> list[str]:
    """Tags of the project's image repositories in podman's storage other than ``current``'s refs."""
    keep = {built.ref for built in current.values()}
    repositories = {spec.repository for spec in IMAGES}
    refs = engine.podman("images", "--format", "{{.Repository}}:{{.Tag}}").split()
    return sorted({ref for ref in refs if ref.rsplit(":", 1)[0] in repositories and ref not in keep
                   and not ref.endswith(":<none>")})


def prune(current: dict[str, Built], log=print) -> list[str]:
    """Remove :func:`stale_tags` (images of older inputs; layers still used stay) and untagged
    images older than an hour; return the tags removed.

    A tag podman refuses to remove (e.g. a container uses it) is logged and kept.
    """
    removed = []
    for ref in stale_tags(current):
        try:
            engine.podman("rmi", ref)
            removed.append(ref)
        except engine.EngineError as exc:
            log(f"kept {ref}: {str(exc).strip().splitlines()[-1]}")
    if removed:
        log(f"removed {len(removed)} stale image tag(s): {' '.join(removed)}")
    # Untagged images left by older builds (a replaced 6 GB trainer image among them); the last
    # hour's are kept: they are the build cache of what was just built.
    engine.podman("image", "prune", "--force", "--filter", "until=1h")
    return removed


def build_images(log=print) -> dict[str, str]:
    """Build (or find up to date) both images; ``{"operator": ref, "trainer": ref}``.

    Raises:
        engine.EngineError: see :func:`build_all`.
    """
    return {name: built.ref for name, built in build_all(log=log).items()}
