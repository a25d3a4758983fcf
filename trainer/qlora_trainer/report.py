"""Telling the world how the run goes: status patches, log lines, the termination message.

* :class:`ProgressReporter` merge-patches ``.status.progress`` of the trainer's own
  QLoRAJob (``qlora.dev/v1alpha1``, plural ``qlorajobs``, the ``status`` subresource)
  through the kubernetes client's ``CustomObjectsApi``. The job is named by the env
  ``QLORA_JOB_NAME`` / ``QLORA_JOB_NAMESPACE``; without them reporting is off. Patches
  are throttled (at most one per ``min_interval`` seconds, default 10, except at stage
  changes and the final one) and never fatal: a failure is logged and training goes on
  (DESIGN.md section 4: a failed report never fails training).
* :func:`log_event` writes one JSON object per line on stderr (what ``kubectl logs``
  shows and log pipelines parse). In a multi-GPU run only global rank 0 writes them
  (:func:`set_rank`); other ranks write only ``error`` events, tagged with ``rank``, so
  a pod's log holds one progress stream.
* :func:`write_termination_message` writes the result JSON (under 4 KiB) to
  ``QLORA_TERMINATION_MESSAGE_PATH`` (default ``/dev/termination-log``), ignoring an
  unwritable path, so the operator can read exit reason, artifacts and metrics from
  the pod status.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import contract

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = contract.API_GROUP, contract.API_VERSION, contract.PLURAL
#: Stages reported in ``.status.progress.stage``, in order.
STAGES = contract.STAGES
TERMINATION_LIMIT = contract.TERMINATION_LIMIT
DEFAULT_TERMINATION_PATH = contract.TERMINATION_MESSAGE_PATH


def now_rfc3339() -> str:
    """Current UTC time as RFC 3339 with second precision, e.g. ``2026-05-01T12:00:00Z``."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _finite(value: Any) -> Any:
    """JSON-safe number: NaN/inf become ``None`` (JSON has no NaN; the API server refuses it)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


#: Global rank of this process in a multi-GPU run (``None``: a single process).
_RANK: int | None = None
#: Events that ranks other than 0 still write.
_ALL_RANK_EVENTS = frozenset({"error"})


def set_rank(rank: int | None) -> None:
    """Declare this process's global rank: ranks above 0 then log only ``error`` events."""
    global _RANK
    _RANK = rank


def log_event(event: str, **fields: Any) -> None:
    """Write ``{"event": event, "time": ..., **fields}`` as one JSON line on stderr (rank 0 only, see above)."""
    if _RANK and event not in _ALL_RANK_EVENTS:
        return
    record = {"event": event, "time": now_rfc3339(), **{k: _finite(v) for k, v in fields.items()}}
    if _RANK is not None:
        record["rank"] = _RANK
    sys.stderr.write(json.dumps(record, default=str) + "\n")
    sys.stderr.flush()


def _api_client() -> Any:
    """A kubernetes ``ApiClient`` for the pod's service account.

    With ``QLORA_SA_TOKEN_DIR`` set (a process outside a pod given a ServiceAccount's
    token) the token and CA come from ``<dir>/token`` and ``<dir>/ca.crt`` and the host
    from ``KUBERNETES_SERVICE_HOST``/``KUBERNETES_SERVICE_PORT``; otherwise the standard
    in-cluster configuration is loaded.
    """
    from kubernetes import client, config

    token_dir = os.environ.get(contract.ENV_SA_TOKEN_DIR)
    if not token_dir:
        config.load_incluster_config()
        return client.ApiClient()
    host = os.environ["KUBERNETES_SERVICE_HOST"]
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    cfg = client.Configuration()
    cfg.host = f"https://{host}:{port}"
    cfg.ssl_ca_cert = str(Path(token_dir) / "ca.crt")
    token_file = Path(token_dir) / "token"
    cfg.api_key = {"authorization": token_file.read_text().strip()}
    cfg.api_key_prefix = {"authorization": "Bearer"}

    # Projected tokens rotate: re-read the file before each request.
    def refresh(c: Any) -> None:
        try:
            c.api_key["authorization"] = token_file.read_text().strip()
        except OSError:
            pass

    cfg.refresh_api_key_hook = refresh
    return client.ApiClient(cfg)


