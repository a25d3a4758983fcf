"""The QLoRAJob spec / trainer config models: defaults, validation messages, helpers.

Table-driven: each invalid case names the field path the message must start with and
a fragment of the message. The same rules are checked by the API server in
tests/integration/test_api_validation.py.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import DELETE, set_path

from qlora_operator.api import (
    MUTABLE_WHILE_ACTIVE,
    QLoRAJobSpec,
    QLoRAJobStatus,
    parse_spec,
    run_is_active,
    run_fields_changed,
    training_fields_changed,
)
from qlora_trainer.config import (
    ConfigError,
    TrainingConfig,
    load_config,
    parse_config,
    uris_overlap,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))

BASE: dict[str, Any] = {
    "model": {"uri": "s3://models/smollm2/"},
    "dataset": {"uri": "s3://datasets/chat/train.jsonl"},
    "output": {"uri": "s3://artifacts/run-1/"},
}


def with_(path: str, value: Any, base: dict[str, Any] = BASE) -> dict[str, Any]:
    """A copy of ``base`` with the dotted ``path`` set to ``value`` (``DELETE`` removes it)."""
    return set_path(copy.deepcopy(base), path, value)


def merged(*pairs: tuple[str, Any]) -> dict[str, Any]:
    data = BASE
    for path, value in pairs:
        data = with_(path, value, data)
    return data


# --- valid specs ----------------------------------------------------------------------


def test_defaults_follow_the_design():
    spec = parse_spec(BASE)
    assert spec.training.epochs is None and spec.training.max_steps is None
    assert spec.training.resolved_epochs() == 3.0
    assert (spec.lora.r, spec.lora.alpha, spec.lora.dropout) == (16, 32, 0.05)
    assert spec.lora.target_modules == ["all-linear"]
    assert (spec.quantization.quant_type, spec.quantization.double_quant) == ("nf4", True)
    assert spec.training.precision == "auto"
    assert spec.resources.gpus == 1
    assert spec.run_policy.backoff_limit == 3 and spec.run_policy.suspend is False
    assert spec.storage.credentials_secret_ref is None


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_valid(example: Path):
    doc = yaml.safe_load(example.read_text())
    assert doc["apiVersion"] == "qlora.dev/v1alpha1" and doc["kind"] == "QLoRAJob"
    assert len(doc["metadata"]["name"]) <= 52
    parse_spec(doc["spec"])


def test_examples_cover_what_the_issue_asks():
    names = {p.name for p in EXAMPLES}
    assert {"minimal.yaml", "full.yaml", "llama-70b.yaml", "demo.yaml"} <= names
    full = yaml.safe_load((REPO / "examples" / "full.yaml").read_text())["spec"]
    assert set(full) == {a.alias or n for n, a in QLoRAJobSpec.model_fields.items()}, "full.yaml misses a section"
    big = parse_spec(yaml.safe_load((REPO / "examples" / "llama-70b.yaml").read_text())["spec"])
    assert (big.lora.r, big.lora.alpha) == (64, 128)
    assert set(big.lora.target_modules) == {f"{m}_proj" for m in ("q", "k", "v", "o", "gate", "up", "down")}
    demo = parse_spec(yaml.safe_load((REPO / "examples" / "demo.yaml").read_text())["spec"])
    assert demo.model.uri == "s3://models/smollm2-135m-instruct/"
    assert demo.dataset.format == "chat" and demo.dataset.eval_uri == "s3://datasets/chatterbot/eval.jsonl"
    assert demo.output.uri == "s3://artifacts/demo/" and demo.training.max_steps is not None
    assert demo.training.max_steps <= 100, "the demo must stay short on a CPU"


@pytest.mark.parametrize(
    "case,spec",
    [
        ("max-steps-only", with_("training.maxSteps", 10)),
        ("epochs-only", with_("training.epochs", 0.5)),
        ("hf-model", with_("model", {"uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "main"})),
        ("file-uris", merged(("model.uri", "file:///models/m"), ("dataset.uri", "file:///data/t.jsonl"),
                             ("output.uri", "file:///out/run"))),
        ("bucket-no-key", with_("output.uri", "s3://artifacts")),
        ("sibling-prefixes", merged(("dataset.uri", "s3://bkt/data"), ("output.uri", "s3://bkt/data-out/"))),
        ("fp16-with-float16", merged(("training.precision", "fp16"), ("quantization.computeDtype", "float16"))),
        ("bf16-with-bfloat16", merged(("training.precision", "bf16"), ("quantization.computeDtype", "bfloat16"))),
        ("eval-fraction-half", with_("dataset.evalFraction", 0.5)),
        ("cpu-as-integer", with_("resources.cpu", 8)),
        ("memory-quantity", with_("resources.memory", "1.5Ti")),
        ("empty-sections", merged(("lora", {}), ("training", {}), ("scheduling", {}), ("runPolicy", {}))),
        ("node-selector", with_("scheduling.nodeSelector", {"nvidia.com/gpu.product": "NVIDIA-H200"})),
        ("tracking-http", with_("tracking.mlflow", {"trackingUri": "http://mlflow.mlflow:5000"})),
        ("tracking-https-path", with_("tracking.mlflow", {"trackingUri": "https://ml.example.com/mlflow/",
                                                          "experimentName": "support bot", "tags": {"team/a": "x y"}})),
        ("tracking-file", with_("tracking.mlflow", {"trackingUri": "file:///tmp/mlruns"})),
        ("tracking-secret", with_("tracking.mlflow", {"trackingUri": "http://m:5000",
                                                      "credentialsSecretRef": {"name": "mlflow-creds"}})),
        ("tensorboard-only", with_("tracking", {"tensorboard": {"enabled": True}})),
    ],
)
def test_valid_specs(case: str, spec: dict[str, Any]):
    parse_spec(spec)


def test_cpu_integer_becomes_quantity_string():
    assert parse_spec(with_("resources.cpu", 8)).resources.cpu == "8"


# --- invalid specs: (id, spec, field path the message starts with, message fragment) ---

INVALID = [
    ("r-not-int", with_("lora.r", "sixteen"), "spec.lora.r", "valid integer"),
    ("r-zero", with_("lora.r", 0), "spec.lora.r", "greater than or equal to 1"),
    ("r-too-big", with_("lora.r", 4096), "spec.lora.r", "less than or equal to 1024"),
    ("dropout-one", with_("lora.dropout", 1.0), "spec.lora.dropout", "less than 1"),
    ("alpha-zero", with_("lora.alpha", 0), "spec.lora.alpha", "greater than 0"),
    ("modules-empty", with_("lora.targetModules", []), "spec.lora.targetModules", "at least 1"),
    ("modules-dup", with_("lora.targetModules", ["q_proj", "q_proj"]), "spec.lora", "unique"),
    ("all-linear-mixed", with_("lora.targetModules", ["all-linear", "q_proj"]), "spec.lora", "list it alone"),
    ("bias-enum", with_("lora.bias", "some"), "spec.lora.bias", "'none', 'all' or 'lora_only'"),
    ("quant-enum", with_("quantization.quantType", "int8"), "spec.quantization.quantType", "'nf4' or 'fp4'"),
    ("format-enum", with_("dataset.format", "sharegpt"), "spec.dataset.format", "'chat'"),
    ("eval-fraction-zero", with_("dataset.evalFraction", 0), "spec.dataset.evalFraction", "greater than 0"),
    ("eval-fraction-big", with_("dataset.evalFraction", 0.6), "spec.dataset.evalFraction", "0.5"),
    ("epochs-and-steps", merged(("training.epochs", 1), ("training.maxSteps", 5)), "spec.training",
     "training.epochs and training.maxSteps are both set"),
    ("max-steps-float", with_("training.maxSteps", 1.5), "spec.training.maxSteps", "integer"),
    ("lr-zero", with_("training.learningRate", 0), "spec.training.learningRate", "greater than 0"),
    ("warmup-one", with_("training.warmupRatio", 1), "spec.training.warmupRatio", "less than 1"),
    ("precision-enum", with_("training.precision", "fp8"), "spec.training.precision", "'fp16'"),
    ("fp16-bf16", merged(("training.precision", "fp16"), ("quantization.computeDtype", "bfloat16")), "spec",
     "training.precision fp16 with quantization.computeDtype bfloat16 is refused"),
    ("model-scheme", with_("model.uri", "gs://models/m/"), "spec.model.uri",
     "must be an s3://bucket/key, file:///path or hf://org/name URI (got 'gs://models/m/')"),
    ("data-hf", with_("dataset.uri", "hf://org/data"), "spec.dataset.uri", "must be an s3://bucket/key or file:///path"),
    ("bucket-upper", with_("output.uri", "s3://Artifacts/x/"), "spec.output.uri", "must be an s3://bucket/key"),
    ("uri-newline", with_("output.uri", "s3://artifacts/x\n"), "spec.output.uri", "must be an s3://bucket/key"),
    ("uri-64k", with_("model.uri", "s3://models/" + "a" * 65536), "spec.model.uri", "at most 2048 characters"),
    ("output-is-data", with_("output.uri", "s3://datasets/chat/train.jsonl"), "spec", "output.uri and dataset.uri"),
    ("output-in-data", merged(("dataset.uri", "s3://data/set/"), ("output.uri", "s3://data/set/out/")), "spec",
     "output.uri and dataset.uri overlap"),
    ("output-is-eval", merged(("dataset.evalUri", "s3://evals/x/"), ("output.uri", "s3://evals/x")), "spec",
     "output.uri and dataset.evalUri overlap"),
    ("output-in-model", with_("output.uri", "s3://models/smollm2/out/"), "spec", "output.uri and model.uri overlap"),
    ("endpoint-scheme", with_("storage.endpoint", "minio:9000"), "spec.storage.endpoint", "http:// or https://"),
    ("secret-name", with_("storage.credentialsSecretRef", {"name": "S3_Creds"}),
     "spec.storage.credentialsSecretRef.name", "must be a Secret name"),
    ("secret-no-name", with_("storage.credentialsSecretRef", {}), "spec.storage.credentialsSecretRef.name",
     "Field required"),
    ("secret-namespace", with_("storage.credentialsSecretRef", {"name": "s3", "namespace": "other"}),
     "spec.storage.credentialsSecretRef.namespace", "own namespace"),
    ("spec-namespace", with_("namespace", "other"), "spec.namespace", "unknown field"),
    ("gpus-zero", with_("resources.gpus", 0), "spec.resources.gpus", "greater than or equal to 1"),
    ("memory-word", with_("resources.memory", "lots"), "spec.resources.memory", "Kubernetes quantity"),
    ("cpu-negative", with_("resources.cpu", -1), "spec.resources.cpu", "Kubernetes quantity"),
    ("toleration-op", with_("scheduling.tolerations", [{"operator": "Maybe"}]),
     "spec.scheduling.tolerations[0].operator", "'Exists' or 'Equal'"),
    ("queue-name", with_("scheduling.queueName", "Team_A"), "spec.scheduling.queueName", "RFC 1123 label"),
    ("backoff-negative", with_("runPolicy.backoffLimit", -1), "spec.runPolicy.backoffLimit", "greater than or equal"),
    ("missing-model", with_("model", DELETE), "spec.model", "Field required"),
    ("missing-output-uri", with_("output", {}), "spec.output.uri", "Field required"),
    ("model-not-object", with_("model", "s3://models/m/"), "spec.model", "Input should be an object"),
    ("packing-not-bool", with_("training.packing", "yes"), "spec.training.packing", "valid boolean"),
    ("gpus-string", with_("resources.gpus", "2"), "spec.resources.gpus", "valid integer"),
    ("pod-env-reserved", with_("pod.env", [{"name": "QLORA_RUN", "value": "9"}]), "spec.pod", "pod.env[0].name"),
    ("pod-env-credentials", with_("pod.env", [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]), "spec.pod",
     "the operator sets QLORA_*"),
    ("pod-env-bad-name", with_("pod.env", [{"name": "1X", "value": "x"}]), "spec.pod.env[0].name",
     "environment variable name"),
    ("pod-env-two-values", with_("pod.env", [{"name": "X", "value": "a", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]),
     "spec.pod.env[0]", "set value or valueFrom, not both"),
    ("pod-env-no-source", with_("pod.env", [{"name": "X", "valueFrom": {}}]), "spec.pod.env[0].valueFrom",
     "exactly one of"),
    ("pod-volume-reserved", with_("pod.volumes", [{"name": "cache", "emptyDir": {}}]), "spec.pod",
     "operator's own volumes"),
    ("pod-mount-reserved", merged(("pod.volumes", [{"name": "data", "emptyDir": {}}]),
                                  ("pod.volumeMounts", [{"name": "data", "mountPath": "/cache/hf"}])),
     "spec.pod", "pod.volumeMounts[0].mountPath"),
    ("pod-mount-above", merged(("pod.volumes", [{"name": "data", "emptyDir": {}}]),
                               ("pod.volumeMounts", [{"name": "data", "mountPath": "/dev"}])),
     "spec.pod", "may not be, lie under or contain"),
    ("pod-mount-unknown", with_("pod.volumeMounts", [{"name": "data", "mountPath": "/data"}]), "spec.pod",
     "must name a volume of pod.volumes"),
    ("pod-mount-relative", with_("pod.volumeMounts", [{"name": "data", "mountPath": "data"}]),
     "spec.pod.volumeMounts[0].mountPath", "absolute path"),
    ("pod-sa-annotation-own", with_("pod.serviceAccountAnnotations", {"qlora.dev/job": "x"}), "spec.pod",
     "the operator's own"),
    ("pod-pull-secret-name", with_("pod.imagePullSecrets", ["Reg_Cred"]), "spec.pod.imagePullSecrets[0]",
     "RFC 1123 subdomain"),
    *[(f"tracking-uri-{case}", with_("tracking.mlflow", {"trackingUri": uri}), "spec.tracking.mlflow.trackingUri",
       "must be an http://, https:// or file:/// URI such as http://mlflow.mlflow:5000")
      for case, uri in [("no-scheme", "mlflow:5000"), ("s3", "s3://bucket/mlruns"), ("no-host", "http://"),
                        ("space", "http://mlflow :5000"), ("file-relative", "file://mlruns"), ("empty", ""),
                        ("databricks", "databricks"), ("newline", "http://mlflow:5000\n")]],
    ("tracking-uri-missing", with_("tracking.mlflow", {"experimentName": "x"}), "spec.tracking.mlflow.trackingUri",
     "Field required"),
    ("tracking-uri-64k", with_("tracking.mlflow", {"trackingUri": "http://m/" + "a" * 65536}),
     "spec.tracking.mlflow.trackingUri", "at most 2048 characters"),
    ("tracking-experiment-empty", with_("tracking.mlflow", {"trackingUri": "http://m:5000", "experimentName": ""}),
     "spec.tracking.mlflow.experimentName", "at least 1 character"),
    ("tracking-tag-key", with_("tracking.mlflow", {"trackingUri": "http://m:5000", "tags": {"a*b": "x", "ok": "y"}}),
     "spec.tracking.mlflow.tags", "keys are 1-250 of letters, digits, _ - . / and space (MLflow's rule): a*b"),
    ("tracking-tags-too-many", with_("tracking.mlflow", {"trackingUri": "http://m:5000",
                                                         "tags": {f"t{i}": "x" for i in range(51)}}),
     "spec.tracking.mlflow.tags", "at most 50 items"),
    ("tracking-secret-name", with_("tracking.mlflow", {"trackingUri": "http://m:5000",
                                                       "credentialsSecretRef": {"name": "MLflow_Creds"}}),
     "spec.tracking.mlflow.credentialsSecretRef.name", "must be a Secret name"),
    ("tracking-secret-namespace", with_("tracking.mlflow", {"trackingUri": "http://m:5000",
                                                            "credentialsSecretRef": {"name": "m", "namespace": "x"}}),
     "spec.tracking.mlflow.credentialsSecretRef.namespace", "unknown field"),
    ("tracking-unknown", with_("tracking", {"wandb": {}}), "spec.tracking.wandb", "unknown field"),
    ("tensorboard-not-bool", with_("tracking", {"tensorboard": {"enabled": "yes"}}), "spec.tracking.tensorboard.enabled",
     "valid boolean"),
    ("pod-env-mlflow-credentials", with_("pod.env", [{"name": "MLFLOW_TRACKING_PASSWORD", "value": "x"}]), "spec.pod",
     "pod.env[0].name"),
]


@pytest.mark.parametrize("case,spec,field,fragment", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_spec_names_the_field(case: str, spec: dict[str, Any], field: str, fragment: str):
    with pytest.raises(ConfigError) as info:
        parse_spec(spec)
    lines = str(info.value).splitlines()
    hits = [line for line in lines if line.startswith(field + ":") and fragment in line]
    assert hits, f"no line '{field}: ...{fragment}...' in:\n{info.value}"


def test_messages_never_show_a_regex():
    with pytest.raises(ConfigError) as info:
        parse_spec(merged(("model.uri", "gs://x"), ("dataset.uri", "x"), ("storage.endpoint", "x")))
    assert "^" not in str(info.value) and "should match pattern" not in str(info.value)


def test_64k_string_message_is_short():
    with pytest.raises(ConfigError) as info:
        parse_spec(with_("model.uri", "s3://models/" + "a" * 65536))
    assert len(str(info.value)) < 300


# --- the trainer side: the same models read a local config file -----------------------


def test_trainer_config_has_no_runtime_fields():
    assert not {"resources", "image", "scheduling", "runPolicy"} & {
        f.alias or n for n, f in TrainingConfig.model_fields.items()
    }
    with pytest.raises(ConfigError, match=r"resources: unknown field"):
        parse_config(with_("resources", {"gpus": 1}))


def test_spec_to_trainer_config_drops_the_secret():
    spec = parse_spec(with_("storage", {"credentialsSecretRef": {"name": "s3"}, "endpoint": "http://m:9000"}))
    cfg = spec.trainer_config()
    assert isinstance(cfg, TrainingConfig) and cfg.storage.endpoint == "http://m:9000"
    assert "credentialsSecretRef" not in cfg.model_dump(by_alias=True)["storage"]


def test_spec_to_trainer_config_drops_the_tracking_secret():
    spec = parse_spec(with_("tracking.mlflow", {"trackingUri": "http://m:5000", "experimentName": "e",
                                                "tags": {"team": "a"}, "credentialsSecretRef": {"name": "mlflow"}}))
    assert spec.tracking.mlflow.credentials_secret_ref.name == "mlflow"
    cfg = spec.trainer_config()
    dumped = cfg.model_dump(by_alias=True)["tracking"]
    assert dumped["mlflow"] == {"trackingUri": "http://m:5000", "experimentName": "e", "tags": {"team": "a"}}
    assert cfg.tracking.report_to() == ["mlflow"]
    assert parse_spec(BASE).trainer_config().tracking.mlflow is None  # no tracking by default


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_load_config_names_the_field(tmp_path: Path, suffix: str):
    path = tmp_path / f"bad{suffix}"
    data = with_("lora.r", 0)
    path.write_text(json.dumps(data) if suffix == ".json" else yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "lora.r: Input should be greater than or equal to 1" in str(info.value)


@pytest.mark.parametrize(
    "text,fragment",
    [("{", "line 1: not valid JSON"), ("[1]", "must be a mapping"), ('{"model": 1}', "model: Input should be")],
)
def test_load_config_bad_files(tmp_path: Path, text: str, fragment: str):
    path = tmp_path / "c.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=fragment):
        load_config(path)


def test_load_config_good_file(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE))
    assert load_config(path).training.resolved_epochs() == 3.0


CLI = REPO / "trainer" / "qlora_trainer" / "cli.py"


@pytest.mark.skipif(not CLI.exists(), reason="qlora_trainer/cli.py is not written yet")
@pytest.mark.parametrize(
    "data,expected",
    [
        (with_("lora.r", 0), "lora.r: Input should be greater than or equal to 1"),
        (with_("model.uri", "gs://m/"), "model.uri: must be an s3://bucket/key, file:///path or hf://org/name URI"),
        (merged(("training.epochs", 1), ("training.maxSteps", 2)), "training.epochs and training.maxSteps"),
    ],
    ids=["range", "uri", "cross-field"],
)
def test_qlora_train_refuses_bad_config(tmp_path: Path, data: dict[str, Any], expected: str):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    proc = subprocess.run(
        [sys.executable, "-m", "qlora_trainer.cli", "--config", str(bad)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


# --- helpers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "a,b,overlap",
    [
        ("s3://b/data", "s3://b/data/", True),
        ("s3://b/data/", "s3://b/data/out/", True),
        ("s3://b/data/out/", "s3://b/data", True),
        ("s3://b/data.jsonl", "s3://b/data.jsonl.out/", False),
        ("s3://b/data", "s3://b/database/", False),
        ("s3://a/x/", "s3://b/x/", False),
        ("file:///d/train.jsonl", "file:///d/out/", False),
    ],
)
def test_uris_overlap(a: str, b: str, overlap: bool):
    assert uris_overlap(a, b) is overlap
    assert uris_overlap(b, a) is overlap


@pytest.mark.parametrize(
    "change,expected",
    [
        ({}, []),
        ({"lora": {"r": 8}}, ["spec.lora.r"]),
        ({"lora": {"r": 16}}, []),  # the default written out is no change
        ({"training": {"learningRate": 1e-4, "maxSteps": 5}}, ["spec.training.learningRate", "spec.training.maxSteps"]),
        ({"runPolicy": {"suspend": True, "activeDeadlineSeconds": 60, "ttlSecondsAfterFinished": 5}}, []),
        ({"runPolicy": {"backoffLimit": 5}}, ["spec.runPolicy.backoffLimit"]),
        ({"scheduling": {"queueName": "q", "nodeSelector": {"a": "b"}}}, []),
        ({"image": "trainer:2"}, ["spec.image"]),
        ({"pod": {"runtimeClassName": "nvidia"}}, ["spec.pod.runtimeClassName"]),  # fixed during a run
        ({"resources": {"gpus": 2}}, ["spec.resources.gpus"]),
        ({"storage": {"credentialsSecretRef": {"name": "other"}}}, ["spec.storage.credentialsSecretRef.name"]),
        ({"lora": {"targetModules": ["q_proj", "v_proj"]}}, ["spec.lora.targetModules"]),
        ({"output": {"uri": "s3://artifacts/run-2/"}}, ["spec.output.uri"]),
    ],
)
def test_training_fields_changed(change: dict[str, Any], expected: list[str]):
    new = copy.deepcopy(BASE)
    for key, value in change.items():
        new[key] = value if not isinstance(value, dict) else {**new.get(key, {}), **value}
    assert training_fields_changed(BASE, new) == expected
    assert training_fields_changed(parse_spec(BASE), parse_spec(new)) == expected


@pytest.mark.parametrize(
    "change,expected",
    [
        ({"lora": {"r": 8}}, ["spec.lora.r"]),
        ({"dataset": {"uri": "s3://data/v2.jsonl"}}, ["spec.dataset.uri"]),
        ({"resources": {"memory": "64Gi"}}, ["spec.resources.memory"]),  # how an OOMKilled run is retried
        ({"image": "trainer:2"}, ["spec.image"]),
        ({"runPolicy": {"backoffLimit": 5}}, []),  # fixed during a run, but it starts none
        ({"runPolicy": {"suspend": True, "ttlSecondsAfterFinished": 5}}, []),
        ({"scheduling": {"priorityClassName": "high"}}, []),
        ({"storage": {"credentialsSecretRef": {"name": "rotated"}}}, []),
        ({"pod": {"runtimeClassName": "nvidia", "env": [{"name": "X", "value": "1"}]}}, []),  # plumbing, not training
        ({"pod": {"serviceAccountAnnotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/r"}}}, []),
        ({"tracking": {"mlflow": {"trackingUri": "http://m:5000"}}},
         ["spec.tracking.mlflow.tags", "spec.tracking.mlflow.trackingUri"]),  # turning MLflow on: a new run
        ({"tracking": {"tensorboard": {"enabled": True}}}, ["spec.tracking.tensorboard.enabled"]),
    ],
)
def test_run_fields_changed(change: dict[str, Any], expected: list[str]):
    new = copy.deepcopy(BASE)
    for key, value in change.items():
        new[key] = value if not isinstance(value, dict) else {**new.get(key, {}), **value}
    assert run_fields_changed(BASE, new) == expected


def test_rotating_the_mlflow_secret_starts_no_run_a_new_server_does():
    old = with_("tracking.mlflow", {"trackingUri": "http://m:5000", "credentialsSecretRef": {"name": "mlflow-a"}})
    rotated = with_("tracking.mlflow.credentialsSecretRef", {"name": "mlflow-b"}, old)
    assert run_fields_changed(old, rotated) == []
    moved = with_("tracking.mlflow.trackingUri", "http://mlflow-2:5000", old)
    assert run_fields_changed(old, moved) == ["spec.tracking.mlflow.trackingUri"]


def test_reordered_keys_are_no_change():
    def reverse(value):
        if isinstance(value, dict):
            return {k: reverse(value[k]) for k in reversed(list(value))}
        return value

    assert list(reverse(BASE)) != list(BASE)
    assert run_fields_changed(BASE, reverse(BASE)) == [] and training_fields_changed(BASE, reverse(BASE)) == []


def test_training_fields_changed_on_invalid_spec_compares_raw():
    assert training_fields_changed(BASE, with_("lora.r", 0)) == ["spec.lora.r"]


def test_mutable_fields_exist():
    spec = parse_spec(BASE).model_dump(by_alias=True)
    for path in MUTABLE_WHILE_ACTIVE:
        node = spec
        for part in path.split("."):
            assert part in node, path
            node = node[part]


@pytest.mark.parametrize(
    "status,active",
    [
        (None, False),
        ({}, False),
        ({"conditions": [{"type": "Running", "status": "True"}]}, True),
        ({"conditions": [{"type": "Running", "status": "False"}, {"type": "Complete", "status": "True"}]}, False),
        ({"conditions": [{"type": "Suspended", "status": "True"}]}, False),
    ],
)
def test_run_is_active(status: dict[str, Any] | None, active: bool):
    assert run_is_active(status) is active
    if status is not None:
        full = {"conditions": [{**c, "reason": "R", "lastTransitionTime": "2025-01-01T00:00:00Z"}
                               for c in status.get("conditions", [])]}
        assert run_is_active(QLoRAJobStatus.model_validate(full)) is active


def test_status_round_trip():
    status = {
        "observedGeneration": 2,
        "phase": "Running",
        "conditions": [{"type": "Running", "status": "True", "reason": "PodRunning", "message": "",
                        "lastTransitionTime": "2025-01-01T00:00:00Z", "observedGeneration": 2}],
        "progress": {"step": 10, "totalSteps": 60, "progress": "10/60", "loss": 1.5, "etaSeconds": 30},
        "attempts": [{"index": 0, "podName": "demo-train-abcde", "exitCode": None}],
        "artifacts": {"adapterUri": "s3://artifacts/demo/adapter/"},
        "jobName": "demo-train",
    }
    parsed = QLoRAJobStatus.model_validate(status)
    assert parsed.progress is not None and parsed.progress.progress == "10/60"
    assert parsed.model_dump(by_alias=True, exclude_none=True, exclude_defaults=False)["jobName"] == "demo-train"
