"""The QLoRAJob CRD on the real local control plane.

- The generated CRD installs; ``kubectl explain`` shows the model descriptions; every
  example applies; ``kubectl get qj`` shows the printer columns; the API server fills
  in the same defaults as the pydantic models.
- INVALID below: one invalid spec per line (wrong types, out-of-range values, unknown
  enum values, missing required fields, each CEL rule, a cross-namespace Secret
  reference, 64 KiB strings). Each is refused by ``kubectl apply`` and the message
  names the offending field; the pydantic models refuse the same spec and name the
  same field (``test_models_refuse_the_same_specs``, no cluster needed).
- Training fields cannot change while the ``Running`` condition is ``True``.

``kubectl apply`` validates with ``--validate=strict`` (its default: server-side strict
field validation), which is what makes an unknown field such as
``credentialsSecretRef.namespace`` a hard error; a client that asks for less gets the
field pruned (``test_unknown_fields_are_pruned_without_strict_validation``).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from helpers import DELETE, set_path, wait_crd_established, wait_for
from qlora_operator import crd
from qlora_operator.api import MAX_NAME_LENGTH, QLoRAJobSpec, parse_spec
from qlora_trainer.config import ConfigError


REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
BIG = "a" * 65536  # 64 KiB

BASE_SPEC: dict[str, Any] = {
    "model": {"uri": "s3://models/smollm2-135m-instruct/"},
    "dataset": {"uri": "s3://datasets/chatterbot/train.jsonl", "format": "chat"},
    "training": {"maxSteps": 60},
    "output": {"uri": "s3://artifacts/t/"},
    "storage": {"endpoint": "http://127.0.0.1:9000", "credentialsSecretRef": {"name": "s3-credentials"}},
}


def job(name: str = "job", spec: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"apiVersion": "qlora.dev/v1alpha1", "kind": "QLoRAJob", "metadata": {"name": name},
            "spec": copy.deepcopy(BASE_SPEC if spec is None else spec)}


def spec_with(*changes: tuple[str, Any]) -> dict[str, Any]:
    """BASE_SPEC with each dotted path set to its value (``DELETE`` removes it)."""
    data = copy.deepcopy(BASE_SPEC)
    for path, value in changes:
        set_path(data, path, value)
    return data


def s(path: str, value: Any) -> dict[str, Any]:
    return spec_with((path, value))


# (id, spec or whole object, field the API server must name, fragment of its message).
# A case whose spec is a dict with "apiVersion" is applied as the whole object.
INVALID: list[tuple[str, dict[str, Any], str, str]] = [
    ("type-r-string",          s("lora.r", "sixteen"),                             "spec.lora.r", "must be of type integer"),
    ("type-maxsteps-float",    s("training.maxSteps", 1.5),                        "spec.training.maxSteps", "must be of type integer"),
    ("type-packing-string",    s("training.packing", "yes"),                       "spec.training.packing", "must be of type boolean"),
    ("type-modules-string",    s("lora.targetModules", "q_proj"),                  "spec.lora.targetModules", "must be of type array"),
    ("type-gpus-string",       s("resources.gpus", "2"),                           "spec.resources.gpus", "must be of type integer"),
    ("type-model-string",      s("model", "s3://models/m/"),                       "spec.model", "must be of type object"),
    ("range-r-zero",           s("lora.r", 0),                                     "spec.lora.r", "greater than or equal to 1"),
    ("range-r-huge",           s("lora.r", 2048),                                  "spec.lora.r", "less than or equal to 1024"),
    ("range-dropout-one",      s("lora.dropout", 1.0),                             "spec.lora.dropout", "less than 1"),
    ("range-alpha-zero",       s("lora.alpha", 0),                                 "spec.lora.alpha", "greater than 0"),
    ("range-lr-zero",          s("training.learningRate", 0),                      "spec.training.learningRate", "greater than 0"),
    ("range-warmup-one",       s("training.warmupRatio", 1),                       "spec.training.warmupRatio", "less than 1"),
    ("range-seqlen-tiny",      s("training.maxSeqLength", 8),                      "spec.training.maxSeqLength", "greater than or equal to 16"),
    ("range-evalfrac-zero",    s("dataset.evalFraction", 0),                       "spec.dataset.evalFraction", "greater than 0"),
    ("range-evalfrac-big",     s("dataset.evalFraction", 0.6),                     "spec.dataset.evalFraction", "less than or equal to 0.5"),
    ("range-gpus-zero",        s("resources.gpus", 0),                             "spec.resources.gpus", "greater than or equal to 1"),
    ("range-backoff-neg",      s("runPolicy.backoffLimit", -1),                    "spec.runPolicy.backoffLimit", "greater than or equal to 0"),
    ("range-modules-empty",    s("lora.targetModules", []),                        "spec.lora.targetModules", "should have at least 1 items"),
    ("enum-quanttype",         s("quantization.quantType", "int8"),                "spec.quantization.quantType", 'supported values: "nf4", "fp4"'),
    ("enum-format",            s("dataset.format", "sharegpt"),                    "spec.dataset.format", "Unsupported value"),
    ("enum-optimizer",         s("training.optimizer", "sgd"),                     "spec.training.optimizer", "Unsupported value"),
    ("enum-precision",         s("training.precision", "fp8"),                     "spec.training.precision", "Unsupported value"),
    ("enum-toleration-op",     s("scheduling.tolerations", [{"operator": "Maybe"}]), "spec.scheduling.tolerations[0].operator", "Unsupported value"),
    ("missing-model",          s("model", DELETE),                                 "spec.model", "Required value"),
    ("missing-output-uri",     s("output", {}),                                    "spec.output.uri", "Required value"),
    ("missing-secret-name",    s("storage.credentialsSecretRef", {}),              "spec.storage.credentialsSecretRef.name", "Required value"),
    ("missing-spec",           {"apiVersion": "qlora.dev/v1alpha1", "kind": "QLoRAJob", "metadata": {"name": "job"}}, "spec", "Required value"),
    ("cel-epochs-and-steps",   s("training.epochs", 2),                            "spec.training.maxSteps", "training.epochs and training.maxSteps are both set"),
    ("cel-fp16-bf16",          spec_with(("training.precision", "fp16"), ("quantization.computeDtype", "bfloat16")), "spec.training.precision", "fp16 gradient scaler"),
    ("cel-model-scheme",       s("model.uri", "gs://models/m/"),                   "spec.model.uri", "must be an s3://bucket/key, file:///path or hf://org/name URI"),
    ("cel-data-scheme",        s("dataset.uri", "https://example.com/d.jsonl"),    "spec.dataset.uri", "must be an s3://bucket/key or file:///path URI"),
    ("cel-eval-scheme",        s("dataset.evalUri", "hf://org/data"),              "spec.dataset.evalUri", "must be an s3://bucket/key or file:///path URI"),
    ("cel-output-bucket",      s("output.uri", "s3://Artifacts/x/"),               "spec.output.uri", "must be an s3://bucket/key or file:///path URI"),
    ("cel-output-is-data",     s("output.uri", "s3://datasets/chatterbot/train.jsonl"), "spec.output.uri", "output.uri and dataset.uri overlap"),
    ("cel-output-in-data",     spec_with(("dataset.uri", "s3://datasets/chat/"), ("output.uri", "s3://datasets/chat/out/")), "spec.output.uri", "output.uri and dataset.uri overlap"),
    ("cel-output-is-eval",     spec_with(("dataset.evalUri", "s3://evals/x/"), ("output.uri", "s3://evals/x")), "spec.output.uri", "output.uri and dataset.evalUri overlap"),
    ("cel-output-in-model",    s("output.uri", "s3://models/smollm2-135m-instruct/out/"), "spec.output.uri", "output.uri and model.uri overlap"),
    ("cel-all-linear-mixed",   s("lora.targetModules", ["all-linear", "q_proj"]),  "spec.lora.targetModules", "list it alone"),
    ("set-modules-duplicate",  s("lora.targetModules", ["q_proj", "q_proj"]),      "spec.lora.targetModules[1]", "Duplicate value"),
    ("cel-export-needs-merge", s("output.export", [{"format": "gguf", "quantization": "q8_0"}]),
     "spec.output.export", "output.export needs output.merge.enabled: true"),
    ("cel-export-duplicate",   s("output", {"uri": "s3://artifacts/t/", "merge": {"enabled": True},
                                            "export": [{"format": "gguf"}, {"format": "gguf", "quantization": "f16"}]}),
     "spec.output.export", "each format may be listed once"),
    ("cel-export-vllm-quant",  s("output", {"uri": "s3://artifacts/t/", "merge": {"enabled": True},
                                            "export": [{"format": "vllm", "quantization": "q8_0"}]}),
     "spec.output.export[0]", "applies to format gguf only"),
    ("enum-export-quant",      s("output", {"uri": "s3://artifacts/t/", "merge": {"enabled": True},
                                            "export": [{"format": "gguf", "quantization": "q4_k_m"}]}),
     "spec.output.export[0].quantization", "Unsupported value"),
    ("cel-endpoint-scheme",    s("storage.endpoint", "minio:9000"),                "spec.storage.endpoint", "must be an http:// or https:// URL"),
    ("cel-secret-name",        s("storage.credentialsSecretRef", {"name": "S3_Creds"}), "spec.storage.credentialsSecretRef.name", "must be a Secret name"),
    ("cel-node-selector-key",  s("scheduling.nodeSelector", {"bad key!": "x"}),    "spec.scheduling.nodeSelector", "keys must be label keys"),
    ("pattern-queue-name",     s("scheduling.queueName", "Team_A"),                "spec.scheduling.queueName", "should match"),
    ("pattern-memory",         s("resources.memory", "lots"),                      "spec.resources.memory", "should match"),
    ("xns-secret-namespace",   s("storage.credentialsSecretRef", {"name": "s3-credentials", "namespace": "kube-system"}), "spec.storage.credentialsSecretRef.namespace", "unknown field"),
    ("xns-spec-namespace",     s("namespace", "kube-system"),                      "spec.namespace", "unknown field"),
    ("big-model-uri-64k",      s("model.uri", "s3://models/" + BIG),               "spec.model.uri", "Too long"),
    ("big-image-64k",          s("image", BIG),                                    "spec.image", "Too long"),
    ("big-text-field-64k",     s("dataset.textField", BIG),                        "spec.dataset.textField", "Too long"),
    ("cel-pod-env-reserved",   s("pod.env", [{"name": "QLORA_RUN", "value": "9"}]), "spec.pod.env", "the operator sets QLORA_*"),
    ("cel-pod-env-credentials", s("pod.env", [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]), "spec.pod.env", "AWS_SECRET_ACCESS_KEY"),
    ("cel-pod-env-two-values", s("pod.env", [{"name": "X", "value": "a", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]),
     "spec.pod.env[0]", "set value or valueFrom, not both"),
    ("cel-pod-env-two-sources", s("pod.env", [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"},
                                                                          "configMapKeyRef": {"name": "c", "key": "k"}}}]),
     "spec.pod.env[0].valueFrom", "set exactly one of"),
    ("cel-pod-volume-reserved", s("pod.volumes", [{"name": "config", "emptyDir": {}}]), "spec.pod.volumes", "operator's own volumes"),
    ("cel-pod-mount-under",    spec_with(("pod.volumes", [{"name": "d", "emptyDir": {}}]),
                                         ("pod.volumeMounts", [{"name": "d", "mountPath": "/etc/qlora/more"}])),
     "spec.pod.volumeMounts", "may not be, lie under or contain the operator's mounts"),
    ("cel-pod-mount-above",    spec_with(("pod.volumes", [{"name": "d", "emptyDir": {}}]),
                                         ("pod.volumeMounts", [{"name": "d", "mountPath": "/dev/"}])),
     "spec.pod.volumeMounts", "may not be, lie under or contain the operator's mounts"),
    ("cel-pod-mount-unknown",  s("pod.volumeMounts", [{"name": "nope", "mountPath": "/data"}]),
     "spec.pod.volumeMounts", "must name a volume of pod.volumes"),
    ("cel-pod-sa-annotation",  s("pod.serviceAccountAnnotations", {"qlora.dev/job": "other"}),
     "spec.pod.serviceAccountAnnotations", "the operator's own"),
    ("cel-pod-sa-annotation-key", s("pod.serviceAccountAnnotations", {"bad key!": "x"}),
     "spec.pod.serviceAccountAnnotations", "keys must be an annotation key"),
    ("pattern-pod-env-name",   s("pod.env", [{"name": "1X", "value": "x"}]), "spec.pod.env[0].name", "should match"),
    ("pattern-pod-mount-path", spec_with(("pod.volumes", [{"name": "d", "emptyDir": {}}]),
                                         ("pod.volumeMounts", [{"name": "d", "mountPath": "data"}])),
     "spec.pod.volumeMounts[0].mountPath", "should match"),
    ("pattern-pod-pull-secret", s("pod.imagePullSecrets", ["Reg_Cred"]), "spec.pod.imagePullSecrets[0]", "should match"),
    ("pattern-pod-runtime-class", s("pod.runtimeClassName", "NVIDIA"), "spec.pod.runtimeClassName", "should match"),
    ("map-pod-env-duplicate",  s("pod.env", [{"name": "X", "value": "1"}, {"name": "X", "value": "2"}]),
     "spec.pod.env[1]", "Duplicate value"),
    ("map-pod-mount-duplicate", spec_with(("pod.volumes", [{"name": "d", "emptyDir": {}}]),
                                          ("pod.volumeMounts", [{"name": "d", "mountPath": "/a"}, {"name": "d", "mountPath": "/a"}])),
     "spec.pod.volumeMounts[1]", "Duplicate value"),
    ("name-too-long",          {**job("n" * (MAX_NAME_LENGTH + 1))},               "metadata.name", f"at most {MAX_NAME_LENGTH} characters"),
]
#: cases only the API server can judge (the object around the spec)
API_ONLY = {"missing-spec", "name-too-long"}


@pytest.fixture(scope="module")
def installed(cluster):
    """The committed CRD, installed and established."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd.CRD_PATH))
    wait_crd_established(cluster, f"{crd.api.PLURAL}.{crd.api.GROUP}")
    return cluster


