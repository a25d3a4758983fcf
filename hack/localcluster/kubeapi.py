"""A small JSON-in, JSON-out layer over the kubernetes client's REST transport.

Tests and the local cluster work on plain dicts (the API's own JSON), which keeps them
free of model conversions. Authentication and TLS come from a
kubeconfig through ``kubernetes.config``; every call has a timeout.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"


class Api:
    """JSON access to one API server with the identity of one kubeconfig.

    Errors: every method raises ``kubernetes.client.exceptions.ApiException`` for a
    non-2xx answer (``.status`` holds the HTTP status; 0 for connection failures) and
    lets urllib3 exceptions through for network trouble.
    """

    def __init__(self, kubeconfig: Path, pool_size: int = 64, timeout_s: float = 30.0):
        cfg = client.Configuration()
        config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
        cfg.proxy = None  # the API server is on loopback
        cfg.connection_pool_maxsize = pool_size
        self.configuration = cfg
        self.server = cfg.host.rstrip("/")
        self.timeout_s = timeout_s
        self._rest = client.ApiClient(cfg).rest_client

    def _url(self, path: str, query: dict[str, Any] | None) -> str:
        url = self.server + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        return url

    def request(self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None,
                content_type: str = "application/json", timeout_s: float | None = None) -> dict[str, Any]:
        """Send one request; return the decoded JSON answer (``{}`` when empty)."""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        resp = self._rest.request(method, self._url(path, query), headers=headers, body=body,
                                  _request_timeout=timeout_s or self.timeout_s)
        data = resp.read()
        if not 200 <= resp.status < 300:
            raise ApiException(status=resp.status, reason=resp.reason, body=data.decode(errors="replace"))
        return json.loads(data) if data else {}

    def get(self, path: str, **query: Any) -> dict[str, Any]:
        """GET ``path``."""
        return self.request("GET", path, query=query)

    def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` to the collection ``path``."""
        return self.request("POST", path, body=body)

    def patch(self, path: str, body: dict[str, Any], content_type: str = MERGE_PATCH) -> dict[str, Any]:
        """PATCH ``path`` (JSON merge patch unless told otherwise)."""
        return self.request("PATCH", path, body=body, content_type=content_type)

    def put(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """PUT (replace) ``path``."""
        return self.request("PUT", path, body=body)

    def delete(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """DELETE ``path`` with optional DeleteOptions."""
        return self.request("DELETE", path, body=body)

    def watch(self, path: str, resource_version: str, timeout_s: int = 300,
              **query: Any) -> Iterator[dict[str, Any]]:
        """Stream watch events (``{"type", "object"}``) of the collection ``path`` from
        ``resource_version`` for up to ``timeout_s`` seconds (bookmarks included).

        An ERROR event is raised as ApiException with the Status's code (410: too old).
        """
        query.update(watch="true", resourceVersion=resource_version, allowWatchBookmarks="true",
                     timeoutSeconds=str(timeout_s))
        resp = self._rest.request("GET", self._url(path, query), headers={"Accept": "application/json"},
                                  _request_timeout=(10, timeout_s + 30))
        raw = resp.response
        try:
            if resp.status != 200:
                raise ApiException(status=resp.status, reason=resp.reason, body=resp.read().decode(errors="replace"))
            for line in iter_resp_lines(raw):
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    status = event.get("object", {})
                    raise ApiException(status=status.get("code", 500), reason=status.get("reason"),
                                       body=json.dumps(status))
                yield event
        finally:
            raw.release_conn()


def now_rfc3339(micro: bool = False, at: float | None = None) -> str:
    """UTC time as RFC 3339 (``...Z``); with ``micro``, microseconds (a MicroTime)."""
    t = time.time() if at is None else at
    if micro:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1e6):06d}Z"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def parse_rfc3339(text: str) -> float:
    """Epoch seconds of an RFC 3339 UTC timestamp (fractions ignored)."""
    import calendar

    return float(calendar.timegm(time.strptime(text[:19], "%Y-%m-%dT%H:%M:%S")))


def error_message(exc: ApiException) -> str:
    """The API's own message of an ApiException (its Status ``message``), else its reason."""
    try:
        return json.loads(exc.body or "{}").get("message") or str(exc.reason)
    except (ValueError, AttributeError):
        return str(exc.reason)
