"""Fixtures shared by every test suite.

- ``cluster`` (session): a started :class:`localcluster.LocalCluster` (control plane and
  MinIO, no node: pods stay Pending) in a temp dir, stopped at the end of the session.
  ``tests/node`` overrides it with a cluster of one real node per module. Set ``QLORA_TEST_CLUSTER_DIR`` to a directory where
  ``python -m localcluster up --dir DIR`` already runs a cluster to reuse it instead.
- ``namespace``: a fresh ``t-<uuid>`` namespace per test (its ``default``
  ServiceAccount and ``kube-root-ca.crt`` ConfigMap exist), deleted afterwards.
- ``mlflow_server`` (session): a real MLflow tracking server
  (:class:`localcluster.mlflow_server.MlflowServer`: the pinned ``mlflow`` from PyPI in a
  cached venv, SQLite store, proxied artifacts) on a free loopback port, stopped at the end.
- ``wait_for`` lives in ``tests/helpers.py`` (``from helpers import wait_for``).
"""

from __future__ import annotations

import os
import signal
import sys
import uuid
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
for extra in (TESTS_DIR, REPO / "hack"):  # helpers.py and the localcluster package
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from helpers import wait_for  # noqa: E402


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """A running local cluster for the whole session (see the module docstring)."""
    from localcluster import LocalCluster

    reuse = os.environ.get("QLORA_TEST_CLUSTER_DIR")
    if reuse:
        yield LocalCluster.attach(reuse)
        return
    # SIGTERM (a CI timeout, a killed run) must still run the teardown below.
    previous = signal.getsignal(signal.SIGTERM)

    def _terminate(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _terminate)
    local = LocalCluster(tmp_path_factory.mktemp("cluster"))  # no node: pods run in tests/node
    try:
        local.start()
        print(f"\nlocal cluster up in {local.startup_seconds:.1f}s {local.timings}", file=sys.stderr)
        yield local
    finally:
        leftovers = local.stop()
        signal.signal(signal.SIGTERM, previous)
        assert not leftovers, f"processes left behind by the local cluster: {leftovers}"


@pytest.fixture
def namespace(cluster):
    """A fresh namespace ``t-<uuid>``, ready for pods; deleted after the test."""
    api = cluster.api()
    name = f"t-{uuid.uuid4().hex[:10]}"
    api.create("/api/v1/namespaces", {"metadata": {"name": name}})

    def ready():
        names = {sa["metadata"]["name"] for sa in api.get(f"/api/v1/namespaces/{name}/serviceaccounts")["items"]}
        cms = {cm["metadata"]["name"] for cm in api.get(f"/api/v1/namespaces/{name}/configmaps")["items"]}
        return "default" in names and "kube-root-ca.crt" in cms

    wait_for(ready, 30, f"namespace {name} to get its default ServiceAccount and kube-root-ca.crt")
    yield name
    api.delete(f"/api/v1/namespaces/{name}")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A running MLflow tracking server for the whole session; ``.url`` is its tracking URI."""
    from localcluster.mlflow_server import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    server.start(timeout_s=120)
    print(f"\nmlflow server {server.version} up in {server.startup_seconds}s at {server.url}", file=sys.stderr)
    try:
        yield server
    finally:
        leftovers = server.stop()
        assert not leftovers, f"mlflow server processes left behind: {leftovers}"
