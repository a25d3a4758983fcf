"""Multi-GPU runs: the launcher (PyTorch's own ``torchrun``) and how workers agree.

**Contract with the operator** (environment of every trainer pod; all optional):

=========================  =======  ==================================================
variable                   default  meaning
=========================  =======  ==================================================
``QLORA_NNODES``           1        pods (nodes) in the job
``QLORA_NPROC_PER_NODE``   1        GPUs per pod = worker processes per pod
``QLORA_NODE_RANK``        0        this pod's index, 0 .. NNODES-1
``QLORA_MASTER_ADDR``      -        host of node rank 0 (needed when NNODES > 1)
``QLORA_MASTER_PORT``      29500    its rendezvous port
=========================  =======  ==================================================

The pod command stays ``qlora-train --config FILE``. With NNODES x NPROC_PER_NODE > 1
and no ``LOCAL_RANK`` in the environment (not already a torchrun worker), ``cli`` calls
:func:`launch`: ``torch.distributed.run`` (static rendezvous ``--nnodes --nproc-per-node
--node-rank --master-addr --master-port``) runs ``python -m qlora_trainer.cli`` with the
same arguments once per GPU, and the pod exits with the code :func:`final_result` picks.

**Exit codes when ranks disagree.** Global rank 0 decides the job's outcome: it writes
its result (exit code, reason, artifacts) to a file the launcher named
(``QLORA_WORKER_RESULT``), then broadcasts its exit code and every worker that hears it
exits with it, so every pod of the job reports the same code (the Job's
``podFailurePolicy`` sees one verdict). Collective decisions make ranks agree anyway:
SIGTERM (the flag is all-reduced at every optimizer step end, so all ranks checkpoint
the same step and exit 143), non-finite loss (every rank sees the same gathered loss
and global gradient norm, so all exit 6 at the same logged step), storage failures of
rank 0's uploads and of each node's downloads (:func:`agree`: every rank raises the
failure of the lowest failing rank). Where rank 0 left no result (it was killed, or
this pod is not node 0), the pod's code is that of its earliest failing worker
(``torchrun``'s failure timestamps, 1 s resolution; ties go to a worker that exited by
itself rather than by a signal, then to the lowest rank); a worker killed by signal N
counts as 128+N. A rank-0 result of 0 wins over a later failure of another rank: the
artifacts and their ``_SUCCESS`` markers were complete by then.

**CUDA out of memory** is not backed off in-process under DDP/FSDP: the other ranks
are blocked in a collective of the same step and cannot re-plan with it. The failing
rank exits 5 naming the micro-batch (lower ``training.microBatchSize``); ``torchrun``
then stops the others. The preflight estimate (``estimate``) refuses layouts that do
not fit at micro-batch 1 before any weights load.

**SIGTERM.** The launcher keeps SIGTERM for itself (torchrun's ``--signals-to-handle``
without it) and forwards it to its workers, which checkpoint at the end of the current
step; ``torchrun``'s own handler would SIGKILL them 30 s after its SIGTERM.

Workers talk over two process groups: the default one (NCCL on CUDA, gloo on CPU;
``ddp_timeout`` 30 min) for training, and a gloo group with a long timeout (6 h:
downloads of large models, merges) for the small control messages here.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from .config import ConfigError
from . import contract
from .errors import TrainerError, describe_unexpected

log = logging.getLogger(__name__)

#: Environment variables of the operator contract (see the module docstring).
ENV_NNODES = contract.ENV_NNODES
ENV_NPROC = contract.ENV_NPROC_PER_NODE
ENV_NODE_RANK = contract.ENV_NODE_RANK
ENV_MASTER_ADDR = contract.ENV_MASTER_ADDR
ENV_MASTER_PORT = contract.ENV_MASTER_PORT
#: Set by the launcher for its workers: where global rank 0 writes its result JSON.
ENV_WORKER_RESULT = contract.ENV_WORKER_RESULT
#: Seconds the control group waits (downloads, rank 0's uploads and merge).
CONTROL_TIMEOUT_S = 6 * 3600
#: Seconds a failed worker waits for rank 0's verdict before exiting with its own code.
FAILED_EXIT_WAIT_S = 60

#: Termination reasons of exit codes (:data:`contract.EXIT_CODES`). 137: a worker was killed by
#: SIGKILL. The launcher cannot tell the kernel's OOM killer from a ``kill -9``: the container
#: runtime can, and the operator reports ``OOMKilled`` when the runtime says so (its reason wins).
reason_for = contract.reason_for


@dataclass(frozen=True)
class LaunchSpec:
    """The job's layout from the ``QLORA_*`` environment (see the module docstring)."""

    nnodes: int = 1
    nproc_per_node: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int = contract.DEFAULT_MASTER_PORT

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> LaunchSpec:
        """Read and check the variables.

        Raises:
            ConfigError: a variable is not an integer in range, or ``QLORA_MASTER_ADDR``
                is missing with more than one node (exit 2).
        """
        env = dict(os.environ if env is None else env)

        def num(name: str, default: int, low: int, high: int) -> int:
            raw = env.get(name, "").strip()
            if not raw:
                return default
            try:
                value = int(raw)
            except ValueError:
                raise ConfigError(f"{name}: must be an integer (got {raw!r})") from None
            if not low <= value <= high:
                raise ConfigError(f"{name}: must be in {low}..{high} (got {value})")
            return value

        nnodes = num(ENV_NNODES, 1, 1, 4096)
        spec = cls(
            nnodes=nnodes,
            nproc_per_node=num(ENV_NPROC, 1, 1, 64),
            node_rank=num(ENV_NODE_RANK, 0, 0, nnodes - 1),
            master_addr=env.get(ENV_MASTER_ADDR, "").strip() or None,
            master_port=num(ENV_MASTER_PORT, contract.DEFAULT_MASTER_PORT, 1, 65535),
        )
        if spec.nnodes > 1 and not spec.master_addr:
            raise ConfigError(f"{ENV_MASTER_ADDR}: required when {ENV_NNODES} > 1 (the host of node rank 0)")
        return spec

    def torchrun_args(self, argv: list[str]) -> list[str]:
        """``torch.distributed.run`` arguments: static rendezvous, then ``-m qlora_trainer.cli ARGV``."""
        return [
            f"--nnodes={self.nnodes}",
            f"--nproc-per-node={self.nproc_per_node}",
            f"--node-rank={self.node_rank}",
            f"--master-addr={self.master_addr or '127.0.0.1'}",
            f"--master-port={self.master_port}",
            "--max-restarts=0",
            # SIGTERM stays with the launcher, which forwards it (torchrun would SIGKILL the workers 30 s later).
            "--signals-to-handle=SIGINT,SIGHUP,SIGQUIT",
            "-m",
            "qlora_trainer.cli",
            *argv,
        ]


