"""Object storage: ``s3://`` and ``file://`` URIs behind one small interface.

:class:`Storage` is the interface the trainer uses. Each URI goes to the backend of its
scheme, :class:`FileBackend` or :class:`S3Backend`, which do the one-object operations
(list, stat, read, download, put, upload, delete, copy, abort multipart uploads) on a
parsed :class:`Location`; what :class:`Storage` builds from them (directories with their
marker, prefix downloads with an ETag record, moves, checkpoints) is written once, for both.

What it guarantees (DESIGN.md section 4, issue 6):

* Requests go to the configured endpoint only. With ``storage.endpoint`` set, boto3
  gets it as ``endpoint_url`` for every call, so a missing or wrong region can never
  send a request to the public AWS endpoint; with it unset, ``AWS_ENDPOINT_URL`` from
  the environment (boto3's own rule) or AWS itself is used.
* Credentials come from the environment only: ``AWS_ACCESS_KEY_ID`` /
  ``AWS_SECRET_ACCESS_KEY`` (+ ``AWS_SESSION_TOKEN``), or a web-identity role
  (``AWS_ROLE_ARN`` + ``AWS_WEB_IDENTITY_TOKEN_FILE``). Shared credential files and
  the instance metadata service are never consulted.
* Transient failures (5xx, throttling, timeouts, dropped connections) are retried:
  botocore's ``standard`` retry mode inside each call, and :func:`Storage._retry`
  around whole transfers with exponential backoff and jitter. Permanent failures
  (403, 404, ``NoSuchBucket``, bad credentials) raise :class:`StorageError` at once,
  naming the operation and the URI (exit code 4).
* Directories are uploaded file by file (multipart above ``multipart_threshold``
  bytes), then the ``_SUCCESS`` marker is written last. An artifact without its marker
  is incomplete and is never listed or reported. Multipart uploads left behind by a
  failed or killed attempt are aborted.

Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

from . import contract
from .config import StorageSettings
from .errors import StorageError

log = logging.getLogger(__name__)

#: Name of the completion marker written last into every artifact prefix.
SUCCESS_MARKER = contract.SUCCESS_MARKER
#: Local sidecar recording what a prefix download fetched (relative path -> ETag).
_DOWNLOAD_RECORD = ".qlora-download.json"

#: S3 error codes that retrying cannot fix.
PERMANENT_CODES = frozenset(
    {
        "403",
        "404",
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "InvalidBucketName",
        "InvalidObjectState",
        "NoSuchBucket",
        "NoSuchKey",
        "NoSuchUpload",
        "NotFound",
        "SignatureDoesNotMatch",
        "AuthorizationHeaderMalformed",
        "InvalidRequest",
        "MethodNotAllowed",
        "PermanentRedirect",
        "301",
        "IllegalLocationConstraintException",
    }
)

T = TypeVar("T")


@dataclass(frozen=True)
class Location:
    """A parsed URI: ``scheme`` is ``s3`` or ``file``.

    For ``s3``, ``bucket`` and ``key`` (no leading slash; may be empty or end in ``/``).
    For ``file``, ``path`` is the absolute local path (``key`` is the same as a string).
    """

    scheme: str
    bucket: str
    key: str

    @property
    def path(self) -> Path:
        """Local path of a ``file://`` location."""
        return Path(self.key)

    @property
    def uri(self) -> str:
        """The URI again, normalised."""
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.key}"
        return f"file://{self.key}"


def parse_uri(uri: str) -> Location:
    """Split ``s3://bucket/key`` or ``file:///abs/path`` into a :class:`Location`.

    Raises:
        StorageError: operation ``parse``, for any other scheme or a relative file path.
    """
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError("parse", uri, "an s3:// URI needs a bucket: s3://bucket/key")
        return Location("s3", parsed.netloc, parsed.path.lstrip("/"))
    if parsed.scheme == "file":
        path = unquote(parsed.path)
        if parsed.netloc not in ("", "localhost") or not path.startswith("/"):
            raise StorageError("parse", uri, "a file:// URI needs an absolute path: file:///dir/file")
        return Location("file", "", path)
    raise StorageError("parse", uri, "unsupported scheme: use s3:// or file://")


