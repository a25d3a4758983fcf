"""Base images made on this machine, standing in for the public ``FROM`` images of the Dockerfiles.

No container registry is reachable here, so each public base the Dockerfiles name in
their ``ARG ..._IMAGE`` defaults gets a local stand-in, built once and cached (stamps
keyed by the recipe):

``debian``  ``localhost/qlora-local/debian:bookworm``
    ``debootstrap --variant=minbase bookworm`` from the Debian mirror this machine's apt
    uses (``QLORA_DEBIAN_MIRROR`` overrides it), imported with ``podman import``; apt
    sources for bookworm, bookworm-updates and bookworm-security. Stands in for the CUDA
    base of the trainer (``CUDA_IMAGE``): the Dockerfile installs Python 3.11 and the C
    compiler with apt-get on either (see Dockerfile.trainer).
``python``  ``localhost/qlora-local/python:3.11-slim-bookworm``
    the Debian image plus Debian's python3 and pip (``python-standin.Containerfile``), for
    ``PYTHON_IMAGE`` of the operator.
``uv``      ``localhost/qlora-local/uv:<version>``
    ``FROM scratch`` holding ``/uv`` and ``/uvx`` from uv's wheel on PyPI, the version of
    the Dockerfile's ``UV_IMAGE`` default, for ``UV_IMAGE``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from localimages import engine, stamps

HERE = Path(__file__).resolve().parent
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
PYTHON_STANDIN = HERE / "python-standin.Containerfile"
#: Bump to rebuild every base (a change of recipe the key does not see).
RECIPE_VERSION = "1"


@dataclass(frozen=True)
class Base:
    """A local base image: its tag and ID, and whether this call built it."""

    name: str
    ref: str
    id: str
    built: bool
    seconds: float


def _host_sources() -> list[tuple[str, list[str]]]:
    """(URI, suites) of the Debian apt sources this machine uses (deb822 and one-line files)."""
    entries: list[tuple[str, list[str]]] = []
    apt = Path("/etc/apt")
    for path in sorted((apt / "sources.list.d").glob("*.sources")):
        for stanza in path.read_text(errors="replace").split("\n\n"):
            fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, flags=re.M))
            if fields.get("Types", "deb").split()[0] == "deb" and fields.get("Enabled", "yes") != "no":
                for uri in fields.get("URIs", "").split():
                    entries.append((uri, fields.get("Suites", "").split()))
    for path in [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]:
        if path.is_file():
            for line in path.read_text(errors="replace").splitlines():
                m = re.match(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line.strip())
                if m:
                    entries.append((m.group(1), [m.group(2)]))
    return entries


def mirrors() -> tuple[str, str]:
    """(Debian mirror, Debian security mirror) for the base: env overrides, then the host's apt, then deb.debian.org."""
    main = os.environ.get("QLORA_DEBIAN_MIRROR")
    security = os.environ.get("QLORA_DEBIAN_SECURITY_MIRROR")
    for uri, suites in _host_sources():
        if not main and SUITE in suites:
            main = uri
        if not security and f"{SUITE}-security" in suites:
            security = uri
    return (main or DEFAULT_MIRROR).rstrip("/"), (security or DEFAULT_SECURITY_MIRROR).rstrip("/")


def _cached(name: str, key: str) -> Base | None:
    stamp = stamps.current(name, key)
    return Base(name, stamp["ref"], stamp["id"], False, stamp["seconds"]) if stamp else None