def is_worker() -> bool:
    """Whether this process is a torchrun worker (``LOCAL_RANK`` set)."""
    return "LOCAL_RANK" in os.environ


def needs_launch(spec: LaunchSpec) -> bool:
    """More than one process in the job and not yet under torchrun."""
    return spec.world_size > 1 and not is_worker()


def single_gpu_visible(spec: LaunchSpec, env: dict[str, str] | None = None) -> str | None:
    """The ``CUDA_VISIBLE_DEVICES`` that keeps a one-process run on one GPU, or None to leave it.

    With one process per job and several GPUs visible, transformers' Trainer would wrap the
    model in ``nn.DataParallel``, which TRL's ``SFTTrainer`` refuses (seen on two H200s with
    ``QLORA_NPROC_PER_NODE`` unset). The operator sets ``QLORA_NPROC_PER_NODE`` to the pod's GPUs;
    a process started by hand with more GPUs than that trains on the first visible one. Set
    before CUDA is initialised (the variable is read once). Workers of torchrun and multi-process
    jobs: None (torchrun gives each worker its ``LOCAL_RANK``).
    """
    env = dict(os.environ if env is None else env)
    if spec.world_size > 1 or "LOCAL_RANK" in env:
        return None
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return "0"
    first = visible.split(",")[0].strip()
    return first if (first and first != visible.strip()) else None


