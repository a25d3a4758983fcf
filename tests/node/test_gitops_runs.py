"""GitOps retraining with the real ``qlora-train`` (issue 15): every run from its own state.

One QLoRAJob on the embedded SmolLM2 model, driven as Flux or Argo would drive it
(``kubectl apply`` of the changed manifest), against the real control plane and MinIO, its
pods on the real node (``tests/node/conftest.py``): the trainer image under a real kubelet
and containerd, as uid 1000 with a read-only root:

1. Run 1 completes (LoRA r 16). The same manifest applied again, with its keys in
   reverse order, a label, an annotation and a ``runPolicy.backoffLimit`` change start
   nothing: no new Job, ``status.run`` stays 1.
2. ``lora.r`` 16 -> 8 starts exactly one run: run 2 starts fresh at step 0 ("previous
   checkpoints belong to run 1"); its pod is deleted once run 2 has a checkpoint, and
   the next attempt resumes from run 2's own checkpoint. Until run 2 completes,
   ``status.artifacts`` still names run 1's adapter, complete in storage. Run 2's
   adapter has rank 8.
3. A checkpoint of run 2 is planted under run 3's prefix (as if copied there), then the
   dataset changes: run 3 refuses it by fingerprint ("differs in data"), moves it to
   ``refused/``, trains all steps from 0 on the new data, and says so in its manifest,
   its attempt and a ``CheckpointRefused`` Event; its lineage names the new data file
   and its eval loss differs from run 2's.
"""

from __future__ import annotations

import copy
import json

import pytest
from helpers import upload_embedded, wait_for
from operator_harness import apply, events, get_qj, is_true, jobs, manifest, pods, wait_event  # tests/operator_harness.py

pytestmark = [pytest.mark.realnode, pytest.mark.cluster, pytest.mark.slow]

STEPS = 6


def _keys(s3, bucket: str, prefix: str) -> set[str]:
    out: set[str] = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out.update(o["Key"][len(prefix):] for o in page.get("Contents", []))
    return out


def _json(s3, bucket: str, key: str) -> dict:
    return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