def format_duration(seconds: float) -> str:
    """``seconds`` for display, in kubectl's AGE style: ``45s``, ``12m30s``, ``3h05m``, ``2d04h``.

    Negative values count as 0. Rounded to the second, then to the two largest units.
    """
    total = max(0, int(round(seconds)))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class ProgressReporter:
    """Throttled, never-fatal merge-patches of ``.status.progress`` of one QLoRAJob.

    Args:
        name, namespace: the QLoRAJob; ``None`` for either disables reporting.
        min_interval: seconds between patches within a stage.
        api: a ``CustomObjectsApi`` (for tests); built lazily from :func:`_api_client` otherwise.
        clock: time source in seconds (for tests).
    """

    def __init__(
        self,
        name: str | None,
        namespace: str | None,
        *,
        min_interval: float = 10.0,
        api: Any = None,
        clock: Any = time.monotonic,
    ) -> None:
        self.name = name
        self.namespace = namespace
        self.min_interval = min_interval
        self._api = api
        self._clock = clock
        self._last_sent: float | None = None
        self._stage: str | None = None
        self._progress: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.failures = 0
        self.sent = 0

    @classmethod
    def from_env(cls, **kwargs: Any) -> ProgressReporter:
        """Reporter for ``QLORA_JOB_NAME`` in ``QLORA_JOB_NAMESPACE`` (disabled when either is unset)."""
        env = os.environ
        return cls(env.get(contract.ENV_JOB_NAME) or None, env.get(contract.ENV_JOB_NAMESPACE) or None, **kwargs)

    @property
    def enabled(self) -> bool:
        return bool(self.name and self.namespace)

    @property
    def progress(self) -> dict[str, Any]:
        """The latest progress fields (camelCase), sent or not."""
        return dict(self._progress)

    def stage(self, stage: str, **fields: Any) -> None:
        """Enter ``stage`` (one of :data:`STAGES`) and report at once."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}: one of {STAGES}")
        self.update(force=stage != self._stage, stage=stage, **fields)

    def update(self, *, force: bool = False, **fields: Any) -> bool:
        """Merge ``fields`` (camelCase progress keys) and patch if due; returns whether a patch was sent.

        ``progress`` ("step/totalSteps"), ``eta`` (``etaSeconds`` as :func:`format_duration`)
        and ``updatedAt`` are filled in here.
        """
        with self._lock:
            for key, value in fields.items():
                if value is not None:
                    self._progress[key] = _finite(value)
            if "stage" in fields:
                self._stage = fields["stage"]
            step, total = self._progress.get("step"), self._progress.get("totalSteps")
            if step is not None and total:
                self._progress["progress"] = f"{step}/{total}"
            if fields.get("etaSeconds") is not None:
                self._progress["eta"] = format_duration(fields["etaSeconds"])
            if not self.enabled:
                return False
            now = self._clock()
            if not force and self._last_sent is not None and now - self._last_sent < self.min_interval:
                return False
            self._last_sent = now
            self._progress["updatedAt"] = now_rfc3339()
            body = {"status": {"progress": dict(self._progress)}}
        return self._send(body)

    def flush(self) -> bool:
        """Send the latest progress regardless of the throttle."""
        return self.update(force=True)

    def _send(self, body: dict[str, Any]) -> bool:
        try:
            if self._api is None:
                from kubernetes import client

                self._api = client.CustomObjectsApi(_api_client())
            self._api.patch_namespaced_custom_object_status(
                GROUP, VERSION, self.namespace, PLURAL, self.name, body, _request_timeout=10
            )
        except Exception as err:  # noqa: BLE001 - reporting must never fail training
            self.failures += 1
            log.warning(
                "progress report to qlorajobs/%s in %s failed (training continues): %s",
                self.name,
                self.namespace,
                _short(err),
            )
            return False
        self.sent += 1
        return True


def _short(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}"
    return text if len(text) < 300 else text[:297] + "..."


def write_termination_message(result: dict[str, Any], path: str | None = None) -> str:
    """Write ``result`` (:class:`contract.TerminationMessage`) to ``path`` (default: the env, else
    ``/dev/termination-log``) as :func:`contract.encode_termination_message` encodes it (compact
    JSON under :data:`TERMINATION_LIMIT` bytes); returns what was written. An unwritable path
    (running outside Kubernetes) is ignored.
    """
    path = path or os.environ.get(contract.ENV_TERMINATION_MESSAGE_PATH) or DEFAULT_TERMINATION_PATH
    text = contract.encode_termination_message(result)
    try:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
    except OSError as err:
        log.debug("termination message not written to %s: %s", path, err)
    return text
