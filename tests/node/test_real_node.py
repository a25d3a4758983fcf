"""The real node of the local cluster (``LocalCluster(node="real")``): containerd, runc, CNI,
kubelet and kube-proxy, with pods from small images built here (``hack/nodeimages``).

One cluster for the module; the last test stops it and checks that nothing of the node is
left on the machine (processes, mounts, ``cni0``/veths, iptables chains, cgroups, sysctls).
The node's ports are fixed: a taken port 10250 fails at once (first test).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

from helpers import wait_for

pytestmark = pytest.mark.realnode


@pytest.fixture(scope="module")
def node_cluster(tmp_path_factory):
    """A started real-node cluster and what was measured while starting it."""
    from localcluster import LocalCluster, nodeimages, realnode

    # SIGTERM (a CI timeout, a killed run) must still stop the node: it changes host state.
    previous = signal.getsignal(signal.SIGTERM)

    def _terminate(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _terminate)
    before = realnode.read_sysctls()
    host_paths = {p for p in realnode.HOST_PATHS if os.path.lexists(p)}
    cluster = LocalCluster(tmp_path_factory.mktemp("realnode"), node="real", gpus_per_node=2, timeout_s=120)
    try:
        cluster.start()
        print(f"\nreal node cluster up in {cluster.startup_seconds:.1f}s {cluster.timings}", file=sys.stderr)
        t = time.monotonic()
        probe = nodeimages.static_image("probe")
        build_s = time.monotonic() - t
        # containerd's root outlives clusters: drop the probe so that the first import copies it
        subprocess.run(nodeimages.ctr_argv(cluster.containerd_socket, "images", "rm", probe), capture_output=True)
        first = cluster.import_image(probe)
        again = cluster.import_image(probe)
        print(f"probe image {probe}: build/lookup {build_s:.1f}s, import {first.seconds:.2f}s "
              f"(copied: {first.imported}), again {again.seconds:.2f}s (copied: {again.imported})", file=sys.stderr)
        yield {"cluster": cluster, "probe": probe, "imports": (first, again), "sysctls": before,
               "host_paths": host_paths}
    finally:
        leftovers = cluster.stop()
        signal.signal(signal.SIGTERM, previous)
        assert not leftovers, f"the real node left behind: {leftovers}"


def _namespace(cluster) -> str:
    name = f"n-{uuid.uuid4().hex[:10]}"
    cluster.kubectl("create", "namespace", name)
    wait_for(lambda: cluster.kubectl("-n", name, "get", "serviceaccount", "default", check=False).returncode == 0,
             30, f"the default ServiceAccount of {name}")
    return name


def _run_pod(cluster, namespace: str, image: str, args: list[str], security: dict | None = None,
             timeout: float = 90) -> dict:
    """Create a pod running ``/probe ARGS``; wait until it ends; return the pod."""
    name = f"probe-{uuid.uuid4().hex[:6]}"
    container = {"name": "probe", "image": image, "imagePullPolicy": "Never", "command": ["/probe", *args]}
    if security:
        container["securityContext"] = security
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace},
           "spec": {"restartPolicy": "Never", "containers": [container]}}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(pod))

    def ended():
        got = json.loads(cluster.kubectl("-n", namespace, "get", "pod", name, "-o", "json").stdout)
        return got if got["status"].get("phase") in ("Succeeded", "Failed") else None

    return wait_for(ended, timeout, f"pod {namespace}/{name} to end")


def _exit_code(pod: dict) -> int:
    return pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"]


def _logs(cluster, pod: dict) -> str:
    return cluster.kubectl("-n", pod["metadata"]["namespace"], "logs", pod["metadata"]["name"]).stdout


def test_taken_kubelet_port_fails_at_once(tmp_path):
    from localcluster import LocalCluster, realnode

    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("0.0.0.0", 10250))
        holder.listen()
        t = time.monotonic()
        with pytest.raises(realnode.NodeSetupError, match="kubelet 10250"):
            LocalCluster(tmp_path, node="real").start()
        assert time.monotonic() - t < 5


def test_node_ready_on_containerd_with_fake_gpus(node_cluster):
    cluster = node_cluster["cluster"]
    node = json.loads(cluster.kubectl("get", "node", "local-node-0", "-o", "json").stdout)
    ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
    assert ready and ready[0]["status"] == "True"
    assert node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "2"
    addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
    assert addresses["InternalIP"] == cluster.node_ip != "127.0.0.1"


def test_image_import_is_skipped_when_present(node_cluster):
    first, again = node_cluster["imports"]
    assert first.imported and first.image_id == again.image_id
    assert not again.imported  # the same podman image ID is already in containerd


def test_pod_succeeds_with_logs_through_the_kubelet(node_cluster):
    cluster = node_cluster["cluster"]
    ns = _namespace(cluster)
    pod = _run_pod(cluster, ns, node_cluster["probe"], ["hello"])
    assert pod["status"]["phase"] == "Succeeded", pod["status"]
    assert pod["status"]["containerStatuses"][0]["containerID"].startswith("containerd://")
    assert f"hello from {pod['metadata']['name']} uid=0" in _logs(cluster, pod)


def test_read_only_root_as_uid_1000_cannot_write(node_cluster):
    cluster = node_cluster["cluster"]
    ns = _namespace(cluster)
    locked = _run_pod(cluster, ns, node_cluster["probe"], ["write-root"],
                      {"runAsUser": 1000, "runAsNonRoot": True, "readOnlyRootFilesystem": True,
                       "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}})
    assert _exit_code(locked) == 3, locked["status"]
    assert "read-only file system" in _logs(cluster, locked)
    # the same probe as root on a writable root writes: the refusal above is the securityContext's
    open_ = _run_pod(cluster, ns, node_cluster["probe"], ["write-root"])
    assert _exit_code(open_) == 0 and "write succeeded" in _logs(cluster, open_)


def test_kubernetes_service_reachable_with_the_service_account_token(node_cluster):
    cluster = node_cluster["cluster"]
    ns = _namespace(cluster)
    cluster.kubectl("-n", ns, "create", "role", "pod-reader", "--verb=list", "--resource=pods")
    cluster.kubectl("-n", ns, "create", "rolebinding", "pod-reader", "--role=pod-reader",
                    f"--serviceaccount={ns}:default")
    pod = _run_pod(cluster, ns, node_cluster["probe"], ["apiserver"])
    log = _logs(cluster, pod)
    assert pod["status"]["phase"] == "Succeeded", log
    assert f"GET https://10.0.0.1:443/api/v1/namespaces/{ns}/pods: 200 items=1" in log


def test_minio_reachable_from_a_pod(node_cluster):
    cluster = node_cluster["cluster"]
    assert cluster.node_ip in cluster.s3_endpoint
    ns = _namespace(cluster)
    url = f"{cluster.s3_endpoint}/minio/health/live"
    pod = _run_pod(cluster, ns, node_cluster["probe"], ["http", url])
    log = _logs(cluster, pod)
    assert pod["status"]["phase"] == "Succeeded", log
    assert f"GET {url}: 200" in log


def test_cluster_dns_resolves_services_and_a_headless_services_pod_hostname(node_cluster):
    """CoreDNS on the node: a ClusterIP Service by short and full name, the ``kubernetes``
    Service of another namespace, and a pod's ``<hostname>.<subdomain>`` under a headless
    Service (what a trainer group's node 0 is reached by) before that pod is Ready."""
    cluster = node_cluster["cluster"]
    ns = _namespace(cluster)
    peer = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "peer", "namespace": ns, "labels": {"app": "group"}},
            "spec": {"hostname": "group-0", "subdomain": "group", "restartPolicy": "Never",
                     "containers": [{"name": "pause", "image": cluster.pause_image, "imagePullPolicy": "Never",
                                     # never Ready: the name must resolve anyway (publishNotReadyAddresses)
                                     "readinessProbe": {"tcpSocket": {"port": 1}, "periodSeconds": 1}}]}}
    headless = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "group", "namespace": ns},
                "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": {"app": "group"},
                         "ports": [{"name": "rendezvous", "port": 29500}]}}
    plain = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api", "namespace": ns},
             "spec": {"selector": {"app": "none"}, "ports": [{"port": 80}]}}
    cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                         "items": [peer, headless, plain]}))
    peer_ip = wait_for(lambda: cluster.kubectl("-n", ns, "get", "pod", "peer", "-o",
                                               "jsonpath={.status.podIP}").stdout or None, 60, "the peer's IP")
    api_ip = cluster.kubectl("-n", ns, "get", "service", "api", "-o", "jsonpath={.spec.clusterIP}").stdout
    names = ["group-0.group", f"group-0.group.{ns}.svc.cluster.local", "api", f"api.{ns}.svc.cluster.local",
             "kubernetes.default"]
    pod = _run_pod(cluster, ns, node_cluster["probe"], ["dns", *names])
    log = _logs(cluster, pod)
    assert pod["status"]["phase"] == "Succeeded", log
    assert f"group-0.group -> {peer_ip}" in log and f"group-0.group.{ns}.svc.cluster.local -> {peer_ip}" in log
    assert f"api -> {api_ip}" in log and f"api.{ns}.svc.cluster.local -> {api_ip}" in log
    assert "kubernetes.default -> 10.0.0.1" in log
    ready = cluster.kubectl("-n", ns, "get", "pod", "peer", "-o", "jsonpath={.status.containerStatuses[0].ready}")
    assert ready.stdout == "false"


