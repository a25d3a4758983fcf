"""Failures the trainer reports, each with its exit code and termination reason.

Exit codes, reasons and retry classes are the contract's (:data:`qlora_trainer.contract.EXIT_CODES`,
DESIGN.md section 4), read by the operator and by the Job's ``podFailurePolicy``; each
class here raises one of them.

Under a multi-GPU launch (``cli``: torchrun) every worker exits with the code of
global rank 0 where rank 0 could decide it; see ``distributed`` for the rules when
ranks disagree.

This module imports nothing heavy, so ``cli`` can map errors to codes before torch
is loaded.
"""

from __future__ import annotations

from . import contract
from .contract import (  # noqa: F401 - the exit codes, as the trainer's modules import them
    EXIT_CUDA_OOM,
    EXIT_DOES_NOT_FIT,
    EXIT_INVALID_CONFIG,
    EXIT_INVALID_DATA,
    EXIT_MERGE_CHECK,
    EXIT_NON_FINITE,
    EXIT_OK,
    EXIT_PREEMPTED,
    EXIT_STORAGE,
    EXIT_UNEXPECTED,
)


class TrainerError(Exception):
    """Base of the trainer's own failures; ``exit_code`` and ``reason`` name the outcome."""

    exit_code: int = EXIT_UNEXPECTED
    reason: str = contract.TRAINER_ERROR


#: Reason of an exception the trainer has no name for (exit code 1).
UNEXPECTED_REASON = contract.TRAINER_ERROR


def describe_unexpected(err: BaseException, limit: int = 1000) -> str:
    """``"<ExceptionType>: <last non-empty line of its message>"`` (what a traceback ends with),
    cut to ``limit`` characters; e.g. ``RuntimeError: size mismatch for lora_A.weight ...``."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = f"{type(err).__name__}: {lines[-1]}" if lines else type(err).__name__
    return text[:limit]


class OutputInUseError(TrainerError):
    """``<output>/run-<N>/`` already holds the published adapter of another QLoRAJob (its uid differs).

    Nothing is written; not retryable with the same spec.
    """

    exit_code = EXIT_INVALID_CONFIG
    reason = contract.INVALID_CONFIG


class DataError(TrainerError):
    """A dataset that cannot be used: the message names the file and, where one applies, the line.

    Example: ``data.jsonl: line 17: not valid JSON: Expecting ',' delimiter (column 12)``.
    """

    exit_code = EXIT_INVALID_DATA
    reason = contract.INVALID_DATA


class StorageError(TrainerError):
    """A storage operation failed for good (after retries, or at once for 403/404/NoSuchBucket).

    Attributes:
        operation: what was attempted, e.g. ``"download"``, ``"upload"``, ``"list"``.
        uri: the ``s3://`` or ``file://`` URI it was attempted on.
    """

    exit_code = EXIT_STORAGE
    reason = contract.STORAGE_ERROR

    def __init__(self, operation: str, uri: str, detail: str) -> None:
        self.operation = operation
        self.uri = uri
        self.detail = detail
        super().__init__(f"{operation} {uri}: {detail}")


class OutOfMemoryError(TrainerError):
    """CUDA ran out of memory even at micro-batch 1; the message lists the sizes tried."""

    exit_code = EXIT_CUDA_OOM
    reason = contract.CUDA_OOM


class NonFiniteLossError(TrainerError):
    """Loss or gradient norm was NaN/inf for ``nonFinitePatience`` consecutive logged steps."""

    exit_code = EXIT_NON_FINITE
    reason = contract.NON_FINITE_LOSS


class DoesNotFitError(TrainerError):
    """The preflight memory estimate (``estimate``) says training cannot fit the GPUs it was given.

    Raised before the weights load; the message names the estimated and available GiB
    per GPU and what would fit (more GPUs, ``training.parallelism: fsdp``, a shorter
    ``training.maxSeqLength``). Not retryable with the same spec.
    """

    exit_code = EXIT_DOES_NOT_FIT
    reason = contract.INSUFFICIENT_GPU_MEMORY


class MergeCheckFailedError(TrainerError):
    """The merged model failed its equivalence check against base + adapter (``merge.passes``).

    Raised after the adapter was published and before anything of the merged model is
    written, so the run's ``merged/`` prefix stays empty. Deterministic for the same
    adapter and merge settings: not retried.

    Attributes:
        check: the check's summary (``merge.check_summary``): dtype, onto, maxAbsLogitDiff,
            tolerance, top-1 and greedy agreement, passed.
    """

    exit_code = EXIT_MERGE_CHECK
    reason = contract.MERGE_CHECK_FAILED

    def __init__(self, message: str, check: dict) -> None:
        self.check = check
        super().__init__(message)


class Preempted(TrainerError):
    """SIGTERM arrived; a checkpoint was saved (when possible) and the run stops for a retry."""

    exit_code = EXIT_PREEMPTED
    reason = contract.PREEMPTED