def join_uri(base: str, *parts: str) -> str:
    """Join path parts onto a URI prefix with single slashes: ``join_uri("s3://b/out/", "adapter")``."""
    out = base.rstrip("/")
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def as_prefix(uri: str) -> str:
    """The URI with exactly one trailing slash (a directory / key prefix)."""
    return uri.rstrip("/") + "/"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a local file, read in ``chunk``-byte pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ObjectInfo:
    """One object (or file) under a listed prefix.

    ``relpath`` is relative to the listed prefix with ``/`` separators; ``size`` in
    bytes; ``etag`` is the S3 ETag without quotes (``None`` for local files).
    """

    uri: str
    relpath: str
    size: int
    etag: str | None


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint in storage: ``<output>/checkpoints/step-N/`` with its marker."""

    step: int
    uri: str


def _error_code(err: BaseException) -> str | None:
    """S3 error code of a botocore/boto3 exception, or ``None`` when it has none."""
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        if code:
            return str(code)
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status:
            return str(status)
    # boto3's S3UploadFailedError only keeps the text of the ClientError it wraps.
    match = re.search(r"\(([A-Za-z0-9]+)\) when calling", str(err))
    return match.group(1) if match else None


def _is_permanent(err: BaseException) -> bool:
    code = _error_code(err)
    return code is not None and code in PERMANENT_CODES


#: ``retry(operation, uri, fn)``: :meth:`Storage._retry`, handed to each backend.
Retrier = Callable[[str, str, Callable[[], T]], T]


class FileBackend:
    """``file://`` locations: local files, written to a temp name and renamed into place.

    Every method takes a parsed :class:`Location` (and the URI it came from, for error
    messages) and raises :class:`StorageError` through the shared ``retry``.
    """

    scheme = "file"

    def __init__(self, retry: Retrier) -> None:
        self._retry = retry

    def local_path(self, loc: Location) -> Path | None:
        """The location's own path: ``file://`` inputs are used in place, never copied."""
        return loc.path

    def list(self, loc: Location) -> list[ObjectInfo]:
        root = loc.path
        if not root.is_dir():
            return []
        out = []
        for path in sorted(root.rglob("*")):
            if path.is_file():
                rel = path.relative_to(root).as_posix()
                out.append(ObjectInfo(f"file://{path}", rel, path.stat().st_size, None))
        return out

    def stat(self, loc: Location, uri: str) -> ObjectInfo | None:
        p = loc.path
        return ObjectInfo(uri, p.name, p.stat().st_size, None) if p.is_file() else None

    def read_bytes(self, loc: Location, uri: str) -> bytes:
        return self._retry("read", uri, loc.path.read_bytes)

    def download_file(self, loc: Location, uri: str, tmp: Path) -> None:
        self._retry("download", uri, lambda: shutil.copyfile(loc.path, tmp))

    def _write(self, loc: Location, uri: str, fill: Callable[[Path], Any]) -> None:
        """Create ``loc``'s file atomically: ``fill(temp path)``, then rename (``upload``, retried)."""

        def write() -> None:
            loc.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = loc.path.with_name(f".{loc.path.name}.part")
            fill(tmp)
            os.replace(tmp, loc.path)

        self._retry("upload", uri, write)

    def put_bytes(self, loc: Location, uri: str, data: bytes, content_type: str) -> None:
        self._write(loc, uri, lambda tmp: tmp.write_bytes(data))

    def upload_file(self, path: Path, loc: Location, uri: str) -> None:
        self._write(loc, uri, lambda tmp: shutil.copyfile(path, tmp))

    def delete(self, loc: Location, uri: str) -> None:
        self._retry("delete", uri, lambda: loc.path.unlink(missing_ok=True))

    def delete_prefix(self, loc: Location, prefix: str) -> None:
        self._retry("delete", prefix, lambda: shutil.rmtree(loc.path, ignore_errors=True))

    def copy(self, source: Location, target: Location, uri: str) -> None:
        def copy() -> None:
            target.path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source.path, target.path)

        self._retry("copy", uri, copy)

    def abort_multipart_uploads(self, loc: Location, uri: str) -> int:
        return 0  # local files have no multipart uploads