def apply(cluster, namespace: str, obj: dict[str, Any], *flags: str):
    return cluster.kubectl("apply", "-n", namespace, *flags, "-f", "-", input=json.dumps(obj), check=False)


def test_committed_crd_is_current():
    assert crd.CRD_PATH.read_text() == crd.crd_yaml(), f"regenerate with `{crd.REGENERATE}`"


def test_explain_shows_descriptions(installed):
    out = wait_for(lambda: installed.kubectl("explain", "qlorajob.spec.lora", check=False).stdout, 60,
                   "kubectl explain to know qlorajob")
    assert "PEFT LoraConfig" in out
    for field, words in [("r", "LoRA rank r"), ("alpha", "lora_alpha"), ("targetModules", "all-linear"),
                         ("dropout", "Dropout probability")]:
        assert re.search(rf"^\s+{field}\s", out, re.M), f"{field} missing from:\n{out}"
        assert words in out
    training = installed.kubectl("explain", "qlorajob.spec.training.epochs").stdout
    assert "3 epochs" in training


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_applies(installed, namespace, example: Path):
    result = installed.kubectl("apply", "-n", namespace, "-f", str(example), check=False)
    assert result.returncode == 0, result.stderr
    name = yaml.safe_load(example.read_text())["metadata"]["name"]
    stored = json.loads(installed.kubectl("get", "qj", name, "-n", namespace, "-o", "json").stdout)
    assert parse_spec(stored["spec"])  # what the API server stored is still a valid spec


