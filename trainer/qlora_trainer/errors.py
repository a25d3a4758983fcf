"""Failures the trainer reports, each with its exit code and termination reason.

Exit codes are the contract of DESIGN.md section 4, read by the operator and by the
Job's ``podFailurePolicy``:

====  =====================  =====================================================
code  reason                 meaning
====  =====================  =====================================================
0     Succeeded              adapter (and merged model) written, markers last
1     TrainerError           an unexpected exception; the message is its type and last line
2     InvalidConfig          the config cannot be used (``config.ConfigError``)
2     InvalidConfig          also: ``<output>/run-<N>/`` holds the result of another QLoRAJob
3     InvalidData            a dataset file is malformed or has no usable rows
4     StorageError           an S3 or file operation failed (retryable)
5     CudaOutOfMemory        CUDA out of memory at micro-batch 1, after back-offs
6     NonFiniteLoss          loss or gradient norm non-finite N logged steps in a row
7     InsufficientGPUMemory  the memory estimate says training cannot fit these GPUs
8     MergeCheckFailed       the merged model answers differently from base + adapter
                             (``merge``): the adapter is published, the merged model not
143   Preempted              SIGTERM: a checkpoint was written, the next attempt resumes
====  =====================  =====================================================

Under a multi-GPU launch (``cli``: torchrun) every worker exits with the code of
global rank 0 where rank 0 could decide it; see ``distributed`` for the rules when
ranks disagree.

This module imports nothing heavy, so ``cli`` can map errors to codes before torch
is loaded.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INVALID_CONFIG = 2
EXIT_INVALID_DATA = 3
EXIT_STORAGE = 4
EXIT_CUDA_OOM = 5
EXIT_NON_FINITE = 6
EXIT_DOES_NOT_FIT = 7
EXIT_MERGE_CHECK = 8
EXIT_PREEMPTED = 143


class TrainerError(Exception):
    """Base of the trainer's own failures; ``exit_code`` and ``reason`` name the outcome."""

    exit_code: int = 1
    reason: str = "TrainerError"


#: Reason of an exception the trainer has no name for (exit code 1).
UNEXPECTED_REASON = "TrainerError"


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
    reason = "InvalidConfig"


class DataError(TrainerError):
    """A dataset that cannot be used: the message names the file and, where one applies, the line.

    Example: ``data.jsonl: line 17: not valid JSON: Expecting ',' delimiter (column 12)``.
    """

    exit_code = EXIT_INVALID_DATA
    reason = "InvalidData"


class StorageError(TrainerError):
    """A storage operation failed for good (after retries, or at once for 403/404/NoSuchBucket).

    Attributes:
        operation: what was attempted, e.g. ``"download"``, ``"upload"``, ``"list"``.
        uri: the ``s3://`` or ``file://`` URI it was attempted on.
    """

    exit_code = EXIT_STORAGE
    reason = "StorageError"

    def __init__(self, operation: str, uri: str, detail: str) -> None:
        self.operation = operation
        self.uri = uri
        self.detail = detail
        super().__init__(f"{operation} {uri}: {detail}")


class OutOfMemoryError(TrainerError):
    """CUDA ran out of memory even at micro-batch 1; the message lists the sizes tried."""

    exit_code = EXIT_CUDA_OOM
    reason = "CudaOutOfMemory"


class NonFiniteLossError(TrainerError):
    """Loss or gradient norm was NaN/inf for ``nonFinitePatience`` consecutive logged steps."""

    exit_code = EXIT_NON_FINITE
    reason = "NonFiniteLoss"


class DoesNotFitError(TrainerError):
    """The preflight memory estimate (``estimate``) says training cannot fit the GPUs it was given.

    Raised before the weights load; the message names the estimated and available GiB
    per GPU and what would fit (more GPUs, ``training.parallelism: fsdp``, a shorter
    ``training.maxSeqLength``). Not retryable with the same spec.
    """

    exit_code = EXIT_DOES_NOT_FIT
    reason = "InsufficientGPUMemory"


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
    reason = "MergeCheckFailed"

    def __init__(self, message: str, check: dict) -> None:
        self.check = check
        super().__init__(message)


class Preempted(TrainerError):
    """SIGTERM arrived; a checkpoint was saved (when possible) and the run stops for a retry."""

    exit_code = EXIT_PREEMPTED
    reason = "Preempted"
