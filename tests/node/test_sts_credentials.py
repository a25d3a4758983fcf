"""Temporary credentials (issue 18 item 4): an S3 session token from MinIO's STS reaches the real
trainer through the job's Secret (the trainer image's ``qlora-train fitcheck`` in a pod on the
real node, reading MinIO at the node's address).

MinIO's ``AssumeRole`` (its STS API on the S3 endpoint) hands out an access key, a secret key
and a session token. The job's Secret holds the three; the operator renders
``AWS_SESSION_TOKEN`` as an optional ``secretKeyRef`` (it never reads the Secret) and the
real ``qlora-train fitcheck`` (the run's CPU-only preflight) reads the model's ``config.json``
with them, so the GPU Job is created. The same temporary key without its token is refused by
MinIO: the fit check fails ``StorageError`` naming the object, and no GPU Job exists.
"""

from __future__ import annotations

import json

import boto3
import pytest
from helpers import MISTRAL_7B, wait_for

from operator_harness import (  # helpers of the operator tests
    REAL_TRAINER,
    apply,
    condition,
    events,
    gpu_jobs,
    wait_terminal,
)

from node_jobs import manifest  # the node's stand-in jobs

pytestmark = [pytest.mark.realnode, pytest.mark.cluster]


def temporary_credentials(cluster) -> dict:
    sts = boto3.client("sts", endpoint_url=cluster.s3_endpoint, region_name=cluster.s3_region,
                       aws_access_key_id=cluster.s3_access_key, aws_secret_access_key=cluster.s3_secret_key)
    return sts.assume_role(RoleArn="arn:xxx:xxx:xxx:xxxx", RoleSessionName="qlora-test",
                           DurationSeconds=900)["Credentials"]


def secret(cluster, namespace: str, name: str, creds: dict, with_token: bool) -> None:
    args = ["-n", namespace, "create", "secret", "generic", name,
            f"--from-literal=AWS_ACCESS_KEY_ID={creds['AccessKeyId']}",
            f"--from-literal=AWS_SECRET_ACCESS_KEY={creds['SecretAccessKey']}"]
    if with_token:
        args.append(f"--from-literal=AWS_SESSION_TOKEN={creds['SessionToken']}")
    cluster.kubectl(*args)


def test_a_session_token_from_minio_sts_reaches_the_trainer_through_the_secret(cluster, namespace, buckets,
                                                                               start_operator):
    api = cluster.api()
    buckets.put_object(Bucket="models", Key=f"{namespace}/mistral-7b/config.json", Body=json.dumps(MISTRAL_7B).encode())
    creds = temporary_credentials(cluster)
    assert creds["SessionToken"] and creds["AccessKeyId"] != cluster.s3_access_key
    secret(cluster, namespace, "sts-creds", creds, with_token=True)
    secret(cluster, namespace, "sts-no-token", creds, with_token=False)
    start_operator(trainer_command=REAL_TRAINER)
    for name, secret_name in (("with-token", "sts-creds"), ("no-token", "sts-no-token")):
        body = manifest(cluster, namespace, name, model={"uri": f"s3://models/{namespace}/mistral-7b/"},
                        resources={"gpus": 1, "gpuMemoryGiB": 24}, runPolicy={"suspend": True})
        body["spec"]["storage"]["credentialsSecretRef"] = {"name": secret_name}
        apply(cluster, body)

    created = wait_for(lambda: gpu_jobs(api, namespace, "with-token") or None, 120, "with-token's GPU Job")
    env = created[0]["spec"]["template"]["spec"]["containers"][0]["env"]
    token = [e for e in env if e["name"] == "AWS_SESSION_TOKEN"]
    assert token and token[0]["valueFrom"]["secretKeyRef"] == {"name": "sts-creds", "key": "AWS_SESSION_TOKEN",
                                                                "optional": True}, token
    assert not any("value" in e and creds["SessionToken"] in str(e["value"]) for e in env)
    passed = [m for _, r, m in events(api, namespace, "with-token") if r == "JobCreated"]
    assert passed and "fit check with-token-train-fit passed" in passed[0], passed

    refused = wait_terminal(api, namespace, "no-token", 120)
    failed = condition(refused, "Failed")
    assert failed["reason"] == "StorageError", failed
    assert f"s3://models/{namespace}/mistral-7b/config.json" in failed["message"], failed["message"]
    assert gpu_jobs(api, namespace, "no-token") == []