def debian(log=print) -> Base:
    """The debootstrapped Debian bookworm minbase image (built once)."""
    mirror, security = mirrors()
    key = hashlib.sha256(f"{RECIPE_VERSION} {SUITE} minbase {mirror} {security}".encode()).hexdigest()
    ref = f"localhost/qlora-local/debian:{SUITE}"
    if cached := _cached("base-debian", key):
        return cached
    engine.ensure_tools(log)
    log(f"debootstrap --variant=minbase {SUITE} from {mirror}")
    start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="debootstrap-", dir=engine.cache_dir()))
    rootfs = work / "rootfs"
    try:
        proc = subprocess.run(["debootstrap", "--variant=minbase", "--components=main", SUITE, str(rootfs), mirror],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise engine.EngineError(f"debootstrap exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")
        (rootfs / "etc/apt/sources.list").write_text(
            f"deb {mirror} {SUITE} main\ndeb {mirror} {SUITE}-updates main\ndeb {security} {SUITE}-security main\n"
        )
        for leftovers in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (rootfs / leftovers).glob("*"):
                if path.is_file():
                    path.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
        try:
            subprocess.run(["podman", "import", "--change", "CMD=/bin/bash", "-", ref], stdin=tar.stdout,
                           env=engine.podman_env(), check=True, capture_output=True)
        except subprocess.CalledProcessError as exc:
            raise engine.EngineError(f"podman import failed: {exc.stderr.decode(errors='replace')[-2000:]}") from None
        finally:
            tar.stdout.close()
            tar.wait()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _record("base-debian", key, ref, start, log)


def _record(name: str, key: str, ref: str, start: float, log) -> Base:
    image = engine.image_id(ref)
    if image is None:
        raise engine.EngineError(f"{ref} is not in podman's storage right after building it")
    seconds = time.monotonic() - start
    stamps.write(name, key, ref, image, seconds)
    log(f"{ref}: built in {seconds:.0f} s")
    return Base(name, ref, image, True, seconds)


def python(debian_base: Base, log=print) -> Base:
    """The Python 3.11 + pip stand-in for ``python:3.11-slim-bookworm`` (built on the Debian image)."""
    recipe = PYTHON_STANDIN.read_text()
    key = hashlib.sha256(f"{RECIPE_VERSION} {debian_base.id} {recipe}".encode()).hexdigest()
    ref = "localhost/qlora-local/python:3.11-slim-bookworm"
    if cached := _cached("base-python", key):
        return cached
    log(f"building {ref} (Debian's python3 + pip)")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(dir=engine.cache_dir()) as context:
        engine.podman("build", "--pull=never", "--layers=false", "-f", str(PYTHON_STANDIN), "-t", ref,
                      "--build-arg", f"DEBIAN_IMAGE={debian_base.ref}", context)
    return _record("base-python", key, ref, start, log)


def uv_version(dockerfile: Path) -> str:
    """The uv version of the ``ARG UV_IMAGE=...uv:<version>`` default in ``dockerfile``.

    Raises:
        ValueError: the Dockerfile has no such ARG.
    """
    m = re.search(r"^ARG UV_IMAGE=\S*/uv:([0-9][^@\s]*)", dockerfile.read_text(), flags=re.M)
    if not m:
        raise ValueError(f"{dockerfile.name}: no `ARG UV_IMAGE=ghcr.io/astral-sh/uv:<version>` line")
    return m.group(1)


def uv(version: str, log=print) -> Base:
    """``FROM scratch`` with ``/uv`` and ``/uvx`` from the ``uv==version`` wheel on PyPI."""
    key = hashlib.sha256(f"{RECIPE_VERSION} uv {version}".encode()).hexdigest()
    ref = f"localhost/qlora-local/uv:{version}"
    if cached := _cached("base-uv", key):
        return cached
    log(f"building {ref} from the uv {version} wheel on PyPI")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(dir=engine.cache_dir()) as tmp:
        work = Path(tmp)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                               "--dest", str(work / "wheel"), f"uv=={version}"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise engine.EngineError(f"pip download uv=={version} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
        wheel = next((work / "wheel").glob("uv-*.whl"))
        context = work / "context"
        context.mkdir()
        with zipfile.ZipFile(wheel) as zf:
            for tool in ("uv", "uvx"):
                member = f"uv-{version}.data/scripts/{tool}"
                (context / tool).write_bytes(zf.read(member))
                (context / tool).chmod(0o755)
        (context / "Containerfile").write_text("FROM scratch\nCOPY uv uvx /\n")
        engine.podman("build", "--pull=never", "--layers=false", "-t", ref, str(context))
    return _record("base-uv", key, ref, start, log)