def test_api_server_defaults_match_the_models(installed, namespace):
    minimal = yaml.safe_load((REPO / "examples" / "minimal.yaml").read_text())
    assert apply(installed, namespace, minimal).returncode == 0
    stored = json.loads(installed.kubectl("get", "qj", "support-bot", "-n", namespace, "-o", "json").stdout)["spec"]
    expected = QLoRAJobSpec.model_validate(minimal["spec"]).model_dump(by_alias=True, mode="json", exclude_none=True)

    def prune(value: Any) -> Any:  # empty maps and lists are left out of the CRD's defaults
        if isinstance(value, dict):
            pruned = {k: prune(v) for k, v in value.items()}
            return {k: v for k, v in pruned.items() if v not in ({}, [])}
        return value

    assert prune(stored) == prune(expected)
    assert "epochs" not in stored["training"] and "maxSteps" not in stored["training"]


def test_get_shows_printer_columns(installed, namespace):
    demo = yaml.safe_load((REPO / "examples" / "demo.yaml").read_text())
    assert apply(installed, namespace, demo).returncode == 0
    status = {"status": {"phase": "Running", "progress": {"step": 20, "totalSteps": 60, "progress": "20/60",
                                                          "loss": 1.25, "etaSeconds": 42, "eta": "42s"}}}
    installed.kubectl("patch", "qj", "demo", "-n", namespace, "--subresource=status", "--type=merge",
                      "-p", json.dumps(status))
    out = installed.kubectl("get", "qj", "-n", namespace).stdout
    header, row = out.splitlines()[:2]
    assert header.split() == ["NAME", "PHASE", "PROGRESS", "LOSS", "ETA", "AGE"], out
    assert row.split()[:5] == ["demo", "Running", "20/60", "1.25", "42s"], out
    wide = installed.kubectl("get", "qlora", "-n", namespace, "-o", "wide").stdout  # the category works too
    assert "MODEL" in wide.splitlines()[0] and "s3://models/smollm2-135m-instruct/" in wide


