"""Pure helpers of the node agent: a container's environment, the mount-path rewrite and
the cluster-DNS stand-in.

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
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_SERVICE_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")  # DNS-1035: a letter first
_HOST_PORT = re.compile(r"^(?P<host>[^:\s]+)(:(?P<port>\d{1,5}))?$")
#: The cluster domain pods' resolvers search (``<ns>.svc.cluster.local svc.cluster.local cluster.local``).
CLUSTER_DOMAIN = "cluster.local"


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


class ServiceLookup(Protocol):
    """Reads Services (for the cluster-DNS stand-in); None for a missing one.

    Raises TransientError for failures that are not "not found".
    """

    def service(self, namespace: str, name: str) -> dict[str, Any] | None: ...


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


# --- cluster DNS stand-in -------------------------------------------------------------------------


@dataclass(frozen=True)
class DnsCandidate:
    """A Service a name could resolve through: ``pod`` names a pod behind a headless one."""

    namespace: str
    service: str
    pod: bool


def dns_candidates(host: str, namespace: str) -> list[DnsCandidate]:
    """The Services a pod in ``namespace`` could reach as ``host``, in its resolver's search order.

    Service names: ``<svc>``, ``<svc>.<ns>``, ``<svc>.<ns>.svc``, ``<svc>.<ns>.svc.cluster.local``.
    Pods behind a headless Service (``hostname`` and ``subdomain``): ``<host>.<svc>`` (the pod's
    own namespace), ``<host>.<svc>.<ns>``, ``<host>.<svc>.<ns>.svc[.cluster.local]``. ``a.b`` is
    tried as pod ``a`` of Service ``b`` first (the first search domain is ``<ns>.svc...``),
    then as Service ``a`` of namespace ``b``. Anything else (an IP, a label that is not a DNS
    label, another domain): no candidate.
    """
    labels = host.lower().rstrip(".").split(".")
    if not host or not all(_DNS_LABEL.match(label) for label in labels):
        return []
    return [c for c in _candidates(labels, namespace) if _SERVICE_NAME.match(c.service)]


def _candidates(labels: list[str], namespace: str) -> list[DnsCandidate]:
    suffix = CLUSTER_DOMAIN.split(".")
    qualified = False
    if labels[-len(suffix) - 1:] == ["svc", *suffix]:
        core, qualified = labels[: -len(suffix) - 1], True
    elif labels[-1] == "svc":
        core, qualified = labels[:-1], True
    else:
        core = labels
    if qualified:
        if len(core) == 2:
            return [DnsCandidate(core[1], core[0], False)]
        if len(core) == 3:
            return [DnsCandidate(core[2], core[1], True)]
        return []
    if len(core) == 1:
        return [DnsCandidate(namespace, core[0], False)]
    if len(core) == 2:
        return [DnsCandidate(namespace, core[1], True), DnsCandidate(core[1], core[0], False)]
    if len(core) == 3:
        return [DnsCandidate(core[2], core[1], True)]
    return []


def resolve_cluster_names(env: Mapping[str, str], namespace: str, lookup: ServiceLookup,
                          address: str = "127.0.0.1") -> dict[str, str]:
    """The stand-in for cluster DNS: ``env`` with every value that is exactly a cluster name
    (see :func:`dns_candidates`), optionally followed by ``:<port>``, replaced by ``address``
    (the port kept) when the Service exists (headless for a pod's name). Other values are
    returned as they are. Every pod of the local node agent shares this machine's loopback,
    so every Service and pod is at ``address``.

    Raises:
        TransientError: a Service could not be read (not "not found").
    """
    cache: dict[tuple[str, str], dict[str, Any] | None] = {}

    def service(ns: str, name: str) -> dict[str, Any] | None:
        if (ns, name) not in cache:
            cache[(ns, name)] = lookup.service(ns, name)
        return cache[(ns, name)]

    out = dict(env)
    for key, value in env.items():
        match = _HOST_PORT.match(value or "")
        if not match:
            continue
        for cand in dns_candidates(match.group("host"), namespace):
            svc = service(cand.namespace, cand.service)
            if svc is None or (cand.pod and (svc.get("spec") or {}).get("clusterIP") != "None"):
                continue
            out[key] = address + (f":{match.group('port')}" if match.group("port") else "")
            break
    return out