# --------------------------------------------------------------------------- launcher side


def _forward_sigterm() -> Any:
    """Install a SIGTERM handler that passes the signal on to this process's children (the workers)."""
    import psutil

    def handler(signum: int, frame: Any) -> None:
        for child in psutil.Process().children(recursive=False):
            try:
                child.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass

    return signal.signal(signal.SIGTERM, handler)


def _code(exitcode: int) -> int:
    """A worker's exit status as a shell would report it (signal N -> 128+N)."""
    return 128 - exitcode if exitcode < 0 else exitcode


def final_result(
    spec: LaunchSpec, rank0_result: dict[str, Any] | None, failures: dict[int, tuple[int, float]]
) -> dict[str, Any]:
    """The pod's result from rank 0's own result (if this pod holds it) and the workers' failures.

    Args:
        spec: the layout.
        rank0_result: what global rank 0 wrote, or ``None``.
        failures: ``{global rank: (exit code as torchrun reports it, timestamp s)}`` of
            the workers that exited non-zero (negative: killed by that signal).

    See the module docstring for the rules.
    """
    if rank0_result is not None and isinstance(rank0_result.get("exitCode"), int):
        return rank0_result
    if not failures:
        return {
            "exitCode": contract.EXIT_OK,
            "reason": contract.SUCCEEDED,
            "message": f"node {spec.node_rank}: all {spec.nproc_per_node} workers finished; "
            "global rank 0 (node 0) reports the artifacts",
        }
    rank, (raw, _) = min(failures.items(), key=lambda kv: (kv[1][1], kv[1][0] < 0, kv[0]))
    code = _code(raw)
    how = f"was killed by signal {-raw}" if raw < 0 else f"exited {raw}"
    others = sorted(r for r in failures if r != rank)
    return {
        "exitCode": code,
        "reason": reason_for(code),
        "message": f"node {spec.node_rank}: worker rank {rank} {how} first"
        + (f" (also failed: ranks {others})" if others else "")
        + "; its log lines above say why",
    }


