"""Helpers shared by the test suites (import as ``from helpers import wait_for``)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.2,
             ignore: tuple[type[BaseException], ...] = ()) -> T:
    """Call ``predicate`` until it returns something truthy and return that value.

    Args:
        predicate: the check; called at least once.
        timeout: bound in seconds.
        what: what is awaited, for the failure message ("job x to complete").
        interval: pause between calls in seconds.
        ignore: exception types that count as "not yet" instead of failing at once.

    Raises:
        AssertionError: ``timeout`` passed; the message names ``what`` and the last
            value or exception seen.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last = value
        except ignore as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; last result: {last!r}")
        time.sleep(interval)


#: Marker for :func:`set_path`: remove the key instead of setting it.
DELETE = object()


def set_path(data: dict, path: str, value: object) -> dict:
    """Set the dotted ``path`` of ``data`` in place (``DELETE`` removes the key); returns ``data``."""
    node = data
    *parents, last = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    if value is DELETE:
        node.pop(last, None)
    else:
        node[last] = value
    return data


def embedded_inputs(root: Path, train_rows: int, eval_rows: int) -> dict[str, Path]:
    """The embedded model and a slice of the embedded corpus, for real trainer runs on CPU.

    Writes ``small-train.jsonl`` (the first ``train_rows`` conversations of the seeded
    train split) and ``small-eval.jsonl`` (``eval_rows`` of the eval split) under ``root``.
    Returns ``{"model": model dir, "train": path, "eval": path}``.
    """
    import embedded  # hack/embedded.py

    embedded.build_corpus(root)
    train = (root / "train.jsonl").read_text().splitlines()[:train_rows]
    evals = (root / "eval.jsonl").read_text().splitlines()[:eval_rows]
    (root / "small-train.jsonl").write_text("\n".join(train) + "\n")
    (root / "small-eval.jsonl").write_text("\n".join(evals) + "\n")
    return {"model": embedded.ensure_model(), "train": root / "small-train.jsonl", "eval": root / "small-eval.jsonl"}


def upload_embedded(s3, root: Path, model_prefix: str | None, slices: dict[str, tuple[str, int, int]]) -> None:
    """Put the embedded model and slices of the embedded corpus into S3, for real trainer runs.

    Args:
        s3: a boto3 S3 client (the cluster's MinIO).
        root: a local directory for the converted corpus.
        model_prefix: key prefix in bucket ``models`` for the model directory's files
            (``s3://models/<model_prefix>/`` is the ``spec.model.uri``); None: the data only.
        slices: ``{key in bucket data: (split "train"|"eval", first row, end row)}``, each a
            JSONL object of those conversations of the seeded split.
    """
    import embedded  # hack/embedded.py

    if model_prefix:
        model_dir = embedded.ensure_model(quiet=True)
        for path in sorted(model_dir.rglob("*")):
            if path.is_file():
                s3.upload_file(str(path), "models", f"{model_prefix}/{path.relative_to(model_dir)}")
    embedded.build_corpus(root)
    for key, (split, start, end) in slices.items():
        rows = (root / f"{split}.jsonl").read_text().splitlines()[start:end]
        s3.put_object(Bucket="data", Key=key, Body="\n".join(rows).encode() + b"\n")


def signal_at_first_step(proc: subprocess.Popen, sig: int, timeout: float = 600) -> tuple[int, list[str]]:
    """Send ``sig`` to ``proc`` when its stderr logs the first ``train_step`` event; wait for its exit.

    ``proc`` must have ``stderr=PIPE`` in text mode. Returns ``(exit code, stderr lines)``;
    the process is killed if it outlives the wait.

    Raises:
        AssertionError: no training step within ``timeout`` seconds.
    """
    seen: list[str] = []
    try:
        deadline = time.monotonic() + timeout
        for line in proc.stderr:
            seen.append(line)
            if line.startswith('{"event": "train_step"'):
                proc.send_signal(sig)
                break
            assert time.monotonic() < deadline, f"no training step within {timeout} s"
        seen += proc.stderr.readlines()
        code = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return code, seen


def wait_crd_established(cluster, name: str = "qlorajobs.qlora.dev", timeout: float = 60) -> None:
    """Wait until the CustomResourceDefinition ``name`` has ``Established=True``.

    Read through the API, not ``kubectl wait --for=condition=Established``: kubectl errors
    out at once (``.status.conditions accessor error: <nil>``) when it reads a CRD the API
    server has not written conditions for yet, which happens on a busy machine.

    Raises:
        AssertionError: not established within ``timeout`` seconds.
    """
    path = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"

    def established() -> bool:
        conditions = (cluster.api().get(path).get("status") or {}).get("conditions") or []
        return any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)

    wait_for(established, timeout, f"the CRD {name} to be established")


#: ``config.json`` fields of Mistral-7B-v0.1 and Llama-3-70B (their Hugging Face model cards'
#: configs): the shapes the memory estimate and the fit check are tested with (no weights).
MISTRAL_7B = {
    "model_type": "mistral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
}
LLAMA3_70B = {
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}
