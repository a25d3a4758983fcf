"""Storage logic that needs no server: URIs, error classification, ``file://`` artifacts.

The S3 paths run against the real MinIO in ``tests/integration/test_trainer_s3.py``.
"""

from __future__ import annotations

import json

import pytest
from qlora_trainer.config import StorageSettings
from qlora_trainer.errors import StorageError
from qlora_trainer.storage import (
    SUCCESS_MARKER,
    Storage,
    _error_code,
    _is_permanent,
    as_prefix,
    checksums,
    join_uri,
    parse_uri,
    sha256_file,
)


@pytest.mark.parametrize(
    "uri,scheme,bucket,key",
    [
        ("s3://bucket/a/b.jsonl", "s3", "bucket", "a/b.jsonl"),
        ("s3://bucket/prefix/", "s3", "bucket", "prefix/"),
        ("s3://bucket", "s3", "bucket", ""),
        ("file:///data/x.jsonl", "file", "", "/data/x.jsonl"),
        ("file://localhost/data/my%20file.csv", "file", "", "/data/my file.csv"),
    ],
)
def test_parse_uri(uri, scheme, bucket, key):
    loc = parse_uri(uri)
    assert (loc.scheme, loc.bucket, loc.key) == (scheme, bucket, key)


@pytest.mark.parametrize("uri", ["http://x/y", "s3:///key", "file://host/x", "gs://b/k", "relative/path"])
def test_parse_uri_refuses(uri):
    with pytest.raises(StorageError, match=r"^parse "):
        parse_uri(uri)


def test_join_and_prefix():
    assert join_uri("s3://b/out/", "checkpoints", "step-5/") == "s3://b/out/checkpoints/step-5"
    assert join_uri("file:///tmp/out", "adapter") == "file:///tmp/out/adapter"
    assert as_prefix("s3://b/out") == as_prefix("s3://b/out/") == "s3://b/out/"


def _client_error(code: str, status: int = 400):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op")


@pytest.mark.parametrize(
    "code,permanent",
    [
        ("NoSuchBucket", True),
        ("AccessDenied", True),
        ("404", True),
        ("InvalidAccessKeyId", True),
        ("SignatureDoesNotMatch", True),
        ("SlowDown", False),
        ("InternalError", False),
        ("503", False),
        ("RequestTimeout", False),
    ],
)
def test_error_classification(code, permanent):
    assert _is_permanent(_client_error(code)) is permanent


def test_error_code_from_a_wrapped_upload_failure():
    from boto3.exceptions import S3UploadFailedError

    err = S3UploadFailedError(
        "Failed to upload x to b/k: An error occurred (AccessDenied) when calling the PutObject operation"
    )
    assert _error_code(err) == "AccessDenied" and _is_permanent(err)


def test_transient_errors_are_retried_then_reported(monkeypatch):
    storage = Storage(StorageSettings(), attempts=3, base_delay=0.001)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise _client_error("SlowDown", 503)
        return "ok"

    assert storage._retry("list", "s3://b/k", flaky) == "ok" and len(calls) == 3
    with pytest.raises(StorageError, match=r"^list s3://b/k: .*gave up after 3 attempts"):
        storage._retry("list", "s3://b/k", lambda: (_ for _ in ()).throw(_client_error("InternalError", 500)))
    calls.clear()

    def denied():
        calls.append(1)
        raise _client_error("AccessDenied", 403)

    with pytest.raises(StorageError, match=r"^upload s3://b/k: .*AccessDenied"):
        storage._retry("upload", "s3://b/k", denied)
    assert len(calls) == 1, "permanent errors are not retried"