@pytest.mark.parametrize("case,spec,field,fragment", INVALID, ids=[c[0] for c in INVALID])
def test_api_server_refuses(installed, namespace, case: str, spec: dict[str, Any], field: str, fragment: str):
    obj = spec if "apiVersion" in spec else job(spec=spec)
    result = apply(installed, namespace, obj)
    message = result.stderr
    assert result.returncode != 0, f"{case}: accepted\n{result.stdout}"
    assert field in message, f"{case}: the error does not name {field}:\n{message[:2000]}"
    assert fragment in message, f"{case}: expected {fragment!r} in:\n{message[:2000]}"
    listed = installed.kubectl("get", "qj", "-n", namespace, "-o", "name").stdout
    assert listed.strip() == "", f"{case}: an object was stored: {listed}"


@pytest.mark.parametrize("case,spec,field,fragment", [c for c in INVALID if c[0] not in API_ONLY],
                         ids=[c[0] for c in INVALID if c[0] not in API_ONLY])
def test_models_refuse_the_same_specs(case: str, spec: dict[str, Any], field: str, fragment: str):
    with pytest.raises(ConfigError) as info:
        parse_spec(spec)
    named = [line.split(":", 1)[0] for line in str(info.value).splitlines()]
    # the API server may name a rule's fieldPath where pydantic names the object holding the rule
    assert any(field.startswith(n) or n.startswith(field.split("[")[0]) for n in named), (
        f"{case}: pydantic names {named}, the API server {field}"
    )