def test_stop_leaves_nothing_behind(node_cluster):
    from localcluster import procs, realnode

    cluster = node_cluster["cluster"]
    ns = _namespace(cluster)  # a pod still running when the cluster stops
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "sleeper", "namespace": ns},
           "spec": {"restartPolicy": "Never", "containers": [
               {"name": "pause", "image": cluster.pause_image, "imagePullPolicy": "Never"}]}}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(pod))
    wait_for(lambda: cluster.kubectl("-n", ns, "get", "pod", "sleeper", "-o",
                                     "jsonpath={.status.phase}").stdout == "Running", 60, "the sleeper pod to run")
    assert realnode.pod_pids() and realnode.bridge_links() and realnode.node_chains()
    t = time.monotonic()
    leftovers = cluster.stop()
    print(f"\nreal node cluster stopped in {time.monotonic() - t:.1f}s", file=sys.stderr)
    assert leftovers == []
    assert procs.marked_pids(cluster.id) == []
    assert realnode.pod_pids() == set()
    assert realnode.bridge_links() == []
    assert list(realnode.NETNS_DIR.glob("cni-*")) == []
    assert list(realnode.CNI_CACHE.glob(f"{realnode.NETWORK_NAME}-*")) == []
    assert {p for p in realnode.HOST_PATHS if os.path.lexists(p)} == node_cluster["host_paths"]
    assert realnode.node_chains() == {}
    assert realnode.mounts_under(cluster.directory) == []
    assert [p for p in realnode.kubepods_dirs()] == []
    after = realnode.read_sysctls()
    changed = {k: (v, after.get(k)) for k, v in node_cluster["sysctls"].items()
               if k not in realnode.NOT_RESTORED and after.get(k) != v}
    assert changed == {}
    for port in realnode.PORTS.values():
        assert procs.port_is_free(port, "0.0.0.0")


