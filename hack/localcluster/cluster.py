"""Start and stop the local cluster: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and MinIO on random free ports, and (``node="real"``) one real node:
containerd, runc, CNI, the kubelet, kube-proxy and CoreDNS (:mod:`localcluster.realnode`).

Usage::

    with LocalCluster(tmp_dir, node="real", gpus_per_node=2) as cluster:
        cluster.kubectl("get", "nodes")

A cluster without a node (``node="none"``, the default) serves the API and S3 only:
what tests of the API server's checks, of the trainer against S3 and of the operator's
API traffic need. Pods are only ever run by the real kubelet.

Every component runs in its own process group with its log in ``<dir>/logs/``; each
is waited for until healthy (bounded; a failure raises :class:`ClusterStartError`
with the end of the component's log). :meth:`LocalCluster.stop` stops them all
(SIGTERM, then SIGKILL) and then kills anything still carrying the cluster's marker
environment variable (pods included), so nothing is left behind. A cluster started
with ``detach=False`` (the default) is also stopped at interpreter exit.

Files written under ``<dir>``: ``kubeconfig`` (admin, client certificate),
``s3.env`` (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``), ``state.json`` (pids, ports; what ``down`` reads),
``pki/``, ``etcd/``, ``minio/``, ``node/`` (the real node's files).
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import shutil
import ssl
import string
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from localcluster import procs, realnode
from localcluster.binaries import find_binaries, read_versions
from localcluster.certs import Pki, write_pki

SERVICE_CIDR = "10.0.0.0/24"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
S3_REGION = "us-east-1"
STATE_FILE = "state.json"
#: every default-on controller except those that need a cloud provider or node CIDRs.
CONTROLLERS = "*,-cloud-node-lifecycle-controller,-service-lb-controller,-node-route-controller,-node-ipam-controller"
#: the order components stop in (batch, share of the grace period): SIGTERM to a batch, then the next.
STOP_BATCHES = ((("kubelet", "kube-proxy", "coredns"), 1.5), (("containerd",), 0.5),
                (("kube-scheduler", "kube-controller-manager"), 1.0), (("kube-apiserver",), 1.0), (("etcd", "minio"), 1.0))
#: what ``node`` may be: no node (API and S3 only) or one real node.
NODE_KINDS = ("none", "real")
#: HTTP without proxies: everything here is on loopback.
_PLAIN = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ClusterStartError(RuntimeError):
    """A component did not become healthy in time (the message ends with its log's tail)."""


class KubectlError(RuntimeError):
    """kubectl exited non-zero; the message holds its stderr. ``result`` is the CompletedProcess."""

    def __init__(self, message: str, result: subprocess.CompletedProcess):
        super().__init__(message)
        self.result = result


@dataclass
class Component:
    """One started process: its argv, log file, ports, and (pid, start time) identity."""

    name: str
    argv: list[str]
    log: Path
    ports: list[int] = field(default_factory=list)
    pid: int = 0
    started: int | None = None
    proc: subprocess.Popen | None = None

    def alive(self) -> bool:
        """True while the process runs (and is the one we started)."""
        if self.proc is not None and self.proc.poll() is not None:
            return False
        return bool(self.pid) and procs.alive(self.pid, self.started)


def _random_secret(length: int) -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


def _kubeconfig(server: str, ca: Path, cert: Path, key: Path, user: str) -> dict[str, Any]:
    import base64

    def b64(path: Path) -> str:
        return base64.b64encode(path.read_bytes()).decode()

    return {
        "apiVersion": "v1", "kind": "Config", "preferences": {},
        "clusters": [{"name": "qlora-local", "cluster": {"server": server, "certificate-authority-data": b64(ca)}}],
        "users": [{"name": user, "user": {"client-certificate-data": b64(cert), "client-key-data": b64(key)}}],
        "contexts": [{"name": "qlora-local", "context": {"cluster": "qlora-local", "user": user}}],
        "current-context": "qlora-local",
    }


class LocalCluster:
    """A local control plane and S3 server, and optionally one real node, rooted in one directory.

    Args:
        directory: where everything is written (created if missing; runtime data of a
            previous run in it is wiped on :meth:`start`).
        node: ``"none"`` (default): no node, pods stay Pending; ``"real"``: one real node
            (containerd, runc, CNI, kubelet, kube-proxy, CoreDNS; see
            :mod:`localcluster.realnode`) named ``node_name`` with ``gpus_per_node``
            fake ``nvidia.com/gpu`` capacity; the API server binds 0.0.0.0 and advertises
            the node's address, MinIO listens on that address (``s3_endpoint`` uses it).
            Needs root and the fixed ports of :data:`localcluster.realnode.PORTS`.
        node_name: the real node's name.
        gpus_per_node: the real node's ``nvidia.com/gpu`` capacity.
        node_pods: the real node's ``maxPods``.
        s3: start MinIO.
        timeout_s: bound on each component's wait for health, in seconds.
        detach: leave the processes running at interpreter exit (``python -m localcluster up``).

    Attributes after :meth:`start`: ``directory``, ``id`` (the marker value every
    process started carries in ``QLORA_LOCALCLUSTER``), ``kubeconfig`` (Path), ``server`` (https URL),
    ``ca_cert`` (Path), ``kubectl_path``, ``helm_path`` (Paths), ``s3_endpoint``,
    ``s3_access_key``, ``s3_secret_key``, ``s3_region``, ``s3_env`` (Path),
    ``node_names``, ``logs_dir``, ``ports`` (name -> port),
    ``kubernetes_version``, ``startup_seconds`` and ``timings`` (component -> seconds
    until healthy, measured from the start of :meth:`start`).
    """

    def __init__(self, directory: Path | str, *, node: str = "none", node_name: str = "local-node-0",
                 gpus_per_node: int = 2, node_pods: int = 110, s3: bool = True, timeout_s: float = 120.0,
                 detach: bool = False):
        self.directory = Path(directory).absolute()
        if node not in NODE_KINDS:
            raise ValueError(f"node must be one of {', '.join(NODE_KINDS)}, not {node!r}")
        self.node = node
        self.node_names = [node_name] if node == "real" else []
        self.node_ip = "127.0.0.1"
        self.containerd_socket = realnode.containerd_socket(self.directory)
        self.pause_image = ""
        self.gpus_per_node = gpus_per_node
        self.node_pods = node_pods
        self.with_s3 = s3
        self.timeout_s = timeout_s
        self.detach = detach
        self.id = ""
        self.components: dict[str, Component] = {}
        self.ports: dict[str, int] = {}
        self.kubeconfig = self.directory / "kubeconfig"
        self.s3_env = self.directory / "s3.env"
        self.logs_dir = self.directory / "logs"
        self.ca_cert = self.directory / "pki" / "ca.crt"
        self.server = ""
        self.kubectl_path = Path()
        self.helm_path = Path()
        self.s3_endpoint = ""
        self.s3_access_key = ""
        self.s3_secret_key = ""
        self.s3_region = S3_REGION
        self.kubernetes_version = read_versions()["KUBERNETES_VERSION"]
        self.startup_seconds = 0.0
        self.timings: dict[str, float] = {}
        self.swept: list[int] = []
        self._pki: Pki | None = None
        self._stopped = True
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- lifecycle
    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> LocalCluster:
        """Start every component and wait until each is healthy. Returns self.

        Raises:
            ClusterStartError: a component exited or was not healthy within ``timeout_s``
                (everything started so far is stopped first).
            localcluster.binaries.BinariesError: the binaries could not be had.
            localcluster.realnode.NodeSetupError: ``node="real"`` cannot run here (a fixed
                port taken, not root, packages missing); raised before anything starts.
            localcluster.nodeimages.ImageError: the pause image could not be built or imported.
        """
        t0 = time.monotonic()
        needed = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
        if self.node == "real":
            needed += ("kubelet", "kube-proxy", "coredns")
            realnode.check_ports()
            realnode.ensure_packages(log=self._log)
            self.node_ip = realnode.node_ip()
            from localcluster import nodeimages

            self.pause_image = nodeimages.static_image("pause", log=self._log)
            self.timings["pause-image"] = round(time.monotonic() - t0, 2)
        bins = find_binaries(names=needed + (("minio",) if self.with_s3 else ()))
        self.kubectl_path, self.helm_path = bins["kubectl"], bins["helm"]
        self._prepare_directory()
        self.id = uuid.uuid4().hex[:16]
        self._stopped = False
        if not self.detach:
            atexit.register(self.stop)
        names = ["etcd-client", "etcd-peer", "apiserver", "controller-manager", "scheduler", "s3", "s3-console"]
        self.ports = dict(zip(names, procs.free_ports(len(names))))
        self.server = f"https://127.0.0.1:{self.ports['apiserver']}"
        try:
            extra_ips = (self.node_ip,) if self.node == "real" else ()
            self._pki = write_pki(self.directory / "pki", tuple(self.node_names), extra_ips)
            self._write_kubeconfigs()
            self._start("etcd", self._etcd_argv(bins["etcd"]), ["etcd-client", "etcd-peer"])
            if self.with_s3:
                self._start_minio(bins["minio"])
            self._wait("etcd", self._etcd_healthy, t0)
            self._start("kube-apiserver", self._apiserver_argv(bins["kube-apiserver"]), ["apiserver"])
            self._wait("kube-apiserver", self._apiserver_healthy, t0)
            self._start("kube-controller-manager", self._kcm_argv(bins["kube-controller-manager"]),
                        ["controller-manager"])
            self._start("kube-scheduler", self._scheduler_argv(bins["kube-scheduler"]), ["scheduler"])
            self._wait("kube-controller-manager", lambda: self._https_ok(self.ports["controller-manager"]), t0)
            self._wait("kube-scheduler", lambda: self._https_ok(self.ports["scheduler"]), t0)
            if self.with_s3:
                self._wait("minio", self._minio_healthy, t0)
            if self.node == "real":
                self._start_real_node(bins, t0)
            self.startup_seconds = round(time.monotonic() - t0, 2)
            self._write_state()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, grace_s: float = 10.0) -> list[str]:
        """Stop everything this cluster started; idempotent.

        Components stop in batches (:data:`STOP_BATCHES`: the kubelet, kube-proxy and
        CoreDNS first; then, on a real node, its pods' processes are killed and their
        containers deleted before containerd stops; etcd last, so the API server can shut
        down cleanly): SIGTERM to each
        process group, SIGKILL after ``grace_s`` seconds; finally every process still
        carrying the cluster's marker is killed. Returns descriptions of processes that
        survived all that (normally an empty list). ``swept`` lists the pids the final
        sweep had to kill (processes that escaped their process group). A real node then
        gets :func:`localcluster.realnode.cleanup` (mounts, network devices and namespaces,
        iptables chains, cgroups, sysctls); what it could not remove is listed too.
        """
        with self._lock:
            if self._stopped:
                return []
            self._stopped = True
        leftovers: list[str] = []
        for names, grace in STOP_BATCHES:
            if names == ("containerd",) and "containerd" in self.components:
                alive = realnode.kill_pod_processes()  # the kubelet is gone: nothing restarts them
                leftovers += [f"pod process {pid}" for pid in sorted(alive)]
                if self.components["containerd"].alive():
                    kept = realnode.remove_containers(self.containerd_socket)
                    leftovers += [f"containerd container {cid}" for cid in kept]
            batch = [self.components[n] for n in names if n in self.components]
            alive = procs.stop_groups([(c.pid, c.started) for c in batch if c.pid], grace * grace_s)
            for c in batch:
                if c.proc is not None:
                    try:
                        c.proc.wait(timeout=1)
                    except subprocess.TimeoutExpired:
                        pass
            leftovers += [f"{c.name} (pid {c.pid})" for c in batch if c.pid in alive]
        if self.id:
            self.swept = procs.marked_pids(self.id)
            if self.swept:
                print(f"localcluster: killing {len(self.swept)} stray process(es) of cluster {self.id}: {self.swept}",
                      file=sys.stderr)
            leftovers += [f"pid {pid} carrying {procs.MARKER_ENV}={self.id}" for pid in procs.kill_marked(self.id)]
        if self.node == "real":
            leftovers += realnode.cleanup(self.directory)
        try:
            atexit.unregister(self.stop)
        except Exception:  # pragma: no cover - interpreter shutting down
            pass
        state = self.directory / STATE_FILE
        if state.exists():
            state.unlink()
        return leftovers

    @classmethod
    def attach(cls, directory: Path | str) -> LocalCluster:
        """A handle on a cluster started (detached) earlier in ``directory``, from its state file.

        Raises:
            FileNotFoundError: no state file (nothing was started there, or it was stopped).
        """
        directory = Path(directory).absolute()
        state = json.loads((directory / STATE_FILE).read_text())
        node = state.get("node", "none")
        cluster = cls(directory, node=node if node in NODE_KINDS else "none",
                      node_name=(state["node_names"] or ["local-node-0"])[0], gpus_per_node=state["gpus_per_node"],
                      s3=state["s3"], detach=True)
        cluster.node_names = state["node_names"]
        cluster.node_ip = state.get("node_ip", "127.0.0.1")
        cluster.id = state["id"]
        cluster.ports = state["ports"]
        cluster.server = state["server"]
        cluster.kubectl_path, cluster.helm_path = Path(state["kubectl"]), Path(state["helm"])
        cluster.s3_endpoint = state["s3_endpoint"]
        cluster.s3_access_key, cluster.s3_secret_key = state["s3_access_key"], state["s3_secret_key"]
        cluster.startup_seconds = state.get("startup_seconds", 0.0)
        for name, c in state["components"].items():
            cluster.components[name] = Component(name, c["argv"], Path(c["log"]), c["ports"], c["pid"], c["started"])
        cluster._stopped = False
        return cluster

    # ----------------------------------------------------------------- helpers for users
    def kubectl(self, *args: str, check: bool = True, input: str | None = None,
                timeout_s: float = 120.0) -> subprocess.CompletedProcess:
        """Run kubectl with the admin kubeconfig; returns the CompletedProcess (text).

        Raises:
            KubectlError: exit status non-zero and ``check`` is true.
            subprocess.TimeoutExpired: it ran longer than ``timeout_s`` seconds.
        """
        argv = [str(self.kubectl_path), "--kubeconfig", str(self.kubeconfig), *args]
        result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout_s)
        if check and result.returncode != 0:
            raise KubectlError(f"kubectl {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}",
                               result)
        return result

    def api(self):
        """A :class:`localcluster.kubeapi.Api` (plain JSON dicts) authenticated as the cluster admin."""
        from localcluster.kubeapi import Api

        return Api(self.kubeconfig)

    def api_client(self):
        """A new ``kubernetes.client.ApiClient`` authenticated as the cluster admin."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def s3_client(self):
        """A new boto3 S3 client for the MinIO server (path-style addressing)."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.s3_endpoint, aws_access_key_id=self.s3_access_key,
                            aws_secret_access_key=self.s3_secret_key, region_name=self.s3_region,
                            config=Config(s3={"addressing_style": "path"}))

    def s3_environ(self) -> dict[str, str]:
        """The S3 settings as environment variables (the contents of ``s3.env``)."""
        return {"AWS_ENDPOINT_URL": self.s3_endpoint, "AWS_ACCESS_KEY_ID": self.s3_access_key,
                "AWS_SECRET_ACCESS_KEY": self.s3_secret_key, "AWS_DEFAULT_REGION": self.s3_region}

    def pids(self) -> dict[str, int]:
        """Component name -> pid."""
        return {name: c.pid for name, c in self.components.items()}

    def leftover_pids(self) -> list[int]:
        """Live processes carrying this cluster's marker (components, pods and their children)."""
        return procs.marked_pids(self.id) if self.id else []

    def healthy(self) -> dict[str, bool]:
        """Component name -> whether its process runs and (for the apiserver) answers /readyz."""
        result = {name: c.alive() for name, c in self.components.items()}
        if result.get("kube-apiserver"):
            result["kube-apiserver"] = self._apiserver_healthy()
        return result

    # ----------------------------------------------------------------- internals
    @staticmethod
    def _log(message: str) -> None:
        print(f"localcluster: {message}", file=sys.stderr)

    def _start_real_node(self, bins: dict[str, Path], t0: float) -> None:
        """Start CoreDNS, containerd, the kubelet and kube-proxy (the control plane is up); wait
        until the node is Ready with its fake GPUs, kube-proxy has synced and CoreDNS is ready."""
        from localcluster import nodeimages

        pki = self._pki
        assert pki is not None
        name = self.node_names[0]
        self.ports.update(realnode.PORTS)
        # `kubectl logs`/`exec`: the API server's kubelet client may use the real kubelet's API
        self.kubectl("create", "clusterrolebinding", "qlora-local:kubelet-api-admin",
                     "--clusterrole=system:kubelet-api-admin", "--user=kube-apiserver-kubelet-client")
        self.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                             "items": realnode.COREDNS_RBAC}))
        realnode.record_host(self.directory)
        realnode.write_files(self.directory, node_name=name, address=self.node_ip, pause_image=self.pause_image,
                             ca_cert=pki.ca_cert, serving_cert=pki.kubelet_cert, serving_key=pki.kubelet_key,
                             max_pods=self.node_pods)
        self.ports["dns-ready"] = procs.free_ports(1)[0]
        corefile = realnode.write_corefile(self.directory, address=self.node_ip,
                                           kubeconfig=Path(self._component_kubeconfig("coredns")),
                                           ready_port=self.ports["dns-ready"])
        self._start("coredns", realnode.coredns_argv(bins["coredns"], corefile), ["dns", "dns-ready"])
        self._start("containerd", realnode.containerd_argv(self.directory), [])
        self._wait("containerd", self._containerd_healthy, t0)
        stale = realnode.remove_containers(self.containerd_socket)  # a crashed run's, in the kept root
        if stale:
            raise ClusterStartError(f"containerd still lists containers of an earlier run: {stale}")
        imported = nodeimages.import_image(self.pause_image, self.containerd_socket, log=self._log)
        self.timings["pause-import"] = imported.seconds
        self._start("kubelet", realnode.kubelet_argv(bins["kubelet"], self.directory,
                                                     Path(self._component_kubeconfig("node-" + name)), name,
                                                     self.node_ip), ["kubelet", "kubelet-healthz"])
        self._start("kube-proxy", realnode.kube_proxy_argv(bins["kube-proxy"],
                                                           Path(self._component_kubeconfig("kube-proxy")), name),
                    ["kube-proxy-metrics", "kube-proxy-healthz"])
        self._wait("kubelet", self._nodes_ready, t0)
        gpus = {"nvidia.com/gpu": str(self.gpus_per_node)}
        self.kubectl("patch", "node", name, "--subresource=status", "--type=merge",
                     "-p", json.dumps({"status": {"capacity": gpus, "allocatable": gpus}}))
        self._wait("kube-proxy", self._kube_proxy_healthy, t0)
        self._wait("coredns", self._coredns_ready, t0)

    def _containerd_healthy(self) -> bool:
        from localcluster import nodeimages

        argv = nodeimages.ctr_argv(self.containerd_socket, "version")
        return subprocess.run(argv, capture_output=True, timeout=10).returncode == 0

    def _coredns_ready(self) -> bool:
        with _PLAIN.open(f"http://127.0.0.1:{self.ports['dns-ready']}/ready", timeout=2) as resp:
            return resp.status == 200

    def _kube_proxy_healthy(self) -> bool:
        url = f"http://127.0.0.1:{realnode.PORTS['kube-proxy-healthz']}/healthz"
        with _PLAIN.open(url, timeout=2) as resp:
            return resp.status == 200

    def import_image(self, ref: str):
        """Import the podman image ``ref`` into the real node's containerd (skipped when the same
        image ID is there); returns :class:`localcluster.nodeimages.Imported`.

        Raises:
            RuntimeError: the cluster has no real node.
            localcluster.nodeimages.ImageError: podman lacks the image, or the import failed.
        """
        from localcluster import nodeimages

        if self.node != "real":
            raise RuntimeError("import_image needs a cluster started with node='real'")
        return nodeimages.import_image(ref, self.containerd_socket, log=self._log)

    def _prepare_directory(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for sub in ("pki", "etcd", "minio", "run"):
            shutil.rmtree(self.directory / sub, ignore_errors=True)
        self.logs_dir.mkdir(exist_ok=True)

    def _env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env[procs.MARKER_ENV] = self.id
        env.update(extra or {})
        return env

    def _start(self, name: str, argv: list[str], port_names: list[str], env: dict[str, str] | None = None) -> None:
        log = self.logs_dir / f"{name}.log"
        with open(log, "a") as f:
            f.write(f"==== {time.strftime('%Y-%m-%dT%H:%M:%S')} starting: {' '.join(argv)}\n")
        proc = procs.spawn(argv, log, self._env(env), cwd=self.directory)
        self.components[name] = Component(name, argv, log, [self.ports[p] for p in port_names],
                                          proc.pid, procs.start_time(proc.pid), proc)
        self._write_state()  # at once, so that `down` finds whatever a failed `up` left running

    def _wait(self, name: str, healthy: Callable[[], bool], t0: float) -> None:
        """Poll ``healthy`` until true; raise ClusterStartError when the process exits or time runs out."""
        component = self.components[name]
        deadline = time.monotonic() + self.timeout_s
        last_error = "never answered"
        while True:
            if not component.alive():
                code = component.proc.poll() if component.proc else None
                raise ClusterStartError(f"{name} exited (status {code}) before it was healthy; "
                                        f"last lines of {component.log}:\n{procs.tail(component.log)}")
            try:
                if healthy():
                    self.timings[name] = round(time.monotonic() - t0, 2)
                    return
                last_error = "not healthy yet"
            except Exception as exc:  # noqa: BLE001 - any failure means "not yet"
                last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise ClusterStartError(f"{name} not healthy after {self.timeout_s:.0f}s ({last_error}); "
                                        f"last lines of {component.log}:\n{procs.tail(component.log)}")
            time.sleep(0.1)

    def _client_ssl(self) -> ssl.SSLContext:
        pki = self.directory / "pki"
        ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        return ctx

    def _api_get(self, path: str) -> Any:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                             urllib.request.HTTPSHandler(context=self._client_ssl()))
        with opener.open(self.server + path, timeout=5) as resp:
            body = resp.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body.decode()

    def _etcd_healthy(self) -> bool:
        url = f"http://127.0.0.1:{self.ports['etcd-client']}/health"
        with _PLAIN.open(url, timeout=2) as resp:
            return json.loads(resp.read()).get("health") == "true"

    def _apiserver_healthy(self) -> bool:
        try:
            return self._api_get("/readyz") == "ok"
        except (urllib.error.URLError, OSError):
            return False

    @staticmethod
    def _https_ok(port: int) -> bool:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # self-signed serving certs of the controller-manager/scheduler
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx))
        with opener.open(f"https://127.0.0.1:{port}/healthz", timeout=2) as resp:
            return resp.status == 200

    def _minio_healthy(self) -> bool:
        with _PLAIN.open(f"{self.s3_endpoint}/minio/health/ready", timeout=2) as resp:
            return resp.status == 200

    def _nodes_ready(self) -> bool:
        nodes = {n["metadata"]["name"]: n for n in self._api_get("/api/v1/nodes")["items"]}
        for name in self.node_names:
            node = nodes.get(name)
            if node is None:
                return False
            ready = [c for c in node.get("status", {}).get("conditions", []) if c["type"] == "Ready"]
            if not ready or ready[0]["status"] != "True":
                return False
            if any(t["key"] == "node.kubernetes.io/not-ready" for t in node.get("spec", {}).get("taints") or []):
                return False
        return True

    def _write_kubeconfigs(self) -> None:
        assert self._pki is not None
        ca = self._pki.ca_cert
        (self.directory / "run").mkdir(exist_ok=True)
        for role, (cert, key) in self._pki.clients.items():
            user = role.replace(":", "-")
            path = self.kubeconfig if role == "admin" else self.directory / "pki" / f"{user}.kubeconfig"
            path.write_text(yaml.safe_dump(_kubeconfig(self.server, ca, cert, key, user), sort_keys=False))
            path.chmod(0o600)

    def _etcd_argv(self, etcd: Path) -> list[str]:
        client, peer = (f"http://127.0.0.1:{self.ports[p]}" for p in ("etcd-client", "etcd-peer"))
        return [str(etcd), "--name", "default", "--data-dir", str(self.directory / "etcd"),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"default={peer}", "--initial-cluster-state", "new",
                "--unsafe-no-fsync", "--log-level", "warn"]

    def _apiserver_argv(self, binary: Path) -> list[str]:
        pki = self._pki
        assert pki is not None
        return [str(binary),
                f"--etcd-servers=http://127.0.0.1:{self.ports['etcd-client']}",
                # a real node's pods reach it through the `kubernetes` Service at the node's address
                f"--bind-address={'0.0.0.0' if self.node == 'real' else '127.0.0.1'}",
                f"--advertise-address={self.node_ip}",
                f"--secure-port={self.ports['apiserver']}",
                f"--cert-dir={self.directory / 'run' / 'apiserver'}",
                f"--tls-cert-file={pki.apiserver_cert}", f"--tls-private-key-file={pki.apiserver_key}",
                f"--client-ca-file={pki.ca_cert}",
                # front-proxy settings no one uses, so that delegated authentication is complete
                f"--requestheader-client-ca-file={pki.ca_cert}", "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User", "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                "--authorization-mode=Node,RBAC",
                f"--service-account-issuer={SA_ISSUER}",
                f"--service-account-key-file={pki.sa_pub}",
                f"--service-account-signing-key-file={pki.sa_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true",
                # kubectl logs/exec: the API server calls the kubelet's API at the node's InternalIP
                "--kubelet-preferred-address-types=InternalIP",
                f"--kubelet-certificate-authority={pki.ca_cert}",
                f"--kubelet-client-certificate={pki.clients['apiserver-kubelet-client'][0]}",
                f"--kubelet-client-key={pki.clients['apiserver-kubelet-client'][1]}",
                "--profiling=false"]

    def _component_kubeconfig(self, role: str) -> str:
        return str(self.directory / "pki" / f"{role}.kubeconfig")

    def _kcm_argv(self, binary: Path) -> list[str]:
        pki = self._pki
        assert pki is not None
        kc = self._component_kubeconfig("controller-manager")
        return [str(binary), f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}",
                f"--authorization-kubeconfig={kc}",
                "--bind-address=127.0.0.1", f"--secure-port={self.ports['controller-manager']}",
                f"--cert-dir={self.directory / 'run' / 'controller-manager'}",
                "--leader-elect=false", "--use-service-account-credentials=true",
                f"--service-account-private-key-file={pki.sa_key}", f"--root-ca-file={pki.ca_cert}",
                f"--cluster-signing-cert-file={pki.ca_cert}", f"--cluster-signing-key-file={pki.ca_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                f"--controllers={CONTROLLERS}", "--cluster-name=qlora-local", "--profiling=false",
                # the default client rate limit (20/s) makes the ~40 controllers start one by one
                "--kube-api-qps=200", "--kube-api-burst=400"]

    def _scheduler_argv(self, binary: Path) -> list[str]:
        kc = self._component_kubeconfig("scheduler")
        return [str(binary), f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}",
                f"--authorization-kubeconfig={kc}",
                "--bind-address=127.0.0.1", f"--secure-port={self.ports['scheduler']}",
                f"--cert-dir={self.directory / 'run' / 'scheduler'}",
                "--leader-elect=false", "--profiling=false", "--kube-api-qps=200", "--kube-api-burst=400"]

    def _start_minio(self, binary: Path) -> None:
        self.s3_access_key, self.s3_secret_key = _random_secret(20), _random_secret(40)
        self.s3_endpoint = f"http://{self.node_ip}:{self.ports['s3']}"  # the node IP: pods reach it
        data = self.directory / "minio"
        data.mkdir(parents=True, exist_ok=True)
        argv = [str(binary), "server", str(data), "--address", f"{self.node_ip}:{self.ports['s3']}",
                "--console-address", f"127.0.0.1:{self.ports['s3-console']}", "--quiet"]
        env = {"MINIO_ROOT_USER": self.s3_access_key, "MINIO_ROOT_PASSWORD": self.s3_secret_key,
               "MINIO_BROWSER": "off", "MINIO_UPDATE": "off", "MINIO_REGION": S3_REGION}
        self._start("minio", argv, ["s3", "s3-console"], env)
        self.s3_env.write_text("".join(f"{k}={v}\n" for k, v in self.s3_environ().items()))
        self.s3_env.chmod(0o600)

    def _write_state(self) -> None:
        state = {
            "id": self.id, "server": self.server, "ports": self.ports, "node_names": self.node_names,
            "gpus_per_node": self.gpus_per_node, "s3": self.with_s3,
            "node": self.node, "node_ip": self.node_ip,
            "kubectl": str(self.kubectl_path), "helm": str(self.helm_path),
            "s3_endpoint": self.s3_endpoint, "s3_access_key": self.s3_access_key,
            "s3_secret_key": self.s3_secret_key, "startup_seconds": self.startup_seconds,
            "components": {n: {"pid": c.pid, "started": c.started, "argv": c.argv, "log": str(c.log),
                               "ports": c.ports} for n, c in self.components.items()},
        }
        path = self.directory / STATE_FILE
        path.write_text(json.dumps(state, indent=2))
        path.chmod(0o600)
