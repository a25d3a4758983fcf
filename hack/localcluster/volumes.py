"""Materialise a pod's volumes as host directories (``<pod dir>/volumes/<name>/``).

Supported: emptyDir, configMap, secret, downwardAPI, and projected (serviceAccountToken,
configMap, secret, downwardAPI sources: the standard ``kube-api-access-*`` volume).
Anything else fails the mount with a message saying so. Files are written once when
the pod starts (later changes of a ConfigMap/Secret are not propagated); service
account tokens are refreshed by the pod worker (see :class:`TokenFile`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from localcluster.podenv import configmap_data, field_ref, resource_field_ref, secret_data


class MountError(Exception):
    """A volume cannot be set up yet (kubelet's FailedMount); the message is the kubelet's."""


class VolumeLookup(Protocol):
    """What volumes need from the API (see :class:`localcluster.podenv.Lookup`)."""

    def secret(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def configmap(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def token(self, pod: Mapping[str, Any], audience: str, expiration_s: int) -> tuple[str, float]:
        """A TokenRequest for the pod's service account: (token, expiry as epoch seconds)."""
        ...


@dataclass
class TokenFile:
    """A projected service-account token on disk and when to refresh it (epoch seconds)."""

    path: Path
    audience: str
    expiration_s: int
    requested_at: float
    expires_at: float

    def due(self, now: float) -> bool:
        """True once 80 % of the token's lifetime has passed (the kubelet's rule)."""
        return now >= self.requested_at + 0.8 * (self.expires_at - self.requested_at)


def write_file(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically (temp file + rename), creating parent dirs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    if mode is not None:
        os.chmod(tmp, mode)
    os.replace(tmp, path)


def _project_keys(target: Path, data: dict[str, bytes], items: list[dict[str, Any]] | None,
                  default_mode: int | None, missing_key: str) -> None:
    if not items:
        for key, value in data.items():
            write_file(target / key, value, default_mode)
        return
    for item in items:
        if item["key"] not in data:
            raise MountError(missing_key.format(key=item["key"]))
        write_file(target / item["path"], data[item["key"]], item.get("mode", default_mode))


def _source(kind: str, ref: Mapping[str, Any], namespace: str, lookup: VolumeLookup,
            target: Path, default_mode: int | None) -> None:
    if kind == "secret":
        name = ref.get("secretName") or ref.get("name")
        obj = lookup.secret(namespace, name)
        data = secret_data(obj) if obj is not None else None
        missing, missing_key = f'secret "{name}" not found', "references non-existent secret key: {key}"
    else:
        name = ref["name"]
        obj = lookup.configmap(namespace, name)
        data = configmap_data(obj) if obj is not None else None
        missing, missing_key = f'configmap "{name}" not found', "configmap references non-existent config key: {key}"
    if data is None:
        if ref.get("optional"):
            return
        raise MountError(missing)
    _project_keys(target, data, ref.get("items"), ref.get("defaultMode", default_mode), missing_key)


def _downward(pod: Mapping[str, Any], items: list[dict[str, Any]], target: Path,
              default_mode: int | None, allocatable: Mapping[str, str]) -> None:
    for item in items:
        if "fieldRef" in item:
            value = field_ref(pod, item["fieldRef"]["fieldPath"])
        else:
            container = pod["spec"]["containers"][0]
            value = resource_field_ref(pod, container, item["resourceFieldRef"], allocatable)
        write_file(target / item["path"], value.encode(), item.get("mode", default_mode))


def setup_volumes(pod: Mapping[str, Any], volumes_dir: Path, lookup: VolumeLookup,
                  allocatable: Mapping[str, str]) -> tuple[dict[str, Path], list[TokenFile]]:
    """Create every volume of ``pod`` under ``volumes_dir``.

    Returns ``{volume name: host dir}`` and the service-account token files to refresh.

    Raises:
        MountError: a referenced object or key is missing, or the volume type is unsupported.
        localcluster.podenv.TransientError: an API read failed transiently.
    """
    namespace = pod["metadata"]["namespace"]
    dirs: dict[str, Path] = {}
    tokens: list[TokenFile] = []
    for volume in pod["spec"].get("volumes") or []:
        name = volume["name"]
        target = volumes_dir / name
        target.mkdir(parents=True, exist_ok=True)
        try:
            if "emptyDir" in volume:
                pass
            elif "configMap" in volume:
                _source("configMap", volume["configMap"], namespace, lookup, target, volume["configMap"].get("defaultMode"))
            elif "secret" in volume:
                _source("secret", volume["secret"], namespace, lookup, target, volume["secret"].get("defaultMode"))
            elif "downwardAPI" in volume:
                spec = volume["downwardAPI"]
                _downward(pod, spec.get("items") or [], target, spec.get("defaultMode"), allocatable)
            elif "projected" in volume:
                tokens += _projected(pod, volume["projected"], target, lookup, allocatable)
            else:
                kinds = ", ".join(k for k in volume if k != "name")
                raise MountError(f"volume type {kinds} is not supported by the local node agent")
        except MountError as exc:
            raise MountError(f'MountVolume.SetUp failed for volume "{name}" : {exc}') from None
        dirs[name] = target
    return dirs, tokens


def _projected(pod: Mapping[str, Any], spec: Mapping[str, Any], target: Path, lookup: VolumeLookup,
               allocatable: Mapping[str, str]) -> list[TokenFile]:
    namespace = pod["metadata"]["namespace"]
    mode = spec.get("defaultMode")
    tokens = []
    for source in spec.get("sources") or []:
        if "serviceAccountToken" in source:
            sat = source["serviceAccountToken"]
            token = TokenFile(target / sat["path"], sat.get("audience", ""), int(sat.get("expirationSeconds", 3600)),
                              0.0, 0.0)
            refresh_token(pod, token, lookup, mode)
            tokens.append(token)
        elif "configMap" in source:
            _source("configMap", source["configMap"], namespace, lookup, target, mode)
        elif "secret" in source:
            _source("secret", source["secret"], namespace, lookup, target, mode)
        elif "downwardAPI" in source:
            _downward(pod, source["downwardAPI"].get("items") or [], target, mode, allocatable)
        else:
            kinds = ", ".join(source)
            raise MountError(f"projected source {kinds} is not supported by the local node agent")
    return tokens


def refresh_token(pod: Mapping[str, Any], token: TokenFile, lookup: VolumeLookup, mode: int | None = None) -> None:
    """Request a fresh token for ``token`` and write it (atomically) to its file."""
    value, expires_at = lookup.token(pod, token.audience, token.expiration_s)
    token.requested_at, token.expires_at = time.time(), expires_at
    write_file(token.path, value.encode(), mode)