class S3Backend:
    """``s3://`` locations through one boto3 client (created on first use).

    Args:
        settings: endpoint, region and addressing style.
        retry: the shared retry wrapper (:meth:`Storage._retry`).
        multipart_threshold, multipart_chunksize, max_concurrency: see :class:`Storage`.
    """

    scheme = "s3"

    def __init__(
        self, settings: StorageSettings, retry: Retrier, *, multipart_threshold: int, multipart_chunksize: int,
        max_concurrency: int,
    ) -> None:
        self.settings = settings
        self._retry = retry
        self.multipart_threshold = multipart_threshold
        self.multipart_chunksize = multipart_chunksize
        self.max_concurrency = max_concurrency
        self._client: Any = None

    @property
    def client(self) -> Any:
        """The boto3 S3 client, created on first use (see the module docstring for the rules)."""
        if self._client is None:
            self._client = self._make_client()
        return self._client

    def _make_client(self) -> Any:
        import boto3
        from botocore.config import Config

        config = Config(
            region_name=self.settings.region,
            signature_version="s3v4",
            s3={"addressing_style": self.settings.addressing_style},
            retries={"mode": "standard", "max_attempts": 5},
            connect_timeout=10,
            read_timeout=120,
            tcp_keepalive=True,
        )
        key_id = os.environ.get("AWS_ACCESS_KEY_ID")
        secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
        kwargs: dict[str, Any] = {"config": config, "region_name": self.settings.region}
        endpoint = self.settings.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            kwargs["endpoint_url"] = endpoint
        if key_id and secret:
            session = boto3.session.Session(
                aws_access_key_id=key_id,
                aws_secret_access_key=secret,
                aws_session_token=os.environ.get("AWS_SESSION_TOKEN") or None,
                region_name=self.settings.region,
            )
        elif os.environ.get("AWS_ROLE_ARN") and os.environ.get("AWS_WEB_IDENTITY_TOKEN_FILE"):
            session = boto3.session.Session(region_name=self.settings.region)
        else:
            raise StorageError(
                "connect",
                endpoint or "s3://",
                "no S3 credentials in the environment: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(the QLoRAJob's storage.credentialsSecretRef)",
            )
        return session.client("s3", **kwargs)

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=self.multipart_chunksize,
            max_concurrency=self.max_concurrency,
            use_threads=True,
        )

    def local_path(self, loc: Location) -> Path | None:
        """None: objects are downloaded (:meth:`Storage.fetch`)."""
        return None

    def list(self, loc: Location) -> list[ObjectInfo]:
        def run() -> list[ObjectInfo]:
            paginator = self.client.get_paginator("list_objects_v2")
            found = []
            for page in paginator.paginate(Bucket=loc.bucket, Prefix=loc.key):
                for obj in page.get("Contents", []):
                    key = obj["Key"]
                    if key.endswith("/"):
                        continue
                    rel = key[len(loc.key) :]
                    found.append(
                        ObjectInfo(f"s3://{loc.bucket}/{key}", rel, int(obj["Size"]), str(obj["ETag"]).strip('"'))
                    )
            return sorted(found, key=lambda o: o.relpath)

        return self._retry("list", loc.uri, run)

    def stat(self, loc: Location, uri: str) -> ObjectInfo | None:
        def run() -> ObjectInfo | None:
            from botocore.exceptions import ClientError

            if not loc.key or loc.key.endswith("/"):
                return None
            try:
                head = self.client.head_object(Bucket=loc.bucket, Key=loc.key)
            except ClientError as err:
                if _error_code(err) in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise
            return ObjectInfo(uri, loc.key.rsplit("/", 1)[-1], int(head["ContentLength"]), str(head["ETag"]).strip('"'))

        return self._retry("stat", uri, run)

    def read_bytes(self, loc: Location, uri: str) -> bytes:
        return self._retry("read", uri, lambda: self.client.get_object(Bucket=loc.bucket, Key=loc.key)["Body"].read())

    def download_file(self, loc: Location, uri: str, tmp: Path) -> None:
        self._retry(
            "download",
            uri,
            lambda: self.client.download_file(loc.bucket, loc.key, str(tmp), Config=self._transfer_config()),
        )

    def put_bytes(self, loc: Location, uri: str, data: bytes, content_type: str) -> None:
        self._retry(
            "upload",
            uri,
            lambda: self.client.put_object(Bucket=loc.bucket, Key=loc.key, Body=data, ContentType=content_type),
        )

    def upload_file(self, path: Path, loc: Location, uri: str) -> None:
        """Multipart above the threshold; a failed upload's multipart parts are aborted."""
        try:
            self._retry(
                "upload",
                uri,
                lambda: self.client.upload_file(str(path), loc.bucket, loc.key, Config=self._transfer_config()),
            )
        except StorageError:
            self.abort_multipart_uploads(loc, uri)
            raise

    def delete(self, loc: Location, uri: str) -> None:
        self._retry("delete", uri, lambda: self.client.delete_object(Bucket=loc.bucket, Key=loc.key))

    def delete_prefix(self, loc: Location, prefix: str) -> None:
        """The marker first, so a reader never sees a half-deleted artifact as complete; then 1,000 a batch."""
        self.delete(parse_uri(prefix + SUCCESS_MARKER), prefix + SUCCESS_MARKER)
        objects = self.list(loc)
        for start in range(0, len(objects), 1000):
            batch = [{"Key": parse_uri(o.uri).key} for o in objects[start : start + 1000]]
            self._retry(
                "delete",
                prefix,
                lambda batch=batch: self.client.delete_objects(
                    Bucket=loc.bucket, Delete={"Objects": batch, "Quiet": True}
                ),
            )

    def copy(self, source: Location, target: Location, uri: str) -> None:
        """Server-side copy (multipart for large objects)."""
        self._retry(
            "copy",
            uri,
            lambda: self.client.copy(
                {"Bucket": source.bucket, "Key": source.key}, target.bucket, target.key,
                Config=self._transfer_config(),
            ),
        )

    def abort_multipart_uploads(self, loc: Location, uri: str) -> int:
        """Abort unfinished multipart uploads whose key starts with ``loc.key``; returns how many.

        Never raises: failing to clean up is logged, not fatal.
        """
        try:

            def run() -> int:
                n = 0
                # Filtered here, not with Prefix=: MinIO matches Prefix against whole keys only.
                paginator = self.client.get_paginator("list_multipart_uploads")
                for page in paginator.paginate(Bucket=loc.bucket):
                    for up in page.get("Uploads", []):
                        if up["Key"].startswith(loc.key):
                            self.client.abort_multipart_upload(
                                Bucket=loc.bucket, Key=up["Key"], UploadId=up["UploadId"]
                            )
                            n += 1
                return n

            n = self._retry("abort-multipart", uri, run)
        except StorageError as err:
            log.warning("could not abort multipart uploads under %s: %s", uri, err)
            return 0
        if n:
            log.info("aborted %d unfinished multipart upload(s) under %s", n, uri)
        return n


