"""The operator's side of the fit check: reading the fit-check Job (``qlora_operator.fitcheck``)
and the status a run shows while it runs, after it refused the run, and once the GPU Job exists."""

from __future__ import annotations

import json

import pytest
from test_status import SETTINGS, at, conds, job, observe, pod, qj

from qlora_operator import fitcheck
from qlora_operator.status import compute_status

REFUSED = {
    "exitCode": 7, "reason": "InsufficientGPUMemory",
    "message": "training does not fit: 41.3 GiB per GPU needed, 24 GiB available; would fit: 2 GPUs with FSDP",
    "fitCheck": {"fits": False, "neededGiB": 41.3, "gpuGiB": 24.0, "worldSize": 1, "seconds": 1.25,
                 "read": ["s3://models/llama-70b/config.json"]},
}


def fit_job(*conditions: tuple[str, str, str]) -> dict:
    out = {"metadata": {"name": "bot-train-fit"}, "status": {}}
    if conditions:
        out["status"]["conditions"] = [{"type": t, "status": "True", "reason": r, "message": m} for t, r, m in conditions]
    return out


def fit_pod(exit_code: int, message: dict | str | None, finished: str = "2026-01-01T00:01:00Z") -> dict:
    term = {"exitCode": exit_code, "finishedAt": finished}
    if message is not None:
        term["message"] = message if isinstance(message, str) else json.dumps(message)
    return {"metadata": {"name": "bot-train-fit-x"},
            "status": {"containerStatuses": [{"name": "trainer", "state": {"terminated": term}}]}}


def test_a_fit_check_without_a_result_yet_is_running():
    check = fitcheck.read(fit_job(), [])
    assert (check.state, check.reason, check.job_name) == ("running", fitcheck.FIT_CHECKING, "bot-train-fit")


def test_exit_7_is_insufficient_gpu_memory_with_what_would_fit_and_what_was_read():
    check = fitcheck.read(fit_job(("Failed", "BackoffLimitExceeded", "")), [fit_pod(7, REFUSED)])
    assert (check.state, check.reason) == ("failed", "InsufficientGPUMemory")
    assert "would fit: 2 GPUs" in check.message
    assert check.read == ("s3://models/llama-70b/config.json",) and check.seconds == 1.25


def test_the_newest_pod_decides_and_success_means_fits():
    older = fit_pod(4, {"exitCode": 4, "reason": "StorageError", "message": "s3 timeout"}, "2026-01-01T00:00:10Z")
    newer = fit_pod(0, {"exitCode": 0, "reason": "Fits", "message": "fits: 9.1 GiB per GPU",
                        "fitCheck": {"fits": True, "seconds": 0.5}}, "2026-01-01T00:00:40Z")
    check = fitcheck.read(fit_job(("Complete", "", "")), [older, newer])
    assert (check.state, check.message, check.seconds) == ("fits", "fits: 9.1 GiB per GPU", 0.5)


@pytest.mark.parametrize("pods, fragment", [
    ([], "failed without a result: the Job was active longer than specified deadline"),
    ([fit_pod(137, None)], "last exit code 137"),
])
def test_a_fit_check_without_a_readable_result_fails_naming_why(pods, fragment):
    check = fitcheck.read(fit_job(("Failed", "DeadlineExceeded", "the Job was active longer than specified deadline")), pods)
    assert (check.state, check.reason) == ("failed", fitcheck.FIT_CHECK_FAILED)
    assert fragment in check.message


def test_an_unreadable_config_json_fails_with_the_trainers_reason():
    message = {"exitCode": 4, "reason": "StorageError", "message": "s3://models/x/config.json: cannot read: NoSuchKey"}
    check = fitcheck.read(fit_job(("Failed", "BackoffLimitExceeded", "")), [fit_pod(4, message)])
    assert (check.reason, check.message) == ("StorageError", message["message"])


def test_status_pending_while_checking_then_failed_without_a_gpu_job():
    running = fitcheck.read(fit_job(), [])
    result = compute_status(qj(), observe(None, fit_check=running), at(5), SETTINGS)
    assert result.phase == "Pending" and not result.terminal
    assert conds(result.status)["Running"]["reason"] == fitcheck.FIT_CHECKING
    assert "before requesting them" in result.status["message"]

    refused = fitcheck.read(fit_job(("Failed", "BackoffLimitExceeded", "")), [fit_pod(7, REFUSED)])
    body = qj(result.status)
    result = compute_status(body, observe(None, fit_check=refused), at(9), SETTINGS)
    assert result.phase == "Failed" and result.terminal
    failed = conds(result.status)["Failed"]
    assert failed["status"] == "True" and failed["reason"] == "InsufficientGPUMemory"
    assert "would fit: 2 GPUs" in failed["message"] and "no GPU was requested" in failed["message"]
    assert ("Warning", "InsufficientGPUMemory") in {(e.type, e.reason) for e in result.events}
    assert result.stop_reason is None and result.delete_pods == []
    # Sticky: a later reconcile (no fit check read, no Job) keeps the failure.
    again = compute_status(qj(result.status), observe(None), at(30), SETTINGS)
    assert again.phase == "Failed" and conds(again.status)["Failed"]["reason"] == "InsufficientGPUMemory"


def test_once_the_gpu_job_exists_the_fit_check_no_longer_decides():
    passed = fitcheck.read(fit_job(("Complete", "", "")), [fit_pod(0, {"exitCode": 0, "reason": "Fits", "message": "fits"})])
    result = compute_status(qj(), observe(job(), [pod(running=2)], fit_check=passed), at(5), SETTINGS)
    assert result.phase == "Running"