def test_missing_credentials_name_the_variables(monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(StorageError, match="AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        Storage(StorageSettings(endpoint="http://127.0.0.1:9")).list("s3://bucket/x")


def test_a_set_endpoint_is_used_for_every_request(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://elsewhere:1")
    client = Storage(StorageSettings(endpoint="http://minio.storage:9000", region="eu-west-3")).client
    assert client.meta.endpoint_url == "http://minio.storage:9000"
    assert client.meta.region_name == "eu-west-3"
    assert client.meta.config.s3["addressing_style"] == "path"
    assert client.meta.config.retries["mode"] == "standard"


def test_a_wrong_region_never_sends_requests_anywhere_but_the_endpoint(monkeypatch):
    """S3 answers a wrong-region request with a redirect; botocore's redirect must stay on our endpoint."""
    from botocore.awsrequest import AWSResponse

    class Raw:
        def __init__(self, body: bytes):
            self.body = body

        def stream(self, **kwargs):
            yield self.body

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    urls: list[str] = []

    def answer_with_redirect(request, **kwargs):
        urls.append(request.url)
        body = (
            b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>PermanentRedirect</Code><Message>wrong region'
            b"</Message><Endpoint>bucket.s3.eu-west-1.amazonaws.com</Endpoint><Bucket>bucket</Bucket></Error>"
        )
        return AWSResponse(request.url, 301, {"x-amz-bucket-region": "eu-west-1"}, Raw(body))

    storage = Storage(StorageSettings(endpoint="http://minio.storage:9000", region="us-west-2"), base_delay=0.001)
    storage.client.meta.events.register("before-send.s3", answer_with_redirect)
    with pytest.raises(StorageError, match=r"^list s3://bucket/x/: .*PermanentRedirect"):
        storage.list("s3://bucket/x")
    assert urls and all(url.startswith("http://minio.storage:9000/") for url in urls), urls
    assert len(urls) <= 2, "a redirect is permanent: not retried"


def test_file_upload_dir_writes_the_marker_last_and_replaces_an_old_one(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "w.bin").write_bytes(b"123")
    (src / "a.json").write_text("{}")
    out = f"file://{tmp_path}/out/adapter"
    storage = Storage()
    assert storage.upload_dir(src, out, marker={"kind": "adapter"}) == ["a.json", "sub/w.bin"]
    marker = json.loads((tmp_path / "out/adapter" / SUCCESS_MARKER).read_text())
    assert marker["files"] == {"a.json": 2, "sub/w.bin": 3} and marker["kind"] == "adapter"
    assert storage.is_complete(out)
    assert (tmp_path / "out/adapter/sub/w.bin").stat().st_mtime <= (tmp_path / "out/adapter/_SUCCESS").stat().st_mtime


def test_file_checkpoints_complete_only_with_marker_and_pruned(tmp_path):
    storage = Storage()
    root = f"file://{tmp_path}/out/checkpoints"
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "adapter_model.safetensors").write_bytes(b"x")
    for step in (2, 4, 6):
        storage.upload_dir(src, f"{root}/step-{step}")
    (tmp_path / "out/checkpoints/step-8").mkdir()
    (tmp_path / "out/checkpoints/step-8/adapter_model.safetensors").write_bytes(b"half")
    (tmp_path / "out/checkpoints/other").mkdir()
    assert [c.step for c in storage.complete_checkpoints(root)] == [2, 4, 6]
    assert storage.prune_checkpoints(root, keep=1) == [2, 4, 8]
    assert [c.step for c in storage.complete_checkpoints(root)] == [6]


def test_fetch_file_and_directory_in_place(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.jsonl").write_text("{}\n")
    storage = Storage()
    path, objs = storage.fetch(f"file://{tmp_path}/d/x.jsonl", tmp_path / "cache")
    assert path == tmp_path / "d" / "x.jsonl" and objs[0].size == 3
    path, objs = storage.fetch(f"file://{tmp_path}/d", tmp_path / "cache")
    assert path == tmp_path / "d" and [o.relpath for o in objs] == ["x.jsonl"]
    with pytest.raises(StorageError, match=r"^download file://.*/missing: 404"):
        storage.fetch(f"file://{tmp_path}/missing", tmp_path / "cache")
    entries = checksums(objs)
    assert entries == [{"path": "x.jsonl", "size": 3, "sha256": sha256_file(tmp_path / "d" / "x.jsonl")}]
