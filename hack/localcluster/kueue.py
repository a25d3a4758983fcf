"""Kueue in the local cluster, on demand: a host process with the admin kubeconfig.

Usage::

    with LocalCluster(tmp_dir) as cluster, Kueue(cluster) as kueue:
        cluster.kubectl("apply", "-f", "queues.yaml")

:meth:`Kueue.start` installs Kueue's CRDs (``config/components/crd/bases`` of the
``sigs.k8s.io/kueue`` Go module the binary was built from, ``kubectl apply
--server-side``), writes a serving certificate for ``127.0.0.1`` signed by the cluster
CA (the one the API server's is signed with, :mod:`localcluster.certs`), starts
``kueue`` with a configuration file (:func:`configuration`: internal cert management
off, ``manageJobsWithoutQueueName: false``, the ``batch/job`` integration only) and
registers its Mutating/ValidatingWebhookConfigurations with ``url:`` clientConfigs
pointing at the host process (the local API server runs on the host). Only the webhooks
of the ``batch`` and ``kueue.x-k8s.io`` groups are registered. :meth:`Kueue.stop`
deletes the webhook configurations first (so no Job create hangs on a stopped webhook),
then stops the process (SIGTERM, SIGKILL after the grace period). The CRDs and Kueue
objects stay (they are harmless without Kueue; the cluster's etcd is wiped on its next
start).

The process carries the cluster's marker environment variable, so
:meth:`LocalCluster.stop` also ends it if :meth:`Kueue.stop` was never called.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from localcluster import procs
from localcluster.binaries import find_binaries, read_versions
from localcluster.certs import issue

#: the webhooks registered: those whose rules name one of these API groups.
WEBHOOK_GROUPS = frozenset({"batch", "kueue.x-k8s.io"})
#: names of the registered webhook configurations (Kueue's own, without a kustomize prefix).
MUTATING_NAME = "qlora-local-kueue-mutating"
VALIDATING_NAME = "qlora-local-kueue-validating"
#: where Kueue (internal cert management off) reads its metrics server's certificate; fixed in its main.go.
METRICS_CERT_DIR = Path("/etc/kueue/metrics/certs")


class KueueStartError(RuntimeError):
    """Kueue did not become ready in time (the message ends with its log's tail)."""


def module_dir(version: str | None = None) -> Path:
    """The ``sigs.k8s.io/kueue@<version>`` directory in the Go module cache (downloaded if missing).

    Raises:
        subprocess.CalledProcessError: ``go mod download`` failed.
    """
    version = version or read_versions()["KUEUE_VERSION"]
    out = subprocess.run(["go", "mod", "download", "-json", f"sigs.k8s.io/kueue@{version}"],
                         capture_output=True, text=True, check=True, timeout=600, cwd="/")
    return Path(json.loads(out.stdout)["Dir"])


def configuration(*, webhook_port: int, cert_dir: Path, health_port: int, metrics_port: int,
                  wait_for_pods_ready: bool = False) -> dict[str, Any]:
    """Kueue's ``config.kueue.x-k8s.io/v1beta2`` Configuration for the local cluster.

    Everything binds 127.0.0.1; leader election is off (one replica); the internal cert
    rotator is off (:class:`Kueue` writes ``tls.crt``/``tls.key`` into ``cert_dir``);
    only Jobs labelled ``kueue.x-k8s.io/queue-name`` are managed. ``wait_for_pods_ready``
    turns on all-or-nothing admission with a 5 minute timeout (off by default: the
    stand-in node runs a pod within seconds).
    """
    config: dict[str, Any] = {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration",
        "namespace": "kueue-system",
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": f"127.0.0.1:{metrics_port}"},
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        # the on-demand visibility API server reads its certificate from a fixed /visibility
        # (pkg/visibility/server.go) and needs an APIService: not used here.
        "featureGates": {"VisibilityOnDemand": False},
        "manageJobsWithoutQueueName": False,
        "clientConnection": {"qps": 50, "burst": 100},
        "integrations": {"frameworks": ["batch/job"]},
    }
    if wait_for_pods_ready:
        config["waitForPodsReady"] = {"timeout": "5m", "blockAdmission": False}
    return config


def webhook_configurations(manifests: list[dict[str, Any]], base_url: str, ca_pem: bytes) -> list[dict[str, Any]]:
    """Kueue's webhook configurations (its ``config/components/webhook/manifests.yaml``)
    rewritten for a host process: ``clientConfig.url = base_url + path`` with ``caBundle``,
    only the webhooks of :data:`WEBHOOK_GROUPS`, renamed to :data:`MUTATING_NAME` /
    :data:`VALIDATING_NAME`."""
    import base64

    names = {"MutatingWebhookConfiguration": MUTATING_NAME, "ValidatingWebhookConfiguration": VALIDATING_NAME}
    out = []
    for doc in manifests:
        if not doc or doc.get("kind") not in names:
            continue
        hooks = []
        for hook in doc.get("webhooks") or []:
            groups = {g for rule in hook.get("rules") or [] for g in rule.get("apiGroups") or []}
            if not groups & WEBHOOK_GROUPS:
                continue
            path = hook["clientConfig"]["service"]["path"]
            hook = dict(hook, clientConfig={"url": base_url + path, "caBundle": base64.b64encode(ca_pem).decode()})
            hooks.append(hook)
        out.append({"apiVersion": doc["apiVersion"], "kind": doc["kind"],
                    "metadata": {"name": names[doc["kind"]]}, "webhooks": hooks})
    return out


class Kueue:
    """Kueue running as a host process for one started :class:`localcluster.LocalCluster`.

    Args:
        cluster: a started cluster (its ``pki/ca.{crt,key}`` sign the webhook certificate).
        wait_for_pods_ready: see :func:`configuration`.
        timeout_s: bound on the wait for readiness (CRDs established, /readyz, webhooks
            answering), in seconds.

    Attributes after :meth:`start`: ``version``, ``log`` (Path), ``pid``, ``ports``
    (name -> port), ``startup_seconds``.
    """

    def __init__(self, cluster, *, wait_for_pods_ready: bool = False, timeout_s: float = 120.0):
        self.cluster = cluster
        self.wait_for_pods_ready = wait_for_pods_ready
        self.timeout_s = timeout_s
        self.version = read_versions()["KUEUE_VERSION"]
        self.directory = Path(cluster.directory) / "kueue"
        self.log = Path(cluster.logs_dir) / "kueue.log"
        self.ports: dict[str, int] = {}
        self.pid = 0
        self.startup_seconds = 0.0
        self._proc: subprocess.Popen | None = None
        self._started: int | None = None

    def __enter__(self) -> Kueue:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Kueue:
        """Install the CRDs, start Kueue, register its webhooks; wait until it admits. Returns self.

        Raises:
            localcluster.binaries.BinariesError: the kueue binary could not be had.
            KueueStartError: Kueue exited or was not ready within ``timeout_s``.
            localcluster.cluster.KubectlError: the CRDs or webhooks could not be applied.
        """
        t0 = time.monotonic()
        binary = find_binaries(names=("kueue",))["kueue"]
        mod = module_dir(self.version)
        self.cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f",
                             str(mod / "config" / "components" / "crd" / "bases"), timeout_s=300)
        crds = [f"crd/{p}.kueue.x-k8s.io" for p in ("workloads", "clusterqueues", "localqueues", "resourceflavors",
                                                     "workloadpriorityclasses")]
        for attempt in range(20):  # `kubectl wait` errors out while a new CRD has no conditions yet
            done = self.cluster.kubectl("wait", "--for=condition=Established", "--timeout=30s", *crds, check=False)
            if done.returncode == 0:
                break
            time.sleep(0.5)
        else:
            raise KueueStartError(f"Kueue's CRDs not established: {done.stderr.strip()}")
        self.cluster.kubectl("create", "namespace", "kueue-system", check=False)
        self.directory.mkdir(parents=True, exist_ok=True)
        cert_dir = self.directory / "certs"
        cert_dir.mkdir(exist_ok=True)
        ca_pem = self._write_serving_cert(cert_dir)
        self._write_metrics_cert(cert_dir)
        self.ports = dict(zip(("webhook", "health", "metrics"), procs.free_ports(3)))
        config_path = self.directory / "config.yaml"
        config_path.write_text(yaml.safe_dump(configuration(
            webhook_port=self.ports["webhook"], cert_dir=cert_dir, health_port=self.ports["health"],
            metrics_port=self.ports["metrics"],
            wait_for_pods_ready=self.wait_for_pods_ready), sort_keys=False))
        argv = [str(binary), f"--config={config_path}", f"--kubeconfig={self.cluster.kubeconfig}",
                "--zap-log-level=info"]
        with open(self.log, "a") as f:
            f.write(f"==== {time.strftime('%Y-%m-%dT%H:%M:%S')} starting: {' '.join(argv)}\n")
        env = dict(os.environ, **{procs.MARKER_ENV: self.cluster.id})
        self._proc = procs.spawn(argv, self.log, env, cwd=self.directory)
        self.pid, self._started = self._proc.pid, procs.start_time(self._proc.pid)
        try:
            self._wait(self._ready, "readyz", t0)
            manifests = list(yaml.safe_load_all((mod / "config" / "components" / "webhook" / "manifests.yaml")
                                                .read_text()))
            base = f"https://127.0.0.1:{self.ports['webhook']}"
            docs = webhook_configurations(manifests, base, ca_pem)
            self.cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                        "items": docs}))
            self._wait(self._webhooks_answer, "webhooks", t0)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = round(time.monotonic() - t0, 2)
        return self

    def stop(self, grace_s: float = 10.0) -> bool:
        """Delete the webhook configurations, then stop the process. Idempotent.

        Returns True when the process is gone (it was stopped or never ran).
        """
        if self.cluster.id and self._proc is not None:
            for kind, name in (("mutatingwebhookconfiguration", MUTATING_NAME),
                               ("validatingwebhookconfiguration", VALIDATING_NAME)):
                self.cluster.kubectl("delete", kind, name, "--ignore-not-found", check=False)
        if not self.pid:
            return True
        alive = procs.stop_groups([(self.pid, self._started)], grace_s)
        if self._proc is not None:
            try:
                self._proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        gone = self.pid not in alive
        self.pid, self._proc = 0, None
        return gone

    # ----------------------------------------------------------------- internals
    def _write_serving_cert(self, cert_dir: Path) -> bytes:
        pki = Path(self.cluster.directory) / "pki"
        ca_pem = (pki / "ca.crt").read_bytes()
        ca_cert = x509.load_pem_x509_certificate(ca_pem)
        ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), password=None)
        pair = issue(ca_key, ca_cert, "kueue-webhook", dns_names=("localhost",), ip_addresses=("127.0.0.1",),
                     server=True, client=False)
        (cert_dir / "tls.crt").write_bytes(pair.cert_pem)
        key = cert_dir / "tls.key"
        key.write_bytes(pair.key_pem)
        key.chmod(0o600)
        return ca_pem

    @staticmethod
    def _write_metrics_cert(cert_dir: Path) -> None:
        """Kueue v0.17 without its cert rotator reads the metrics server's certificate from the
        fixed :data:`METRICS_CERT_DIR` (cmd/kueue/main.go): put the webhook's pair there
        (written atomically; any valid pair serves, so clusters side by side may share it).

        Raises:
            KueueStartError: the directory cannot be written (Kueue needs root here).
        """
        try:
            METRICS_CERT_DIR.mkdir(parents=True, exist_ok=True)
            for name in ("tls.crt", "tls.key"):
                tmp = METRICS_CERT_DIR / f".{name}.{os.getpid()}"
                tmp.write_bytes((cert_dir / name).read_bytes())
                tmp.chmod(0o600)
                os.replace(tmp, METRICS_CERT_DIR / name)
        except OSError as err:
            raise KueueStartError(f"cannot write Kueue's metrics certificate into {METRICS_CERT_DIR}: {err}") from err

    def _wait(self, check, what: str, t0: float) -> None:
        deadline = t0 + self.timeout_s
        last = "never answered"
        while True:
            if self._proc is None or self._proc.poll() is not None:
                code = self._proc.poll() if self._proc else None
                raise KueueStartError(f"kueue exited (status {code}) before {what}; last lines of {self.log}:\n"
                                      f"{procs.tail(self.log)}")
            try:
                if check():
                    return
                last = "not ready yet"
            except Exception as exc:  # noqa: BLE001 - any failure means "not yet"
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise KueueStartError(f"kueue not ready ({what}) after {self.timeout_s:.0f}s ({last}); "
                                      f"last lines of {self.log}:\n{procs.tail(self.log)}")
            time.sleep(0.2)

    def _ready(self) -> bool:
        import urllib.request

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{self.ports['health']}/readyz", timeout=2) as resp:
            return resp.status == 200

    def _webhooks_answer(self) -> bool:
        """A server-side dry run of a ResourceFlavor goes through Kueue's mutating webhook."""
        flavor = {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor",
                  "metadata": {"name": "qlora-local-probe"}, "spec": {}}
        result = self.cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(flavor),
                                      check=False, timeout_s=15)
        return result.returncode == 0