def test_unknown_fields_are_pruned_without_strict_validation(installed, namespace):
    obj = job(spec=s("storage.credentialsSecretRef", {"name": "s3-credentials", "namespace": "kube-system"}))
    warned = apply(installed, namespace, obj, "--validate=warn")
    assert warned.returncode == 0, warned.stderr
    assert 'unknown field "spec.storage.credentialsSecretRef.namespace"' in warned.stderr
    stored = json.loads(installed.kubectl("get", "qj", "job", "-n", namespace, "-o", "json").stdout)
    assert stored["spec"]["storage"]["credentialsSecretRef"] == {"name": "s3-credentials"}


def _set_running(cluster, namespace: str, name: str, running: str) -> None:
    condition = {"type": "Running", "status": running, "reason": "Test", "message": "",
                 "lastTransitionTime": "2025-01-01T00:00:00Z"}
    cluster.kubectl("patch", "qj", name, "-n", namespace, "--subresource=status", "--type=merge",
                    "-p", json.dumps({"status": {"conditions": [condition]}}))


def _patch(cluster, namespace: str, name: str, spec: dict[str, Any]):
    return cluster.kubectl("patch", "qj", name, "-n", namespace, "--type=merge", "-p", json.dumps({"spec": spec}),
                           check=False)


def test_training_fields_are_fixed_while_running(installed, namespace):
    assert apply(installed, namespace, job()).returncode == 0
    assert _patch(installed, namespace, "job", {"lora": {"r": 8}}).returncode == 0  # not running yet
    _set_running(installed, namespace, "job", "True")

    refused = _patch(installed, namespace, "job", {"lora": {"r": 32}, "training": {"maxSteps": 61}})
    assert refused.returncode != 0
    for field in ("spec.lora", "spec.training"):
        assert f"{field} cannot change while a run is active" in refused.stderr, refused.stderr
    refused = _patch(installed, namespace, "job", {"runPolicy": {"backoffLimit": 9}})
    assert "spec.runPolicy.backoffLimit" in refused.stderr and refused.returncode != 0

    for allowed in ({"runPolicy": {"suspend": True, "activeDeadlineSeconds": 600, "ttlSecondsAfterFinished": 60}},
                    {"scheduling": {"queueName": "team-a", "nodeSelector": {"gpu": "h200"}}}):
        result = _patch(installed, namespace, "job", allowed)
        assert result.returncode == 0, result.stderr

    _set_running(installed, namespace, "job", "False")
    assert _patch(installed, namespace, "job", {"lora": {"r": 32}}).returncode == 0
    stored = json.loads(installed.kubectl("get", "qj", "job", "-n", namespace, "-o", "json").stdout)
    assert stored["spec"]["lora"]["r"] == 32 and stored["spec"]["runPolicy"]["suspend"] is True