def test_cli_up_and_down_with_a_real_node(tmp_path):
    """``python -m localcluster up --node real`` / ``down`` (what ``make cluster-up NODE=real`` /
    ``cluster-down`` run): down, from the state file alone, leaves nothing behind."""
    from localcluster import realnode
    from localcluster.binaries import HACK_DIR

    env = {**os.environ, "PYTHONPATH": str(HACK_DIR)}
    cli = [sys.executable, "-m", "localcluster"]
    up = subprocess.run(cli + ["up", "--node", "real", "--dir", str(tmp_path)], env=env, capture_output=True,
                        text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stderr
        assert "real node at" in up.stdout
        state = json.loads((tmp_path / "state.json").read_text())
        assert state["node"] == "real" and {"containerd", "kubelet", "kube-proxy"} <= set(state["components"])
        status = subprocess.run(cli + ["status", "--dir", str(tmp_path)], env=env, capture_output=True, text=True)
        assert status.returncode == 0, status.stdout
    finally:
        down = subprocess.run(cli + ["down", "--dir", str(tmp_path)], env=env, capture_output=True, text=True,
                              timeout=120)
    assert down.returncode == 0, down.stderr
    assert realnode.bridge_links() == [] and realnode.node_chains() == {} and realnode.kubepods_dirs() == []
    assert realnode.mounts_under(tmp_path) == []
    assert not (tmp_path / "node-host.json").exists()  # sysctls restored, host paths removed
