"""The CPU-only fit-check Job (render.render_fitcheck_job): no GPU, the job's own credentials, only a check."""

from __future__ import annotations

import pytest

from qlora_operator import plan, render
from qlora_operator.settings import OperatorSettings

from tests.unit.test_render import BASE_SPEC, body, parsed


def fit_body(**resources) -> dict:
    spec = dict(BASE_SPEC)
    spec["resources"] = {**(BASE_SPEC.get("resources") or {}), **resources}
    return body(spec=spec)


def test_fitcheck_job_requests_no_gpu_and_runs_the_check() -> None:
    b = fit_body(gpus=2, gpuMemoryGiB=24)
    settings = OperatorSettings()
    job = render.render_fitcheck_job(b, parsed(b), settings, run=1)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    res = container["resources"]
    assert res == {"requests": render.FITCHECK_RESOURCES, "limits": render.FITCHECK_RESOURCES}
    assert not any("gpu" in k for k in [*res["requests"], *res["limits"]])
    assert container["command"] == [
        "qlora-train", "fitcheck", "--config", "/etc/qlora/config.json",
        "--gpus", "2", "--nodes", "1", "--gpu-memory", "24",
    ]
    gpu_job = render.render_job(b, parsed(b), settings, run=1)
    gpu_container = gpu_job["spec"]["template"]["spec"]["containers"][0]
    # The job's own credentials and config, the trainer's image and ServiceAccount.
    assert container["env"] == gpu_container["env"]
    assert container["image"] == gpu_container["image"]
    assert container["volumeMounts"] == gpu_container["volumeMounts"]
    assert pod["serviceAccountName"] == gpu_job["spec"]["template"]["spec"]["serviceAccountName"]
    assert container["terminationMessagePath"] == gpu_container["terminationMessagePath"]
    # Never mistaken for the run's GPU Job.
    assert render.run_of(job) is None
    assert job["metadata"]["labels"][render.LABEL_FITCHECK_RUN] == "1"
    assert job["metadata"]["name"] != gpu_job["metadata"]["name"]
    assert plan.current_run({}, [job]) == (0, None)


def test_fitcheck_drops_gpu_node_placement() -> None:
    b = fit_body(gpuMemoryGiB=80)
    b["spec"]["scheduling"] = {"nodeSelector": {"gpu": "h100"}, "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]}
    job = render.render_fitcheck_job(b, parsed(b), OperatorSettings())
    pod = job["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod and "tolerations" not in pod
    assert render.render_job(b, parsed(b), OperatorSettings())["spec"]["template"]["spec"]["nodeSelector"] == {"gpu": "h100"}


def test_no_gpu_memory_no_fitcheck() -> None:
    b = fit_body()
    with pytest.raises(ValueError, match="gpuMemoryGiB"):
        render.render_fitcheck_job(b, parsed(b), OperatorSettings())


def test_gpu_memory_must_be_positive() -> None:
    spec, invalid = plan.validate(fit_body(gpuMemoryGiB=0)["spec"], OperatorSettings())
    assert spec is None and "gpuMemoryGiB" in invalid