def _reversed_keys(value):
    """The same document with every mapping's keys in reverse order (what a re-ordering GitOps tool sends)."""
    if isinstance(value, dict):
        return {k: _reversed_keys(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [_reversed_keys(v) for v in value]
    return value


def _done(api, namespace: str, name: str, run: int, timeout: float) -> dict:
    def check():
        body = get_qj(api, namespace, name)
        status = body.get("status") or {}
        if status.get("run") == run and is_true(body, "Failed"):
            raise AssertionError(f"run {run} failed: {status.get('message')} {status.get('attempts')}")
        return body if status.get("run") == run and is_true(body, "Complete") else None

    return wait_for(check, timeout, f"run {run} of {namespace}/{name} to complete", interval=1)


@pytest.mark.timeout(1800)
def test_gitops_retraining_runs_are_isolated(node, namespace, operator, tmp_path):
    cluster, s3 = node["cluster"], node["s3"]
    api = cluster.api()
    upload_embedded(s3, tmp_path / "corpus", None, {  # the model is in s3://models/smollm2/ (node fixture)
        f"{namespace}/a.jsonl": ("train", 0, 40), f"{namespace}/b.jsonl": ("train", 200, 240),
        f"{namespace}/eval.jsonl": ("eval", 0, 8)})

    name = "gitops"
    body = manifest(cluster, namespace, name)
    del body["spec"]["image"]  # the operator's default: the trainer image built by make images
    body["spec"].update({
        "model": {"uri": "s3://models/smollm2/"},
        "dataset": {"uri": f"s3://data/{namespace}/a.jsonl", "evalUri": f"s3://data/{namespace}/eval.jsonl",
                    "format": "chat"},
        "lora": {"r": 16, "alpha": 16, "targetModules": ["q_proj", "v_proj"]},
        "training": {"maxSteps": STEPS, "microBatchSize": 2, "gradientAccumulationSteps": 1, "maxSeqLength": 64,
                     "checkpointEverySteps": 2, "evalEverySteps": 100, "optimizer": "adamw_torch",
                     "learningRate": 1e-3, "gradientCheckpointing": False},
        "resources": {"gpus": 1, "cpu": "2", "memory": "4Gi"},
        "runPolicy": {"backoffLimit": 3},
    })
    out = f"{namespace}/{name}/"

    # --- run 1 ------------------------------------------------------------------------------
    apply(cluster, body)
    first = _done(api, namespace, name, 1, 900)
    assert first["status"]["artifacts"]["run"] == 1
    assert first["status"]["artifacts"]["adapterUri"] == f"s3://artifacts/{out}run-1/adapter/"
    assert "StartedFresh" in [r for _, r, _ in events(api, namespace, name)]
    manifest1 = _json(s3, "artifacts", f"{out}run-1/adapter/manifest.json")
    assert (manifest1["run"]["run"], manifest1["run"]["generation"]) == (1, 1)
    assert manifest1["run"]["job"]["uid"] == first["metadata"]["uid"]
    assert manifest1["run"]["checkpoints"]["decision"] == "StartedFresh"

    # --- no-op applies: nothing starts -------------------------------------------------------
    apply(cluster, body)
    apply(cluster, _reversed_keys(copy.deepcopy(body)))
    cluster.kubectl("-n", namespace, "label", "qj", name, "team=nlp")
    cluster.kubectl("-n", namespace, "annotate", "qj", name, "gitops.example/revision=abc123")
    retuned = copy.deepcopy(body)
    retuned["spec"]["runPolicy"]["backoffLimit"] = 4  # how retries are made, not what is trained
    apply(cluster, retuned)
    generation = get_qj(api, namespace, name)["metadata"]["generation"]
    assert generation == 2, "only the backoffLimit change is a spec change"
    settled = wait_for(lambda: (lambda b: b if b["status"].get("observedGeneration") == generation else None)(
        get_qj(api, namespace, name)), 60, "the operator to observe the runPolicy change")
    assert settled["status"]["run"] == 1 and is_true(settled, "Complete")
    assert [j["metadata"]["name"] for j in jobs(api, namespace, name)] == [f"{name}-train"]
    assert "RunStarted" not in [r for _, r, _ in events(api, namespace, name)]

    # --- run 2: lora.r 16 -> 8; its pod is killed mid-run -------------------------------------
    second_spec = copy.deepcopy(retuned)
    second_spec["spec"]["lora"]["r"] = 8
    apply(cluster, second_spec)
    wait_for(lambda: f"{namespace}/{name}/run-2/checkpoints/step-2/_SUCCESS"
             if "step-2/_SUCCESS" in _keys(s3, "artifacts", f"{out}run-2/checkpoints/") else None,
             600, "run 2's first checkpoint", interval=1)
    during = get_qj(api, namespace, name)
    assert during["status"]["run"] == 2 and not is_true(during, "Complete")
    # The published result of run 1 stays listed and complete while run 2 trains.
    assert during["status"]["artifacts"]["run"] == 1
    assert "_SUCCESS" in _keys(s3, "artifacts", f"{out}run-1/adapter/")
    victim = [p for p in pods(api, namespace, name)
              if p["metadata"]["labels"].get("qlora.dev/run") == "2" and p["status"].get("phase") == "Running"]
    assert len(victim) == 1, [p["metadata"]["name"] for p in pods(api, namespace, name)]
    api.delete(f"/api/v1/namespaces/{namespace}/pods/{victim[0]['metadata']['name']}")
    second = _done(api, namespace, name, 2, 900)
    attempts = second["status"]["attempts"]
    assert len(attempts) == 2, attempts
    assert "started fresh: previous checkpoints belong to run 1" in attempts[0]["checkpoint"]
    assert attempts[1]["resumedFromStep"] >= 2, attempts
    assert f"resumed run 2 from its checkpoint at step {attempts[1]['resumedFromStep']}" in attempts[1]["checkpoint"]
    assert wait_event(api, namespace, name, "Normal", "ResumedFromCheckpoint")
    assert second["status"]["artifacts"]["run"] == 2
    assert second["status"]["artifacts"]["adapterUri"] == f"s3://artifacts/{out}run-2/adapter/"
    assert second["status"]["progress"]["step"] == STEPS
    assert _json(s3, "artifacts", f"{out}run-2/adapter/adapter_config.json")["r"] == 8
    assert _json(s3, "artifacts", f"{out}run-1/adapter/adapter_config.json")["r"] == 16  # untouched
    manifest2 = _json(s3, "artifacts", f"{out}run-2/adapter/manifest.json")
    assert manifest2["run"]["run"] == 2 and manifest2["run"]["generation"] == 3
    assert manifest2["run"]["checkpoints"]["decision"] == "Resumed"
    assert [j["metadata"]["name"] for j in jobs(api, namespace, name)] == [f"{name}-train", f"{name}-train-r2"]

    # --- run 3: a planted checkpoint under run 3, then a new dataset --------------------------
    step = max(int(k.split("/")[0].removeprefix("step-")) for k in _keys(s3, "artifacts", f"{out}run-2/checkpoints/")
               if k.endswith("/_SUCCESS"))
    planted_from = f"{out}run-2/checkpoints/step-{step}/"
    for key in _keys(s3, "artifacts", planted_from):
        target = f"{out}run-3/checkpoints/step-{step}/{key}"
        if key == "qlora_state.json":  # claims run 3, but its config is run 2's
            state = _json(s3, "artifacts", planted_from + key)
            state["owner"]["run"] = 3
            s3.put_object(Bucket="artifacts", Key=target, Body=json.dumps(state).encode())
        elif key != "_SUCCESS":
            s3.copy_object(Bucket="artifacts", Key=target, CopySource={"Bucket": "artifacts", "Key": planted_from + key})
    s3.put_object(Bucket="artifacts", Key=f"{out}run-3/checkpoints/step-{step}/_SUCCESS", Body=b"{}")
    third_spec = copy.deepcopy(second_spec)
    third_spec["spec"]["dataset"]["uri"] = f"s3://data/{namespace}/b.jsonl"
    apply(cluster, third_spec)
    third = _done(api, namespace, name, 3, 900)
    attempt = third["status"]["attempts"][0]
    assert "resumedFromStep" not in attempt, attempt
    assert "refused 1 checkpoint(s) under run 3" in attempt["checkpoint"]
    assert "config fingerprint differs in data" in attempt["checkpoint"]
    assert "fingerprint differs in data" in wait_event(api, namespace, name, "Warning", "CheckpointRefused")
    assert third["status"]["progress"]["step"] == STEPS
    manifest3 = _json(s3, "artifacts", f"{out}run-3/adapter/manifest.json")
    assert manifest3["run"]["checkpoints"]["decision"] == "StartedFresh"
    assert manifest3["run"]["checkpoints"]["refused"][0]["step"] == step
    assert manifest3["metrics"]["steps"] == STEPS and manifest3["run"]["resumedFromStep"] is None
    assert manifest3["datasets"]["train"] != manifest2["datasets"]["train"]
    assert manifest3["config"]["dataset"]["uri"].endswith("/b.jsonl")
    assert manifest3["metrics"]["evalLossAfter"] != manifest2["metrics"]["evalLossAfter"]
    # The planted checkpoint is kept, moved aside; run 3's own checkpoints are its own.
    refused = _keys(s3, "artifacts", f"{out}run-3/refused/")
    assert any(k.endswith("/adapter_model.safetensors") for k in refused), refused
    for key in _keys(s3, "artifacts", f"{out}run-3/checkpoints/"):
        if key.endswith("qlora_state.json"):
            assert _json(s3, "artifacts", f"{out}run-3/checkpoints/{key}")["fingerprint"] != state["fingerprint"]
    # Every run's published result is still there.
    for run in (1, 2, 3):
        assert "_SUCCESS" in _keys(s3, "artifacts", f"{out}run-{run}/adapter/")
    assert len(jobs(api, namespace, name)) == 3