def test_status_accepts_every_field(installed, namespace):
    assert apply(installed, namespace, job()).returncode == 0
    status = {
        "observedGeneration": 1, "phase": "Succeeded", "jobName": "job-train", "run": 1,
        "startTime": "2025-01-01T00:00:00Z", "completionTime": "2025-01-01T01:00:00Z", "message": "done",
        "conditions": [{"type": "Complete", "status": "True", "reason": "Succeeded", "message": "ok",
                        "lastTransitionTime": "2025-01-01T01:00:00Z", "observedGeneration": 1}],
        "progress": {"step": 60, "totalSteps": 60, "epoch": 1.5, "loss": 0.9, "evalLoss": 1.1,
                     "learningRate": 0.0001, "tokensPerSecond": 1234.5, "gpuMemoryGiB": 6.9, "etaSeconds": 0, "progress": "60/60",
                     "stage": "Done", "updatedAt": "2025-01-01T01:00:00Z"},
        "attempts": [{"index": 0, "podName": "job-train-abcde", "startTime": "2025-01-01T00:00:00Z",
                      "finishTime": "2025-01-01T01:00:00Z", "exitCode": 0, "reason": "Completed",
                      "message": "{}", "resumedFromStep": 0}],
        "artifacts": {"adapterUri": "s3://artifacts/t/adapter/", "mergedUri": "s3://artifacts/t/merged/",
                      "manifestUri": "s3://artifacts/t/adapter/manifest.json",
                      "lastCheckpointUri": "s3://artifacts/t/checkpoints/step-60/",
                      "mergeCheck": {"passed": True, "dtype": "bfloat16", "onto": "nf4-dequantised",
                                     "maxAbsLogitDiff": 1.16, "tolerance": 3.0, "top1Agreement": 1.0,
                                     "minTop1Agreement": 0.95, "greedyTokensAgree": 80, "greedyTokens": 80}},
    }
    installed.kubectl("patch", "qj", "job", "-n", namespace, "--subresource=status", "--type=merge",
                      "-p", json.dumps({"status": status}))
    stored = json.loads(installed.kubectl("get", "qj", "job", "-n", namespace, "-o", "json").stdout)["status"]
    assert stored == status  # nothing was pruned


def test_invalid_table_is_complete():
    assert len({c[0] for c in INVALID}) == len(INVALID) >= 30
    kinds = {c[0].split("-")[0] for c in INVALID}
    assert {"type", "range", "enum", "missing", "cel", "xns", "big"} <= kinds
