"""The fit check before any GPU is taken (issue 18 item 3), on the real node (``tests/node``).

The operator runs the real ``qlora-train fitcheck`` (the trainer image) in a CPU-only Job
before the GPU Job.
The model prefixes in MinIO hold only ``config.json`` (Llama-3-70B and Mistral-7B widths,
no weights), so a check that read anything else would fail loudly.

- A 70B job asking for one 24 GiB GPU fails ``InsufficientGPUMemory`` naming what would fit:
  its only Job is the fit check (no GPU requested by any pod, no GPU Job ever created), and
  the check read exactly ``<model>/config.json``.
- A 7B job on one 24 GiB GPU passes: its GPU Job is created after the check (the JobCreated
  event says so). A job without ``gpuMemoryGiB`` goes straight to its GPU Job; the test
  prints both apply-to-Job times (what the preflight adds here).
"""

from __future__ import annotations

import json
import sys
import time

import pytest
from helpers import LLAMA3_70B, MISTRAL_7B, wait_for

from operator_harness import (  # helpers of the operator tests
    REAL_TRAINER,
    apply,
    condition,
    events,
    gpu_jobs,
    jobs,
    pods,
    wait_terminal,
)

from node_jobs import manifest  # the node's stand-in jobs

pytestmark = [pytest.mark.realnode, pytest.mark.cluster]


def gpu_requests(pod: dict) -> list[str]:
    """The GPU quantities any container of ``pod`` requests or is limited to."""
    out = []
    for container in pod["spec"].get("containers", []) + pod["spec"].get("initContainers", []):
        res = container.get("resources") or {}
        for part in ("requests", "limits"):
            out += [v for k, v in (res.get(part) or {}).items() if "gpu" in k]
    return out


def test_a_70b_job_on_one_24gib_gpu_is_refused_before_any_gpu_pod(cluster, namespace, buckets, start_operator):
    api = cluster.api()
    model = f"s3://models/{namespace}/llama-70b/"
    buckets.put_object(Bucket="models", Key=f"{namespace}/llama-70b/config.json", Body=json.dumps(LLAMA3_70B).encode())
    start_operator(trainer_command=REAL_TRAINER)
    apply(cluster, manifest(cluster, namespace, "big", model={"uri": model},
                            resources={"gpus": 1, "gpuMemoryGiB": 24, "cpu": "1", "memory": "1Gi"}))
    body = wait_terminal(api, namespace, "big", 180)
    failed = condition(body, "Failed")
    assert failed.get("status") == "True" and failed["reason"] == "InsufficientGPUMemory", body["status"]
    assert "training does not fit" in failed["message"] and "Would fit:" in failed["message"], failed["message"]
    assert "24.0 GiB" in failed["message"] and "no GPU was requested" in failed["message"]
    assert body["status"]["phase"] == "Failed"

    assert gpu_jobs(api, namespace, "big") == []
    only = jobs(api, namespace, "big")
    assert [j["metadata"]["name"] for j in only] == ["big-train-fit"]
    checked = pods(api, namespace, "big")
    assert checked and all(gpu_requests(p) == [] for p in checked), [gpu_requests(p) for p in checked]
    assert all(not p["spec"].get("nodeSelector") and not p["spec"].get("priorityClassName") for p in checked)
    term = checked[0]["status"]["containerStatuses"][0]["state"]["terminated"]
    result = json.loads(term["message"])
    assert term["exitCode"] == 7 and result["fitCheck"]["read"] == [f"{model}config.json"], result
    reasons = [r for _, r, _ in events(api, namespace, "big")]
    assert "FitCheckStarted" in reasons and "InsufficientGPUMemory" in reasons and "JobCreated" not in reasons

    # Level-based: later reconciles (resync every 2 s) keep it refused and create nothing.
    time.sleep(5)
    assert gpu_jobs(api, namespace, "big") == [] and len(jobs(api, namespace, "big")) == 1


def test_a_job_that_fits_gets_its_gpu_job_after_the_check(cluster, namespace, buckets, start_operator):
    api = cluster.api()
    buckets.put_object(Bucket="models", Key=f"{namespace}/mistral-7b/config.json", Body=json.dumps(MISTRAL_7B).encode())
    start_operator(trainer_command=REAL_TRAINER)
    timings = {}
    for name, resources in (("checked", {"gpus": 1, "gpuMemoryGiB": 24}), ("unchecked", {"gpus": 1})):
        # Suspended: the GPU Job is created but runs no pod (there are no weights to train on).
        body = manifest(cluster, namespace, name, model={"uri": f"s3://models/{namespace}/mistral-7b/"},
                        resources=resources, runPolicy={"suspend": True})
        start = time.monotonic()
        apply(cluster, body)
        created = wait_for(lambda n=name: gpu_jobs(api, namespace, n) or None, 180, f"{name}'s GPU Job")
        timings[name] = time.monotonic() - start
        assert len(created) == 1 and created[0]["spec"]["suspend"] is True
    messages = [m for _, r, m in events(api, namespace, "checked") if r == "JobCreated"]
    assert len(messages) == 1 and "fit check checked-train-fit passed" in messages[0], messages
    assert [j["metadata"]["name"] for j in jobs(api, namespace, "unchecked")] == ["unchecked-train"]
    sys.stderr.write(
        f"\napply -> GPU Job: with the fit check {timings['checked']:.1f}s, without {timings['unchecked']:.1f}s "
        f"(preflight adds {timings['checked'] - timings['unchecked']:.1f}s on this cluster)\n"
    )
