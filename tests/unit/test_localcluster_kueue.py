"""The pure parts of :mod:`localcluster.kueue`: its configuration and webhook rewriting,
checked against the webhook manifests of the pinned Kueue Go module."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import yaml

from localcluster import kueue


def test_configuration_manages_only_queue_labelled_jobs(tmp_path: Path):
    config = kueue.configuration(webhook_port=9443, cert_dir=tmp_path, health_port=1, metrics_port=2)
    assert config["manageJobsWithoutQueueName"] is False
    assert config["integrations"]["frameworks"] == ["batch/job"]
    assert config["internalCertManagement"] == {"enable": False}
    assert config["webhook"] == {"host": "127.0.0.1", "port": 9443, "certDir": str(tmp_path)}
    assert "waitForPodsReady" not in config
    assert kueue.configuration(webhook_port=1, cert_dir=tmp_path, health_port=1, metrics_port=2,
                               wait_for_pods_ready=True)["waitForPodsReady"]["timeout"] == "5m"


def test_webhooks_point_at_the_host_process():
    try:
        mod = kueue.module_dir()
    except Exception as exc:  # noqa: BLE001 - no Go toolchain or module cache here
        pytest.skip(f"Kueue's Go module is not available: {exc}")
    manifests = list(yaml.safe_load_all((mod / "config/components/webhook/manifests.yaml").read_text()))
    docs = kueue.webhook_configurations(manifests, "https://127.0.0.1:1234", b"CA")
    assert {d["metadata"]["name"] for d in docs} == {kueue.MUTATING_NAME, kueue.VALIDATING_NAME}
    paths = set()
    for doc in docs:
        for hook in doc["webhooks"]:
            url = hook["clientConfig"]["url"]
            assert url.startswith("https://127.0.0.1:1234/"), url
            assert base64.b64decode(hook["clientConfig"]["caBundle"]) == b"CA"
            groups = {g for r in hook["rules"] for g in r["apiGroups"]}
            assert groups <= kueue.WEBHOOK_GROUPS, groups
            paths.add(url.rsplit("/", 1)[1])
    assert {"mutate-batch-v1-job", "validate-batch-v1-job", "mutate-kueue-x-k8s-io-v1beta2-workload"} <= paths
