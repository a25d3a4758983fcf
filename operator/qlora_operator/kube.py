"""The only module that talks to the Kubernetes API (besides kopf's own watching).

A small synchronous REST layer over the ``kubernetes`` client's connection handling
(credentials, TLS, token refresh), returning plain camelCase dicts. Errors become
:class:`ApiError` subclasses the callers can act on: :class:`Transient` (retry with a
delay), :class:`NotFound`, :class:`Conflict`, :class:`NamespaceTerminating` (stop),
:class:`ChildConflict` (a child's name is taken by an object we do not own).

API surface used (the operator's RBAC, mirrored by the Helm chart):

=============================================  ==========================================
qlora.dev qlorajobs                           get, list, watch, patch (kopf annotations)
qlora.dev qlorajobs/status                    get, patch
qlora.dev qlorajobs/finalizers                update (ownerReferences with blockOwnerDeletion)
batch jobs                                    get, list, watch, create, patch, delete (a replaced suspended run)
"" pods                                       get, list, watch, delete
"" events                                     list (Job events: quota), create
"" configmaps, serviceaccounts                get, create, patch
"" services                                   get, create, patch, delete (nodes > 1: headless, per run)
rbac.authorization.k8s.io roles, rolebindings  get, create, patch
kueue.x-k8s.io workloads                      get, list (status.queue of queued runs; optional)
=============================================  ==========================================

Creating a Role that grants ``get``/``patch`` on ``qlorajobs/status`` requires the
operator to hold those permissions itself (RBAC escalation check), which it does.
Secrets are never read.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from qlora_operator import render
from qlora_operator.api import API_VERSION, KIND, PLURAL
from qlora_operator.objects import fmt_time, utcnow
from qlora_trainer import contract

log = logging.getLogger("qlora_operator.kube")

#: (apiVersion, kind) -> (path prefix, plural)
#: Kueue's Workload API (v0.17 serves and stores v1beta2).
KUEUE_API_VERSION = "kueue.x-k8s.io/v1beta2"
#: The label Kueue puts on a Workload: the UID of the Job it was made for.
KUEUE_JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"

RESOURCES: dict[tuple[str, str], tuple[str, str]] = {
    ("v1", "ConfigMap"): ("/api/v1", "configmaps"),
    ("v1", "ServiceAccount"): ("/api/v1", "serviceaccounts"),
    ("v1", "Service"): ("/api/v1", "services"),
    ("v1", "Pod"): ("/api/v1", "pods"),
    ("v1", "Event"): ("/api/v1", "events"),
    ("rbac.authorization.k8s.io/v1", "Role"): ("/apis/rbac.authorization.k8s.io/v1", "roles"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): ("/apis/rbac.authorization.k8s.io/v1", "rolebindings"),
    ("batch/v1", "Job"): ("/apis/batch/v1", "jobs"),
    (KUEUE_API_VERSION, "Workload"): (f"/apis/{KUEUE_API_VERSION}", "workloads"),
    (API_VERSION, KIND): (f"/apis/{API_VERSION}", PLURAL),
}
MERGE_PATCH = "application/merge-patch+json"
REQUEST_TIMEOUT = (10, 30)


class ApiError(Exception):
    """An API call failed; ``status`` is the HTTP status (0: no response)."""

    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class Transient(ApiError):
    """Worth retrying after a delay: no response, 429, 5xx, a race resolved by waiting."""


class NotFound(ApiError):
    """404."""


class Conflict(ApiError):
    """409: already exists, or a resourceVersion precondition failed."""


class Forbidden(ApiError):
    """403 (RBAC)."""


class Invalid(ApiError):
    """422: the server refused the object."""


class NamespaceTerminating(ApiError):
    """The namespace is being deleted: nothing new can be created there."""


class ChildConflict(ApiError):
    """A child's name is taken by an object that belongs to someone else."""


def _client_configuration(kubeconfig: str | None = None) -> Any:
    """A ``kubernetes.client.Configuration``: in-cluster (the pod's token, or the token directory
    ``QLORA_SA_TOKEN_DIR`` names, with ``KUBERNETES_SERVICE_HOST``), else the kubeconfig."""
    from kubernetes import client, config

    cfg = client.Configuration()
    token_dir = os.environ.get(contract.ENV_SA_TOKEN_DIR)
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST") and (
        token_dir or os.path.exists("/var/run/secrets/kubernetes.io/serviceaccount/token")
    ):
        from kubernetes.config.incluster_config import InClusterConfigLoader

        base = token_dir or "/var/run/secrets/kubernetes.io/serviceaccount"
        InClusterConfigLoader(
            token_filename=os.path.join(base, "token"), cert_filename=os.path.join(base, "ca.crt")
        ).load_and_set(cfg)
        return cfg
    config.load_kube_config(config_file=kubeconfig or os.environ.get("KUBECONFIG"), client_configuration=cfg)
    return cfg


