"""What the pod workers of one node share: its API identity, settings and object lookups."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes.client.exceptions import ApiException

from localcluster.kubeapi import Api, error_message, now_rfc3339, parse_rfc3339
from localcluster.podenv import TransientError
from localcluster.volumes import MountError, VolumeLookup

log = logging.getLogger("localcluster.node_agent")


@dataclass
class NodeContext:
    """What every pod worker of one node shares."""

    node_name: str
    api: Api
    pods_dir: Path
    allocatable: dict[str, str]
    base_env: dict[str, str]
    unpullable: Callable[[str], bool]
    executor: Executor
    stopping: threading.Event
    service_host: str = "127.0.0.1"
    service_port: str = "443"

    def event(self, pod: Mapping[str, Any], kind: str, reason: str, message: str, field_path: str = "") -> None:
        """Record a core/v1 Event about ``pod`` as the kubelet of this node would (errors logged only)."""
        meta = pod["metadata"]
        ts = now_rfc3339()
        body = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"kind": "Pod", "apiVersion": "v1", "namespace": meta["namespace"],
                               "name": meta["name"], "uid": meta["uid"], "fieldPath": field_path or None},
            "type": kind, "reason": reason, "message": message, "count": 1,
            "firstTimestamp": ts, "lastTimestamp": ts,
            "source": {"component": "kubelet", "host": self.node_name},
            "reportingComponent": "kubelet", "reportingInstance": self.node_name,
        }
        try:
            self.api.create(f"/api/v1/namespaces/{meta['namespace']}/events", body)
        except Exception as exc:  # noqa: BLE001 - events are best effort
            log.debug("event %s for %s/%s not recorded: %s", reason, meta["namespace"], meta["name"], exc)


class ApiLookup(VolumeLookup):
    """Secrets, ConfigMaps, Services and service-account tokens through the node's identity."""

    def __init__(self, api: Api):
        self.api = api

    def _get(self, path: str) -> dict[str, Any] | None:
        try:
            return self.api.get(path)
        except ApiException as exc:
            if exc.status == 404:
                return None
            # 403 happens for a moment after binding, until the Node authorizer's graph
            # knows the pod; the kubelet retries too.
            raise TransientError(error_message(exc)) from None
        except Exception as exc:  # noqa: BLE001 - network trouble
            raise TransientError(str(exc)) from None

    def secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The Secret or None when it does not exist."""
        return self._get(f"/api/v1/namespaces/{namespace}/secrets/{name}")

    def configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The ConfigMap or None when it does not exist."""
        return self._get(f"/api/v1/namespaces/{namespace}/configmaps/{name}")

    def service(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The Service or None when it does not exist (the Node authorizer lets a node read Services)."""
        return self._get(f"/api/v1/namespaces/{namespace}/services/{name}")

    def token(self, pod: Mapping[str, Any], audience: str, expiration_s: int) -> tuple[str, float]:
        """A TokenRequest bound to ``pod`` for its service account: (token, expiry epoch seconds)."""
        meta = pod["metadata"]
        sa = pod["spec"].get("serviceAccountName") or "default"
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"audiences": [audience] if audience else [], "expirationSeconds": expiration_s,
                         "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": meta["name"],
                                            "uid": meta["uid"]}}}
        try:
            answer = self.api.create(f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{sa}/token", body)
        except ApiException as exc:
            if exc.status == 404:
                raise MountError(f"failed to fetch token: {error_message(exc)}") from None
            raise TransientError(error_message(exc)) from None
        except Exception as exc:  # noqa: BLE001
            raise TransientError(str(exc)) from None
        return answer["status"]["token"], parse_rfc3339(answer["status"]["expirationTimestamp"])
