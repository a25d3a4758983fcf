"""The fit-check Job of a run: a CPU-only pod of the trainer that checks the memory estimate
before a GPU is requested (``spec.resources.gpuMemoryGiB``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qlora_operator.api import QLoRAJobSpec
from qlora_operator.render.names import ANN_JOB, child_metadata, child_name, job_name, labels
from qlora_operator.render.pod import render_pod_spec
from qlora_operator.settings import OperatorSettings


def fitcheck_job_name(job: str, run: int = 1) -> str:
    """Name of run ``run``'s CPU-only fit-check Job."""
    return child_name(job_name(job, run), "fit")


#: Label of a fit-check Job and pod: the run it checks.
LABEL_FITCHECK_RUN = "qlora.dev/fitcheck-run"

#: What the fit-check container requests (and is limited to): no GPU.
FITCHECK_RESOURCES = {"cpu": "250m", "memory": "512Mi"}


def fitcheck_command(settings: OperatorSettings, spec: QLoRAJobSpec) -> list[str]:
    """The trainer command with ``fitcheck`` before ``--config`` and the GPUs to check appended.

    Raises:
        ValueError: ``spec.resources.gpuMemoryGiB`` is unset (no fit check to run).
    """
    res = spec.resources
    if res.gpu_memory_gib is None:
        raise ValueError("spec.resources.gpuMemoryGiB: unset, so there is no fit check to render")
    command = list(settings.trainer_command)
    at = command.index("--config") if "--config" in command else len(command)
    command.insert(at, "fitcheck")
    return [*command, "--gpus", str(res.gpus), "--nodes", str(res.nodes), "--gpu-memory", f"{res.gpu_memory_gib:g}"]


def render_fitcheck_job(
    body: Mapping[str, Any], spec: QLoRAJobSpec, settings: OperatorSettings, run: int = 1
) -> dict[str, Any]:
    """Run ``run``'s fit check: a CPU-only batch/v1 Job created before the GPU Job.

    Why a separate pod, not an initContainer: an initContainer runs in the GPU pod, which
    holds its GPUs from scheduling on. The pod is the trainer's (image, ServiceAccount,
    credentials env from the job's own Secret, config mount, restricted security context),
    with ``qlora-train fitcheck`` as its command, :data:`FITCHECK_RESOURCES` and no GPU,
    and none of ``spec.scheduling``'s GPU-node placement (node selector, tolerations,
    affinity, priority). It reads only ``<model.uri>/config.json``; its result is its
    termination message (``fitCheck``; exit 0 fits, 7 InsufficientGPUMemory).
    """
    job = body["metadata"]["name"]
    pod = render_pod_spec(body, spec, settings, run)
    container = pod["containers"][0]
    container["command"] = fitcheck_command(settings, spec)
    container["resources"] = {"requests": dict(FITCHECK_RESOURCES), "limits": dict(FITCHECK_RESOURCES)}
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName", "subdomain"):
        pod.pop(key, None)
    pod["terminationGracePeriodSeconds"] = 5
    # No qlora.dev/run label: the run's GPU Job is found by that label (plan.current_run).
    fit_labels = {**labels(job), "app.kubernetes.io/component": "fitcheck", LABEL_FITCHECK_RUN: str(run)}
    meta = child_metadata(body, fitcheck_job_name(job, run))
    meta["labels"] = dict(fit_labels)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            "backoffLimit": 1,
            "activeDeadlineSeconds": 300,
            "podReplacementPolicy": "Failed",
            "template": {"metadata": {"labels": fit_labels, "annotations": {ANN_JOB: job}}, "spec": pod},
        },
    }


__all__ = [
    "FITCHECK_RESOURCES",
    "LABEL_FITCHECK_RUN",
    "fitcheck_command",
    "fitcheck_job_name",
    "render_fitcheck_job",
]
