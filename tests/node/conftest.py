"""Fixtures of the tests on the real node (``tests/node``): pods under a real kubelet and
containerd, from the images ``make images`` builds.

- ``node`` (module): a started real-node cluster (control plane, MinIO at the node's address,
  one node of containerd + runc + CNI + kubelet + kube-proxy with fake ``nvidia.com/gpu``: the
  module's ``NODE_GPUS``, 1 without it),
  the trainer and operator images imported into its containerd (skipped when the same image
  is there: containerd's root is kept per machine), the CRD established, buckets ``models``, ``data``,
  ``artifacts``, the embedded SmolLM2-135M under ``s3://models/smollm2/`` and slices of the
  corpus as ``s3://data/train.jsonl`` (48 conversations) and ``s3://data/eval.jsonl`` (8).
  ``{"cluster", "image" (the trainer's), "images" ({"operator", "trainer"}), "s3", "timings"}``. The node's ports are fixed (one real node per
  machine), so modules using it run one after the other and each stops its node.
- ``namespace``: a fresh namespace with its default ServiceAccount and the ``s3-creds`` Secret.
- ``operator``: an operator process for the test's namespace (``qlora-operator run --namespace
  NS``, :class:`operator_harness.Operator`) with the built trainer image as the default,
  ``imagePullPolicy: Never`` and the trainer's own command (``qlora-train``).
- ``start_operator``: ``start_operator(**settings)`` starts such an operator with the stand-in
  trainer (``node_jobs.NODE_COMMAND``) unless ``trainer_command`` is given; stopped afterwards.
- ``cluster``, ``buckets``: the node's cluster and its MinIO client, under the names the
  operator tests use (instead of the session's ``cluster`` of ``tests/conftest.py``).

``test_real_node.py`` starts its own node (``node_cluster``: small probe images only).
"""

from __future__ import annotations

import signal
import sys
import time
import uuid
from pathlib import Path

import pytest

from helpers import upload_embedded, wait_crd_established, wait_for

REPO = Path(__file__).resolve().parents[2]
from operator_harness import REAL_TRAINER, Operator  # the operator tests' process wrapper

from node_jobs import NODE_COMMAND  # noqa: E402


@pytest.fixture(scope="module")
def node(request, tmp_path_factory):
    """A started real-node cluster with both images imported, the CRD installed and the
    model and data in MinIO: ``{"cluster", "image", "images", "s3", "timings"}``; the node has the
    module's ``NODE_GPUS`` fake GPUs (1 without it)."""
    import localimages
    from localcluster import LocalCluster

    timings: dict[str, float] = {}
    t = time.monotonic()
    images = localimages.build_images(log=lambda m: print(f"[images] {m}", file=sys.stderr))
    timings["images"] = time.monotonic() - t
    # SIGTERM (a CI timeout, a killed run) must still stop the node: it changes host state.
    previous = signal.getsignal(signal.SIGTERM)

    def _terminate(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _terminate)
    gpus = getattr(request.module, "NODE_GPUS", 1)
    cluster = LocalCluster(tmp_path_factory.mktemp("realnode"), node="real", gpus_per_node=gpus,
                           timeout_s=180)
    try:
        t = time.monotonic()
        cluster.start()
        timings["cluster"] = time.monotonic() - t
        t = time.monotonic()
        imported = {name: cluster.import_image(ref) for name, ref in images.items()}  # trainer and operator
        timings["import"] = time.monotonic() - t
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
        wait_crd_established(cluster)
        t = time.monotonic()
        s3 = cluster.s3_client()
        for bucket in ("models", "data", "artifacts"):
            s3.create_bucket(Bucket=bucket)
        upload_embedded(s3, tmp_path_factory.mktemp("corpus"), "smollm2",
                        {"train.jsonl": ("train", 0, 48), "eval.jsonl": ("eval", 0, 8)})
        timings["inputs"] = time.monotonic() - t
        print(f"\nreal node up: {cluster.timings}; images {images} "
              f"(copied: {[n for n, i in imported.items() if i.imported]}); "
              + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()), file=sys.stderr)
        yield {"cluster": cluster, "image": images["trainer"], "images": images, "s3": s3, "timings": timings}
    finally:
        leftovers = cluster.stop()
        signal.signal(signal.SIGTERM, previous)
        assert not leftovers, f"the real node left behind: {leftovers}"


@pytest.fixture
def namespace(node):
    """A fresh namespace with its default ServiceAccount and the S3 credentials Secret."""
    cluster = node["cluster"]
    name = f"f-{uuid.uuid4().hex[:10]}"
    cluster.kubectl("create", "namespace", name)
    wait_for(lambda: cluster.kubectl("-n", name, "get", "serviceaccount", "default", check=False).returncode == 0,
             30, f"the default ServiceAccount of {name}")
    cluster.kubectl("-n", name, "create", "secret", "generic", "s3-creds",
                    f"--from-literal=AWS_ACCESS_KEY_ID={cluster.s3_access_key}",
                    f"--from-literal=AWS_SECRET_ACCESS_KEY={cluster.s3_secret_key}")
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def operator(start_operator):
    """An operator process for the test's namespace: the trainer image as the default,
    ``imagePullPolicy: Never``, the trainer's own command (stopped after the test)."""
    return start_operator(trainer_command=REAL_TRAINER, stalled_timeout_seconds=600)


@pytest.fixture(scope="module")
def cluster(node):
    """The real-node cluster (instead of the session's ``cluster``)."""
    return node["cluster"]


@pytest.fixture(scope="module")
def buckets(node):
    """The boto3 client of the node's MinIO (buckets ``models``, ``data``, ``artifacts``)."""
    return node["s3"]


@pytest.fixture
def start_operator(node, namespace, tmp_path):
    """start_operator(ns=None, env=None, ready_text=..., **settings) -> a running
    :class:`Operator` (the test's namespace unless ``ns``), stopped after the test: the trainer
    image as the default, ``imagePullPolicy: Never``, the stand-in trainer unless
    ``trainer_command`` is given."""
    started: list[Operator] = []

    def start(ns: str | None = None, env: dict | None = None, ready_text: str = "qlora-operator started",
              **settings) -> Operator:
        settings = {"trainer_command": NODE_COMMAND, "trainer_image": node["image"], "image_pull_policy": "Never",
                    **settings}
        op = Operator(node["cluster"], ns or namespace, tmp_path / f"operator-{len(started)}.log", env=env, **settings)
        started.append(op)
        return op.start(ready_text)

    yield start
    for op in started:
        op.stop()
        sys.stderr.write(f"\n--- operator log ({op.namespace}), tail ---\n{op.log()[-2500:]}\n")
