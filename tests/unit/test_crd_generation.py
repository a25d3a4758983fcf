"""The generated CRD: matches the committed file, is structural, and mirrors the models."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field

from qlora_operator import api, crd
from qlora_trainer import config as cfg


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    return crd.crd_manifest()


@pytest.fixture(scope="module")
def schema(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def walk(node: dict[str, Any], path: str = ""):
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}" if path else name)
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}.*")


def test_committed_crd_matches_the_models():
    committed = crd.CRD_PATH.read_text(encoding="utf-8") if crd.CRD_PATH.exists() else ""
    assert committed == crd.crd_yaml(), (
        f"{crd.CRD_RELPATH} is out of date with operator/qlora_operator/api/: "
        f"regenerate it with `{crd.REGENERATE}` and commit the result"
    )


def test_check_command_passes_on_the_committed_file():
    proc = subprocess.run([sys.executable, "-m", "qlora_operator.crd", "--check"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_check_command_fails_on_a_stale_file(tmp_path):
    stale = tmp_path / "crd.yaml"
    stale.write_text(crd.crd_yaml().replace("maxLength: 2048", "maxLength: 2047", 1))
    proc = subprocess.run([sys.executable, "-m", "qlora_operator.crd", "--check", "-o", str(stale)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "python -m qlora_operator.crd" in proc.stderr


def test_generation_is_deterministic():
    assert crd.crd_yaml() == crd.crd_yaml()
    assert yaml.safe_load(crd.crd_yaml()) == crd.crd_manifest()


def test_names_and_scope(manifest: dict[str, Any]):
    spec = manifest["spec"]
    assert manifest["metadata"]["name"] == "qlorajobs.qlora.dev"
    assert spec["group"] == "qlora.dev" and spec["scope"] == "Namespaced"
    assert spec["names"] == {"kind": "QLoRAJob", "listKind": "QLoRAJobList", "plural": "qlorajobs",
                             "singular": "qlorajob", "shortNames": ["qj"], "categories": ["qlora"]}
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}


def test_printer_columns(manifest: dict[str, Any]):
    cols = {c["name"]: c for c in manifest["spec"]["versions"][0]["additionalPrinterColumns"]}
    default = [c["name"] for c in manifest["spec"]["versions"][0]["additionalPrinterColumns"] if not c.get("priority")]
    assert default == ["Phase", "Progress", "Loss", "ETA", "Age"]
    assert cols["Phase"]["jsonPath"] == ".status.phase"
    assert cols["Progress"]["jsonPath"] == ".status.progress.progress"
    assert cols["Loss"]["jsonPath"] == ".status.progress.loss"
    assert cols["ETA"]["jsonPath"] == ".status.progress.eta" and cols["ETA"]["type"] == "string"
    assert cols["Age"] == {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}


#: Where the schema keeps unknown fields: core/v1 Affinity parts and Volume sources.
PASS_THROUGH = {
    "spec.scheduling.affinity.nodeAffinity",
    "spec.scheduling.affinity.podAffinity",
    "spec.scheduling.affinity.podAntiAffinity",
    "spec.pod.volumes[]",
}


def test_schema_is_structural(schema: dict[str, Any]):
    allowed_anyof = [{"type": "integer"}, {"type": "string"}]
    for path, node in walk(schema):
        assert "$ref" not in node and "allOf" not in node and "oneOf" not in node, path
        assert "nullable" not in node and "title" not in node, path
        if node.get("x-kubernetes-preserve-unknown-fields"):
            # only the core/v1 structures passed to the pod as written (the API server checks them on the Job)
            assert path in PASS_THROUGH, path
        assert node.get("additionalProperties") is not False, path
        if "anyOf" in node:
            assert node["anyOf"] == allowed_anyof and node.get("x-kubernetes-int-or-string"), path
        else:
            assert "type" in node, f"{path}: no type"
        if isinstance(node.get("exclusiveMinimum"), (int, float)) and not isinstance(node["exclusiveMinimum"], bool):
            pytest.fail(f"{path}: exclusiveMinimum must be the OpenAPI 3.0 boolean form")


def test_every_spec_field_is_bounded_and_documented(schema: dict[str, Any]):
    for path, node in walk(schema["properties"]["spec"], "spec"):
        if node.get("type") == "string" and "enum" not in node:
            assert "maxLength" in node, f"{path}: string without maxLength"
        if node.get("type") == "array":
            assert "maxItems" in node, f"{path}: list without maxItems"
        if "*" not in path and "[]" not in path:
            assert node.get("description"), f"{path}: no description"


def test_no_namespace_field_anywhere(schema: dict[str, Any]):
    for path, _ in walk(schema["properties"]["spec"], "spec"):
        assert "namespace" not in path.rsplit(".", 1)[-1].lower(), path


def _model_fields(model: type[BaseModel]) -> set[str]:
    return {f.alias or n for n, f in model.model_fields.items()}


@pytest.mark.parametrize(
    "path,model",
    [
        ("spec", api.QLoRAJobSpec),
        ("spec.lora", cfg.LoraSettings),
        ("spec.training", cfg.TrainingSettings),
        ("spec.storage", api.JobStorageSettings),
        ("spec.runPolicy", api.RunPolicy),
        ("status", api.QLoRAJobStatus),
        ("status.progress", api.Progress),
        ("status.artifacts", api.Artifacts),
    ],
)
def test_schema_lists_every_model_field(schema: dict[str, Any], path: str, model: type[BaseModel]):
    node = schema
    for part in path.split("."):
        node = node["properties"][part]
    assert set(node["properties"]) == _model_fields(model)


def test_status_lists_nested_items(schema: dict[str, Any]):
    status = schema["properties"]["status"]["properties"]
    assert set(status["conditions"]["items"]["properties"]) == _model_fields(api.Condition)
    assert set(status["attempts"]["items"]["properties"]) == _model_fields(api.Attempt)
    assert status["conditions"]["x-kubernetes-list-type"] == "map"
    assert status["conditions"]["x-kubernetes-list-map-keys"] == ["type"]
    assert "type" in status["conditions"]["items"]["required"]


def test_defaults_match_the_models(schema: dict[str, Any]):
    spec = schema["properties"]["spec"]["properties"]
    assert spec["lora"]["default"] == {} and spec["training"]["default"] == {}
    assert spec["lora"]["properties"]["r"]["default"] == 16
    assert spec["lora"]["properties"]["targetModules"]["default"] == ["all-linear"]
    assert spec["training"]["properties"]["learningRate"]["default"] == 2e-4
    assert "default" not in spec["training"]["properties"]["epochs"], "epochs must stay unset (maxSteps may be set)"
    assert "default" not in spec["training"]["properties"]["maxSteps"]
    ef = spec["dataset"]["properties"]["evalFraction"]
    assert (ef["minimum"], ef["exclusiveMinimum"], ef["maximum"]) == (0, True, 0.5)
    assert spec["resources"]["properties"]["gpus"]["minimum"] == 1
    for path, node in walk(schema["properties"]["status"], "status"):
        assert "default" not in node, path


def test_uri_fields_keep_the_regex_and_a_friendly_rule(schema: dict[str, Any]):
    spec = schema["properties"]["spec"]["properties"]
    uri = spec["model"]["properties"]["uri"]
    assert uri["pattern"] == cfg.MODEL_URI_PATTERN and uri["maxLength"] == cfg.MAX_URI_LENGTH
    assert uri["x-kubernetes-validations"][0]["message"] == cfg.MSG_MODEL_URI
    assert spec["output"]["properties"]["uri"]["pattern"] == cfg.DATA_URI_PATTERN


def test_cel_rules_carry_the_pydantic_messages(schema: dict[str, Any]):
    messages = [r["message"] for _, node in walk(schema) for r in node.get("x-kubernetes-validations", [])]
    for constant in (cfg.MSG_EPOCHS_AND_MAX_STEPS, cfg.MSG_FP16_WITH_BF16, cfg.MSG_OUTPUT_OVERLAPS_DATASET,
                     cfg.MSG_OUTPUT_OVERLAPS_EVAL, cfg.MSG_OUTPUT_OVERLAPS_MODEL, cfg.MSG_ALL_LINEAR_ALONE,
                     cfg.MSG_DATA_URI, cfg.MSG_MODEL_URI, cfg.MSG_ENDPOINT):
        assert constant in messages
    for _, node in walk(schema):
        for rule in node.get("x-kubernetes-validations", []):
            assert rule["rule"] and rule["message"]


def test_immutability_rule_covers_exactly_the_fixed_fields(schema: dict[str, Any]):
    fixed = api.fixed_during_run()
    assert "lora" in fixed and "runPolicy.backoffLimit" in fixed and "image" in fixed
    for mutable in api.MUTABLE_WHILE_ACTIVE:
        assert mutable not in fixed
    top = {p.split(".")[0] for p in fixed} | {p.split(".")[0] for p in api.MUTABLE_WHILE_ACTIVE}
    assert top == set(schema["properties"]["spec"]["properties"])
    rules = [r for r in schema["x-kubernetes-validations"] if "oldSelf" in r["rule"]]
    assert [r["fieldPath"] for r in rules] == [f".spec.{p}" for p in fixed]
    for path, rule in zip(fixed, rules):
        assert f"self.spec.{path} == oldSelf.spec.{path}" in rule["rule"]
        assert "c.type == 'Running' && c.status == 'True'" in rule["rule"]
        assert rule["message"].startswith(f"spec.{path} cannot change while a run is active")
        assert "scheduling" not in rule["rule"] and "suspend" not in rule["rule"]


def test_unsupported_union_is_refused():
    class Bad(BaseModel):
        x: int | str

    with pytest.raises(crd.SchemaError, match="union"):
        crd.structural_schema(Bad)


class _Inner(BaseModel):
    model_config = ConfigDict(json_schema_extra=cfg.cel_rules(cfg.cel_rule("self.a != 'x'", "inner: a is not x")))
    a: str = Field(max_length=8)


class _Outer(BaseModel):
    inner: _Inner = Field(
        description="the field",
        json_schema_extra=cfg.cel_rules(cfg.cel_rule("self.a != 'y'", "outer: a is not y", fieldPath=".a")),
    )
    names: list[str] = Field(
        max_length=4,
        json_schema_extra={"x-kubernetes-list-type": "set", **cfg.cel_rules(cfg.cel_pattern("^[a-z]$", "one letter"))},
    )


def test_rules_declared_on_fields_and_models_land_on_their_nodes():
    node = crd.structural_schema(_Outer)
    inner = node["properties"]["inner"]
    # the model's rule first, then the field's; keys in Kubernetes' order (pydantic sorts them)
    assert inner["x-kubernetes-validations"] == [
        {"rule": "self.a != 'x'", "message": "inner: a is not x"},
        {"rule": "self.a != 'y'", "message": "outer: a is not y", "fieldPath": ".a"},
    ]
    keys = [list(r) for r in inner["x-kubernetes-validations"]]
    assert keys == [["rule", "message"], ["rule", "message", "fieldPath"]]
    names = node["properties"]["names"]
    assert names["x-kubernetes-list-type"] == "set"
    assert names["x-kubernetes-validations"] == [{"rule": "self.matches(r'^[a-z]$')", "message": "one letter"}]
    # the manifest holds copies: changing it leaves the declarations alone
    inner["x-kubernetes-validations"].clear()
    assert crd.structural_schema(_Outer)["properties"]["inner"]["x-kubernetes-validations"]


def test_a_malformed_rule_is_refused():
    class Bad(BaseModel):
        a: str = Field(max_length=8, json_schema_extra={"x-kubernetes-validations": [{"message": "no rule"}]})

    with pytest.raises(crd.SchemaError, match="needs 'rule'"):
        crd.structural_schema(Bad)
    with pytest.raises(ValueError, match="quote"):
        cfg.cel_pattern("^a'b$", "quoted")


def test_the_trainer_config_declares_its_own_rules():
    # TrainingConfig (no operator) carries the rules its validators check, so the CRD gets them from it
    rules = crd.structural_schema(cfg.TrainingConfig)["x-kubernetes-validations"]
    assert [r["message"] for r in rules] == [cfg.MSG_FP16_WITH_BF16, cfg.MSG_OUTPUT_OVERLAPS_DATASET,
                                              cfg.MSG_OUTPUT_OVERLAPS_EVAL, cfg.MSG_OUTPUT_OVERLAPS_MODEL]