class Kube:
    """Synchronous API access for the reconciler (thread-safe: one connection pool)."""

    def __init__(self, api_client: Any = None, *, kubeconfig: str | None = None) -> None:
        if api_client is None:
            from kubernetes import client

            cfg = _client_configuration(kubeconfig)
            cfg.connection_pool_maxsize = max(getattr(cfg, "connection_pool_maxsize", 4) or 4, 16)
            api_client = client.ApiClient(cfg)
        self.api = api_client
        self.identity = socket.gethostname()

    # --- credentials for kopf -------------------------------------------------------

    def connection_info(self) -> dict[str, Any]:
        """Server, CA, client certificate/key and bearer token, for ``kopf.ConnectionInfo``."""
        cfg = self.api.configuration
        header = None
        for key in ("BearerToken", "authorization"):
            try:
                header = cfg.get_api_key_with_prefix(key)
            except Exception:  # noqa: BLE001 - older/newer client layouts
                header = None
            if header:
                break
        scheme, token = None, None
        if header:
            parts = header.split(" ", 1)
            scheme, token = (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])
        return {
            "server": cfg.host,
            "ca_path": cfg.ssl_ca_cert,
            "insecure": not cfg.verify_ssl,
            "scheme": scheme,
            "token": token,
            "certificate_path": cfg.cert_file,
            "private_key_path": cfg.key_file,
        }

    # --- generic REST ---------------------------------------------------------------------

    @staticmethod
    def path(api_version: str, kind: str, namespace: str | None, name: str | None = None, sub: str | None = None) -> str:
        """URL path of a collection or an object (``sub``: a subresource such as ``status``)."""
        prefix, plural = RESOURCES[(api_version, kind)]
        out = prefix
        if namespace:
            out += f"/namespaces/{quote(namespace, safe='')}"
        out += f"/{plural}"
        if name:
            out += f"/{quote(name, safe='')}"
        if sub:
            out += f"/{sub}"
        return out

    def request(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, str]] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> Any:
        """One API call; returns the decoded JSON body (None when empty)."""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type  # the client serializes JSON bodies itself
        try:
            method_, url, headers_, _, _ = self.api.param_serialize(
                method, path, query_params=query or None, header_params=headers, auth_settings=["BearerToken"]
            )
            resp = self.api.call_api(method_, url, header_params=headers_, body=body, _request_timeout=REQUEST_TIMEOUT)
            data = resp.read()
            status = resp.status
        except ApiError:
            raise
        except Exception as err:  # connection refused, timeouts, TLS: no response
            status = getattr(err, "status", 0) or 0
            if status:
                data = getattr(err, "body", b"") or b""
            else:
                raise Transient(0, f"{method} {path}: {type(err).__name__}: {err}") from err
        if 200 <= status < 300:
            if not data:
                return None
            return json.loads(data)
        raise self._error(method, path, status, data)

    @staticmethod
    def _error(method: str, path: str, status: int, data: Any) -> ApiError:
        try:
            payload = json.loads(data) if data else {}
        except ValueError:
            payload = {}
        message = payload.get("message") or (data.decode(errors="replace") if isinstance(data, bytes) else str(data))
        reason = payload.get("reason") or ""
        text = f"{method} {path}: {status} {reason}: {message}"
        if status == 404:
            return NotFound(status, text, reason)
        if status == 409:
            return Conflict(status, text, reason)
        if status == 403 and "being terminated" in message:
            return NamespaceTerminating(status, text, reason)
        if status == 403:
            return Forbidden(status, text, reason)
        if status == 422:
            return Invalid(status, text, reason)
        if status == 429 or status >= 500:
            return Transient(status, text, reason)
        return ApiError(status, text, reason)

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return self.request("GET", self.path(api_version, kind, namespace, name))
        except NotFound:
            return None

    def list(
        self, api_version: str, kind: str, namespace: str, *, labels: str | None = None, fields: str | None = None
    ) -> list[dict[str, Any]]:
        """Items of a namespaced collection (selectors applied by the server)."""
        query = []
        if labels:
            query.append(("labelSelector", labels))
        if fields:
            query.append(("fieldSelector", fields))
        out = self.request("GET", self.path(api_version, kind, namespace), query=query)
        return list((out or {}).get("items") or [])

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create ``obj`` (raises :class:`Conflict` when the name is taken)."""
        meta = obj["metadata"]
        return self.request("POST", self.path(obj["apiVersion"], obj["kind"], meta["namespace"]), body=obj)

    def patch(
        self, api_version: str, kind: str, namespace: str, name: str, patch: Mapping[str, Any], sub: str | None = None
    ) -> dict[str, Any]:
        """JSON merge patch (lists are replaced as a whole)."""
        return self.request(
            "PATCH", self.path(api_version, kind, namespace, name, sub), body=patch, content_type=MERGE_PATCH
        )

    def delete(
        self, api_version: str, kind: str, namespace: str, name: str, *, propagation: str = "Background",
        grace_seconds: int | None = None,
    ) -> bool:
        """Delete; False when it was already gone."""
        body: dict[str, Any] = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": propagation}
        if grace_seconds is not None:
            body["gracePeriodSeconds"] = grace_seconds
        try:
            self.request("DELETE", self.path(api_version, kind, namespace, name), body=body)
        except NotFound:
            return False
        return True

    # --- QLoRAJobs -------------------------------------------------------------------------

    def get_qlorajob(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The QLoRAJob, or None."""
        return self.get(API_VERSION, KIND, namespace, name)

    def patch_qlorajob_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        """Merge-patch the status subresource (the trainer's ``progress`` is left alone)."""
        return self.patch(API_VERSION, KIND, namespace, name, {"status": dict(patch)}, sub="status")

    # --- children ---------------------------------------------------------------------------

    def list_jobs(self, namespace: str, qlorajob: str) -> list[dict[str, Any]]:
        """batch/v1 Jobs labelled for the QLoRAJob (all runs)."""
        return self.list("batch/v1", "Job", namespace, labels=f"{render.LABEL_JOB}={render.label_value(qlorajob)}")

    def list_pods(self, namespace: str, qlorajob: str, run: int) -> list[dict[str, Any]]:
        """Trainer pods of run ``run``."""
        selector = f"{render.LABEL_JOB}={render.label_value(qlorajob)},{render.LABEL_RUN}={run}"
        return self.list("v1", "Pod", namespace, labels=selector)

    def get_workload(self, namespace: str, job: Mapping[str, Any]) -> dict[str, Any] | None:
        """Kueue's Workload for ``job`` (label ``kueue.x-k8s.io/job-uid``), newest first; None when
        there is none yet, Kueue is not installed (404) or the operator may not read Workloads (403)."""
        uid = (job.get("metadata") or {}).get("uid")
        if not uid:
            return None
        try:
            items = self.list(KUEUE_API_VERSION, "Workload", namespace, labels=f"{KUEUE_JOB_UID_LABEL}={uid}")
        except (NotFound, Forbidden):
            return None
        items.sort(key=lambda w: (w.get("metadata") or {}).get("creationTimestamp") or "", reverse=True)
        return items[0] if items else None

    def list_fitcheck_pods(self, namespace: str, qlorajob: str, run: int) -> list[dict[str, Any]]:
        """Pods of run ``run``'s fit-check Job (label ``qlora.dev/fitcheck-run``)."""
        selector = f"{render.LABEL_JOB}={render.label_value(qlorajob)},{render.LABEL_FITCHECK_RUN}={run}"
        return self.list("v1", "Pod", namespace, labels=selector)

    def list_job_events(self, namespace: str, job: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Events about a batch/v1 Job (the Job controller's FailedCreate carries quota errors)."""
        meta = job["metadata"]
        fields = f"involvedObject.kind=Job,involvedObject.name={meta['name']}"
        if meta.get("uid"):
            fields += f",involvedObject.uid={meta['uid']}"
        return self.list("v1", "Event", namespace, fields=fields)

    def get_config_map(self, namespace: str, name: str) -> dict[str, Any] | None:
        """A ConfigMap, or None."""
        return self.get("v1", "ConfigMap", namespace, name)

    def patch_job(self, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        """Merge-patch a batch/v1 Job (suspend, activeDeadlineSeconds, annotations)."""
        return self.patch("batch/v1", "Job", namespace, name, patch)

    def delete_pod(self, namespace: str, name: str) -> bool:
        """Delete a pod (its GPU is released once it is gone)."""
        return self.delete("v1", "Pod", namespace, name)

    def create_or_adopt(self, obj: Mapping[str, Any], owner_uid: str) -> tuple[dict[str, Any], str]:
        """Create ``obj``; on 409 fetch the existing one and compare, never duplicating.

        Returns ``(object, "created" | "exists" | "updated" | "adopted")``: an owned object
        whose mutable content differs (ConfigMap data, Role rules, RoleBinding subjects,
        Service selector and ports, the ServiceAccount's annotations from
        ``spec.pod.serviceAccountAnnotations``: :func:`render.service_account_patch`) is patched; an unowned one carrying our ``qlora.dev/job``
        label gets our owner reference. A Job is never changed (its pod template is immutable).

        Raises:
            Transient: the name is held by a child of a deleted QLoRAJob of the same
                name, still waiting for garbage collection.
            ChildConflict: the name is held by an object we do not own.
        """
        meta = obj["metadata"]
        api_version, kind, ns, name = obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"]
        try:
            return self.create(obj), "created"
        except Conflict:
            pass
        existing = self.get(api_version, kind, ns, name)
        if existing is None:  # deleted in between: one more try
            try:
                return self.create(obj), "created"
            except Conflict as err:
                raise Transient(409, f"{kind} {ns}/{name} is being replaced: {err}") from err
        emeta = existing.get("metadata") or {}
        refs = emeta.get("ownerReferences") or []
        if any(r.get("uid") == owner_uid and r.get("controller") for r in refs):
            return self._compare(obj, existing)
        if emeta.get("deletionTimestamp"):
            raise Transient(409, f"{kind} {ns}/{name} is being deleted; waiting to create it again")
        owner = meta["ownerReferences"][0]
        if any(r.get("kind") == owner["kind"] and r.get("name") == owner["name"] for r in refs):
            raise Transient(
                409, f"{kind} {ns}/{name} still belongs to a deleted {owner['kind']} of the same name; "
                "waiting for garbage collection"
            )
        if (emeta.get("labels") or {}).get(render.LABEL_JOB) == (meta.get("labels") or {}).get(render.LABEL_JOB) and not any(
            r.get("controller") for r in refs
        ):
            adopted = self.patch(api_version, kind, ns, name, {"metadata": {"ownerReferences": [*refs, owner]}})
            return adopted, "adopted"
        raise ChildConflict(
            409, f"{kind} {ns}/{name} already exists and is not owned by {owner['kind']} {owner['name']}: "
            f"delete or rename it"
        )

    def _compare(self, want: Mapping[str, Any], have: dict[str, Any]) -> tuple[dict[str, Any], str]:
        kind = want["kind"]
        meta = want["metadata"]
        patch: dict[str, Any] = {}
        if kind == "ConfigMap" and have.get("data") != want.get("data"):
            patch = {"data": want.get("data"), "metadata": {"annotations": meta.get("annotations")}}
        elif kind == "Role" and have.get("rules") != want.get("rules"):
            patch = {"rules": want["rules"]}
        elif kind == "RoleBinding" and have.get("subjects") != want.get("subjects"):
            patch = {"subjects": want["subjects"]}
        elif kind == "ServiceAccount":
            patch = render.service_account_patch(have, want) or {}
        elif kind == "Service":
            hspec, wspec = have.get("spec") or {}, want.get("spec") or {}
            changed = {k: wspec[k] for k in ("selector", "ports", "publishNotReadyAddresses") if hspec.get(k) != wspec.get(k)}
            if changed:
                patch = {"spec": changed}
        elif kind == "Job":
            ann_have = (have.get("metadata") or {}).get("annotations") or {}
            ann_want = meta.get("annotations") or {}
            if ann_have.get(render.ANN_SPEC_HASH) != ann_want.get(render.ANN_SPEC_HASH):
                log.warning(
                    "Job %s/%s exists with another spec (hash %s, wanted %s); a Job's template is immutable: "
                    "keeping it", meta["namespace"], meta["name"], ann_have.get(render.ANN_SPEC_HASH),
                    ann_want.get(render.ANN_SPEC_HASH),
                )
        if not patch:
            return have, "exists"
        updated = self.patch(want["apiVersion"], kind, meta["namespace"], meta["name"], patch)
        return updated, "updated"

    # --- events -------------------------------------------------------------------------------

    def create_event(self, body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        """Post a core/v1 Event about the QLoRAJob ``body`` (shown by ``kubectl describe qj``)."""
        meta = body["metadata"]
        now = fmt_time(utcnow())
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": body.get("apiVersion", API_VERSION),
                "kind": body.get("kind", KIND),
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "reason": reason,
            "message": message[:1024],
            "type": type_,
            "source": {"component": "qlora-operator", "host": self.identity},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        self.request("POST", self.path("v1", "Event", meta["namespace"]), body=event)
