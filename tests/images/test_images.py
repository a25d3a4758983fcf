"""The images built from Dockerfile.trainer and Dockerfile.operator, run the way their pods run them.

Each test starts a container with podman (``pods.pod_run``): the trainer as the
operator's rendered pod spec asks (uid/gid 1000, read-only root, emptyDirs on /cache and
/tmp, the pod's env), the operator as the chart's Deployment does (uid 10001, read-only
root, an emptyDir on /tmp). No network in any of them.

- A second build builds nothing; each tag ends with its input key (its label).
- Triton's first-use compilation works: a C extension built by Triton's own
  ``compile_module_from_src`` (gcc + Python.h) lands in the Triton cache under /cache and
  loads; the NVIDIA backend's ``driver.c`` and a generated kernel launcher compile.
- Writes outside the emptyDirs fail with EROFS; every library cache resolves under
  /cache or /tmp and is writable as uid 1000.
- ``qlora-train --help`` and the trainer stack import, at the pinned versions.
- ``qlora-operator --help`` runs as uid 10001.
- Neither image holds the CA bundle the build got as a secret, nor a certificate it adds.
- A real two-step QLoRA training run on CPU (the embedded SmolLM2-135M) writes its adapter.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
from localimages import build, ca, engine
from pods import PROBES, emptydir, operator_pod_shape, pod_run, trainer_pod_shape

from qlora_operator import render

pytestmark = pytest.mark.images

REPO = Path(__file__).resolve().parents[2]
TRAINER_STACK = ("torch", "transformers", "peft", "bitsandbytes", "trl", "datasets", "triton")


def last_json(proc) -> dict:
    """The last stdout line of ``proc`` as JSON (the probes print one), failing with its output."""
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_warm_build_builds_nothing_and_the_tags_carry_their_input_key(images):
    again = build.build_all(log=lambda msg: None)
    assert {name: (b.ref, b.built) for name, b in again.items()} == {name: (ref, False) for name, ref in images.items()}
    for built in again.values():
        label = engine.podman("image", "inspect", "--format", "{{index .Labels \"%s\"}}" % build.LABEL, built.ref)
        assert built.ref.endswith(":" + label.strip()) and len(label.strip()) == 16


def test_triton_compiles_its_launcher_at_first_use(images, tmp_path):
    shape = trainer_pod_shape()
    proc = pod_run(images["trainer"], ["python", "/probes/triton_launcher.py"], shape, tmp_path,
                   binds={str(PROBES): "/probes"})
    result = last_json(proc)
    assert result["uid"] == render.RUN_AS_USER
    assert result["cc"] == "/usr/bin/gcc" and result["python"].startswith("3.11.")
    assert result["built"]["cuda_utils"] > 0 and result["built"]["__triton_launcher"] > 0
    # The compiled module is in Triton's cache on the /cache emptyDir, i.e. on the host side too.
    cache = emptydir(tmp_path, shape, render.CACHE_DIR)
    assert [p.startswith("/cache/triton/") for p in result["cached"]] == [True]
    assert list(cache.glob("triton/*/qlora_probe*.so")), sorted(str(p) for p in cache.rglob("*"))


def test_root_is_read_only_and_every_cache_lives_on_the_empty_dirs(images, tmp_path):
    shape = trainer_pod_shape()
    assert sorted(shape.empty_dirs) == sorted([render.CACHE_DIR, render.TMP_DIR])
    result = last_json(pod_run(images["trainer"], ["python", "/probes/readonly_caches.py"], shape, tmp_path,
                               binds={str(PROBES): "/probes"}))
    assert (result["uid"], result["gid"]) == (render.RUN_AS_USER, render.RUN_AS_USER)
    writes = result["writes"]
    assert {p: writes[p] for p in ("/probe", "/opt/venv/probe", "/opt/venv/bin/probe", "/etc/probe",
                                   "/usr/local/lib/probe")} == dict.fromkeys(
        ("/probe", "/opt/venv/probe", "/opt/venv/bin/probe", "/etc/probe", "/usr/local/lib/probe"), "EROFS")
    assert writes["/tmp/probe"] == writes["/cache/probe"] == "ok"
    assert result["tempdir"] == result["home"] == "/tmp"
    caches = result["caches"]
    assert {"huggingface_hub", "datasets", "torch.hub", "torch_extensions", "triton", "inductor"} <= set(caches)
    outside = {name: c["dir"] for name, c in caches.items() if not re.match(r"^/(cache|tmp)(/|$)", c["dir"])}
    assert not outside, f"caches outside the emptyDirs: {outside}"
    assert {name: c["write"] for name, c in caches.items()} == dict.fromkeys(caches, "ok")
    # What was written is on the host side of the emptyDirs, nowhere else.
    assert (emptydir(tmp_path, shape, "/cache") / "huggingface").is_dir()


def test_trainer_cli_and_stack_run_as_the_pod_user_at_the_pinned_versions(images, tmp_path):
    shape = trainer_pod_shape()
    help_proc = pod_run(images["trainer"], ["qlora-train", "--help"], shape, tmp_path)
    assert help_proc.returncode == 0 and "--config" in help_proc.stdout, help_proc.stderr[-3000:]
    code = ("import importlib.metadata as m, json, os; "
            + "".join(f"import {name}; " for name in TRAINER_STACK)
            + f"print(json.dumps({{'uid': os.getuid(), 'versions': {{n: m.version(n) for n in {TRAINER_STACK!r}}}}}))")
    result = last_json(pod_run(images["trainer"], ["python", "-c", code], shape, tmp_path))
    assert result["uid"] == render.RUN_AS_USER
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (REPO / "constraints.txt").read_text(), flags=re.M))
    assert result["versions"] == {name: pins[name] for name in TRAINER_STACK}


def test_operator_cli_runs_as_the_chart_user_on_a_read_only_root(images, tmp_path):
    shape = operator_pod_shape()
    proc = pod_run(images["operator"], ["qlora-operator", "--help"], shape, tmp_path)
    assert proc.returncode == 0 and "run" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    ident = pod_run(images["operator"], ["python", "-c", "import os, sys, qlora_operator; "
                                         "open('/probe', 'w')"], shape, tmp_path)
    assert ident.returncode != 0 and "Read-only file system" in ident.stderr, ident.stderr[-2000:]
    uid = pod_run(images["operator"], ["id", "-u"], shape, tmp_path)
    assert uid.stdout.strip() == "10001", uid.stdout + uid.stderr


@pytest.mark.parametrize("name", ["operator", "trainer"])
def test_the_build_ca_is_not_in_the_image(images, tmp_path, name):
    bundle = ca.host_bundle()
    assert bundle is not None, "no CA bundle on this machine: the build had no egress-ca secret to leave behind"
    data = tmp_path / "probe-data"
    data.mkdir()
    raw = bundle.read_bytes()
    extra = ca.extra_certificates(bundle)
    (data / "egress.json").write_text(json.dumps({"bundle_size": len(raw), "bundle_sha256": hashlib.sha256(raw).hexdigest(),
                                                  "certificates": extra}))
    shape = operator_pod_shape() if name == "operator" else trainer_pod_shape()
    shape.user = "0:0"  # root reads every file of the image
    result = last_json(pod_run(images[name], ["python", "/probes/no_egress_ca.py"], shape, tmp_path,
                               binds={str(PROBES): "/probes", str(data): "/probe-data"}, timeout=600))
    assert result["scanned"] > 1000 and result["stores"] > 0, result
    assert result["found"] == [], f"the build's CA bundle or its extra certificates are in the {name} image"


@pytest.mark.slow
def test_a_training_step_runs_in_the_trainer_image_on_cpu(images, tmp_path):
    """Two QLoRA steps of the embedded SmolLM2-135M on CPU; the adapter and manifest land on the emptyDir."""
    from helpers import embedded_inputs

    inputs = embedded_inputs(tmp_path / "inputs", 16, 4)
    # The pod reads its inputs as uid 1000: a world-readable copy of the cached model.
    model = shutil.copytree(inputs["model"], tmp_path / "model")
    for path in [model, *model.rglob("*"), tmp_path / "inputs", *(tmp_path / "inputs").rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    config = {
        "model": {"uri": "file:///model"},
        "dataset": {"uri": "file:///data/small-train.jsonl", "evalUri": "file:///data/small-eval.jsonl"},
        "training": {"maxSteps": 2, "microBatchSize": 2, "gradientAccumulationSteps": 1, "maxSeqLength": 64,
                     "gradientCheckpointing": False, "checkpointEverySteps": 1000, "evalEverySteps": 1000,
                     "optimizer": "adamw_torch"},
        "output": {"uri": "file:///cache/out"},
    }
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / render.CONFIG_FILE).write_text(json.dumps(config))
    term = tmp_path / "termination-log"
    term.write_text("")
    term.chmod(0o666)
    shape = trainer_pod_shape()
    proc = pod_run(images["trainer"], ["qlora-train", "--config", f"{render.CONFIG_DIR}/{render.CONFIG_FILE}"],
                   shape, tmp_path, timeout=900,
                   binds={str(model): "/model", str(tmp_path / "inputs"): "/data",
                          str(config_dir): render.CONFIG_DIR},
                   files={render.TERMINATION_MESSAGE_PATH: str(term)})
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = json.loads(term.read_text())
    assert result["artifacts"]["adapterUri"] == "file:///cache/out/run-1/adapter/", result
    adapter = emptydir(tmp_path, shape, "/cache") / "out" / "run-1" / "adapter"
    assert (adapter / "_SUCCESS").exists() and (adapter / "adapter_model.safetensors").stat().st_size > 0
    manifest = json.loads((adapter / "manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 2