Backend = FileBackend | S3Backend


class Storage:
    """Reads and writes ``s3://`` and ``file://`` URIs; one instance per run.

    Each URI goes to the backend of its scheme (:class:`FileBackend`, :class:`S3Backend`,
    which do one-object operations); what is built from them (directories with their
    marker, prefix downloads with an ETag record, moves, checkpoints) is written once here.

    Args:
        settings: endpoint, region and addressing style (``storage`` of the config).
        attempts: tries per operation for transient errors (outer wrapper), >= 1.
        base_delay: first backoff in seconds; doubled per attempt, with jitter, capped at 30 s.
        multipart_threshold: files at least this many bytes are uploaded in parts.
        multipart_chunksize: part size in bytes (S3 requires >= 5 MiB except the last).
        max_concurrency: parallel part transfers per file.
    """

    def __init__(
        self,
        settings: StorageSettings | None = None,
        *,
        attempts: int = 5,
        base_delay: float = 1.0,
        multipart_threshold: int = 64 * 1024 * 1024,
        multipart_chunksize: int = 64 * 1024 * 1024,
        max_concurrency: int = 8,
    ) -> None:
        self.settings = settings or StorageSettings()
        self.attempts = max(1, attempts)
        self.base_delay = base_delay
        self._s3 = S3Backend(
            self.settings, self._retry, multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize, max_concurrency=max_concurrency,
        )
        self._backends: dict[str, Backend] = {"file": FileBackend(self._retry), "s3": self._s3}

    @property
    def client(self) -> Any:
        """The boto3 S3 client (:attr:`S3Backend.client`)."""
        return self._s3.client

    def _locate(self, uri: str) -> tuple[Location, Backend]:
        """``uri`` parsed, and the backend of its scheme (:func:`parse_uri` raises for others)."""
        loc = parse_uri(uri)
        return loc, self._backends[loc.scheme]

    # ------------------------------------------------------------------ retries
    def _retry(self, operation: str, uri: str, fn: Callable[[], T]) -> T:
        """Run ``fn``; retry transient failures with backoff; map failures to :class:`StorageError`."""
        try:
            from boto3.exceptions import S3TransferFailedError, S3UploadFailedError
            from botocore.exceptions import BotoCoreError, ClientError

            s3_errors: tuple[type[BaseException], ...] = (
                ClientError, BotoCoreError, S3UploadFailedError, S3TransferFailedError,
            )
        except ImportError:  # file:// only: an image without boto3 never raises its errors
            s3_errors = ()
        delay = self.base_delay
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except StorageError:
                raise
            except (ConnectionError, TimeoutError, *s3_errors) as err:
                detail = f"{type(err).__name__}: {err}"
                if _is_permanent(err):
                    raise StorageError(operation, uri, detail) from err
                if attempt == self.attempts:
                    raise StorageError(operation, uri, f"{detail} (gave up after {attempt} attempts)") from err
                sleep = min(30.0, delay) * (0.5 + random.random())
                log.warning(
                    "storage %s %s failed (attempt %d/%d), retrying in %.1fs: %s",
                    operation,
                    uri,
                    attempt,
                    self.attempts,
                    sleep,
                    detail,
                )
                time.sleep(sleep)
                delay *= 2
            except FileNotFoundError as err:
                raise StorageError(operation, uri, f"not found: {err.filename or err}") from err
            except PermissionError as err:
                raise StorageError(operation, uri, f"permission denied: {err.filename or err}") from err
            except OSError as err:
                raise StorageError(operation, uri, f"{type(err).__name__}: {err}") from err
        raise AssertionError("unreachable")  # pragma: no cover

    # ------------------------------------------------------------------ listing
    def list(self, uri: str) -> list[ObjectInfo]:
        """Every object under the prefix ``uri`` (recursively), sorted by ``relpath``.

        ``uri`` is treated as a directory: ``s3://b/models/x`` lists keys under
        ``models/x/``. Zero-byte "directory" keys (ending in ``/``) are skipped. A missing
        prefix gives an empty list; a missing bucket raises :class:`StorageError`.
        """
        loc, backend = self._locate(as_prefix(uri))
        return backend.list(loc)

    def stat(self, uri: str) -> ObjectInfo | None:
        """Size and ETag of one object/file, or ``None`` when it does not exist."""
        loc, backend = self._locate(uri)
        return backend.stat(loc, uri)

    def exists(self, uri: str) -> bool:
        """Whether one object/file exists at ``uri``."""
        return self.stat(uri) is not None

    # ------------------------------------------------------------------ reading
    def read_bytes(self, uri: str) -> bytes:
        """The content of one object/file."""
        loc, backend = self._locate(uri)
        return backend.read_bytes(loc, uri)

    def download_file(self, uri: str, dest: Path) -> Path:
        """Copy one object/file to ``dest`` (parents created; written to a temp name, then renamed)."""
        loc, backend = self._locate(uri)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")
        backend.download_file(loc, uri, tmp)
        os.replace(tmp, dest)
        return dest

    def download_prefix(self, uri: str, dest: Path) -> list[Path]:
        """Mirror every object under the prefix ``uri`` into the directory ``dest``.

        Files already fetched with the same ETag (recorded in a sidecar file) are kept,
        so a repeated call is cheap. Returns the local paths, sorted.

        Raises:
            StorageError: operation ``download`` with 404 when the prefix holds nothing.
        """
        objects = self.list(uri)
        if not objects:
            raise StorageError("download", as_prefix(uri), "404: no objects under this prefix")
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        record_path = dest / _DOWNLOAD_RECORD
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError):
            record = {}
        out = []
        for obj in objects:
            target = dest / obj.relpath
            if (
                obj.etag is not None
                and record.get(obj.relpath) == obj.etag
                and target.is_file()
                and target.stat().st_size == obj.size
            ):
                out.append(target)
                continue
            self.download_file(obj.uri, target)
            if obj.etag is not None:
                record[obj.relpath] = obj.etag
                record_path.write_text(json.dumps(record))
            out.append(target)
        return sorted(out)

    def fetch(self, uri: str, cache_dir: Path) -> tuple[Path, list[ObjectInfo]]:
        """Make ``uri`` (one file, or a prefix of files) available locally.

        ``file://`` URIs are used in place (no copy). ``s3://`` URIs are downloaded
        under ``cache_dir``. A URI naming an existing object is a file; otherwise it is a
        prefix. Returns ``(local path, objects)`` where the path is the file or the
        directory and ``objects`` lists what the path holds (for checksums/ETags).
        Objects already fetched with the same ETag are not downloaded again (the other
        ranks of a multi-GPU job find what their node's local rank 0 fetched).

        Raises:
            StorageError: nothing exists at ``uri`` (404), or the transfer failed.
        """
        loc, backend = self._locate(uri)
        in_place = backend.local_path(loc)
        if in_place is not None:
            if in_place.is_file():
                return in_place, [ObjectInfo(uri, in_place.name, in_place.stat().st_size, None)]
            if in_place.is_dir():
                return in_place, self.list(uri)
            raise StorageError("download", uri, "404: no such file or directory")
        one = self.stat(uri)
        base = Path(cache_dir) / loc.bucket / loc.key.strip("/")
        if one is not None:
            # Kept when already fetched with the same ETag (a retry, or another rank of a multi-GPU job).
            etag_file = base.with_name(f".{base.name}.etag")
            if (
                one.etag is not None
                and base.is_file()
                and base.stat().st_size == one.size
                and etag_file.is_file()
                and etag_file.read_text() == one.etag
            ):
                return base, [one]
            self.download_file(uri, base)
            if one.etag is not None:
                etag_file.write_text(one.etag)
            return base, [one]
        objects = self.list(uri)
        if not objects:
            raise StorageError("download", uri, "404: no object with this key and no objects under this prefix")
        self.download_prefix(uri, base)
        return base, objects

    # ------------------------------------------------------------------ writing
    def put_bytes(self, uri: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Write one small object/file (atomically for files: temp name, then rename)."""
        loc, backend = self._locate(uri)
        backend.put_bytes(loc, uri, data, content_type)

    def upload_file(self, path: Path, uri: str) -> None:
        """Upload one local file (multipart above the threshold; failed multiparts aborted)."""
        loc, backend = self._locate(uri)
        backend.upload_file(path, loc, uri)

    def upload_dir(self, local_dir: Path, uri: str, *, marker: dict[str, Any] | None = None) -> list[str]:
        """Upload every file under ``local_dir`` to the prefix ``uri``, then ``_SUCCESS`` last.

        An existing marker is deleted first, so a prefix is never marked complete while
        it is being rewritten; stale multipart uploads under the prefix are aborted
        before and after a failure. The marker holds JSON: the file list with sizes,
        ``completedAt`` and any ``marker`` fields given.

        Returns the relative paths uploaded (marker excluded).
        """
        local_dir = Path(local_dir)
        prefix = as_prefix(uri)
        marker_uri = prefix + SUCCESS_MARKER
        self.delete(marker_uri)
        self.abort_multipart_uploads(prefix)
        files = sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name != SUCCESS_MARKER)
        uploaded = []
        for path in files:
            rel = path.relative_to(local_dir).as_posix()
            self.upload_file(path, prefix + rel)
            uploaded.append(rel)
        body = {
            "files": {rel: (local_dir / rel).stat().st_size for rel in uploaded},
            "completedAt": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            **(marker or {}),
        }
        self.put_bytes(marker_uri, json.dumps(body, indent=1).encode(), "application/json")
        return uploaded

    def delete(self, uri: str) -> None:
        """Delete one object/file; a missing one is not an error."""
        loc, backend = self._locate(uri)
        backend.delete(loc, uri)

    def delete_prefix(self, uri: str) -> None:
        """Delete everything under the prefix ``uri``.

        The marker goes first, so a reader never sees a half-deleted artifact as complete.
        """
        prefix = as_prefix(uri)
        loc, backend = self._locate(prefix)
        backend.delete_prefix(loc, prefix)

    def move_prefix(self, uri: str, dest: str) -> int:
        """Move everything under the prefix ``uri`` to the prefix ``dest``; returns the objects moved.

        Copies first (S3 server-side copy, multipart for large objects; files with
        ``shutil``), the ``_SUCCESS`` marker last, then deletes the source marker-first: a
        move cut short leaves the source or the destination complete, never neither.
        """
        src, dst = as_prefix(uri), as_prefix(dest)
        objects = sorted(self.list(src), key=lambda o: o.relpath == SUCCESS_MARKER)
        for obj in objects:
            target, backend = self._locate(dst + obj.relpath)
            backend.copy(parse_uri(obj.uri), target, obj.uri)
        self.delete_prefix(src)
        return len(objects)

    def abort_multipart_uploads(self, uri: str) -> int:
        """Abort unfinished multipart uploads whose key starts with ``uri``'s key; returns how many.

        Never raises: failing to clean up is logged, not fatal (``file://``: always 0).
        """
        loc, backend = self._locate(uri)
        return backend.abort_multipart_uploads(loc, uri)

    # ------------------------------------------------------------------ artifacts
    def is_complete(self, uri: str) -> bool:
        """Whether the artifact prefix ``uri`` has its ``_SUCCESS`` marker."""
        return self.exists(as_prefix(uri) + SUCCESS_MARKER)

    def complete_checkpoints(self, checkpoints_uri: str) -> list[Checkpoint]:
        """Complete checkpoints under ``<output>/checkpoints/``, oldest first.

        A checkpoint is ``step-N/`` with ``step-N/_SUCCESS``; prefixes without the
        marker (a run killed mid-upload) are ignored.
        """
        found = []
        for obj in self.list(checkpoints_uri):
            parts = obj.relpath.split("/")
            if len(parts) == 2 and parts[1] == SUCCESS_MARKER:
                step = contract.step_of_dir(parts[0])
                if step is not None:
                    found.append(Checkpoint(step, join_uri(checkpoints_uri, parts[0])))
        return sorted(found, key=lambda c: c.step)

    def prune_checkpoints(self, checkpoints_uri: str, keep: int) -> list[int]:
        """Delete every checkpoint but the newest ``keep`` complete ones; returns the steps deleted.

        Incomplete checkpoints (no marker: left by a killed attempt) are deleted too.
        Called by the only writer of the prefix, right after a checkpoint completed.
        """
        complete = self.complete_checkpoints(checkpoints_uri)
        kept = {c.step for c in complete[-keep:]} if keep > 0 else set()
        steps = set()
        for obj in self.list(checkpoints_uri):
            step = contract.step_of_dir(obj.relpath.split("/")[0])
            if step is not None:
                steps.add(step)
        deleted = []
        for step in sorted(steps - kept):
            self.delete_prefix(join_uri(checkpoints_uri, contract.checkpoint_dir(step)))
            deleted.append(step)
        return deleted


def local_tempdir(parent: Path | None, prefix: str) -> Path:
    """A new private temp directory under ``parent`` (created if needed)."""
    if parent is not None:
        Path(parent).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


def checksums(objects: Iterable[ObjectInfo]) -> list[dict[str, Any]]:
    """Lineage entries for the manifest: ``{path, size, etag}`` or ``{path, size, sha256}``.

    S3 objects carry their ETag (free from the listing); local files (``file://``,
    no ETag) are hashed with SHA-256.
    """
    out = []
    for obj in objects:
        entry: dict[str, Any] = {"path": obj.relpath, "size": obj.size}
        if obj.etag is not None:
            entry["etag"] = obj.etag
        else:
            loc = parse_uri(obj.uri)
            entry["sha256"] = sha256_file(loc.path)
        out.append(entry)
    return out
