"""Pure helpers of the node agent: a container's environment and the mount-path rewrite.

Nothing here talks to the API: objects are fetched through a :class:`Lookup` the
caller provides. Error messages copy the kubelet's so that whatever reads pod status
sees what a real cluster would show.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from kubernetes.utils import parse_quantity

ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")


class ConfigError(Exception):
    """A container cannot be configured yet (missing Secret/ConfigMap/key): kubelet's
    ``CreateContainerConfigError``. The message is the kubelet's."""


class TransientError(Exception):
    """An API read failed for a reason worth retrying (network, 5xx, authorizer lag)."""


class Lookup(Protocol):
    """Reads the objects a pod references; returns None for a missing object.

    Raises TransientError for failures that are not "not found".
    """

    def secret(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def configmap(self, namespace: str, name: str) -> dict[str, Any] | None: ...


def secret_data(secret: Mapping[str, Any]) -> dict[str, bytes]:
    """A Secret's ``data`` decoded from base64 (``stringData`` never comes back from the API)."""
    return {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}


def configmap_data(cm: Mapping[str, Any]) -> dict[str, bytes]:
    """A ConfigMap's ``data`` and ``binaryData`` as bytes."""
    out = {k: v.encode() for k, v in (cm.get("data") or {}).items()}
    out.update({k: base64.b64decode(v) for k, v in (cm.get("binaryData") or {}).items()})
    return out


def field_ref(pod: Mapping[str, Any], path: str) -> str:
    """The value of a downward-API ``fieldPath`` of the pod.

    Supports metadata.name/namespace/uid, metadata.labels['k'], metadata.annotations['k'],
    spec.nodeName, spec.serviceAccountName, status.podIP(s), status.hostIP(s).

    Raises:
        ConfigError: an unsupported field path.
    """
    meta, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status", {})
    simple = {
        "metadata.name": meta.get("name", ""), "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""), "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": status.get("podIP", ""), "status.hostIP": status.get("hostIP", ""),
        "status.podIPs": ",".join(i["ip"] for i in status.get("podIPs") or []),
        "status.hostIPs": ",".join(i["ip"] for i in status.get("hostIPs") or []),
    }
    if path in simple:
        return simple[path]
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if match:
        return (meta.get(match.group(1)) or {}).get(match.group(2), "")
    if path in ("metadata.labels", "metadata.annotations"):
        items = meta.get(path.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    raise ConfigError(f"unsupported fieldPath {path!r} (the local node agent supports {', '.join(simple)})")


def resource_field_ref(pod: Mapping[str, Any], container: Mapping[str, Any], ref: Mapping[str, Any],
                       allocatable: Mapping[str, str]) -> str:
    """The value of a ``resourceFieldRef`` (limits.*/requests.*), rounded up to whole divisors.

    An unset limit reads as the node's allocatable amount, as on a kubelet.
    """
    target = container
    if ref.get("containerName"):
        target = next((c for c in pod["spec"]["containers"] if c["name"] == ref["containerName"]), container)
    kind, _, resource = ref["resource"].partition(".")
    resources = target.get("resources") or {}
    value = (resources.get(kind) or {}).get(resource)
    if value is None and kind == "limits":
        value = allocatable.get(resource, "0")
    divisor = parse_quantity(ref.get("divisor") or "1")
    return str(math.ceil(parse_quantity(value or "0") / divisor))


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: known names are replaced, ``$$`` escapes a ``$``,
    unknown references are left as they are."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("$(", i) and ")" in text[i + 2:]:
            end = text.index(")", i + 2)
            name = text[i + 2:end]
            out.append(env[name] if name in env else text[i:end + 1])
            i = end + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def container_env(pod: Mapping[str, Any], container: Mapping[str, Any], lookup: Lookup,
                  allocatable: Mapping[str, str]) -> dict[str, str]:
    """The environment a container's spec asks for (envFrom, then env), values expanded.

    Raises:
        ConfigError: a referenced Secret/ConfigMap or key is missing and not optional.
        TransientError: the lookup failed transiently.
    """
    ns = pod["metadata"]["namespace"]
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        if "secretRef" in source:
            ref, kind = source["secretRef"], "secret"
            obj = lookup.secret(ns, ref["name"])
            data = secret_data(obj) if obj is not None else None
        else:
            ref, kind = source["configMapRef"], "configmap"
            obj = lookup.configmap(ns, ref["name"])
            data = configmap_data(obj) if obj is not None else None
        if data is None:
            if ref.get("optional"):
                continue
            raise ConfigError(f'{kind} "{ref["name"]}" not found')
        for key, value in data.items():
            if ENV_NAME.match(prefix + key):
                env[prefix + key] = value.decode(errors="replace")
    for item in container.get("env") or []:
        name = item["name"]
        if "valueFrom" not in item:
            env[name] = expand(item.get("value", ""), env)
            continue
        source = item["valueFrom"]
        if "fieldRef" in source:
            env[name] = field_ref(pod, source["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in source:
            env[name] = resource_field_ref(pod, container, source["resourceFieldRef"], allocatable)
        elif "secretKeyRef" in source or "configMapKeyRef" in source:
            is_secret = "secretKeyRef" in source
            ref = source["secretKeyRef" if is_secret else "configMapKeyRef"]
            obj = lookup.secret(ns, ref["name"]) if is_secret else lookup.configmap(ns, ref["name"])
            kind, title = ("secret", "Secret") if is_secret else ("configmap", "ConfigMap")
            if obj is None:
                if ref.get("optional"):
                    continue
                raise ConfigError(f'{kind} "{ref["name"]}" not found')
            data = secret_data(obj) if is_secret else configmap_data(obj)
            if ref["key"] not in data:
                if ref.get("optional"):
                    continue
                raise ConfigError(f"couldn't find key {ref['key']} in {title} {ns}/{ref['name']}")
            env[name] = data[ref["key"]].decode(errors="replace")
        else:
            raise ConfigError(f"unsupported valueFrom in env {name!r} (the local node agent cannot resolve it)")
    return env


@dataclass(frozen=True)
class PathMapper:
    """Rewrites container paths (mount paths, the termination-message path) to host paths.

    A container path matches where it starts a path: not preceded by a letter, digit,
    ``.``, ``_`` or ``-``, and followed by ``/``, the end, or a character that cannot
    continue a file name. The longest container path wins. ``file:///data/x`` with
    ``/data`` mapped to ``/h`` becomes ``file:///h/x``; ``s3://bucket/data`` is untouched.
    """

    mapping: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, mapping: Mapping[str, str]) -> PathMapper:
        """Build from ``{container_path: host_path}`` (trailing slashes dropped; "/" ignored)."""
        items = {k.rstrip("/"): v.rstrip("/") or "/" for k, v in mapping.items() if k.rstrip("/")}
        return cls(tuple(sorted(items.items(), key=lambda kv: -len(kv[0]))))

    def rewrite(self, text: str) -> str:
        """Replace every container path in ``text`` with its host path."""
        if not self.mapping or not text:
            return text
        pattern = re.compile(r"(?<![\w.-])(" + "|".join(re.escape(k) for k, _ in self.mapping) + r")(?![\w.-])")
        table = dict(self.mapping)
        return pattern.sub(lambda m: table[m.group(1)], text)

    def host_path(self, container_path: str) -> str | None:
        """The host path of an absolute container path, or None if no mapping covers it."""
        for src, dst in self.mapping:
            if container_path == src or container_path.startswith(src + "/"):
                return dst + container_path[len(src):]
        return None
