"""``hack/localimages`` without podman: what the image keys cover, the build arguments, the CA split.

- The inputs of each image are exactly what its Dockerfile copies from the build
  context; the key changes with any of them (a source file, constraints.txt, the
  Dockerfile, a base image ID, a build argument) and not with files the image never sees.
- Each ``ARG *_IMAGE`` of the Dockerfiles gets a local base; an unknown one is refused.
- The certificates a bundle adds to Debian's stock roots are found by content.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "hack") not in sys.path:
    sys.path.insert(0, str(REPO / "hack"))

from localimages import bases, build, ca  # noqa: E402

BASES = {
    "debian": bases.Base("debian", "localhost/qlora-local/debian:bookworm", "sha256:d", False, 0.0),
    "python": bases.Base("python", "localhost/qlora-local/python:3.11-slim-bookworm", "sha256:p", False, 0.0),
    "uv": bases.Base("uv", "localhost/qlora-local/uv:0.13.9", "sha256:u", False, 0.0),
}


@pytest.mark.parametrize("spec,expected", [
    (build.TRAINER, ["pyproject.toml", "constraints.txt", "hack/versions.env", "hack/fetch-converter.sh", "README.md",
                     "operator", "trainer"]),
    (build.OPERATOR, ["pyproject.toml", "constraints.txt", "README.md", "operator", "trainer"]),
])
def test_inputs_are_what_the_dockerfile_copies(spec, expected):
    assert build.copied_sources(REPO / spec.dockerfile) == expected


def test_build_args_give_every_base_argument_its_local_image(tmp_path):
    assert build.build_args(REPO / "Dockerfile.trainer", BASES) == {
        "CUDA_IMAGE": BASES["debian"].ref, "UV_IMAGE": BASES["uv"].ref}
    assert build.build_args(REPO / "Dockerfile.operator", BASES) == {"PYTHON_IMAGE": BASES["python"].ref}
    odd = tmp_path / "Dockerfile"
    odd.write_text("ARG ROCM_IMAGE=rocm/dev\nFROM ${ROCM_IMAGE}\n")
    with pytest.raises(ValueError, match="ARG ROCM_IMAGE has no local base"):
        build.build_args(odd, BASES)


def test_copying_a_glob_is_refused(tmp_path):
    odd = tmp_path / "Dockerfile"
    odd.write_text("FROM x\nCOPY *.toml ./\n")
    with pytest.raises(ValueError, match=r"COPY \*\.toml"):
        build.copied_sources(odd)


@pytest.fixture
def context(tmp_path) -> Path:
    """A copy of the build context's files the trainer image reads."""
    root = tmp_path / "ctx"
    root.mkdir()
    for name in ("Dockerfile.trainer", ".dockerignore", "pyproject.toml", "constraints.txt", "README.md"):
        shutil.copy(REPO / name, root / name)
    for name in ("operator", "trainer"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "hack").mkdir()
    for name in ("versions.env", "fetch-converter.sh"):  # the llama.cpp converter step (issue 17)
        shutil.copy(REPO / "hack" / name, root / "hack" / name)
    return root


def key(root: Path, local_bases=BASES) -> str:
    args = build.build_args(root / "Dockerfile.trainer", local_bases)
    return build.input_key(build.TRAINER, args, local_bases, root)


@pytest.mark.parametrize("change", [
    lambda r: (r / "trainer/qlora_trainer/cli.py").write_text((r / "trainer/qlora_trainer/cli.py").read_text() + "\n#"),
    lambda r: (r / "constraints.txt").write_text((r / "constraints.txt").read_text() + "\n"),
    lambda r: (r / "Dockerfile.trainer").write_text((r / "Dockerfile.trainer").read_text() + "\n# note\n"),
    lambda r: (r / "operator/qlora_operator/new.py").write_text("x = 1\n"),
    lambda r: (r / "hack/versions.env").write_text((r / "hack/versions.env").read_text() + "\n"),
])
def test_the_key_changes_with_every_input(context, change):
    before = key(context)
    assert key(context) == before and len(before) == 16
    change(context)
    assert key(context) != before


def test_the_key_ignores_what_the_image_never_sees_and_follows_the_base_ids(context):
    before = key(context)
    (context / "tests").mkdir()
    (context / "tests/test_x.py").write_text("def test(): pass\n")
    (context / "trainer/qlora_trainer/__pycache__").mkdir(exist_ok=True)
    (context / "trainer/qlora_trainer/__pycache__/cli.cpython-311.pyc").write_bytes(b"\0")
    assert key(context) == before
    rebuilt = {**BASES, "debian": bases.Base("debian", BASES["debian"].ref, "sha256:other", True, 1.0)}
    assert key(context, rebuilt) != before
    # The operator's base is not an input of the trainer image.
    other_python = {**BASES, "python": bases.Base("python", BASES["python"].ref, "sha256:other", True, 1.0)}
    assert key(context, other_python) == before


def pem(body: str) -> str:
    return f"-----BEGIN CERTIFICATE-----\n{body[:8]}\n{body[8:]}\n-----END CERTIFICATE-----\n"


def test_extra_certificates_are_the_ones_debian_does_not_ship(tmp_path):
    stock = tmp_path / "mozilla"
    stock.mkdir()
    (stock / "Root_A.crt").write_text(pem("QUFBQUFBQUFBQUFB"))
    (stock / "Root_B.crt").write_text(pem("QkJCQkJCQkJCQkJC"))
    bundle = tmp_path / "ca-certificates.crt"
    bundle.write_text(pem("QUFBQUFBQUFBQUFB") + pem("QkJCQkJCQkJCQkJC") + pem("UFJPWFlQUk9YWUNB"))
    assert ca.extra_certificates(bundle, stock) == ["UFJPWFlQUk9YWUNB"]
    with pytest.raises(FileNotFoundError, match="stock CA directory"):
        ca.extra_certificates(bundle, tmp_path / "missing")


def test_an_egress_ca_named_by_the_environment_must_exist(monkeypatch, tmp_path):
    monkeypatch.setenv("QLORA_EGRESS_CA", str(tmp_path / "nope.crt"))
    with pytest.raises(FileNotFoundError, match="QLORA_EGRESS_CA="):
        ca.host_bundle()
    (tmp_path / "proxy.crt").write_text(pem("UFJPWFlQUk9YWUNB"))
    monkeypatch.setenv("QLORA_EGRESS_CA", str(tmp_path / "proxy.crt"))
    assert ca.host_bundle() == (tmp_path / "proxy.crt").resolve()


def test_import_scratch_dirs_of_dead_processes_are_swept_and_live_ones_kept(tmp_path):
    """A killed ``podman save`` leaves an image-sized file in its scratch dir: the next import
    removes scratch dirs whose process is gone and keeps those of running processes."""
    import os
    import subprocess

    from localcluster import nodeimages

    dead = subprocess.Popen(["true"])  # a pid that has exited
    dead.wait()
    gone = tmp_path / f"save-{dead.pid}-abc"
    live = tmp_path / f"save-{os.getpid()}-def"
    other = tmp_path / "unrelated"
    for directory in (gone, live, other):
        directory.mkdir()
        (directory / "blob").write_bytes(b"x" * 10)
    nodeimages._sweep_save_dirs(tmp_path)
    assert not gone.exists()
    assert live.exists() and other.exists()
