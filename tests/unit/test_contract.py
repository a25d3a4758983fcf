"""The operator-trainer contract (``qlora_trainer.contract``): one table, read by both sides."""

from __future__ import annotations

import pytest

from qlora_operator import attempts, render
from qlora_trainer import contract, errors, export
from qlora_trainer.distributed import reason_for

TRAINER_ERRORS = [
    errors.TrainerError, errors.OutputInUseError, errors.DataError, errors.OutOfMemoryError,
    errors.NonFiniteLossError, errors.DoesNotFitError, errors.MergeCheckFailedError, errors.Preempted,
    export.UnsupportedExportError,
]


@pytest.mark.parametrize("cls", TRAINER_ERRORS, ids=lambda c: c.__name__)
def test_every_trainer_error_raises_a_code_of_the_table_with_its_reason(cls):
    assert reason_for(cls.exit_code) == cls.reason


def test_storage_error_is_retried_and_the_permanent_codes_fail_the_job_at_once():
    retry = {e.code: e.retry for e in contract.EXIT_CODES}
    assert retry[errors.StorageError.exit_code] is contract.Retry.counted
    assert render.PERMANENT_EXIT_CODES == contract.PERMANENT_EXIT_CODES == (2, 3, 6, 7, 8)


def test_the_table_has_one_row_per_code():
    codes = [e.code for e in contract.EXIT_CODES]
    assert codes == sorted(set(codes))


@pytest.mark.parametrize(
    "code,reason",
    [(0, "Succeeded"), (2, "InvalidConfig"), (3, "InvalidData"), (4, "StorageError"), (5, "CudaOutOfMemory"),
     (6, "NonFiniteLoss"), (7, "InsufficientGPUMemory"), (8, "MergeCheckFailed"), (137, "Killed"), (9, None)],
)
def test_the_operator_names_an_exit_by_the_same_reason(code, reason):
    # 137 without OOMKilled is Killed on both sides; 1 and 143 need more than the code (see classify_exit)
    assert attempts.classify_exit(code, None, None) == (reason or "ExitCode9")


@pytest.mark.parametrize(
    "name,run",
    [("run-7", 7), ("run-7/", 7), ("run-x", None), ("step-7", None), ("run-", None)],
)
def test_run_dir_round_trips(name, run):
    assert contract.run_of_dir(name) == run
    if run is not None:
        assert contract.run_dir(run) == name.strip("/")


@pytest.mark.parametrize("name,step", [("step-120", 120), ("step-120-1700000000", None), ("run-1", None)])
def test_checkpoint_dir_round_trips(name, step):
    assert contract.step_of_dir(name) == step


def test_termination_message_round_trips_and_stays_under_the_limit():
    result = {"exitCode": 3, "reason": "InvalidData", "message": "x" * 10_000, "metrics": {"loss": 1.0}, "none": None}
    text = contract.encode_termination_message(result)
    assert len(text.encode()) <= contract.TERMINATION_LIMIT
    parsed = contract.parse_termination_message(text)
    assert parsed["exitCode"] == 3 and parsed["reason"] == "InvalidData" and "none" not in parsed
    assert parsed["message"].endswith("...(truncated)")


@pytest.mark.parametrize("text", [None, "", "not json", "[1, 2]", 7])
def test_an_unreadable_termination_message_is_none(text):
    assert contract.parse_termination_message(text) is None


def test_every_qlora_variable_on_the_trainer_pod_is_a_contract_name():
    from test_render import body, env_of, job_for

    names = {v for k, v in vars(contract).items() if k.startswith("ENV_") and k != "ENV_PREFIX"}
    spec = {**body()["spec"], "resources": {"gpus": 2, "nodes": 2}}
    pod_env = env_of(job_for(body(spec=spec)))
    ours = {n for n in pod_env if n.startswith(contract.ENV_PREFIX)}
    assert ours and ours <= names
    assert {contract.ENV_NNODES, contract.ENV_NODE_RANK, contract.ENV_MASTER_PORT} <= ours