def launch(spec: LaunchSpec, argv: list[str], work_dir: Path) -> dict[str, Any]:
    """Run the workers with ``torch.distributed.run`` and return this pod's result (see :func:`final_result`)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    work_dir.mkdir(parents=True, exist_ok=True)
    result_path = work_dir / "rank0-result.json"
    result_path.unlink(missing_ok=True)
    os.environ[ENV_WORKER_RESULT] = str(result_path)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // spec.nproc_per_node)))
    previous = _forward_sigterm()
    failures: dict[int, tuple[int, float]] = {}
    try:
        run(parse_args(spec.torchrun_args(argv)))
    except ChildFailedError as err:
        failures = {rank: (f.exitcode, float(f.timestamp)) for rank, f in err.failures.items()}
    finally:
        signal.signal(signal.SIGTERM, previous)
    try:
        rank0 = json.loads(result_path.read_text())
    except (OSError, ValueError):
        rank0 = None
    return final_result(spec, rank0, failures)


# --------------------------------------------------------------------------- worker side


class RemoteFailure(TrainerError):
    """Another rank failed; this rank stops with the same exit code and reason."""

    def __init__(self, exit_code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.reason = reason


def classify(err: BaseException) -> tuple[int, str, str]:
    """``(exit code, reason, message)`` of an exception, as ``cli`` would report it."""
    if isinstance(err, TrainerError):
        return err.exit_code, err.reason, str(err)
    if isinstance(err, ConfigError):
        return contract.EXIT_INVALID_CONFIG, contract.INVALID_CONFIG, str(err)
    return contract.EXIT_UNEXPECTED, contract.TRAINER_ERROR, describe_unexpected(err)


class Dist:
    """This worker's place in the job and the collectives the trainer's decisions use.

    A single-process run gets ``Dist.single()``: rank 0 of 1, every collective a no-op,
    so the same code path serves both.
    """

    def __init__(self, rank: int, local_rank: int, world_size: int, control: Any = None) -> None:
        self.rank = rank
        self.local_rank = local_rank
        self.world_size = world_size
        self.control = control
        #: Started by torchrun (process groups exist, even with one process).
        self.launched = control is not None

    @classmethod
    def single(cls) -> Dist:
        return cls(0, 0, 1)

    @classmethod
    def init(cls) -> Dist:
        """Initialise the process groups from torchrun's environment (``RANK``, ``WORLD_SIZE``, ...).

        The default group is NCCL on CUDA (with gloo for CPU tensors) and gloo on CPU;
        the control group is gloo with :data:`CONTROL_TIMEOUT_S`. Each local rank uses
        its own GPU (``cuda:LOCAL_RANK``).
        """
        import torch
        import torch.distributed as dist

        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world = int(os.environ["WORLD_SIZE"])
        if not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(local_rank)
                backend = "cuda:nccl,cpu:gloo"
            else:
                backend = "gloo"
                # accelerate names a multi-process CPU device "cpu:<local rank>", and the Trainer then resumes
                # with torch.load(map_location="cpu:0"), which torch cannot map: plain "cpu" instead.
                os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")
            dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
        control = dist.new_group(backend="gloo", timeout=timedelta(seconds=CONTROL_TIMEOUT_S))
        return cls(rank, local_rank, world, control)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Global rank 0: the only rank with side effects (uploads, status, termination message)."""
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """Local rank 0: the rank that downloads inputs into this node's cache."""
        return self.local_rank == 0

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier(group=self.control)

    def broadcast(self, value: Any, src: int = 0) -> Any:
        """``value`` of rank ``src`` on every rank (picklable objects)."""
        if not self.active:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=src, group=self.control)
        return box[0]

    def any_flag(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (an all-reduce MAX)."""
        if not self.active:
            return flag
        import torch
        import torch.distributed as dist

        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return bool(t.item())

    def agree(self, error: BaseException | None) -> None:
        """Every rank calls this after a step that may have failed on some ranks.

        Returns when no rank failed. Otherwise every rank raises: the lowest failing
        rank its own exception, the others a :class:`RemoteFailure` with its exit code,
        reason and message.
        """
        if not self.active:
            if error is not None:
                raise error
            return
        import torch
        import torch.distributed as dist

        t = torch.tensor([self.rank if error is not None else self.world_size], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        first = int(t.item())
        if first >= self.world_size:
            return
        info = self.broadcast(classify(error) if self.rank == first and error is not None else None, src=first)
        if self.rank == first and error is not None:
            raise error
        code, reason, message = info
        raise RemoteFailure(code, reason, f"rank {first} failed: {message}")

    def final_code(self, own_code: int) -> int:
        """Rank 0's exit code, as every rank should exit with it (see the module docstring).

        A rank that failed waits :data:`FAILED_EXIT_WAIT_S` for it (rank 0 may be stuck in
        a collective with it), then exits with its own code.
        """
        if not self.active:
            return own_code
        import torch
        import torch.distributed as dist

        t = torch.tensor([own_code], dtype=torch.int64)
        try:
            work = dist.broadcast(t, src=0, group=self.control, async_op=True)
            if own_code == contract.EXIT_OK or self.is_main:
                work.wait()
            else:
                work.wait(timeout=timedelta(seconds=FAILED_EXIT_WAIT_S))
            return int(t.item())
        except Exception as err:  # noqa: BLE001 - a dead peer must not hide this rank's own code
            log.warning("rank %d: no verdict from rank 0 (%s); exiting with its own code %d", self.rank, err, own_code)
            return own_code

    def shutdown(self) -> None:
        """Tear the process groups down (quietly: peers may be gone already)."""
        if not self.active:
            return
        import torch.distributed as dist

        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def write_worker_result(result: dict[str, Any]) -> bool:
    """Rank 0 under the launcher: write ``result`` where the launcher reads it; False when not launched so."""
    path = os.environ.get(ENV_WORKER_RESULT)
    if not path:
        return False
    tmp = Path(path).with_suffix(".part")
    tmp.write_text(json.dumps(result, default=str))
    os.replace(tmp, path)
    return True

