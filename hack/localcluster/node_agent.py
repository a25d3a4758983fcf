"""The local node agent: the only stand-in for a kubelet (DESIGN.md section 5).

Run as ``python -m localcluster.node_agent --pods-dir DIR --node NAME=KUBECONFIG ...``
(:class:`localcluster.LocalCluster` starts it). Each ``--node`` is registered with its
own identity (a ``system:node:<name>`` client certificate, so the real Node authorizer
applies) and gets:

Nodes
    Created (or updated) with capacity and allocatable ``cpu``, ``memory``, ``pods``,
    ``ephemeral-storage`` and ``nvidia.com/gpu`` (``--gpus``; the resource name is
    ``--gpu-resource``), labels ``kubernetes.io/hostname``, ``kubernetes.io/os``,
    ``kubernetes.io/arch`` and ``--label`` ones, address 127.0.0.1. The Lease in
    ``kube-node-lease`` is renewed every 10 s and the Ready condition every 60 s.

Pods bound to a node (``spec.nodeName``)
    Each container runs as a local process in its own process group: ``command`` +
    ``args`` (with ``$(VAR)`` expansion); the image is not pulled and the command runs
    from this project's environment (``PATH`` starts with the bin directory of the
    Python running the agent, so ``python`` is the venv's). The image's entrypoint is
    unknown, so a container without ``command`` fails with reason ``StartError``.

    Environment: a few variables of the agent (``PATH``, ``HOME``, ``LANG``, ``USER``,
    ``XDG_CACHE_HOME``, ``HF_HOME``... and ``--pass-env`` ones), ``HOSTNAME`` (the pod's
    ``spec.hostname``, else its name), ``TMPDIR`` (per pod), ``KUBERNETES_SERVICE_HOST``/
    ``_PORT`` (the API server's loopback address and port), then ``envFrom`` and ``env``
    (value, secretKeyRef, configMapKeyRef, fieldRef: metadata.name/namespace/uid,
    metadata.labels['k']/annotations['k'], spec.nodeName, spec.serviceAccountName,
    status.podIP/hostIP; resourceFieldRef). Pods of an Indexed Job run like any other:
    the ``JOB_COMPLETION_INDEX`` variable the Job controller adds (a fieldRef to the
    ``batch.kubernetes.io/job-completion-index`` label or annotation) resolves, and
    ``HOSTNAME`` is the ``<job-name>-<index>`` hostname the controller sets.

    **Cluster DNS stand-in.** Every pod process shares this machine's loopback, and a
    process cannot be given a resolver, so names are resolved once, before the process
    starts: an ``env`` value (not one from the downward API) that is *exactly* the
    cluster DNS name of an existing Service, optionally followed by ``:<port>``, is
    replaced by ``127.0.0.1`` (the port kept). Names as a pod's resolver would expand
    them (search path ``<ns>.svc.cluster.local svc.cluster.local cluster.local``):
    ``<svc>``, ``<svc>.<ns>``, ``<svc>.<ns>.svc``, ``<svc>.<ns>.svc.cluster.local``, and
    for a pod behind a headless Service (``hostname`` + ``subdomain``)
    ``<hostname>.<svc>`` plus the same suffixes (the Service must exist and be headless;
    the pod itself need not exist yet, its processes are on the same loopback anyway).
    See :func:`localcluster.podenv.resolve_cluster_names`.

    Volumes: emptyDir, configMap, secret, downwardAPI and projected (serviceAccountToken
    through the TokenRequest API with the pod's service account, audience and bound
    pod reference, refreshed at 80 % of its lifetime; configMap such as
    ``kube-root-ca.crt``; downwardAPI) are host directories under
    ``<pods-dir>/<ns>_<pod>_<uid>/volumes/<volume>/`` (``subPath`` honoured). A
    process cannot see absolute mount paths, so **mount paths are rewritten**: every
    occurrence of a ``volumeMount``'s ``mountPath`` (as a path prefix) in ``command``,
    ``args``, ``env`` values and ``workingDir`` is replaced by the host directory, and
    so is the ``terminationMessagePath``. Code that has paths built in gets:

    - ``QLORA_SA_TOKEN_DIR``: the host directory mounted at
      ``/var/run/secrets/kubernetes.io/serviceaccount`` (``token``, ``ca.crt``,
      ``namespace``): in-cluster clients read their credentials from there.
    - ``QLORA_TERMINATION_MESSAGE_PATH``: the host file behind ``terminationMessagePath``.

    ``workingDir`` is honoured (rewritten; a path outside every mount lives under the
    pod's ``work/``, which is also the default). Init containers run one after the
    other before the containers; several containers run side by side.

Status (as a kubelet reports it)
    Phase Pending -> Running -> Succeeded/Failed (kubelet's rules for restartPolicy
    Never/OnFailure/Always; restarts back off 1 s doubling to 30 s, waiting reason
    ``CrashLoopBackOff``); conditions PodReadyToStartContainers, Initialized,
    ContainersReady, Ready (PodScheduled and others are kept); container states with
    exitCode, reason ``Completed`` (0), ``OOMKilled`` (137 not caused by the agent's own
    SIGKILL), ``Error`` (other), ``StartError`` (128, exec failed), startedAt/finishedAt
    and the termination message (4096 bytes at most; ``FallbackToLogsOnError`` uses the
    last 80 lines / 2048 bytes of the log); podIP and hostIP 127.0.0.1;
    ``activeDeadlineSeconds`` (reason ``DeadlineExceeded``). A missing non-optional
    Secret/ConfigMap/key referenced by env keeps the container waiting with reason
    ``CreateContainerConfigError`` and the kubelet's message (``secret "x" not found``),
    retried every 2 s; one referenced by a volume keeps it ``ContainerCreating`` with a
    ``FailedMount`` event. Events: Started, Killing, Failed, BackOff, FailedMount.

Unpullable images (so tests can produce image-pull failures)
    An image whose reference contains ``does-not-exist``, or whose registry host (the
    first path component, when it has a ``.`` or ``:``) starts with ``invalid.`` or
    ends with ``.invalid``, cannot be pulled: the container waits with reason
    ``ErrImagePull``, then ``ImagePullBackOff`` (message names the image), retried with
    back-off. ``--unpullable REGEX`` (repeatable) replaces that rule.

Deletion
    A pod with a deletionTimestamp gets SIGTERM to each container's process group,
    SIGKILL after ``deletionGracePeriodSeconds``; the final status is reported and the
    pod deleted with grace period 0 (as the kubelet does). A force-deleted pod's
    processes are killed at once. When a container's main process exits, what is left
    of its process group is killed.

Files
    ``<pods-dir>/<ns>_<pod>_<uid>/<container>.log`` holds stdout and stderr of every run
    (kept after deletion; :func:`localcluster.podfiles.pod_log` reads it, and so does
    ``kubectl logs`` through the kubelet API when ``--kubelet-port`` is given).

Not done (differences from a kubelet)
    No images, containers, namespaces, cgroups or resource limits: processes share this
    machine's filesystem, network and users (``securityContext``, ``readOnly`` mounts,
    ``hostNetwork``, ports are ignored; memory limits are not enforced, so
    ``OOMKilled`` only appears for exit code 137). No probes (a running container is
    ready at once), no lifecycle hooks, no sidecar (restartable init) containers, no
    ``enableServiceLinks`` variables. No DNS resolver and no Service networking: the
    only stand-in is the rewrite of ``env`` values that are cluster names (above) to the
    shared loopback address, done once at container start: a name inside a longer value
    (a URL, a list), in ``command``/``args`` (but for a ``$(VAR)`` of a rewritten
    variable) or in a file is not rewritten, a Service created after the container
    started is not seen, and a single-label value that happens to equal a Service name
    of the namespace (``<svc>``) is rewritten too. Two pods listening on the same port
    collide (one loopback). Volumes: no hostPath, PVC, CSI, ephemeral or
    clusterTrustBundle; ConfigMap/Secret volume contents are not updated after start.
    Of the kubelet's HTTPS API only ``/containerLogs`` exists (``kubectl logs``, with
    ``--tail``, ``--limit-bytes``, ``-f``; see :mod:`localcluster.kubelet_server`):
    ``kubectl exec``/``attach``/``port-forward``/``top`` do not work. No eviction, no node pressure, no static pods, no
    ``pods/resize``. An agent restart does not re-adopt running processes: such pods are
    reported Failed (reason ``NodeAgentRestarted``).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import re
import signal
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubernetes.client.exceptions import ApiException
from qlora_trainer import contract

from localcluster.kubeapi import Api, error_message, now_rfc3339
from localcluster.kubelet_server import KubeletServer
from localcluster.nodecontext import NodeContext
from localcluster.podstatus import POD_IP
from localcluster.podworker import PodWorker
from localcluster.procs import MARKER_ENV

log = logging.getLogger("localcluster.node_agent")

LEASE_SECONDS = 40
LEASE_RENEW_S = 10.0
STATUS_EVERY_S = 60.0
DEFAULT_UNPULLABLE = (r"does-not-exist", r"^(invalid\.[^/]*|[^/]*\.invalid(:\d+)?)/")
PASS_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "XDG_CACHE_HOME",
            "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "SSL_CERT_FILE", contract.ENV_LLAMA_CPP_DIR, MARKER_ENV)


def unpullable_rule(patterns: list[str]):
    """A predicate ``image -> bool``: true when any regex of ``patterns`` matches the image."""
    compiled = [re.compile(p) for p in patterns]
    return lambda image: any(p.search(image) for p in compiled)


def pod_environment(pass_env: list[str]) -> dict[str, str]:
    """The base environment of pod processes: listed variables of ours, venv bin first on PATH."""
    env = {k: os.environ[k] for k in list(PASS_ENV) + pass_env if k in os.environ}
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([venv_bin] + [p for p in env.get("PATH", os.defpath).split(os.pathsep)
                                                if p and p != venv_bin])
    return env


class Node:
    """One registered Node: its API identity, heartbeats, pod watch and pod workers."""

    def __init__(self, agent: NodeAgent, name: str, kubeconfig: Path):
        self.agent, self.name = agent, name
        self.api = Api(kubeconfig)
        host_port = self.api.server.split("://", 1)[1]
        host, _, port = host_port.rpartition(":")
        self.ctx = NodeContext(node_name=name, api=self.api, pods_dir=agent.pods_dir,
                               allocatable=agent.capacity, base_env=agent.base_env, unpullable=agent.unpullable,
                               executor=agent.executor, stopping=agent.stopping, service_host=host,
                               service_port=port or "443")
        self.workers: dict[str, PodWorker] = {}
        self.uid = ""

    # ------------------------------------------------------------------ registration
    def node_status(self) -> dict[str, Any]:
        """The Node's status: capacity, Ready and pressure conditions, addresses, nodeInfo."""
        now = now_rfc3339()

        def cond(kind: str, status: str, reason: str, message: str) -> dict[str, str]:
            return {"type": kind, "status": status, "reason": reason, "message": message,
                    "lastHeartbeatTime": now, "lastTransitionTime": self.agent.started_rfc3339}

        return {
            "capacity": self.agent.capacity, "allocatable": self.agent.capacity,
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                cond("Ready", "True", "KubeletReady", "local node agent is posting ready status"),
            ],
            "addresses": [{"type": "InternalIP", "address": POD_IP}, {"type": "Hostname", "address": self.name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.agent.kubelet_port}},
            "nodeInfo": {"machineID": self.agent.machine_id, "systemUUID": self.agent.machine_id,
                         "bootID": self.agent.boot_id, "kernelVersion": platform.release(),
                         "osImage": "qlora local node agent", "containerRuntimeVersion": "local://1",
                         "kubeletVersion": self.agent.kubernetes_version, "kubeProxyVersion": "",
                         "operatingSystem": "linux", "architecture": "amd64"},
        }

    def register(self) -> None:
        """Create the Node (or update an existing one) and mark it Ready."""
        labels = {"kubernetes.io/hostname": self.name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                  **self.agent.labels}
        try:
            node = self.api.create("/api/v1/nodes", {"metadata": {"name": self.name, "labels": labels},
                                                     "spec": {}, "status": self.node_status()})
        except ApiException as exc:
            if exc.status != 409:
                raise
            node = self.api.patch(f"/api/v1/nodes/{self.name}", {"metadata": {"labels": labels}})
        self.uid = node["metadata"]["uid"]
        self.api.patch(f"/api/v1/nodes/{self.name}/status", {"status": self.node_status()})
        self.renew_lease()
        log.info("node %s registered", self.name)

    def renew_lease(self) -> None:
        """Renew (or create) the node's Lease in kube-node-lease."""
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.name}"
        spec = {"holderIdentity": self.name, "leaseDurationSeconds": LEASE_SECONDS,
                "renewTime": now_rfc3339(micro=True)}
        try:
            self.api.patch(path, {"spec": spec})
        except ApiException as exc:
            if exc.status != 404:
                raise
            owner = {"apiVersion": "v1", "kind": "Node", "name": self.name, "uid": self.uid}
            self.api.create("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                            {"metadata": {"name": self.name, "namespace": "kube-node-lease",
                                          "ownerReferences": [owner]}, "spec": spec})

    def heartbeat_loop(self) -> None:
        """Renew the Lease every 10 s and the Ready condition every 60 s until the agent stops."""
        last_status = time.monotonic()
        while not self.agent.stopping.wait(LEASE_RENEW_S):
            try:
                self.renew_lease()
                if time.monotonic() - last_status >= STATUS_EVERY_S:
                    self.api.patch(f"/api/v1/nodes/{self.name}/status", {"status": self.node_status()})
                    last_status = time.monotonic()
            except ApiException as exc:
                if exc.status == 404:  # someone deleted the Node: register again
                    self._try(self.register)
                else:
                    log.warning("node %s: heartbeat failed: %s", self.name, error_message(exc))
            except Exception as exc:  # noqa: BLE001 - keep beating
                log.warning("node %s: heartbeat failed: %s", self.name, exc)

    def _try(self, fn) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            log.warning("node %s: %s failed: %s", self.name, fn.__name__, exc)

    # ------------------------------------------------------------------ pods
    def watch_loop(self) -> None:
        """List and watch the pods bound to this node; feed them to pod workers."""
        selector = f"spec.nodeName={self.name}"
        rv = None
        while not self.agent.stopping.is_set():
            try:
                if rv is None:
                    listing = self.api.get("/api/v1/pods", fieldSelector=selector)
                    rv = listing["metadata"]["resourceVersion"]
                    self._sync(listing["items"])
                for event in self.api.watch("/api/v1/pods", rv, fieldSelector=selector):
                    if self.agent.stopping.is_set():
                        return
                    obj = event["object"]
                    rv = obj["metadata"].get("resourceVersion", rv)
                    if event["type"] != "BOOKMARK":
                        self._dispatch(event["type"], obj)
            except ApiException as exc:
                if exc.status == 410:
                    rv = None
                    continue
                log.warning("node %s: pod watch failed: %s", self.name, error_message(exc))
                self.agent.stopping.wait(1.0)
            except Exception as exc:  # noqa: BLE001 - reconnect
                if not self.agent.stopping.is_set():
                    log.warning("node %s: pod watch failed: %s", self.name, exc)
                    rv = None
                    self.agent.stopping.wait(1.0)

    def _sync(self, pods: list[dict[str, Any]]) -> None:
        seen = {p["metadata"]["uid"] for p in pods}
        for uid in [u for u in self.workers if u not in seen]:
            self.workers.pop(uid).mark_deleted()
        for pod in pods:
            self._dispatch("MODIFIED", pod)

    def _dispatch(self, kind: str, pod: dict[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        worker = self.workers.get(uid)
        if kind == "DELETED":
            if worker is not None:
                self.workers.pop(uid)
                worker.mark_deleted()
            return
        if worker is None:
            worker = PodWorker(self.ctx, pod)
            self.workers[uid] = worker
            worker.start()
        else:
            worker.update(pod)

    def shutdown(self, timeout_s: float) -> None:
        """Stop every pod's processes (the agent is stopping)."""
        for worker in self.workers.values():
            worker.shutdown()
        deadline = time.monotonic() + timeout_s
        for worker in self.workers.values():
            worker.thread.join(max(0.0, deadline - time.monotonic()))


class NodeAgent:
    """Registers the Nodes, keeps them Ready and runs their pods until :meth:`stop`."""

    def __init__(self, nodes: list[tuple[str, Path]], pods_dir: Path, *, cpu: str = "32", memory: str = "256Gi",
                 max_pods: int = 110, gpus: int = 2, gpu_resource: str = "nvidia.com/gpu",
                 labels: dict[str, str] | None = None, unpullable: list[str] | None = None,
                 pass_env: list[str] | None = None, kubernetes_version: str = "v0.0.0",
                 kubelet_api: tuple[int, Path, Path, Path] | None = None):
        self.pods_dir = Path(pods_dir)
        self.pods_dir.mkdir(parents=True, exist_ok=True)
        self.capacity = {"cpu": cpu, "memory": memory, "pods": str(max_pods), "ephemeral-storage": "100Gi"}
        if gpus:
            self.capacity[gpu_resource] = str(gpus)
        self.labels = dict(labels or {})
        if gpus:
            self.labels.setdefault("nvidia.com/gpu.present", "true")
        self.unpullable = unpullable_rule(list(unpullable or DEFAULT_UNPULLABLE))
        self.base_env = pod_environment(list(pass_env or []))
        self.kubernetes_version = kubernetes_version
        self.machine_id = uuid.uuid4().hex
        self.boot_id = str(uuid.uuid4())
        self.started_rfc3339 = now_rfc3339()
        self.stopping = threading.Event()
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="finalize")
        self.nodes = [Node(self, name, kubeconfig) for name, kubeconfig in nodes]
        self.threads: list[threading.Thread] = []
        self.kubelet_port = 10250
        self.kubelet_server: KubeletServer | None = None
        if kubelet_api is not None:
            port, cert, key, client_ca = kubelet_api
            self.kubelet_port = port
            self.kubelet_server = KubeletServer(port, cert, key, client_ca, self.pods_dir, self.container_running,
                                                self.stopping)

    def container_running(self, namespace: str, pod: str, container: str) -> bool:
        """True while the named container of a pod on these nodes runs or may run again."""
        for node in self.nodes:
            for worker in list(node.workers.values()):
                if worker.ns == namespace and worker.name == pod and not worker.finished:
                    return any(c.name == container and c.state != "terminated"
                               for c in worker.inits + worker.containers)
        return False

    def start(self, register_timeout_s: float = 60.0) -> None:
        """Register every Node (retrying until ``register_timeout_s``) and start the loops.

        Raises:
            ApiException / urllib3 errors: a Node could not be registered in time.
        """
        if self.kubelet_server is not None:
            self.kubelet_server.start()
        deadline = time.monotonic() + register_timeout_s
        for node in self.nodes:
            while True:
                try:
                    node.register()
                    break
                except Exception as exc:  # noqa: BLE001 - the API may still be warming up
                    if time.monotonic() > deadline:
                        raise
                    log.info("node %s: registration failed, retrying: %s", node.name, exc)
                    time.sleep(0.5)
        for node in self.nodes:
            for target, label in ((node.heartbeat_loop, "heartbeat"), (node.watch_loop, "watch")):
                thread = threading.Thread(target=target, name=f"{label}-{node.name}", daemon=True)
                thread.start()
                self.threads.append(thread)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the loops and every pod's processes (SIGTERM, SIGKILL after 2 s)."""
        self.stopping.set()
        if self.kubelet_server is not None:
            self.kubelet_server.stop()
        for node in self.nodes:
            node.shutdown(timeout_s)
        self.executor.shutdown(wait=False, cancel_futures=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of ``python -m localcluster.node_agent``."""
    p = argparse.ArgumentParser(prog="python -m localcluster.node_agent", description=__doc__.split("\n")[0])
    p.add_argument("--pods-dir", type=Path, required=True, help="where pod files and logs go")
    p.add_argument("--node", action="append", required=True, metavar="NAME=KUBECONFIG",
                   help="a Node to register and the kubeconfig of its identity (repeatable)")
    p.add_argument("--cpu", default="32", help="cpu capacity of each node")
    p.add_argument("--memory", default="256Gi", help="memory capacity of each node")
    p.add_argument("--max-pods", type=int, default=110, help="pods capacity of each node")
    p.add_argument("--gpus", type=int, default=2, help="GPU capacity of each node")
    p.add_argument("--gpu-resource", default="nvidia.com/gpu", help="extended resource name of GPUs")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="extra node label")
    p.add_argument("--unpullable", action="append", metavar="REGEX",
                   help="images matching this regex fail to pull (replaces the default rule)")
    p.add_argument("--pass-env", action="append", default=[], metavar="NAME",
                   help="also pass this variable of the agent's environment to pods")
    p.add_argument("--kubernetes-version", default="v0.0.0", help="reported as the kubelet version")
    p.add_argument("--kubelet-port", type=int, help="serve the kubelet API (kubectl logs) on 127.0.0.1:PORT")
    p.add_argument("--kubelet-cert", type=Path, help="serving certificate of the kubelet API")
    p.add_argument("--kubelet-key", type=Path, help="its key")
    p.add_argument("--client-ca", type=Path, help="CA that signs the API server's client certificate")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the agent until SIGTERM/SIGINT; returns the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(threadName)s %(message)s")
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    nodes = []
    for spec in args.node:
        name, _, kubeconfig = spec.partition("=")
        nodes.append((name, Path(kubeconfig)))
    labels = dict(item.split("=", 1) for item in args.label)
    agent = NodeAgent(nodes, args.pods_dir, cpu=args.cpu, memory=args.memory, max_pods=args.max_pods,
                      gpus=args.gpus, gpu_resource=args.gpu_resource, labels=labels, unpullable=args.unpullable,
                      pass_env=args.pass_env, kubernetes_version=args.kubernetes_version,
                      kubelet_api=(args.kubelet_port, args.kubelet_cert, args.kubelet_key, args.client_ca)
                      if args.kubelet_port else None)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    agent.start()
    log.info("node agent running for %s", ", ".join(n for n, _ in nodes))
    stop.wait()
    log.info("stopping")
    agent.stop()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
